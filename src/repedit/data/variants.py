"""Run-time robustness variants that the datasets do not store: scrambled subjects and
long-context passages.

Both are drawn from a ``random.Random`` seeded by a stable hash of (seed, key, ...), never
from global state, so a case gets the same variants in every process, for every method, and
regardless of the order cases are visited. ``key`` is normally the case id.

The tokenizer arguments are duck-typed on the Hugging Face interface:
``tokenizer(text, add_special_tokens=False)["input_ids"]`` and ``tokenizer.decode(ids)``.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections.abc import Sequence
from itertools import permutations
from pathlib import Path
from typing import Any, Literal, TypeVar

T = TypeVar("T")

_HEADING = re.compile(r"^\s*(=+)\s.*\s\1\s*$")
"""A WikiText heading line such as `` = Valkyria Chronicles = `` or `` = = Plot = = ``."""

_EXHAUSTIVE_UP_TO = 8
"""Up to this many tokens all T! orders are listed and sampled; beyond, orders are drawn."""


def stable_rng(*parts: object) -> random.Random:
    """A generator seeded from a SHA-256 of ``parts`` (Python's ``hash`` is salted per process)."""
    digest = hashlib.sha256("\x1f".join(repr(p) for p in parts).encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def split_half(xs: Sequence[T]) -> tuple[list[T], list[T]]:
    """In-domain / held-out halves of a variant list: the first ceil(n/2), and the rest.

    This is how REP splits scrambled subjects (a 2-token subject has one scramble, which is
    in-domain, and no held-out one).
    """
    k = math.ceil(len(xs) / 2)
    return list(xs[:k]), list(xs[k:])


def _token_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _normalise(text: str) -> str:
    return " ".join(text.split())


def scrambled_subjects(
    subject: str, tokenizer: Any, *, n_max: int = 10, seed: int = 0, key: str = ""
) -> list[str]:
    """Distinct reorderings of the subject's tokens, as text (REP's "scrambled subject" test).

    Each token is decoded on its own, so byte-level or SentencePiece markers (``Ġ``, ``▁``)
    never reach the text, and the pieces are joined and whitespace-normalised. The identity
    order and any order whose text equals the subject (or the identity's text) are excluded; at most
    ``min(n_max, T! - 1)`` are returned, fewer if orders collapse to the same text. Subjects of
    fewer than two tokens have no scramble.
    """
    ids = _token_ids(tokenizer, subject)
    t = len(ids)
    if t < 2 or n_max <= 0:
        return []
    pieces = [tokenizer.decode([i]) for i in ids]
    identity = tuple(range(t))
    rng = stable_rng("scramble", seed, key, subject)
    want = min(n_max, math.factorial(t) - 1)
    if t <= _EXHAUSTIVE_UP_TO:
        orders: list[tuple[int, ...]] = [p for p in permutations(range(t)) if p != identity]
        rng.shuffle(orders)
    else:
        orders = _random_orders(t, want, rng, identity)
    out: list[str] = []
    # Orders that only swap equal pieces reproduce the subject (or, for tokenizers whose
    # single-token decode drops the leading space, its unspaced form): not a scramble.
    seen = {_normalise(subject), _normalise("".join(pieces))}
    for order in orders:
        text = _normalise("".join(pieces[j] for j in order))
        if text and text not in seen:
            seen.add(text)
            out.append(text)
            if len(out) == want:
                break
    return out


def _random_orders(
    t: int, want: int, rng: random.Random, identity: tuple[int, ...]
) -> list[tuple[int, ...]]:
    """Distinct random non-identity orders of ``t`` items, for ``t`` too large to enumerate."""
    found: dict[tuple[int, ...], None] = {}
    attempts = 0
    while len(found) < 4 * want and attempts < 100 * want:
        attempts += 1
        order = list(range(t))
        rng.shuffle(order)
        tup = tuple(order)
        if tup != identity:
            found.setdefault(tup)
    return list(found)


class PassageSampler:
    """Cuts fixed-length passages from a corpus, for REP's long-context test.

    The paper prepends random 512-token WikiText-103 segments; the released code uses 300
    words of consecutive WikiText rows. Both are expressible here via ``length`` and ``unit``.
    Heading lines and empty lines are dropped first, and braces removed, so a passage can
    never be mistaken for the ``{}`` subject slot.
    """

    def __init__(
        self,
        text: str | Path,
        *,
        length: int = 512,
        unit: Literal["tokens", "words"] = "tokens",
        tokenizer: Any = None,
        seed: int = 0,
    ) -> None:
        if unit not in ("tokens", "words"):
            raise ValueError(f"unit must be 'tokens' or 'words', got {unit!r}")
        if unit == "tokens" and tokenizer is None:
            raise ValueError("unit='tokens' needs a tokenizer")
        if length <= 0:
            raise ValueError(f"length must be positive, got {length}")
        if isinstance(text, Path):
            text = text.read_text(encoding="utf-8")
        self.length = length
        self.unit = unit
        self.tokenizer = tokenizer
        self.seed = seed
        lines = [
            _normalise(ln.replace("{", " ").replace("}", " "))
            for ln in text.splitlines()
            if ln.strip() and not _HEADING.match(ln)
        ]
        lines = [ln for ln in lines if ln]
        if unit == "words":
            self._units: list[Any] = " ".join(lines).split()
        else:
            self._units = _chunked_ids(tokenizer, lines)
        if len(self._units) < length:
            raise ValueError(
                f"corpus has {len(self._units)} {unit}, fewer than one passage of {length}"
            )

    @classmethod
    def from_file(cls, path: str | Path, **kwargs: Any) -> PassageSampler:
        """Same as passing ``Path(path)``; spelled out because a str is taken as text."""
        return cls(Path(path), **kwargs)

    def passages(self, key: str, count: int) -> list[str]:
        """``count`` contiguous passages of exactly ``length`` units, from seeded random starts.

        The same (seed, key) gives the same passages; key is normally the case id, with a
        suffix to tell apart the training and test draws.
        """
        rng = stable_rng("passage", self.seed, self.unit, self.length, key)
        last = len(self._units) - self.length
        return [self._render(rng.randint(0, last)) for _ in range(count)]

    def _render(self, start: int) -> str:
        window = self._units[start : start + self.length]
        if self.unit == "words":
            return " ".join(window)
        text = _normalise(self.tokenizer.decode(window))
        return text.replace("{", "").replace("}", "")


def _chunked_ids(tokenizer: Any, lines: list[str], chunk_chars: int = 8000) -> list[int]:
    """Token ids of the lines joined by single spaces, encoded a few KB at a time.

    Chunks break only between lines and carry the joining space, so the ids match encoding the
    whole text for tokenizers that split words at spaces, without one huge call (and without
    the "sequence longer than the model's maximum" warning that HF tokenizers print).
    """
    ids: list[int] = []
    buf: list[str] = []
    size = 0
    for line in [*lines, None]:
        if line is not None:
            buf.append(line)
            size += len(line) + 1
        if buf and (line is None or size >= chunk_chars):
            chunk = " ".join(buf)
            ids.extend(_token_ids(tokenizer, chunk if not ids else " " + chunk))
            buf, size = [], 0
    return ids


def long_context_prompt(passage: str, prompt_text: str) -> str:
    """The long-context probe: the passage, one space, then the (filled-in) prompt."""
    return passage + " " + prompt_text

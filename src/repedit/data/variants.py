"""A case's surface forms as typed :class:`Variant` values, built by one function,
:func:`case_variants`, for the three users: the evaluation probes, the key analysis and REP's
training pool. Also the run-time generators the datasets do not store: scrambled subjects and
long-context passages.

Halves: ``edit`` is the edit prompt itself; ``train`` forms are those REP may train on (the
in-domain subject paraphrases, the first half of the scrambles, REP's own passages); ``heldout``
forms are evaluation only. No ``train`` form ever has the text of a ``heldout`` form of the same
case (compared after whitespace normalisation): :func:`training_forms` drops a colliding one.

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
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import permutations
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

from repedit.data.case import EditCase
from repedit.data.loaders import DATA_ENV, passage_corpus

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


def normalise(text: str) -> str:
    """Whitespace collapsed to single spaces, ends stripped: how variant texts are compared."""
    return " ".join(text.split())


_normalise = normalise


def escape_braces(text: str) -> str:
    """``text`` made literal for ``str.format`` (a template's text around its ``{}`` slot)."""
    return text.replace("{", "{{").replace("}", "}}")


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


class PassageSettings(Protocol):
    """What a passage sampler is built from (both the suite's and REP's configs have it)."""

    long_context_corpus: str | None
    long_context_length: int
    long_context_unit: Any
    seed: int


def passage_sampler(
    tokenizer: Any, settings: PassageSettings, *, purpose: str, strict: bool = False
) -> PassageSampler | None:
    """The passage sampler ``settings`` describe, or None with a warning naming ``purpose``
    when no corpus is found (or, unless ``strict``, when the one found is unusable).

    Tokenising a corpus takes a moment: build one sampler per run and pass it on.
    """
    path, where = passage_corpus(settings.long_context_corpus)
    if path is None:
        warnings.warn(
            f"long-context corpus not found ({where}); {purpose} without passages. "
            f"Set {DATA_ENV} or pass a text file as the long-context corpus.",
            stacklevel=3,
        )
        return None
    try:
        return PassageSampler.from_file(
            path,
            length=settings.long_context_length,
            unit=settings.long_context_unit,
            tokenizer=tokenizer,
            seed=settings.seed,
        )
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        if strict:
            raise
        warnings.warn(
            f"long-context corpus {path} unusable ({exc}); {purpose} without passages",
            stacklevel=3,
        )
        return None


# --------------------------------------------------------------------------- typed variants

VariantKind = Literal[
    "original",
    "prompt_paraphrase",
    "subject_paraphrase",
    "ood_subject_paraphrase",
    "scrambled_subject",
    "long_context",
]
Half = Literal["edit", "train", "heldout"]

VARIANT_KINDS: tuple[VariantKind, ...] = (
    "original",
    "prompt_paraphrase",
    "subject_paraphrase",
    "ood_subject_paraphrase",
    "scrambled_subject",
    "long_context",
)
"""Every kind, in the order :func:`case_variants` lists them."""

#: the seed suffixes of the two passage draws: evaluation probes and REP's training forms
TEST_PASSAGES = "test"
TRAIN_PASSAGES = "rep-train"


@dataclass(frozen=True)
class Variant:
    """One surface form of a case: a complete text whose ``subject_span`` (character offsets)
    holds the subject form ``subject``, or None when the subject cannot be pointed at (a
    rephrased prompt that words the subject differently).

    ``index`` numbers the forms of a kind as the evaluation records them (``meta["index"]``:
    subject paraphrases count on from the in-domain ones into the held-out ones, scrambles
    across both halves). ``half``: see the module docstring.
    """

    kind: VariantKind
    text: str
    subject_span: tuple[int, int] | None
    half: Half
    index: int
    subject: str

    @property
    def template(self) -> str:
        """The text with ``{}`` in place of the subject and other braces escaped."""
        if self.subject_span is None:
            raise ValueError(f"{self.kind} variant {self.text!r} has no subject span")
        a, b = self.subject_span
        return escape_braces(self.text[:a]) + "{}" + escape_braces(self.text[b:])


def fill(template: str, subject: str) -> tuple[str, tuple[int, int]]:
    """``template.format(subject)`` and the subject's character span in it."""
    head = template.partition("{}")[0].replace("{{", "{").replace("}}", "}")
    return template.format(subject), (len(head), len(head) + len(subject))


def _in_template(kind: VariantKind, template: str, subject: str, half: Half, index: int) -> Variant:
    text, span = fill(template, subject)
    return Variant(kind, text, span, half, index, subject)


def _prompt_paraphrases(case: EditCase) -> list[Variant]:
    """The dataset's rephrased prompts, whitespace-normalised, without repeats or the edit
    prompt itself; the subject span is its first verbatim occurrence, if any."""
    subject = case.request.subject
    seen = {normalise(case.request.text)}
    out = []
    for i, raw in enumerate(case.prompt_paraphrases):
        text = normalise(raw)
        if not text or text in seen:
            continue
        seen.add(text)
        at = text.find(subject)
        span = (at, at + len(subject)) if at >= 0 else None
        out.append(Variant("prompt_paraphrase", text, span, "heldout", i, subject))
    return out


def _passages(
    case: EditCase, sampler: PassageSampler | None, key: str, draw: str, n: int, half: Half
) -> list[Variant]:
    if sampler is None or n <= 0:
        return []
    req = case.request
    out = []
    for i, passage in enumerate(sampler.passages(f"{key}:{draw}", n)):
        template = escape_braces(passage) + " " + req.prompt
        out.append(_in_template("long_context", template, req.subject, half, i))
    return out


def case_variants(
    case: EditCase,
    tokenizer: Any,
    *,
    key: str,
    seed: int = 0,
    scramble_max: int = 10,
    sampler: PassageSampler | None = None,
    passages: int = 1,
    train_passages: int = 0,
) -> list[Variant]:
    """Every surface form of ``case``, in :data:`VARIANT_KINDS` order.

    ``key`` (normally the case id) and ``seed`` seed the scrambles and passages, so each user
    sees the same forms. ``passages`` held-out long-context forms are drawn with
    :data:`TEST_PASSAGES`, ``train_passages`` training ones with :data:`TRAIN_PASSAGES`.
    REP takes its forms through :func:`training_forms`, which keeps the halves apart.
    """
    req = case.request
    n_id = len(case.id_paraphrases)
    train_scr, held_scr = split_half(
        scrambled_subjects(req.subject, tokenizer, n_max=scramble_max, seed=seed, key=key)
    )
    scrambles: list[tuple[str, Half]] = [(s, "train") for s in train_scr]
    scrambles += [(s, "heldout") for s in held_scr]
    out = [
        _in_template("original", req.prompt, req.subject, "edit", 0),
        *_prompt_paraphrases(case),
        *(
            _in_template("subject_paraphrase", req.prompt, s, "train", i)
            for i, s in enumerate(case.id_paraphrases)
        ),
        *(
            _in_template("ood_subject_paraphrase", req.prompt, s, "heldout", n_id + i)
            for i, s in enumerate(case.ood_paraphrases)
        ),
        *(
            _in_template("scrambled_subject", req.prompt, s, half, i)
            for i, (s, half) in enumerate(scrambles)
        ),
        *_passages(case, sampler, key, TEST_PASSAGES, passages, "heldout"),
        *_passages(case, sampler, key, TRAIN_PASSAGES, train_passages, "train"),
    ]
    return out


def training_forms(variants: Sequence[Variant]) -> list[Variant]:
    """The ``train`` forms whose text is no ``heldout`` form's (after whitespace normalisation).

    A subject with few token orders, or a scramble that happens to spell a held-out paraphrase,
    so gets fewer training forms, never one the evaluation also holds out.
    """
    heldout = {normalise(v.text) for v in variants if v.half == "heldout"}
    return [v for v in variants if v.half == "train" and normalise(v.text) not in heldout]


# --------------------------------------------------------------------------- look-alikes


#: function words that make no two subjects look alike
_FUNCTION_WORDS = frozenset(
    {
        "the",
        "and",
        "for",
        "von",
        "van",
        "der",
        "den",
        "des",
        "del",
        "della",
        "les",
        "los",
        "las",
        "une",
        "und",
        "with",
        "from",
    }
)


class NearSubjects:
    """Other cases of a dataset whose subject looks like a given one, so that an edit of the one
    must leave the other alone: they share a subword token of at least ``min_chars``
    characters (the subject tokenised bare and after a space), or a word beginning of
    ``prefix_chars`` characters (Slovakia and Slovenia: ``slov``). Function words do not count.
    Only cases with a true answer (``target_true``) can serve.
    """

    def __init__(
        self,
        cases: Sequence[EditCase],
        tokenizer: Any,
        *,
        min_chars: int = 3,
        prefix_chars: int = 4,
    ):
        self.min_chars = min_chars
        self.prefix_chars = prefix_chars
        self._tok = tokenizer
        self._cases = [c for c in cases if c.request.target_true]
        self._pieces = [self.pieces(c.request.subject) for c in self._cases]
        self._subjects: frozenset[str] | None = None

    @property
    def cases(self) -> tuple[EditCase, ...]:
        """The cases that can serve as look-alikes (those with a true answer)."""
        return tuple(self._cases)

    @property
    def subjects(self) -> frozenset[str]:
        """Every subject a look-alike can have, whitespace-normalised and case-folded: what a
        generated training form must never equal."""
        if self._subjects is None:
            self._subjects = frozenset(normalise(c.request.subject).casefold() for c in self._cases)
        return self._subjects

    def pieces(self, subject: str) -> frozenset[str]:
        """The subject's token texts and word beginnings (case-folded) that can be shared."""
        out = set()
        for form in (subject, " " + subject):
            for i in _token_ids(self._tok, form):
                piece = self._tok.decode([i]).strip().casefold()
                if len(piece) >= self.min_chars:
                    out.add(piece)
        for word in subject.casefold().split():
            if len(word) >= self.prefix_chars:
                out.add(word[: self.prefix_chars] + "…")
        return frozenset(out - _FUNCTION_WORDS)

    def lookalikes(
        self, case: EditCase, n: int, *, key: str = "", seed: int = 0
    ) -> list[tuple[EditCase, list[str]]]:
        """Up to ``n`` other cases whose subject shares pieces with ``case``'s, most shared
        characters first (ties in a seeded order), with the shared pieces.

        A case with the same subject, or with one of ``case``'s subject paraphrases as its
        subject, is not a look-alike: the edit should reach it.
        """
        own = {normalise(s).casefold() for s in [case.request.subject, *case.subject_paraphrases]}
        mine = self.pieces(case.request.subject)
        found: list[tuple[int, float, EditCase, list[str]]] = []
        rng = stable_rng("near", seed, key)
        for other, theirs in zip(self._cases, self._pieces, strict=True):
            if normalise(other.request.subject).casefold() in own:
                continue
            shared = sorted(mine & theirs)
            if shared:
                found.append((-sum(map(len, shared)), rng.random(), other, shared))
        found.sort(key=lambda f: (f[0], f[1]))
        return [(other, shared) for _, _, other, shared in found[:n]]

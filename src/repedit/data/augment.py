"""Generated surface forms of a subject, for training REP on forms the dataset does not store.

Each kind rewrites the subject one way (``Steve Jobs`` as the example):

* ``case``: ``steve jobs``, ``STEVE JOBS``, ``Steve Jobs`` capitalised word by word;
* ``spacing``: a space removed (``SteveJobs``), hyphens for spaces (``Steve-Jobs``), a space
  inside a word (``Ste ve Jobs``);
* ``punct``: the subject in quotes or brackets, or followed / preceded by a punctuation mark
  (``"Steve Jobs"``, ``Steve Jobs,``);
* ``noise``: one typo, never in a word's first letter: adjacent letters swapped (``Stvee``),
  a letter dropped (``Stve``) or doubled (``Stteve``);
* ``determiner``: ``the Steve Jobs``, ``The Steve Jobs``;
* ``initials`` (several words): ``S. Jobs``, ``S Jobs``, acronyms ``SJ`` and ``S.J.``;
* ``truncate`` (several words): leading words dropped (``Jobs``);
* ``span`` (several tokens): a contiguous run of the subject's tokens, shorter than the whole
  (``Ste``, ``ve Jobs`` for tokens ``Ste|ve| Jobs``), so each of its tokens is trained as the
  last one a key is read at, in its own order. A strict part of the token sequence is never a
  reordering of all of it.

A form is an :class:`AugmentForm`: the text around the subject (quotes, punctuation, a
determiner) is kept apart from the subject's own rewrite, so a trainer can read the key at the
subject's last token rather than at a closing quote.

**No leakage.** A form is dropped when, after whitespace normalisation and case folding, it
equals an evaluation probe's subject or text of the same case (subject paraphrases of both
halves, scrambles of both halves, held-out texts such as long-context passages) or one of the
caller's ``exclude`` subjects (the dataset's look-alike subjects), and when it is a reordering
of the subject's tokens or words: reorderings are the scramble test's distribution, which the
held-out half of the scrambles must not see. Forms are drawn from a generator seeded by
(seed, key, subject, kind), so a case gets the same forms in every process.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from repedit.data.variants import Variant, escape_braces, normalise, stable_rng

AugmentKind = Literal[
    "case", "spacing", "punct", "noise", "determiner", "initials", "truncate", "span"
]
AUGMENT_KINDS: tuple[str, ...] = get_args(AugmentKind)

#: variant kinds whose subject is an evaluation probe's subject (the original subject is not)
_PROBE_SUBJECT_KINDS = ("subject_paraphrase", "ood_subject_paraphrase", "scrambled_subject")
#: (prefix, suffix) pairs that ``punct`` puts around the subject
_WRAPS = (('"', '"'), ("'", "'"), ("(", ")"), ("", ","), ("", ":"), ("", "."), ("", ";"),
          ("", "!"), ("- ", ""), (": ", ""))  # fmt: skip
_DETERMINERS = ("the ", "The ")
#: the least share of the subject's letters and digits a ``span`` form keeps
SPAN_SHARE = 0.4
#: words left out of an acronym's capitals and never the first word of a truncation
_MINOR_WORDS = frozenset({"of", "the", "and", "de", "la", "le", "von", "van", "der", "in", "for"})


@dataclass(frozen=True)
class AugmentForm:
    """One generated form: ``prefix + core + suffix``; ``core`` is the rewritten subject whose
    last token carries the key, ``prefix``/``suffix`` the text placed around it."""

    kind: str
    core: str
    prefix: str = ""
    suffix: str = ""

    @property
    def text(self) -> str:
        return self.prefix + self.core + self.suffix

    def wrap(self, template: str) -> str:
        """``template`` (one ``{}`` slot) with the prefix and suffix around the slot."""
        return template.replace(
            "{}", escape_braces(self.prefix) + "{}" + escape_braces(self.suffix), 1
        )


def fold(text: str) -> str:
    """Whitespace-normalised and case-folded: how forms are compared with probes."""
    return normalise(text).casefold()


def parse_kinds(kinds: str | Iterable[str]) -> tuple[str, ...]:
    """``"case,noise"`` or an iterable as a tuple of known kinds (ValueError names the rest)."""
    items = kinds.split(",") if isinstance(kinds, str) else list(kinds)
    out = tuple(dict.fromkeys(k.strip() for k in items if k.strip()))
    unknown = [k for k in out if k not in AUGMENT_KINDS]
    if unknown:
        raise ValueError(f"unknown augment kind(s) {unknown}; choose from {list(AUGMENT_KINDS)}")
    return out


# --------------------------------------------------------------------------- generators


def _case(words: list[str]) -> list[AugmentForm]:
    subject = " ".join(words)
    titled = " ".join(w[:1].upper() + w[1:] for w in words)
    return [AugmentForm("case", s) for s in (subject.lower(), subject.upper(), titled)]


def _spacing(words: list[str]) -> list[AugmentForm]:
    out = []
    for i in range(1, len(words)):  # one space removed
        out.append(" ".join([*words[: i - 1], words[i - 1] + words[i], *words[i + 1 :]]))
    if len(words) > 1:
        out += ["".join(words), "-".join(words)]
    for i, w in enumerate(words):  # a space inside a word, never after its first letter
        for j in range(2, len(w) - 1):
            if w[j - 1].isalpha() and w[j].isalpha():
                out.append(" ".join([*words[:i], w[:j] + " " + w[j:], *words[i + 1 :]]))
    return [AugmentForm("spacing", s) for s in out]


def _punct(words: list[str]) -> list[AugmentForm]:
    core = " ".join(words)
    return [AugmentForm("punct", core, a, b) for a, b in _WRAPS]


def _noise(words: list[str]) -> list[AugmentForm]:
    out = []
    for i, w in enumerate(words):
        edits = []
        for j in range(1, len(w)):
            if not w[j].isalpha():
                continue
            edits.append(w[:j] + w[j + 1 :])  # dropped
            edits.append(w[:j] + w[j] + w[j:])  # doubled
            if j + 1 < len(w) and w[j + 1].isalpha() and w[j + 1] != w[j]:
                edits.append(w[:j] + w[j + 1] + w[j] + w[j + 2 :])  # swapped
        out += [" ".join([*words[:i], e, *words[i + 1 :]]) for e in edits if e]
    return [AugmentForm("noise", s) for s in out]


def _determiner(words: list[str]) -> list[AugmentForm]:
    if words and words[0].casefold() in ("the", "a", "an"):
        return []
    return [AugmentForm("determiner", " ".join(words), d) for d in _DETERMINERS]


def _initials(words: list[str]) -> list[AugmentForm]:
    if len(words) < 2 or not all(w[:1].isalpha() for w in words):
        return []
    head, last = words[:-1], words[-1]
    out = [
        " ".join([*(w if w.casefold() in _MINOR_WORDS else w[0] + dot for w in head), last])
        for dot in (".", "")
    ]
    major = [w for w in words if w.casefold() not in _MINOR_WORDS] or words
    if len(major) > 1:
        caps = [w[0].upper() for w in major]
        out += ["".join(caps), "".join(f"{c}." for c in caps)]
    return [AugmentForm("initials", s) for s in out]


def _truncate(words: list[str]) -> list[AugmentForm]:
    out = []
    for i in range(1, len(words)):
        rest = words[i:]
        if rest[0].casefold() not in _MINOR_WORDS:
            out.append(AugmentForm("truncate", " ".join(rest)))
    return out


_GENERATORS = {
    "case": _case,
    "spacing": _spacing,
    "punct": _punct,
    "noise": _noise,
    "determiner": _determiner,
    "initials": _initials,
    "truncate": _truncate,
}


def _spans(tokenizer: Any, subject: str) -> list[AugmentForm]:
    """Contiguous runs of the subject's tokens, shorter than the whole, decoded and stripped,
    that keep at least :data:`SPAN_SHARE` of the subject's letters and digits (a fragment such
    as ``of`` or ``ia`` is no form of the subject: the gate would learn to open on it)."""
    ids = tokenizer(normalise(subject), add_special_tokens=False)["input_ids"]
    need = SPAN_SHARE * sum(c.isalnum() for c in subject)
    out = []
    for length in range(1, len(ids)):
        for start in range(len(ids) - length + 1):
            text = normalise(tokenizer.decode(ids[start : start + length]))
            if sum(c.isalnum() for c in text) >= max(need, 1) and fold(text) not in _MINOR_WORDS:
                out.append(AugmentForm("span", text))
    return out


def candidates(subject: str, kind: str, tokenizer: Any = None) -> list[AugmentForm]:
    """Every form of ``kind`` for ``subject``, in a fixed order, before any filtering
    (``span`` needs the ``tokenizer``)."""
    if kind == "span":
        if tokenizer is None:
            raise ValueError("augment kind 'span' needs the tokenizer")
        return _spans(tokenizer, subject)
    if kind not in _GENERATORS:
        raise ValueError(f"unknown augment kind {kind!r}; choose from {list(AUGMENT_KINDS)}")
    return _GENERATORS[kind](normalise(subject).split())


# --------------------------------------------------------------------------- filtering


def _pieces(tokenizer: Any, subject: str) -> list[str]:
    """The subject's tokens as text, whitespace removed and case-folded (empty ones dropped)."""
    ids = tokenizer(subject, add_special_tokens=False)["input_ids"]
    out = ["".join(tokenizer.decode([i]).split()).casefold() for i in ids]
    return [p for p in out if p]


def _concatenates(text: str, pieces: Counter[str]) -> bool:
    """Whether ``text`` is the concatenation, in some order, of exactly the ``pieces``."""
    if not text:
        return not +pieces
    for piece in [p for p, n in pieces.items() if n > 0]:
        if text.startswith(piece):
            pieces[piece] -= 1
            found = _concatenates(text[len(piece) :], pieces)
            pieces[piece] += 1
            if found:
                return True
    return False


def is_reordering(form: str, subject: str, pieces: Sequence[str]) -> bool:
    """Whether ``form`` reorders the subject's words or its tokens (``pieces``, as
    :func:`_pieces` gives them), ignoring whitespace and case. The subject's own order, with
    its spaces or case changed, is not a reordering."""
    words, own = fold(form).split(), fold(subject).split()
    if words != own and sorted(words) == sorted(own):
        return True
    flat = "".join(words)
    if flat == "".join(own):
        return False
    return _concatenates(flat, Counter(pieces))


def probe_texts(variants: Sequence[Variant]) -> set[str]:
    """The folded subjects and texts a case's evaluation probes (or training forms) hold,
    which no generated form may equal. The original subject is not among them."""
    out = {fold(v.subject) for v in variants if v.kind in _PROBE_SUBJECT_KINDS}
    out |= {fold(v.text) for v in variants if v.half != "edit"}
    return out


@dataclass(frozen=True)
class Forbidden:
    """The folded texts no form of ``subject`` may equal: ``probes`` (:func:`probe_texts`) and
    ``others``, other cases' subjects (the evaluation's look-alikes), less the subject itself:
    a look-alike never has the edited subject's own text."""

    subject: str
    probes: Container[str]
    others: Container[str] = frozenset()

    def __contains__(self, text: object) -> bool:
        if text in self.probes:
            return True
        return text in self.others and text != fold(self.subject)


def augment_forms(
    subject: str,
    kinds: Sequence[str],
    n: int,
    *,
    tokenizer: Any,
    seed: int = 0,
    key: str = "",
    forbidden: Container[str] = (),
) -> list[AugmentForm]:
    """Up to ``n`` forms of each kind, in a seeded order, none of which is the subject, a
    reordering of it, another kind's form, or (folded) in ``forbidden``.

    ``forbidden``: folded texts (:func:`fold`), e.g. a :class:`Forbidden` of the case's
    probes and the dataset's look-alike subjects.
    """
    pieces = _pieces(tokenizer, subject)
    seen = {normalise(subject)}
    out: list[AugmentForm] = []
    for kind in kinds:
        pool = candidates(subject, kind, tokenizer)
        stable_rng("augment", seed, key, subject, kind).shuffle(pool)
        taken = 0
        for form in pool:
            if taken >= n:
                break
            text = normalise(form.text)
            if not normalise(form.core) or text in seen or fold(text) in forbidden:
                continue
            if is_reordering(text, subject, pieces):
                continue
            seen.add(text)
            out.append(form)
            taken += 1
    return out

"""REP's training data for an edit: token sequences and the position whose key is trained.

For each request the pool holds (positives: the subject-last key should align with the edit)

* the editor's context templates × {original subject (bare template excluded), the in-domain
  subject paraphrases (the first ``case.id_split``), the first half of the scrambles};
* ``n_long`` long-context examples ``passage + " " + prompt`` with the original subject: the
  the paper's released code built these but never trained on them;

and, apart from the pool, the bare original prompt, which goes into *every* batch (its key
``k_o`` anchors the consistency loss). With ``negatives`` the pool also holds negative
sequences (every token a gate negative): other subjects in the edit's templates, the case's
neighbourhood prompts, general-text passages. Batches are drawn without repetition.

Scrambles and passages use the same seeded generators as the evaluation suite
(:func:`repedit.data.scrambled_subjects` keyed by the case key; passages keyed
``"<key>:rep-train"``, disjoint from the test draw ``"<key>:test"``), so the in-domain scrambles
REP trains on are exactly the ones the suite labels ``half="id"``.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from repedit.data.case import EditCase, EditRequest
from repedit.data.loaders import DATA_ENV, passage_corpus
from repedit.data.variants import PassageSampler, scrambled_subjects, split_half
from repedit.errors import InvalidRequestError
from repedit.models.tokens import Position, locate, subject_span, subject_token_index
from repedit.rep.adapter import RepConfig

#: kinds whose ``position`` token is a positive (the gate should open, the key align)
POSITIVE_KINDS = ("prompt", "original", "paraphrase", "scramble", "long")
#: kinds whose every token is a negative
NEGATIVE_KINDS = ("subject_negative", "neighbourhood", "text")


@dataclass(frozen=True)
class RepExample:
    """One training or probing sequence.

    ``position``: index (in ``ids``) of the subject token whose key is a positive; None for a
    negative sequence. ``request``: index of the request it belongs to (-1: none).
    ``subject_start``: index of the subject's first token (its tokens are
    ``subject_start..position`` for ``position="last"``).
    """

    ids: tuple[int, ...]
    position: int | None
    kind: str
    request: int
    text: str
    subject_start: int | None = None

    @property
    def positive(self) -> bool:
        return self.position is not None


@dataclass
class RepItem:
    """What REP needs about one edit: the request, its in-domain subject paraphrases, its
    neighbourhood prompts (texts) and the key that seeds its scrambles and passages."""

    request: EditRequest
    paraphrases: list[str] = field(default_factory=list)
    neighbourhood: list[str] = field(default_factory=list)
    key: str = ""


def item_key(request: EditRequest) -> str:
    """The evaluation suite's case key: the case id, else the prompt text."""
    return str(request.case_id) if request.case_id is not None else request.text


def rep_items(
    cases: Sequence[EditCase | EditRequest | RepItem] | EditCase | EditRequest,
    keys: Sequence[str] | None = None,
) -> list[RepItem]:
    """Normalise cases, bare requests or items into :class:`RepItem` (keys default to ids)."""
    if isinstance(cases, EditCase | EditRequest | RepItem):
        cases = [cases]
    out = []
    for i, c in enumerate(cases):
        if isinstance(c, RepItem):
            item = c
        elif isinstance(c, EditCase):
            item = RepItem(
                c.request,
                list(c.id_paraphrases),
                [nb.prompt for nb in c.neighbourhood if nb.prompt.strip()],
                item_key(c.request),
            )
        elif isinstance(c, EditRequest):
            item = RepItem(c, [], [], item_key(c))
        else:
            raise InvalidRequestError(f"cannot train REP on {type(c).__name__} (item {i})")
        if keys is not None:
            item = RepItem(item.request, item.paraphrases, item.neighbourhood, str(keys[i]))
        elif not item.key:
            item = RepItem(
                item.request, item.paraphrases, item.neighbourhood, item_key(item.request)
            )
        out.append(item)
    if not out:
        raise InvalidRequestError("no edits to train REP on")
    return out


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def _unique(xs: Sequence[str], exclude: set[str]) -> list[str]:
    out, seen = [], set(exclude)
    for x in xs:
        norm = " ".join(str(x).split())
        if norm and norm not in seen:
            seen.add(norm)
            out.append(norm)
    return out


def passage_sampler(lm: Any, cfg: RepConfig) -> PassageSampler | None:
    """The long-context passage sampler REP trains with, or None (with a warning)."""
    path, where = passage_corpus(cfg.long_context_corpus)
    if path is None:
        warnings.warn(
            f"REP: long-context corpus not found ({where}); training without long-context "
            f"examples. Set {DATA_ENV} or RepConfig.long_context_corpus.",
            stacklevel=2,
        )
        return None
    return PassageSampler.from_file(
        path,
        length=cfg.long_context_length,
        unit=cfg.long_context_unit,  # type: ignore[arg-type]
        tokenizer=lm.tokenizer,
        seed=cfg.seed,
    )


class _Builder:
    def __init__(self, lm: Any, position: Position):
        self.tok = lm.tokenizer
        self.position = position
        self.skipped: list[tuple[str, str]] = []

    def positive(self, template: str, subject: str, kind: str, request: int) -> RepExample | None:
        try:
            ids, pos = locate(self.tok, template, subject, position=self.position)
            text, start, _ = subject_span(template, subject)
            first = subject_token_index(self.tok, text, start, start + 1, "last")
        except InvalidRequestError as exc:
            self.skipped.append((kind, f"{subject!r} in {template[-60:]!r}: {exc}"))
            return None
        return RepExample(tuple(ids), pos, kind, request, text, min(first, pos))

    def negative(self, text: str, kind: str, request: int = -1) -> RepExample:
        ids = tuple(self.tok(text)["input_ids"])
        return RepExample(ids, None, kind, request, text)


@dataclass
class RepPool:
    """The examples REP trains one adapter set on."""

    prompts: list[RepExample]
    positives: list[RepExample]
    negatives: list[RepExample] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for ex in (*self.prompts, *self.positives, *self.negatives):
            out[ex.kind] = out.get(ex.kind, 0) + 1
        if self.skipped:
            out["skipped"] = len(self.skipped)
        return out

    def all_examples(self) -> list[RepExample]:
        return [*self.prompts, *self.positives, *self.negatives]


class NoRepeatBatches:
    """Batches of indices into ``n`` items: each pass is a fresh permutation, no batch holds an
    item twice, and the batch that spans two passes is not a repeat of another."""

    def __init__(self, n: int, batch: int, rng: random.Random):
        self.n = n
        self.batch = min(batch, n)
        self.rng = rng
        self.queue: list[int] = []

    def __iter__(self) -> Iterator[list[int]]:
        return self

    def __next__(self) -> list[int]:
        if self.n == 0:
            return []
        out: list[int] = []
        while len(out) < self.batch:
            if not self.queue:
                perm = list(range(self.n))
                self.rng.shuffle(perm)
                # items already in this batch wait for the next one
                self.queue = [i for i in perm if i not in out] + [i for i in perm if i in out]
            i = self.queue.pop(0)
            if i in out:
                self.queue.append(i)
                continue
            out.append(i)
        return out


def build_pool(
    lm: Any,
    items: Sequence[RepItem],
    contexts: Sequence[str],
    cfg: RepConfig,
    *,
    sampler: PassageSampler | None = None,
    position: Position = "last",
    negative_subjects: Sequence[str] = (),
) -> RepPool:
    """The training pool for ``items`` (one adapter set): see the module docstring.

    ``contexts``: the editor's templates (``editor.contexts(lm, hp)``, the first being "{}").
    ``sampler``: long-context passages (required for ``cfg.long_context``; None skips them with
    the count visible in :meth:`RepPool.counts`).
    """
    b = _Builder(lm, position)
    bare = "{}"
    ctxs = [c for c in contexts if c != bare]
    prompts: list[RepExample] = []
    positives: list[RepExample] = []
    negatives: list[RepExample] = []
    own_subjects = set()
    for r, item in enumerate(items):
        req = item.request
        own_subjects.add(" ".join(req.subject.split()))
        prompt = b.positive(req.prompt, req.subject, "prompt", r)
        if prompt is None:
            raise InvalidRequestError(
                f"REP: cannot locate subject {req.subject!r} in prompt {req.prompt!r}"
            )
        prompts.append(prompt)
        templates = [c.replace("{}", req.prompt) for c in ctxs]
        for t in templates:
            positives.append(b.positive(t, req.subject, "original", r))  # type: ignore[arg-type]
        paraphrases = _unique(item.paraphrases, {" ".join(req.subject.split())})
        scrambles_all = scrambled_subjects(
            req.subject, lm.tokenizer, n_max=cfg.scramble_max, seed=cfg.seed, key=item.key
        )
        scrambles = _unique(split_half(scrambles_all)[0], {req.subject, *paraphrases})
        for kind, subjects in (("paraphrase", paraphrases), ("scramble", scrambles)):
            for s in subjects:
                own_subjects.add(s)
                for t in [req.prompt, *templates]:
                    positives.append(b.positive(t, s, kind, r))  # type: ignore[arg-type]
        if cfg.long_context and sampler is not None and cfg.n_long > 0:
            for passage in sampler.passages(f"{item.key}:rep-train", cfg.n_long):
                t = _escape(passage) + " " + req.prompt
                positives.append(b.positive(t, req.subject, "long", r))  # type: ignore[arg-type]
        if cfg.negatives:
            if "neighbourhood" in cfg.negative_sources:
                for text in item.neighbourhood:
                    negatives.append(b.negative(text, "neighbourhood", r))
            if "text" in cfg.negative_sources and sampler is not None and cfg.n_negative_text:
                for passage in sampler.passages(f"{item.key}:rep-negative", cfg.n_negative_text):
                    negatives.append(b.negative(passage, "text", r))
    if cfg.negatives and "subjects" in cfg.negative_sources:
        others = _unique(negative_subjects, own_subjects)
        for r, item in enumerate(items):
            for s in others:
                for t in [
                    item.request.prompt,
                    *[c.replace("{}", item.request.prompt) for c in ctxs],
                ]:
                    ex = b.positive(t, s, "subject_negative", r)
                    if ex is not None:
                        negatives.append(RepExample(ex.ids, None, ex.kind, r, ex.text))
    return RepPool(
        prompts=prompts,
        positives=[p for p in positives if p is not None],
        negatives=negatives,
        skipped=b.skipped,
    )


def heldout_examples(
    lm: Any,
    case: EditCase | RepItem,
    *,
    scramble_max: int = 10,
    seed: int = 0,
    key: str | None = None,
    sampler: PassageSampler | None = None,
    n_long: int = 1,
    position: Position = "last",
) -> dict[str, list[RepExample]]:
    """Probing sequences for gate reports, in the bare relation template:
    ``efficacy``, ``id_paraphrase``, ``ood_paraphrase``, ``id_scramble``, ``ood_scramble``,
    ``long_test`` (passages keyed ``"<key>:test"``, as the suite draws them) as positives, and
    ``neighbourhood`` prompts (every token a negative)."""
    if isinstance(case, EditCase):
        req = case.request
        id_para, ood_para = list(case.id_paraphrases), list(case.ood_paraphrases)
        nbr = [nb.prompt for nb in case.neighbourhood if nb.prompt.strip()]
    else:
        req, id_para, ood_para, nbr = case.request, list(case.paraphrases), [], case.neighbourhood
    key = key if key is not None else item_key(req)
    b = _Builder(lm, position)
    subj = " ".join(req.subject.split())
    id_s, ood_s = split_half(
        scrambled_subjects(req.subject, lm.tokenizer, n_max=scramble_max, seed=seed, key=key)
    )

    def pos(kind: str, subjects: Sequence[str]) -> list[RepExample]:
        out = [b.positive(req.prompt, s, kind, 0) for s in subjects]
        return [e for e in out if e is not None]

    out = {
        "efficacy": pos("prompt", [req.subject]),
        "id_paraphrase": pos("paraphrase", _unique(id_para, {subj})),
        "ood_paraphrase": pos("paraphrase", _unique(ood_para, {subj})),
        "id_scramble": pos("scramble", id_s),
        "ood_scramble": pos("scramble", ood_s),
        "long_test": [],
        "neighbourhood": [b.negative(t, "neighbourhood", 0) for t in nbr],
    }
    if sampler is not None and n_long > 0:
        for passage in sampler.passages(f"{key}:test", n_long):
            ex = b.positive(_escape(passage) + " " + req.prompt, req.subject, "long", 0)
            if ex is not None:
                out["long_test"].append(ex)
    return out

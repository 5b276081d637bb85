"""REP's training data for an edit: token sequences and the position whose key is trained.

For each request the pool holds (positives: the subject-last key should align with the edit)

* the editor's context templates × {original subject (bare template excluded), the in-domain
  subject paraphrases (the first ``case.id_split``), the first half of the scrambles};
* ``n_long`` long-context examples ``passage + " " + prompt`` with the original subject: the
  paper's released code built these but never trained on them;
* with ``cfg.augment``, ``n_augment`` generated forms of the subject per kind
  (:mod:`repedit.data.augment`) in the prompt and every context template, none equal to an
  evaluation probe of the case or to an ``exclude_subjects`` subject (the dataset's look-alikes);

and, apart from the pool, the bare original prompt, which goes into *every* batch (its key
``k_o`` anchors the consistency loss). With ``negatives`` the pool also holds negative
sequences (every token a gate negative): other subjects in the edit's templates, the case's
neighbourhood prompts, general-text passages. Batches are drawn without repetition.

The paraphrases, scrambles and passages are the case's ``train`` forms from
:func:`repedit.data.variants.case_variants` (through :func:`~repedit.data.variants.training_forms`),
the same function the evaluation suite builds its probes from: with the suite's seed and
``scramble_max``, the scrambles REP trains on are exactly the ones the suite labels
``half="id"``, and no form REP trains on is a held-out probe of the same case.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field, replace

from repedit.data.augment import Forbidden, augment_forms, fold, probe_texts
from repedit.data.case import EditCase, EditRequest
from repedit.data.variants import (
    PassageSampler,
    Variant,
    case_variants,
    normalise,
    training_forms,
)
from repedit.data.variants import passage_sampler as _passage_sampler
from repedit.errors import InvalidRequestError
from repedit.models.loading import LoadedModel
from repedit.models.tokens import Position, locate, subject_span, subject_token_index
from repedit.rep.adapter import RepConfig
from repedit.rep.negatives import SubjectPool

#: kinds whose ``position`` token is a positive (the gate should open, the key align)
POSITIVE_KINDS = ("prompt", "original", "paraphrase", "scramble", "long", "augment")
#: kinds whose every token is a negative
NEGATIVE_KINDS = ("subject_negative", "pool_subject", "neighbourhood", "text")


@dataclass(frozen=True)
class RepExample:
    """One training or probing sequence.

    ``position``: index (in ``ids``) of the subject token whose key is a positive; None for a
    negative sequence. ``request``: index of the request it belongs to (-1: none).
    ``subject_start``: index of the subject's first token (its tokens are
    ``subject_start..position`` for ``position="last"``). ``subject_end``: on a negative
    sequence that holds another subject, that subject's last token (its tokens are near
    negatives of the gate).
    """

    ids: tuple[int, ...]
    position: int | None
    kind: str
    request: int
    text: str
    subject_start: int | None = None
    subject_end: int | None = None

    @property
    def positive(self) -> bool:
        return self.position is not None


@dataclass
class RepItem:
    """What REP needs about one edit: the request, its in-domain subject paraphrases, its
    neighbourhood prompts (texts), the key that seeds its scrambles and passages, and the case
    when there is one (its held-out forms are kept out of training)."""

    request: EditRequest
    paraphrases: list[str] = field(default_factory=list)
    neighbourhood: list[str] = field(default_factory=list)
    key: str = ""
    case: EditCase | None = None

    def as_case(self) -> EditCase:
        """The case whose variants REP draws from: :attr:`case`, with :attr:`paraphrases` as its
        in-domain subject paraphrases."""
        held = self.case.ood_paraphrases if self.case is not None else []
        base = self.case or EditCase(self.request)
        return EditCase(
            self.request,
            prompt_paraphrases=list(base.prompt_paraphrases),
            subject_paraphrases=[*self.paraphrases, *held],
            id_split=len(self.paraphrases),
        )

    @property
    def edit_request(self) -> EditRequest:
        """The request to edit with, carrying the in-domain paraphrases (``subject_forms``)."""
        return self.as_case().edit_request


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
                c,
            )
        elif isinstance(c, EditRequest):
            item = RepItem(c, [], [], item_key(c))
        else:
            raise InvalidRequestError(f"cannot train REP on {type(c).__name__} (item {i})")
        if keys is not None:
            item = replace(item, key=str(keys[i]))
        elif not item.key:
            item = replace(item, key=item_key(item.request))
        out.append(item)
    if not out:
        raise InvalidRequestError("no edits to train REP on")
    return out


def _unique(xs: Sequence[str], exclude: set[str]) -> list[str]:
    out, seen = [], set(exclude)
    for x in xs:
        norm = normalise(str(x))
        if norm and norm not in seen:
            seen.add(norm)
            out.append(norm)
    return out


def passage_sampler(lm: LoadedModel, cfg: RepConfig) -> PassageSampler | None:
    """The long-context passage sampler REP trains with, or None (with a warning) when no corpus
    is found; an unusable corpus is an error."""
    return _passage_sampler(lm.tokenizer, cfg, purpose="REP trains", strict=True)


def item_variants(
    lm: LoadedModel, item: RepItem, cfg: RepConfig, sampler: PassageSampler | None
) -> list[Variant]:
    """Every variant of the item's case, with REP's scramble count, seed and passages."""
    n_long = cfg.n_long if cfg.long_context and sampler is not None else 0
    return case_variants(
        item.as_case(),
        lm.tokenizer,
        key=item.key,
        seed=cfg.forms_seed,
        scramble_max=cfg.scramble_max,
        sampler=sampler,
        train_passages=n_long,
    )


class _Builder:
    def __init__(self, lm: LoadedModel, position: Position):
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
    lm: LoadedModel,
    items: Sequence[RepItem],
    contexts: Sequence[str],
    cfg: RepConfig,
    *,
    sampler: PassageSampler | None = None,
    position: Position = "last",
    negative_subjects: Sequence[str] = (),
    exclude_subjects: Collection[str] = (),
    subject_pool: SubjectPool | None = None,
) -> RepPool:
    """The training pool for ``items`` (one adapter set): see the module docstring.

    ``contexts``: the editor's templates (``editor.contexts(lm, hp)``, the first being "{}").
    ``sampler``: long-context passages (required for ``cfg.long_context``; None skips them with
    the count visible in :meth:`RepPool.counts`). ``exclude_subjects``: subjects no generated
    form (``cfg.augment``) or pool negative (``cfg.pool_negatives``) may equal, folded or not
    (the dataset's look-alike subjects). ``subject_pool``: where ``cfg.pool_negatives`` draws.
    """
    b = _Builder(lm, position)
    ctxs = [c for c in contexts if c != "{}"]
    pool = RepPool(prompts=[], positives=[], negatives=[])
    own_subjects: set[str] = set()
    excluded = {fold(s) for s in exclude_subjects}
    every = [item_variants(lm, item, cfg, sampler) for item in items]
    # what pool negatives must avoid, gathered only when they are drawn
    group = _GroupProbes.of(items, every) if cfg.pool_negatives and subject_pool else None
    for r, (item, variants) in enumerate(zip(items, every, strict=True)):
        pool.prompts.append(_prompt_example(b, item.request, r))
        own_subjects.add(normalise(item.request.subject))
        forms = training_forms(variants)
        own_subjects.update(_add_positives(b, pool.positives, item.request, forms, ctxs, r))
        if cfg.augment:
            forbidden = Forbidden(item.request.subject, probe_texts(variants), excluded)
            own_subjects.update(_add_augments(b, pool.positives, item, cfg, ctxs, r, forbidden))
        if cfg.negatives:
            pool.negatives.extend(_item_negatives(b, item, cfg, sampler, r))
        if group is not None and subject_pool is not None:
            drawn = subject_pool.draw(
                item.as_case(), cfg.pool_negatives, kinds=cfg.pool_kinds, key=item.key,
                seed=cfg.seed, excluded=excluded, others=group.forms, texts=group.texts,
            )  # fmt: skip
            pool.negatives.extend(_pool_negatives(b, item, drawn, ctxs, r))
    if cfg.negatives and "subjects" in cfg.negative_sources:
        others = _unique(negative_subjects, own_subjects)
        pool.negatives.extend(_subject_negatives(b, items, others, ctxs))
    pool.skipped = b.skipped
    return pool


@dataclass(frozen=True)
class _GroupProbes:
    """What every edit sharing one adapter set is probed with: their subject forms (held-out
    ones included) and the folded texts of their probes and neighbourhood prompts. A pool
    negative must avoid them all, not only its own edit's, since the gate is shared."""

    forms: frozenset[str]
    texts: tuple[str, ...]

    @classmethod
    def of(cls, items: Sequence[RepItem], variants: Sequence[Sequence[Variant]]) -> _GroupProbes:
        forms: set[str] = set()
        texts: set[str] = set()
        for item, vs in zip(items, variants, strict=True):
            case = item.as_case()
            forms |= {fold(s) for s in [case.request.subject, *case.subject_paraphrases]}
            texts |= probe_texts(vs) | {fold(t) for t in item.neighbourhood}
        return cls(frozenset(forms), tuple(sorted(texts)))


def _prompt_example(b: _Builder, req: EditRequest, r: int) -> RepExample:
    prompt = b.positive(req.prompt, req.subject, "prompt", r)
    if prompt is None:
        raise InvalidRequestError(
            f"REP: cannot locate subject {req.subject!r} in prompt {req.prompt!r}"
        )
    return prompt


def _add_positives(
    b: _Builder,
    out: list[RepExample],
    req: EditRequest,
    forms: Sequence[Variant],
    ctxs: Sequence[str],
    r: int,
) -> list[str]:
    """The subject in every context, the training subjects in the prompt and every context,
    the training passages; returns the subject forms trained on."""
    templates = [c.replace("{}", req.prompt) for c in ctxs]
    made = [b.positive(t, req.subject, "original", r) for t in templates]
    paraphrases = _unique(
        [v.subject for v in forms if v.kind == "subject_paraphrase"], {normalise(req.subject)}
    )
    scrambles = _unique(
        [v.subject for v in forms if v.kind == "scrambled_subject"], {req.subject, *paraphrases}
    )
    for kind, subjects in (("paraphrase", paraphrases), ("scramble", scrambles)):
        for s in subjects:
            made.extend(b.positive(t, s, kind, r) for t in [req.prompt, *templates])
    for v in forms:
        if v.kind == "long_context":
            made.append(b.positive(v.template, req.subject, "long", r))
    out.extend(ex for ex in made if ex is not None)
    return [*paraphrases, *scrambles]


def _add_augments(
    b: _Builder,
    out: list[RepExample],
    item: RepItem,
    cfg: RepConfig,
    ctxs: Sequence[str],
    r: int,
    forbidden: Forbidden,
) -> list[str]:
    """The generated forms (``cfg.augment``) in the prompt and every context, the key at the
    rewritten subject's last token; returns the forms trained on. A sequence whose text is a
    probe's (``forbidden``, folded) is left out as well as a form that is one."""
    req = item.request
    forms = augment_forms(
        req.subject,
        cfg.augment,
        cfg.n_augment,
        tokenizer=b.tok,
        seed=cfg.seed,
        key=item.key,
        forbidden=forbidden,
    )
    templates = [req.prompt, *(c.replace("{}", req.prompt) for c in ctxs)]
    for form in forms:
        for t in templates:
            ex = b.positive(form.wrap(t), form.core, "augment", r)
            if ex is not None and fold(ex.text) not in forbidden:
                out.append(ex)
    return [normalise(f.text) for f in forms]


def _item_negatives(
    b: _Builder, item: RepItem, cfg: RepConfig, sampler: PassageSampler | None, r: int
) -> list[RepExample]:
    out: list[RepExample] = []
    if "neighbourhood" in cfg.negative_sources:
        out.extend(b.negative(text, "neighbourhood", r) for text in item.neighbourhood)
    if "text" in cfg.negative_sources and sampler is not None and cfg.n_negative_text:
        for passage in sampler.passages(f"{item.key}:rep-negative", cfg.n_negative_text):
            out.append(b.negative(passage, "text", r))
    return out


def _subject_negatives(
    b: _Builder, items: Sequence[RepItem], others: Sequence[str], ctxs: Sequence[str]
) -> list[RepExample]:
    """Other subjects in each item's prompt and contexts, every token a negative."""
    out: list[RepExample] = []
    for r, item in enumerate(items):
        prompt = item.request.prompt
        for s in others:
            for t in [prompt, *[c.replace("{}", prompt) for c in ctxs]]:
                ex = b.positive(t, s, "subject_negative", r)
                if ex is not None:
                    out.append(RepExample(ex.ids, None, ex.kind, r, ex.text))
    return out


def _pool_negatives(
    b: _Builder, item: RepItem, subjects: Sequence[str], ctxs: Sequence[str], r: int
) -> list[RepExample]:
    """Pool subjects in the item's prompt and contexts; their tokens are near negatives. A
    sequence that starts with the subject's own tokens in that template is left out (its key
    there would be the positive's)."""
    prompt, subject = item.request.prompt, item.request.subject
    out: list[RepExample] = []
    for t in [prompt, *[c.replace("{}", prompt) for c in ctxs]]:
        own = b.positive(t, subject, "original", r)
        head = own.ids[: own.position + 1] if own is not None and own.position is not None else ()
        for s in subjects:
            ex = b.positive(t, s, "pool_subject", r)
            if ex is not None and ex.ids[: len(head)] != head:
                out.append(replace(ex, position=None, subject_end=ex.position))
    return out


def heldout_examples(
    lm: LoadedModel,
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
    ``long_test`` (the suite's held-out passages) as positives, and ``neighbourhood`` prompts
    (every token a negative)."""
    if isinstance(case, EditCase):
        case = rep_items(case)[0]
    req = case.request
    key = key if key is not None else case.key
    variants = case_variants(
        case.as_case(),
        lm.tokenizer,
        key=key,
        seed=seed,
        scramble_max=scramble_max,
        sampler=sampler,
        passages=n_long,
    )
    b = _Builder(lm, position)
    subj = normalise(req.subject)

    def pos(kind: str, subjects: Sequence[str], template: str = req.prompt) -> list[RepExample]:
        out = [b.positive(template, s, kind, 0) for s in subjects]
        return [e for e in out if e is not None]

    def subjects(kind: str, half: str) -> list[str]:
        return [v.subject for v in variants if v.kind == kind and v.half == half]

    passages = [v for v in variants if v.kind == "long_context"]
    return {
        "efficacy": pos("prompt", [req.subject]),
        "id_paraphrase": pos("paraphrase", _unique(case.paraphrases, {subj})),
        "ood_paraphrase": pos(
            "paraphrase", _unique(subjects("ood_subject_paraphrase", "heldout"), {subj})
        ),
        "id_scramble": pos("scramble", subjects("scrambled_subject", "train")),
        "ood_scramble": pos("scramble", subjects("scrambled_subject", "heldout")),
        "long_test": [ex for v in passages for ex in pos("long", [req.subject], v.template)],
        "neighbourhood": [b.negative(t, "neighbourhood", 0) for t in case.neighbourhood],
    }

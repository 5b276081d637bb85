"""The robustness suite as probe families: one :class:`Probe` per (case, variant).

Every family is scored by :func:`~repedit.evaluation.scoring.score_probes` (teacher forcing),
so a case's probes of all families can go through the model in one call. Test names:

``efficacy``
    the edit prompt itself.
``prompt_paraphrase``
    the dataset's rephrased prompts (complete texts, subject inside).
``subject_paraphrase`` / ``ood_subject_paraphrase``
    the in-domain (first ``case.id_split``) / held-out subject paraphrases, substituted into
    the edit's relation template ``request.prompt``.
``scrambled_subject``
    reorderings of the subject's tokens (:func:`~repedit.data.scrambled_subjects`); the
    in-domain / held-out halves are kept in ``meta["half"]`` (``"id"`` / ``"ood"``).
    A one-token subject has no scramble.
``long_context``
    ``passage + " " + prompt`` with passages cut by :class:`~repedit.data.PassageSampler`.
``neighbourhood``
    the case's unrelated prompts with the dataset's answer as target: scored by agreement with
    the unedited model's predictions (``agree``) and, separately, by exact match to the answer
    (reported as ``neighbourhood_truth``).
``neighbourhood_plus``
    the neighbourhood prompts with the edit prompt and its new object prepended
    (:func:`plus_prompt`, CounterFact+): an edit that bleeds into nearby facts once its own
    statement is in the context shows here. Scored by agreement with the unedited model on
    the same prepended prompts.
``near_subject``
    look-alikes: other cases' edit prompts whose subject shares subword tokens with this one
    (Slovakia for Slovenia), with that case's true answer as target (:class:`NearSubjects`);
    scored like the neighbourhood, by agreement with the unedited model.
``fluency``
    not a probe: ROME's n-gram entropy of sampled text (:func:`fluency_prompts` gives the
    prompts, :func:`case_fluency` the score).

The success probes are the case's :func:`~repedit.data.variants.case_variants`, mapped to
probes here. Every success probe carries ``alt = target_true`` when the case knows it, so both
metrics are available: ``exact`` (argmax matches every target token, the paper's) and ``beats_alt``
(ROME's P(new) > P(true)).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args

from repedit.data.case import EditCase
from repedit.data.variants import (
    NearSubjects,
    PassageSampler,
    Variant,
    case_variants,
    stable_rng,
)
from repedit.data.variants import passage_sampler as _passage_sampler
from repedit.errors import InvalidRequestError
from repedit.evaluation.scoring import Impl, Probe
from repedit.models.loading import LoadedModel
from repedit.models.precision import Precision, check_precision

log = logging.getLogger(__name__)

SUCCESS_TESTS: tuple[str, ...] = (
    "efficacy",
    "prompt_paraphrase",
    "subject_paraphrase",
    "ood_subject_paraphrase",
    "scrambled_subject",
    "long_context",
)
"""Tests scored as success rates on ``target_new``."""

LOCALITY_TESTS: tuple[str, ...] = ("neighbourhood", "neighbourhood_plus", "near_subject")
"""Tests scored by agreement with the unedited model (what the edit must leave alone)."""

TESTS: tuple[str, ...] = (*SUCCESS_TESTS, *LOCALITY_TESTS, "fluency")
"""Every test name, in report order (the keys of ``summary.json["tests"]``)."""

PROBE_TESTS: tuple[str, ...] = (*SUCCESS_TESTS, *LOCALITY_TESTS)
"""Tests that are probe families (fluency is not)."""


Scoring = Literal["teacher-forced", "generate", "both"]
SCORINGS: tuple[str, ...] = get_args(Scoring)
"""How probes are scored: teacher forcing, greedy generation, or both."""


def teacher_forced(scoring: str) -> bool:
    return scoring != "generate"


def generated(scoring: str) -> bool:
    return scoring != "teacher-forced"


_ALIASES = {
    "paraphrase": "prompt_paraphrase",
    "ood_paraphrase": "ood_subject_paraphrase",
    "scrambled": "scrambled_subject",
    "scramble": "scrambled_subject",
    "long": "long_context",
    "locality": "neighbourhood",
    "neighborhood": "neighbourhood",
    "near": "near_subject",
    "neighborhood_plus": "neighbourhood_plus",
    "counterfact_plus": "neighbourhood_plus",
    "lookalike": "near_subject",
}


def parse_tests(spec: str | Iterable[str] | None) -> tuple[str, ...]:
    """Test names from ``"all"``, a comma-separated string or an iterable, in report order.

    A few aliases are accepted (``locality``, ``neighborhood``, ``scrambled``, ``long``...);
    an unknown name is an error that lists the known ones.
    """
    if spec is None:
        return TESTS
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names = {s.strip().lower().replace("-", "_") for s in items if s and s.strip()}
    if not names or "all" in names:
        return TESTS
    names = {_ALIASES.get(n, n) for n in names}
    unknown = names - set(TESTS)
    if unknown:
        raise InvalidRequestError(
            f"unknown test(s) {sorted(unknown)}; choose from all, {', '.join(TESTS)}"
        )
    return tuple(t for t in TESTS if t in names)


@dataclass
class SuiteConfig:
    """What the robustness suite builds and how.

    ``long_context_corpus``: a text file (WikiText ``.raw`` or any text); ``None`` means
    ``$REPEDIT_DATA/wikitext/wiki.test.raw``. ``long_context_unit``: ``"tokens"`` (the paper,
    512) or ``"words"`` (the released code, 300). ``fluency_samples`` texts of
    ``fluency_tokens`` new tokens are sampled per case (top-k ``fluency_top_k``).
    ``batch_size`` counts sequences per forward pass in scoring. ``near_subject_max``: at
    most this many look-alike prompts per case. ``scoring``: teacher forcing (the papers'),
    greedy generation (:func:`~repedit.evaluation.scoring.generate_scores`) or both;
    ``scoring_impl``: the teacher-forced scorer's implementation (same results, recorded but
    not part of a run's identity). ``precision``: ``bfloat16`` runs every scoring and
    generation forward under bfloat16 autocast (opt-in; part of a run's identity).
    """

    tests: tuple[str, ...] = TESTS
    seed: int = 0
    scramble_max: int = 10
    long_context_corpus: str | None = None
    long_context_length: int = 512
    long_context_unit: Literal["tokens", "words"] = "tokens"
    long_context_passages: int = 1
    fluency_samples: int = 1
    fluency_tokens: int = 100
    fluency_top_k: int = 5
    batch_size: int = 32
    near_subject_max: int = 5
    scoring: Scoring = "teacher-forced"
    scoring_impl: Impl = "fast"
    precision: Precision = "model"

    def __post_init__(self) -> None:
        self.tests = parse_tests(self.tests)
        check_precision(self.precision)
        if self.scoring not in SCORINGS:
            raise InvalidRequestError(
                f"scoring must be one of {', '.join(SCORINGS)}, got {self.scoring!r}"
            )
        if self.scoring_impl not in ("fast", "reference"):
            raise InvalidRequestError(
                f"scoring_impl must be 'fast' or 'reference', got {self.scoring_impl!r}"
            )
        if self.long_context_unit not in ("tokens", "words"):
            raise InvalidRequestError(
                f"long_context_unit must be 'tokens' or 'words', got {self.long_context_unit!r}"
            )
        for name in ("long_context_length", "batch_size", "fluency_tokens", "fluency_top_k"):
            if getattr(self, name) < 1:
                raise InvalidRequestError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "long_context_passages",
            "fluency_samples",
            "scramble_max",
            "near_subject_max",
        ):
            if getattr(self, name) < 0:
                raise InvalidRequestError(f"{name} must be >= 0, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["tests"] = list(self.tests)
        return out


# --------------------------------------------------------------------------- long context


def passage_sampler(lm: LoadedModel, cfg: SuiteConfig) -> PassageSampler | None:
    """The long-context test's sampler (:func:`repedit.data.variants.passage_sampler`), or None
    when the test is not selected or no corpus is usable (with a warning)."""
    if "long_context" not in cfg.tests:
        return None
    return _passage_sampler(lm.tokenizer, cfg, purpose="the long_context test runs")


def near_index(lm: LoadedModel, cfg: SuiteConfig, cases: Sequence[EditCase]) -> NearSubjects | None:
    """The look-alike index for ``near_subject``, built once per run from every case of the
    dataset (not only the evaluated ones), or None when the test is not selected."""
    if "near_subject" not in cfg.tests or cfg.near_subject_max == 0:
        return None
    return NearSubjects(cases, lm.tokenizer)


# --------------------------------------------------------------------------- building


def case_key(case: EditCase, index: int | None = None) -> str:
    """The stable key of a case for seeding variants and naming records."""
    if case.case_id is not None:
        return str(case.case_id)
    return f"#{index}" if index is not None else case.request.text


def case_keys(cases: Sequence[EditCase]) -> list[str]:
    """Unique record keys: the case id, disambiguated (``id#2``) if a dataset repeats one.

    Scrambles and passages are seeded by this key, and run records are named by it, so the
    harness and the analysis share this one rule.
    """
    keys, seen = [], set()
    for i, case in enumerate(cases):
        key = case_key(case, i)
        k, j = key, 1
        while k in seen:
            j += 1
            k = f"{key}#{j}"
        seen.add(k)
        keys.append(k)
    return keys


_AUTO: Any = object()

#: variant kind → the success test that scores it
TEST_OF_KIND: dict[str, str] = {
    "original": "efficacy",
    "prompt_paraphrase": "prompt_paraphrase",
    "subject_paraphrase": "subject_paraphrase",
    "ood_subject_paraphrase": "ood_subject_paraphrase",
    "scrambled_subject": "scrambled_subject",
    "long_context": "long_context",
}

_SCRAMBLE_HALF = {"train": "id", "heldout": "ood"}


def variant_probe(v: Variant, case: EditCase, sampler: PassageSampler | None = None) -> Probe:
    """The success probe that scores variant ``v`` (the meta the run records carry)."""
    req = case.request
    test = TEST_OF_KIND[v.kind]
    meta: dict[str, Any] = {}
    if v.kind != "original":
        meta["index"] = v.index
    if v.kind == "scrambled_subject":
        meta["half"] = _SCRAMBLE_HALF[v.half]
    if v.kind in ("subject_paraphrase", "ood_subject_paraphrase", "scrambled_subject"):
        meta["subject"] = v.subject
    if v.kind == "long_context" and sampler is not None:
        meta.update(length=sampler.length, unit=sampler.unit)
    return Probe(v.text, req.target_new, req.target_true, test, meta)


def build_probes(
    case: EditCase,
    lm: LoadedModel,
    cfg: SuiteConfig | None = None,
    *,
    sampler: PassageSampler | None = _AUTO,
    key: str | None = None,
    near: NearSubjects | None = None,
) -> dict[str, list[Probe]]:
    """The probe families of ``case`` that ``cfg.tests`` selects (fluency excluded).

    ``sampler``: the long-context passage sampler (default: built from ``cfg`` on the spot;
    pass the one from :func:`passage_sampler` when building many cases; None disables the
    family). ``key`` seeds scrambles and passages (default: the case id). ``near``: the
    dataset's look-alike index for ``near_subject`` (None: that family is empty). A family the
    case cannot feed is present with an empty list.
    """
    cfg = cfg or SuiteConfig()
    key = key if key is not None else case_key(case)
    tests = set(cfg.tests)
    if "long_context" in tests and sampler is _AUTO:
        sampler = passage_sampler(lm, cfg)
    if "long_context" not in tests or sampler is _AUTO:
        sampler = None
    variants = case_variants(
        case,
        lm.tokenizer,
        key=key,
        seed=cfg.seed,
        scramble_max=cfg.scramble_max if "scrambled_subject" in tests else 0,
        sampler=sampler,
        passages=cfg.long_context_passages,
    )
    out: dict[str, list[Probe]] = {t: [] for t in SUCCESS_TESTS if t in tests}
    for v in variants:
        test = TEST_OF_KIND[v.kind]
        if test in out:
            out[test].append(variant_probe(v, case, sampler))
    if "neighbourhood" in tests:
        out["neighbourhood"] = [
            Probe(nb.prompt, nb.target, None, "neighbourhood", {"index": i})
            for i, nb in enumerate(case.neighbourhood)
            if nb.prompt.strip() and nb.target.strip()
        ]
    if "neighbourhood_plus" in tests:
        prefix = plus_prefix(case)
        out["neighbourhood_plus"] = [
            Probe(prefix + nb.prompt, nb.target, None, "neighbourhood_plus", {"index": i})
            for i, nb in enumerate(case.neighbourhood)
            if nb.prompt.strip() and nb.target.strip()
        ]
    if "near_subject" in tests:
        out["near_subject"] = near_probes(case, near, cfg.near_subject_max, key)
    return out


def plus_prefix(case: EditCase) -> str:
    """What ``neighbourhood_plus`` puts before a neighbourhood prompt: the edit's statement,
    ``"<edit prompt> <new object>. "``."""
    req = case.request
    return f"{req.text.rstrip()} {req.target_new.strip()}. "


def near_probes(case: EditCase, near: NearSubjects | None, n: int, key: str) -> list[Probe]:
    """``near_subject`` probes: each look-alike case's edit prompt with its true answer."""
    if near is None or n <= 0:
        return []
    return [
        Probe(
            other.request.text,
            str(other.request.target_true),
            None,
            "near_subject",
            {"index": i, "subject": other.request.subject, "shared": shared},
        )
        for i, (other, shared) in enumerate(near.lookalikes(case, n, key=key))
    ]


def fluency_prompts(case: EditCase, cfg: SuiteConfig | None = None) -> list[str]:
    """``cfg.fluency_samples`` prompts to sample from: the case's generation prompts, else the
    edit prompt, cycled (rows of one batch draw different samples)."""
    cfg = cfg or SuiteConfig()
    base = [p for p in case.generation_prompts if p and p.strip()] or [case.request.text]
    return [base[i % len(base)] for i in range(cfg.fluency_samples)]


def fluency_seed(cfg: SuiteConfig, key: str) -> int:
    """A per-case sampling seed: the same case gets the same draw in any order or process."""
    return stable_rng("fluency", cfg.seed, key).randrange(2**31)


def case_fluency(
    lm: LoadedModel, case: EditCase, cfg: SuiteConfig | None = None, *, key: str | None = None
) -> dict[str, Any]:
    """Sample the case's fluency texts and score them with ROME's n-gram entropy."""
    from repedit.evaluation.fluency import generate_texts, text_ngram_entropy

    cfg = cfg or SuiteConfig()
    key = key if key is not None else case_key(case)
    prompts = fluency_prompts(case, cfg)
    if not prompts:
        return {"n": 0, "entropy": None, "scores": [], "texts": []}
    texts = generate_texts(
        lm,
        prompts,
        max_new_tokens=cfg.fluency_tokens,
        top_k=cfg.fluency_top_k,
        seed=fluency_seed(cfg, key),
        batch_size=cfg.batch_size,
        precision=cfg.precision,
    )
    scores = [text_ngram_entropy(t) for t in texts]
    return {
        "n": len(scores),
        "entropy": sum(scores) / len(scores),
        "scores": scores,
        "texts": texts,
    }


@dataclass
class CaseProbes:
    """All probe families of one case, flattened for a single scoring call."""

    key: str
    families: dict[str, list[Probe]] = field(default_factory=dict)

    @property
    def flat(self) -> list[Probe]:
        return [p for test in PROBE_TESTS for p in self.families.get(test, [])]

    @property
    def spans(self) -> dict[str, tuple[int, int]]:
        """``test -> (start, stop)`` into :attr:`flat`."""
        out, i = {}, 0
        for test in PROBE_TESTS:
            n = len(self.families.get(test, []))
            if test in self.families:
                out[test] = (i, i + n)
            i += n
        return out

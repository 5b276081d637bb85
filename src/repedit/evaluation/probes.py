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
    in-domain / held-out halves (:func:`~repedit.data.split_half`) are kept in ``meta["half"]``.
    A one-token subject has no scramble.
``long_context``
    ``passage + " " + prompt`` with passages cut by :class:`~repedit.data.PassageSampler`.
``neighbourhood``
    the case's unrelated prompts with the dataset's answer as target: scored by agreement with
    the unedited model's predictions (``agree``) and, separately, by exact match to the answer
    (reported as ``neighbourhood_truth``).
``fluency``
    not a probe: ROME's n-gram entropy of sampled text (:func:`fluency_prompts` gives the
    prompts, :func:`case_fluency` the score).

Every success probe carries ``alt = target_true`` when the case knows it, so both metrics are
available: ``exact`` (argmax matches every target token, the paper's) and ``beats_alt``
(ROME's P(new) > P(true)).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from repedit.data.case import EditCase
from repedit.data.loaders import DATA_ENV, passage_corpus
from repedit.data.variants import (
    PassageSampler,
    long_context_prompt,
    scrambled_subjects,
    split_half,
    stable_rng,
)
from repedit.errors import InvalidRequestError
from repedit.evaluation.scoring import Probe

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

TESTS: tuple[str, ...] = (*SUCCESS_TESTS, "neighbourhood", "fluency")
"""Every test name, in report order (the keys of ``summary.json["tests"]``)."""

PROBE_TESTS: tuple[str, ...] = (*SUCCESS_TESTS, "neighbourhood")
"""Tests that are probe families (fluency is not)."""


_ALIASES = {
    "paraphrase": "prompt_paraphrase",
    "ood_paraphrase": "ood_subject_paraphrase",
    "scrambled": "scrambled_subject",
    "scramble": "scrambled_subject",
    "long": "long_context",
    "locality": "neighbourhood",
    "neighborhood": "neighbourhood",
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
    ``batch_size`` counts sequences per forward pass in scoring.
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

    def __post_init__(self) -> None:
        self.tests = parse_tests(self.tests)
        if self.long_context_unit not in ("tokens", "words"):
            raise InvalidRequestError(
                f"long_context_unit must be 'tokens' or 'words', got {self.long_context_unit!r}"
            )
        for name in ("long_context_length", "batch_size", "fluency_tokens", "fluency_top_k"):
            if getattr(self, name) < 1:
                raise InvalidRequestError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("long_context_passages", "fluency_samples", "scramble_max"):
            if getattr(self, name) < 0:
                raise InvalidRequestError(f"{name} must be >= 0, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["tests"] = list(self.tests)
        return out


# --------------------------------------------------------------------------- long context


def passage_sampler(lm: Any, cfg: SuiteConfig) -> PassageSampler | None:
    """A sampler for the long-context test, or None (with a warning) when no corpus is usable.

    Tokenising a corpus takes a moment, so build one sampler per run and pass it to
    :func:`build_probes`.
    """
    if "long_context" not in cfg.tests:
        return None
    path, where = passage_corpus(cfg.long_context_corpus)
    if path is None:
        warnings.warn(
            f"long-context corpus not found ({where}); the long_context test will have n = 0. "
            f"Set {DATA_ENV} or pass a text file as the long-context corpus.",
            stacklevel=2,
        )
        return None
    try:
        return PassageSampler.from_file(
            path,
            length=cfg.long_context_length,
            unit=cfg.long_context_unit,
            tokenizer=lm.tokenizer,
            seed=cfg.seed,
        )
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        warnings.warn(
            f"long-context corpus {path} unusable ({exc}); the long_context test will have n = 0",
            stacklevel=2,
        )
        return None


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


def build_probes(
    case: EditCase,
    lm: Any,
    cfg: SuiteConfig | None = None,
    *,
    sampler: PassageSampler | None = _AUTO,
    key: str | None = None,
) -> dict[str, list[Probe]]:
    """The probe families of ``case`` that ``cfg.tests`` selects (fluency excluded).

    ``sampler``: the long-context passage sampler (default: built from ``cfg`` on the spot;
    pass the one from :func:`passage_sampler` when building many cases; None disables the
    family). ``key`` seeds scrambles and passages (default: the case id). A family the case
    cannot feed is present with an empty list.
    """
    cfg = cfg or SuiteConfig()
    key = key if key is not None else case_key(case)
    req = case.request
    alt = req.target_true
    new = req.target_new
    tests = set(cfg.tests)
    out: dict[str, list[Probe]] = {}

    def success(test: str, prompt: str, **meta: Any) -> Probe:
        return Probe(prompt, new, alt, test, dict(meta))

    if "efficacy" in tests:
        out["efficacy"] = [success("efficacy", req.text)]
    if "prompt_paraphrase" in tests:
        seen = {" ".join(req.text.split())}
        probes = []
        for i, text in enumerate(case.prompt_paraphrases):
            norm = " ".join(text.split())
            if norm and norm not in seen:
                seen.add(norm)
                probes.append(success("prompt_paraphrase", norm, index=i))
        out["prompt_paraphrase"] = probes
    if "subject_paraphrase" in tests:
        out["subject_paraphrase"] = [
            success("subject_paraphrase", req.prompt.format(s), index=i, subject=s)
            for i, s in enumerate(case.id_paraphrases)
        ]
    if "ood_subject_paraphrase" in tests:
        offset = len(case.id_paraphrases)
        out["ood_subject_paraphrase"] = [
            success("ood_subject_paraphrase", req.prompt.format(s), index=offset + i, subject=s)
            for i, s in enumerate(case.ood_paraphrases)
        ]
    if "scrambled_subject" in tests:
        scrambles = scrambled_subjects(
            req.subject, lm.tokenizer, n_max=cfg.scramble_max, seed=cfg.seed, key=key
        )
        in_domain, held_out = split_half(scrambles)
        out["scrambled_subject"] = [
            success("scrambled_subject", req.prompt.format(s), index=i, half=half, subject=s)
            for i, (s, half) in enumerate(
                [(s, "id") for s in in_domain] + [(s, "ood") for s in held_out]
            )
        ]
    if "long_context" in tests:
        if sampler is _AUTO:
            sampler = passage_sampler(lm, cfg)
        probes = []
        if sampler is not None and cfg.long_context_passages > 0:
            for i, passage in enumerate(sampler.passages(f"{key}:test", cfg.long_context_passages)):
                probes.append(
                    success(
                        "long_context",
                        long_context_prompt(passage, req.text),
                        index=i,
                        length=sampler.length,
                        unit=sampler.unit,
                    )
                )
        out["long_context"] = probes
    if "neighbourhood" in tests:
        out["neighbourhood"] = [
            Probe(nb.prompt, nb.target, None, "neighbourhood", {"index": i})
            for i, nb in enumerate(case.neighbourhood)
            if nb.prompt.strip() and nb.target.strip()
        ]
    return out


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
    lm: Any, case: EditCase, cfg: SuiteConfig | None = None, *, key: str | None = None
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

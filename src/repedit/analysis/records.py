"""The key analysis's records: variant types, the paper's reference levels, and per-case
scores (:class:`VariantKeys`, :class:`CaseSimilarity`) as ``similarity.json`` stores them."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

VARIANTS: tuple[str, ...] = (
    "original",
    "subject_paraphrase",
    "ood_subject_paraphrase",
    "scrambled_subject",
    "long_context",
    "prompt_paraphrase",
    "unrelated",
)
"""Variant types, in report order."""

EQUIVALENT: tuple[str, ...] = (
    "subject_paraphrase",
    "ood_subject_paraphrase",
    "scrambled_subject",
    "long_context",
    "prompt_paraphrase",
)
"""Semantically equivalent variants other than the edit prompt (robustness: should be high)."""

FINDING1_VARIANTS: tuple[str, ...] = (
    "subject_paraphrase",
    "ood_subject_paraphrase",
    "scrambled_subject",
)
"""The variants of the paper's first finding ("paraphrased and scrambled subjects")."""

TEST_OF_VARIANT: dict[str, str] = {
    "original": "efficacy",
    **{v: v for v in VARIANTS if v not in ("original", "unrelated")},
}
"""Variant type → the evaluation test (``results.jsonl``) that scores the same text."""

VARIANT_OF_TEST: dict[str, str] = {t: v for v, t in TEST_OF_VARIANT.items()}

#: the paper's level for paraphrased/scrambled keys ("from 1.0 to < 0.4")
PAPER_LEVEL = 0.4
#: the paper's unrelated-subject β (> 2500) over LLaMA2-7B's d_mlp (11008): the corpus mean of
#: kᵀC⁻¹k is d_mlp (trace identity), which makes the number comparable across models
PAPER_UNRELATED_RATIO = 2500 / 11008
#: bin edges of β̃ for success rates
BETA_BINS: tuple[float, ...] = (-math.inf, 0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2, math.inf)


# --------------------------------------------------------------------------- records


@dataclass
class VariantKeys:
    """Scores of every key of one variant type of one case (parallel lists, one per key).

    ``beta`` = kᵀC⁻¹k*, ``beta_norm`` = β / k*ᵀC⁻¹k*, ``cosine`` = cos(k, k*). ``index`` is the
    evaluation probe's ``meta["index"]`` (0 for ``original``); ``labels`` the substituted
    subject (or the paraphrase text, or ``passage #i``); ``texts`` the full text the key was
    read from; ``token_index`` the token the key was read at (in ``prompt_ids(text)``).
    """

    beta: list[float] = field(default_factory=list)
    beta_norm: list[float] = field(default_factory=list)
    cosine: list[float] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    index: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    token_index: list[int] = field(default_factory=list)
    meta: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.beta)

    def to_dict(self, *, long_texts: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not long_texts:
            d["texts"] = [_abbreviate(t) for t in self.texts]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VariantKeys:
        return cls(**{k: list(v) for k, v in d.items()})


@dataclass
class CaseSimilarity:
    """One case at the edit layer: ``k*``'s self-similarity and every variant key's scores."""

    case_id: str
    subject: str
    prompt: str
    layer: int
    d_mlp: int
    self_similarity: float
    k_star_norm: float
    variants: dict[str, VariantKeys]
    #: variants whose subject could not be located in the text, per type (not scored)
    skipped: dict[str, int] = field(default_factory=dict)

    def beta_norm(self, variant: str) -> np.ndarray:
        vk = self.variants.get(variant)
        return np.asarray(vk.beta_norm if vk else [], dtype=float)

    def beta(self, variant: str) -> np.ndarray:
        vk = self.variants.get(variant)
        return np.asarray(vk.beta if vk else [], dtype=float)

    def to_dict(self, *, long_texts: bool = False) -> dict[str, Any]:
        return {
            "case_id": self.case_id,
            "subject": self.subject,
            "prompt": self.prompt,
            "layer": self.layer,
            "d_mlp": self.d_mlp,
            "self_similarity": self.self_similarity,
            "k_star_norm": self.k_star_norm,
            "skipped": dict(self.skipped),
            "variants": {
                name: vk.to_dict(long_texts=long_texts) for name, vk in self.variants.items()
            },
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CaseSimilarity:
        return cls(
            case_id=str(d["case_id"]),
            subject=d["subject"],
            prompt=d["prompt"],
            layer=int(d["layer"]),
            d_mlp=int(d["d_mlp"]),
            self_similarity=float(d["self_similarity"]),
            k_star_norm=float(d["k_star_norm"]),
            variants={k: VariantKeys.from_dict(v) for k, v in d["variants"].items()},
            skipped=dict(d.get("skipped", {})),
        )


def _abbreviate(text: str, limit: int = 160) -> str:
    if len(text) <= limit:
        return text
    return f"[{len(text) - 100} chars] …" + text[-100:]

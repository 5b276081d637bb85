"""CoRE (context-robust editing): MEMIT whose value must hold after prefixes about the fact.

Two changes to MEMIT, both in the value step (keys and the per-layer solve are MEMIT's):

* the value is fitted after prefixes sampled, for each request, from the model itself starting
  at the old object, the subject and the new object (instead of the editor's shared prefixes),
  so it must win against text that primes the old answer;
* a penalty, weighted by ``variance_weight``, on how far apart the request's hidden states at
  the subject token lie across those rows, at every layer above the last edited one
  (:mod:`repedit.editors.context_variance`).

With ``variance_weight = 0``, ``request_contexts = 0`` and MEMIT's ``value.stop_prob`` it is MEMIT
exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from repedit.data.case import EditRequest
from repedit.data.variants import stable_rng
from repedit.editors.context_variance import ContextVariance
from repedit.editors.contexts import sample_prefixes
from repedit.editors.memit import Memit, MemitHparams
from repedit.editors.value_forms import Form, case_key
from repedit.editors.values import ValueHparams
from repedit.errors import EditError, InvalidRequestError
from repedit.models.loading import LoadedModel
from repedit.models.tokens import document_start

#: what a request's prefixes may be sampled from: its old object, its subject, its new object
SOURCES = ("target_true", "subject", "target_new")


@dataclass
class CoreHparams(MemitHparams):
    method: ClassVar[str] = "core"
    #: λ of the penalty. The penalty sums over row pairs and scales with the model's hidden
    #: norms, so λ does not transfer between models: 1e-4 starts it near a tenth of the target
    #: NLL on SmolLM2, where the reference 0.01 outweighs the NLL and the edit fails (docs/core.md)
    variance_weight: float = 1e-4
    #: how many layers above the last edited one the penalty reads; None: all of them
    variance_layers: int | None = None
    #: per-request value prefixes: how many (split evenly over the sources; 0: use the
    #: editor's shared contexts as MEMIT does), new tokens each, and the sampler's top-k
    request_contexts: int = 15
    request_context_length: int = 10
    request_context_top_k: int = 5
    request_context_sources: tuple[str, ...] = SOURCES
    #: every value step runs (stop_prob 1): stopping once the target is likely could end the
    #: optimisation before the penalty has acted (the reference stops only once the whole loss,
    #: penalty included, is below 0.05)
    value: ValueHparams = field(default_factory=lambda: ValueHparams(stop_prob=1.0))

    def __post_init__(self) -> None:
        bad = [s for s in self.request_context_sources if s not in SOURCES]
        checks = {
            "variance_weight": math.isfinite(self.variance_weight) and self.variance_weight >= 0,
            "variance_layers": self.variance_layers is None or self.variance_layers >= 1,
            "request_contexts": self.request_contexts >= 0,
            "request_context_length": self.request_context_length >= 1,
            "request_context_top_k": self.request_context_top_k >= 1,
            "request_context_sources": bool(self.request_context_sources) and not bad,
        }
        wrong = [f"{k}={getattr(self, k)!r}" for k, ok in checks.items() if not ok]
        if wrong:
            raise InvalidRequestError(
                f"invalid core hyper-parameter(s): {', '.join(wrong)} (sources: {SOURCES})"
            )


def request_prefixes(lm: LoadedModel, request: EditRequest, hp: CoreHparams) -> list[str]:
    """The request's sampled prefixes (each ends in ``". "``), seeded by its case key.

    The count is split evenly over the sources it has (a request without ``target_true``
    draws from the other two), at least one each, as in the reference code.
    """
    texts = {
        "target_true": request.target_true,
        "subject": request.subject,
        "target_new": request.target_new,
    }
    sources = [texts[s] for s in hp.request_context_sources if texts.get(s)]
    if not sources or hp.request_contexts == 0:
        return []
    per_source = max(hp.request_contexts // len(sources), 1)
    start = document_start(lm.tokenizer)
    starters = [start + str(s).strip() for s in sources for _ in range(per_source)]
    seed = stable_rng("core", hp.context_seed, case_key(request)).getrandbits(63)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            texts_out = sample_prefixes(
                lm, starters, hp.request_context_length, top_k=hp.request_context_top_k
            )
        except RuntimeError as exc:  # the sampler rejects NaN/inf or negative probabilities
            raise EditError(
                f"core: sampling the value prefixes of request {case_key(request)!r} failed "
                f"(NaN/inf in the model's output?): {exc}"
            ) from exc
    return [t + ". " for t in texts_out]


class Core(Memit):
    """MEMIT whose value step also fits per-request prefixes and pays the context-variance
    penalty; keys and the solve are MEMIT's."""

    name: ClassVar[str] = "core"
    hparams_class = CoreHparams

    def values_with(  # type: ignore[override]
        self, lm: LoadedModel, hp: CoreHparams, requests: list[EditRequest]
    ) -> dict[str, Any]:
        values_with: dict[str, Any] = {
            "variance": ContextVariance(hp.variance_weight, hp.variance_layers)
        }
        if hp.request_contexts > 0:
            values_with["contexts"] = ["{}"]
            values_with["forms"] = [
                [Form(p + req.prompt, req.subject) for p in request_prefixes(lm, req, hp)]
                for req in requests
            ]
        return values_with

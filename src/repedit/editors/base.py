"""What every locate-and-edit method shares: request checks, contexts, statistics, apply.

A method subclasses ``Editor`` and implements ``_compute`` (keys → values → solve); the base
class validates requests before any weight is touched and applies the result at the end, so a
failure never leaves a model half-edited.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from repedit.data.case import EditRequest
from repedit.editors.contexts import generate_contexts
from repedit.editors.hparams import Hparams, layer_at
from repedit.editors.result import EditResult
from repedit.editors.values import ValueHparams
from repedit.errors import InvalidRequestError
from repedit.models.loading import LoadedModel
from repedit.models.precision import Precision, check_precision
from repedit.models.tokens import Position, continuation_ids, locate
from repedit.stats.corpus import ModelSampledCorpus, resolve_corpus
from repedit.stats.second_moment import SecondMoment, second_moments

#: token budget for C when ``corpus="auto"`` found no text and samples it from the model
SAMPLED_TOKENS = 16_384


@dataclass
class StatsConfig:
    """Which text the key statistics ``C`` come from (see ``repedit.stats``), and in what
    precision its forwards run (``bfloat16``: autocast, opt-in, part of the cache key).
    ``progress``: bars for the editor's long work (statistics, a batch's values)."""

    corpus: str = "auto"
    n_tokens: int = 100_000
    seq_len: int = 256
    cache: str | None = None
    progress: bool = True
    precision: Precision = "model"

    def __post_init__(self) -> None:
        check_precision(self.precision)


@dataclass
class LocateEditHparams(Hparams):
    """Fields shared by every method: where keys are read and how values are optimised."""

    position: Position = "last"
    #: (prefix length in tokens, how many) for the generated context prefixes
    contexts: tuple[tuple[int, int], ...] = ((5, 5), (10, 5))
    context_seed: int = 0
    value: ValueHparams = field(default_factory=ValueHparams)


class Editor:
    """Base class. ``edit(lm, requests)`` returns an applied (by default) ``EditResult``."""

    name: ClassVar[str] = ""
    hparams_class: ClassVar[type[LocateEditHparams]] = LocateEditHparams

    def __init__(
        self,
        hparams: LocateEditHparams | dict[str, Any] | None = None,
        stats: StatsConfig | None = None,
    ):
        if isinstance(hparams, dict):
            hparams = self.hparams_class().replace(**hparams)
        self.hparams = hparams or self.hparams_class()
        self.stats_config = stats or StatsConfig()
        self._contexts: dict[str, list[str]] = {}
        self._stats: dict[tuple[str, int], SecondMoment] = {}

    # -- shared services -------------------------------------------------------------------
    def derived_state(self) -> dict[str, Any]:
        """What this editor derived from models so far (context prefixes, key statistics), for
        :meth:`adopt_state` on another copy of it, so a worker process need not derive it again."""
        return {"contexts": dict(self._contexts), "stats": dict(self._stats)}

    def adopt_state(self, state: dict[str, Any]) -> None:
        """Take over another copy's :meth:`derived_state` (keyed by model fingerprint, so a
        different model simply derives its own)."""
        self._contexts.update(state.get("contexts", {}))
        self._stats.update(state.get("stats", {}))

    def contexts(self, lm: LoadedModel, hp: LocateEditHparams) -> list[str]:
        """Context prefixes for this model, generated once per editor (seeded)."""
        key = f"{lm.fingerprint}:{hp.contexts}:{hp.context_seed}"
        if key not in self._contexts:
            self._contexts[key] = generate_contexts(lm, hp.contexts, seed=hp.context_seed)
        return self._contexts[key]

    def second_moment(self, lm: LoadedModel, layers: Sequence[int]) -> dict[int, SecondMoment]:
        """``C`` per layer from the configured corpus (disk-cached, and kept in memory)."""
        missing = [layer for layer in layers if (lm.fingerprint, layer) not in self._stats]
        if missing:
            cfg = self.stats_config
            corpus = resolve_corpus(cfg.corpus, lm)
            n_tokens = cfg.n_tokens
            if cfg.corpus == "auto" and isinstance(corpus, ModelSampledCorpus):
                # sampling is slow on a CPU; enough tokens for a well-conditioned C, not more
                n_tokens = min(n_tokens, SAMPLED_TOKENS)
            got = second_moments(
                lm,
                missing,
                corpus,
                n_tokens,
                seq_len=cfg.seq_len,
                cache=cfg.cache,
                progress=cfg.progress,
                precision=cfg.precision,
            )
            for layer, moment in got.items():
                self._stats[(lm.fingerprint, layer)] = moment
        return {layer: self._stats[(lm.fingerprint, layer)] for layer in layers}

    def resolved(self, lm: LoadedModel) -> LocateEditHparams:
        """Hyper-parameters with model-derived defaults filled in (layers, weights)."""
        return self.hparams.for_model(lm)

    # -- the pipeline ----------------------------------------------------------------------
    def validate(self, lm: LoadedModel, requests: Sequence[EditRequest]) -> None:
        """Fail early, naming the request, before any weight changes."""
        if not requests:
            raise InvalidRequestError("no edit requests given")
        for i, req in enumerate(requests):
            name = req.case_id if req.case_id is not None else f"#{i}"
            try:
                locate(lm.tokenizer, req.prompt, req.subject, position=self.hparams.position)
                continuation_ids(lm.tokenizer, req.text, req.target_new)
            except InvalidRequestError as exc:
                raise InvalidRequestError(f"request {name} ({req.subject!r}): {exc}") from None

    def edit(
        self, lm: LoadedModel, requests: Sequence[EditRequest] | EditRequest, *, apply: bool = True
    ) -> EditResult:
        """Compute the edit for ``requests`` and (by default) apply it to ``lm``."""
        if isinstance(requests, EditRequest):
            requests = [requests]
        requests = list(requests)
        self.validate(lm, requests)
        hp = self.resolved(lm)
        for layer in self.layers(lm, hp):
            if not 0 <= layer < lm.n_layers:
                raise InvalidRequestError(
                    f"{self.name}: edit layer {layer} is out of range (the model has layers "
                    f"0..{lm.n_layers - 1}); set 'layer'/'layers' accordingly"
                )
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            result = self._compute(lm, hp, requests)
        result.info.setdefault("seconds", time.perf_counter() - t0)
        result.requests = [r.to_dict() for r in requests]
        result.hparams = {"method": self.name, **hp.to_dict()}
        if apply:
            result.apply(lm)
        return result

    def layers(self, lm: LoadedModel, hp: LocateEditHparams) -> list[int]:
        raise NotImplementedError

    def _compute(
        self, lm: LoadedModel, hp: LocateEditHparams, requests: list[EditRequest]
    ) -> EditResult:
        raise NotImplementedError


def default_layer(lm: LoadedModel, layer: int | None, fraction: float) -> int:
    return layer if layer is not None else layer_at(fraction, lm.n_layers)

"""EMMET (Gupta, Sajnani & Anumanchipalli, 2024): batched edits as equality constraints.

Minimise ``‖ŴK₀ − WK₀‖²`` subject to ``ŴK_E = V_E``:
``ΔW = R (K_Eᵀ(λC)⁻¹K_E + ρI)⁻¹ K_Eᵀ(λC)⁻¹``. With one edit and ρ = 0 this is R-ROME. The
reference code edits one layer with λ = 1e5 (for d_mlp = 11008) and ρ = 0.1, with MEMIT-style
hidden-state targets; repedit scales λ with d_mlp so the share written stays comparable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from repedit.data.case import EditRequest
from repedit.editors.base import Editor, LocateEditHparams
from repedit.editors.memit import KeyMode, fraction_layers, spread_over_layers
from repedit.editors.result import EditResult
from repedit.editors.solve import equality_constrained_update
from repedit.models.loading import LoadedModel
from repedit.stats.second_moment import SecondMoment

SCALE_PER_DIM = 1e5 / 11008


@dataclass
class EmmetHparams(LocateEditHparams):
    method: ClassVar[str] = "emmet"
    layers: tuple[int, ...] | None = None
    #: one layer, at ROME's depth, unless ``layers`` says otherwise
    layer_fractions: tuple[float, float] = (0.16, 0.16)
    #: λ scaling C; None derives SCALE_PER_DIM · d_mlp
    mom2_update_weight: float | None = None
    #: ρ added to K_Eᵀ(λC)⁻¹K_E (also for a single edit, as in the reference code)
    emmet_lambda: float = 0.1
    #: "auto", "each" or "mean" (see MemitHparams.key_mode)
    key_mode: KeyMode = "auto"


class Emmet(Editor):
    name: ClassVar[str] = "emmet"
    hparams_class = EmmetHparams

    def layers(self, lm: LoadedModel, hp: EmmetHparams) -> list[int]:  # type: ignore[override]
        return fraction_layers(lm, hp.layers, hp.layer_fractions)

    def _compute(
        self,
        lm: LoadedModel,
        hp: EmmetHparams,  # type: ignore[override]
        requests: list[EditRequest],
    ) -> EditResult:
        scale = hp.mom2_update_weight or SCALE_PER_DIM * lm.arch.d_mlp

        def solve(
            layer: int, keys: torch.Tensor, share: torch.Tensor, c: SecondMoment
        ) -> torch.Tensor:
            return equality_constrained_update(keys, share, c, scale, hp.emmet_lambda)

        return spread_over_layers(self, lm, hp, requests, self.layers(lm, hp), solve)

"""AlphaEdit (Fang et al., 2025): MEMIT projected onto the null space of preserved knowledge.

The update is confined to directions where general-text keys (the eigenvectors of ``C`` with
tiny eigenvalues) carry almost no energy, so preserved associations are untouched:
``ΔW = R Kᵀ P (P(K Kᵀ + K_p K_pᵀ) + l2·I)⁻¹``. ``K_p`` are the keys of this editor's earlier
edits *that are still applied*, so a run of sequential edits does not undo itself while an
edit-evaluate-revert loop starts afresh each time (``reset()`` forgets all of them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from repedit.data.case import EditRequest
from repedit.editors.base import Editor
from repedit.editors.memit import MemitHparams, fraction_layers, spread_over_layers
from repedit.editors.result import EditResult
from repedit.editors.solve import null_space_projector, null_space_update
from repedit.editors.values import ValueHparams
from repedit.models.loading import LoadedModel
from repedit.stats.second_moment import SecondMoment


@dataclass
class AlphaEditHparams(MemitHparams):
    method: ClassVar[str] = "alphaedit"
    #: eigenvalues of C below this fraction of the largest span the null space
    nullspace_threshold: float = 1e-2
    l2: float = 10.0
    #: the value side is MEMIT's default only: its cost to AlphaEdit's locality is not measured
    value: ValueHparams = field(default_factory=ValueHparams)


class AlphaEdit(Editor):
    name: ClassVar[str] = "alphaedit"
    hparams_class = AlphaEditHparams

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._projectors: dict[tuple[str, int, float], torch.Tensor] = {}
        #: this editor's earlier results; only those still applied count as K_p
        self._history: list[EditResult] = []

    def reset(self) -> None:
        """Forget earlier edits (start a new sequential-editing session)."""
        self._history.clear()

    def past_kkt(self, lm: LoadedModel, layer: int) -> torch.Tensor | None:
        """Σ K_p K_pᵀ over this editor's earlier edits that are still applied to ``lm``."""
        total = None
        for result in self._history:
            key = f"keys.{layer}"
            if result.applied and result.fingerprint == lm.fingerprint and key in result.tensors:
                k = result.tensors[key].to(torch.float64).T  # [d_mlp, n]
                total = k @ k.T if total is None else total + k @ k.T
        return total

    def layers(self, lm: LoadedModel, hp: AlphaEditHparams) -> list[int]:  # type: ignore[override]
        return fraction_layers(lm, hp.layers, hp.layer_fractions)

    def _compute(
        self,
        lm: LoadedModel,
        hp: AlphaEditHparams,  # type: ignore[override]
        requests: list[EditRequest],
    ) -> EditResult:
        def solve(
            layer: int, keys: torch.Tensor, share: torch.Tensor, c: SecondMoment
        ) -> torch.Tensor:
            pkey = (lm.fingerprint, layer, hp.nullspace_threshold)
            if pkey not in self._projectors:
                self._projectors[pkey] = null_space_projector(c, hp.nullspace_threshold)
            return null_space_update(
                keys, share, self._projectors[pkey], self.past_kkt(lm, layer), hp.l2
            )

        result = spread_over_layers(self, lm, hp, requests, self.layers(lm, hp), solve)
        self._history.append(result)  # counts once applied (now or later), not after revert
        return result

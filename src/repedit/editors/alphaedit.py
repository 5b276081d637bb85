"""AlphaEdit (Fang et al., 2025): MEMIT projected onto the null space of preserved knowledge.

The update is confined to directions where general-text keys (the eigenvectors of ``C`` with
tiny eigenvalues) carry almost no energy, so preserved associations are untouched:
``ΔW = R Kᵀ P (P(K Kᵀ + K_p K_pᵀ) + l2·I)⁻¹``. ``K_p`` are the keys of this editor's earlier
edits, kept on the editor object so a run of sequential edits does not undo itself
(``reset()`` forgets them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from repedit.data.case import EditRequest
from repedit.editors.base import Editor
from repedit.editors.memit import MemitHparams, fraction_layers, spread_over_layers
from repedit.editors.result import EditResult
from repedit.editors.solve import null_space_projector, null_space_update
from repedit.stats.second_moment import SecondMoment


@dataclass
class AlphaEditHparams(MemitHparams):
    method: ClassVar[str] = "alphaedit"
    #: eigenvalues of C below this fraction of the largest span the null space
    nullspace_threshold: float = 1e-2
    l2: float = 10.0


class AlphaEdit(Editor):
    name: ClassVar[str] = "alphaedit"
    hparams_class = AlphaEditHparams

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._projectors: dict[tuple[str, int, float], torch.Tensor] = {}
        self._past_kkt: dict[tuple[str, int], torch.Tensor] = {}

    def reset(self) -> None:
        """Forget earlier edits' keys (start a new sequential-editing session)."""
        self._past_kkt.clear()

    def layers(self, lm: Any, hp: AlphaEditHparams) -> list[int]:  # type: ignore[override]
        return fraction_layers(lm, hp.layers, hp.layer_fractions)

    def _compute(
        self,
        lm: Any,
        hp: AlphaEditHparams,  # type: ignore[override]
        requests: list[EditRequest],
    ) -> EditResult:
        def solve(
            layer: int, keys: torch.Tensor, share: torch.Tensor, c: SecondMoment
        ) -> torch.Tensor:
            pkey = (lm.fingerprint, layer, hp.nullspace_threshold)
            if pkey not in self._projectors:
                self._projectors[pkey] = null_space_projector(c, hp.nullspace_threshold)
            past = self._past_kkt.get((lm.fingerprint, layer))
            return null_space_update(keys, share, self._projectors[pkey], past, hp.l2)

        result = spread_over_layers(self, lm, hp, requests, self.layers(lm, hp), solve)
        for layer in result.layers:
            k = result.tensors[f"keys.{layer}"].to(torch.float64).T  # [d_mlp, n]
            key = (lm.fingerprint, layer)
            self._past_kkt[key] = self._past_kkt.get(key, 0) + k @ k.T
        return result

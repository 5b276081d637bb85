"""ROME: a rank-one update of one down-projection (Meng et al., 2022).

``Ŵ = W + δ (C⁻¹k*)ᵀ / ((C⁻¹k*)ᵀ k_o)``, where ``k*`` is the context-averaged key, ``k_o`` the
bare-prompt key (as in the reference code) and ``δ = v* − W k_o`` the optimised change of the
MLP output. Several requests are applied one after the other (each sees the previous edits);
the result holds their summed delta.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from repedit.data.case import EditRequest
from repedit.editors.base import Editor, LocateEditHparams, default_layer
from repedit.editors.keys import key_inputs, keys_at
from repedit.editors.result import EditResult
from repedit.editors.solve import rank_one_update
from repedit.editors.values import optimise_values
from repedit.models.loading import LoadedModel


@dataclass
class RomeHparams(LocateEditHparams):
    method: ClassVar[str] = "rome"
    layer: int | None = None
    #: ROME edits an early-middle layer: 5 of 32 for LLaMA-2 7B (the REP paper's setting)
    layer_fraction: float = 0.16


class Rome(Editor):
    name: ClassVar[str] = "rome"
    hparams_class = RomeHparams
    #: ROME's residual and denominator use the bare-prompt key (R-ROME changes this)
    consistent_keys: ClassVar[bool] = False

    def layers(self, lm: LoadedModel, hp: RomeHparams) -> list[int]:  # type: ignore[override]
        return [default_layer(lm, hp.layer, hp.layer_fraction)]

    def _compute(
        self,
        lm: LoadedModel,
        hp: RomeHparams,  # type: ignore[override]
        requests: list[EditRequest],
    ) -> EditResult:
        (layer,) = self.layers(lm, hp)
        contexts = self.contexts(lm, hp)
        stats = self.second_moment(lm, [layer])[layer]
        name = f"{lm.arch.down_proj_name(layer)}.weight"
        steps = []
        k_stars, v_stars, total = [], [], None
        applied: list[EditResult] = []
        try:
            for req in requests:
                seqs, pos = key_inputs(lm, [req], contexts, hp.position)
                flat = keys_at(lm, [layer], seqs, pos)[layer].float()  # [contexts, d_mlp]
                k_star, k_o = flat.mean(0), flat[0]
                values = optimise_values(
                    lm, [req], contexts, layer=layer, site="mlp", hp=hp.value, position=hp.position
                )
                # the value optimisation asks for output + δ wherever the subject appears, so
                # the residual the update must write at its reference key is δ itself
                k_res = k_star if self.consistent_keys else k_o
                delta = rank_one_update(stats, k_star, k_res, values.delta[0])
                stored = lm.arch.to_storage(delta).float().cpu()
                step = EditResult(self.name, lm.fingerprint, {name: stored}).apply(lm)
                applied.append(step)
                total = stored if total is None else total + stored
                k_stars.append(k_star.cpu())
                v_stars.append(values.target[0])
                steps.append({"value_prob": values.prob[0], "value_steps": values.steps[0]})
        finally:
            for step in reversed(applied):
                step.revert(lm)
        assert total is not None
        return EditResult(
            self.name,
            lm.fingerprint,
            {name: total},
            info={"layer": layer, "requests": steps},
            tensors={
                f"keys.{layer}": torch.stack(k_stars),
                f"values.{layer}": torch.stack(v_stars),
            },
        )

"""MEMIT (Meng et al., 2023): many edits spread over a range of layers by least squares.

A target hidden state ``z`` is optimised at the output of the last edited layer. The layers are
then updated in order: each recomputes its keys (earlier updates change them), takes the
remaining residual ``R = z − h`` and writes its share ``R / (layers left)`` with
``ΔW = R Kᵀ (λC + K Kᵀ)⁻¹``. EMMET and AlphaEdit reuse this procedure with their own solve.
Where a layer normalises its MLP output before the residual add (Gemma 2/3), the share is first
mapped through that norm (:mod:`repedit.editors.post_norm`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, get_args

import torch

from repedit.data.case import EditRequest
from repedit.editors.base import Editor, LocateEditHparams
from repedit.editors.hparams import layer_at
from repedit.editors.keys import compute_keys
from repedit.editors.post_norm import through_post_norm
from repedit.editors.result import EditResult
from repedit.editors.solve import least_squares_update
from repedit.editors.values import ROBUST_VALUE, ValueHparams, current_values, optimise_values
from repedit.errors import InvalidRequestError
from repedit.models.loading import LoadedModel
from repedit.stats.second_moment import SecondMoment

#: (layer, keys [d_mlp, n], residual share [d_model, n], C) -> ΔW [d_model, d_mlp]
LayerSolve = Callable[[int, torch.Tensor, torch.Tensor, SecondMoment], torch.Tensor]

#: λ/d_mlp of the reference LLaMA-2 7B setting (15000 for d_mlp = 11008); scaling λ with d_mlp
#: keeps the share of the residual written at a typical key the same across model sizes
LAMBDA_PER_DIM = 15000 / 11008

#: how a request's context keys enter the solve (see ``MemitHparams.key_mode``)
KeyMode = Literal["auto", "each", "mean"]


def resolve_key_mode(
    mode: str, n_requests: int, n_contexts: int, d_mlp: int
) -> Literal["each", "mean"]:
    """``"each"`` or ``"mean"``; ``"auto"`` is ``"each"`` while the batch's context keys fit
    in the key space (``n_requests · n_contexts ≤ d_mlp``), else ``"mean"``: beyond that the
    per-context columns span every direction and their deviations pull ΔW towards zero."""
    if mode not in get_args(KeyMode):
        raise InvalidRequestError(f"key_mode must be 'auto', 'each' or 'mean', not {mode!r}")
    if mode == "auto":
        return "each" if n_requests * n_contexts <= d_mlp else "mean"
    return "each" if mode == "each" else "mean"


@dataclass
class MemitHparams(LocateEditHparams):
    method: ClassVar[str] = "memit"
    layers: tuple[int, ...] | None = None
    #: first and last edited layer as depth fractions: layers 4–8 of 32 for LLaMA-2 7B
    layer_fractions: tuple[float, float] = (0.125, 0.25)
    #: λ in (λC + KKᵀ); None derives it from the model as LAMBDA_PER_DIM · d_mlp
    mom2_update_weight: float | None = None
    #: "each": every context's key is its own column sharing the request's residual, so the
    #: edit also holds where a key is far from the average, e.g. a subject at the very start of
    #: a prompt with no BOS token (SmolLM2: β̃ of the bare key ≈ 0.3); "mean": one
    #: context-averaged key per request, as in the reference code (for reproduction and mass
    #: editing); "auto" (default): "each" while requests × contexts ≤ d_mlp, else "mean"
    #: (:func:`resolve_key_mode`; the mode used is in the result's ``info["key_mode"]``)
    key_mode: KeyMode = "auto"
    #: value-side robustness on by default: three in-domain scrambles and corpus passages of
    #: 50 and 300 words as rows of the value loss (what it buys and costs: docs/core.md)
    value: ValueHparams = field(default_factory=lambda: ValueHparams(**ROBUST_VALUE))


def fraction_layers(
    lm: LoadedModel, layers: tuple[int, ...] | None, fractions: tuple[float, float]
) -> list[int]:
    if layers:
        return sorted(layers)
    lo, hi = (layer_at(f, lm.n_layers) for f in fractions)
    return list(range(lo, hi + 1))


def _mlp_share(
    lm: LoadedModel, layer: int, keys: torch.Tensor, share: torch.Tensor
) -> torch.Tensor:
    """The change of layer ``layer``'s MLP output that moves the residual stream by ``share``
    at ``keys`` (``[n, d_mlp]``): ``share`` itself, or mapped through a post-MLP norm (Gemma 2/3)
    where the layer has one."""
    norm = lm.arch.post_mlp(layer)
    if norm is None:
        return share
    weight = lm.arch.weight(layer)
    with torch.no_grad():
        outputs = lm.arch.down_proj(layer)(keys.to(device=weight.device, dtype=weight.dtype))
    return through_post_norm(norm, outputs, share.to(outputs.device)).to(share.device)


def spread_over_layers(
    editor: Editor,
    lm: LoadedModel,
    hp: LocateEditHparams,
    requests: list[EditRequest],
    layers: list[int],
    solve: LayerSolve,
    values_with: dict[str, Any] | None = None,
) -> EditResult:
    """The MEMIT procedure with a pluggable per-layer solve; leaves ``lm`` unchanged.

    ``values_with``: keyword arguments for :func:`optimise_values` that override the defaults
    (an editor's own value contexts, extra forms or penalty); the keys keep the editor's
    contexts.
    """
    contexts = editor.contexts(lm, hp)
    stats = editor.second_moment(lm, layers)
    key_mode = resolve_key_mode(
        getattr(hp, "key_mode", "mean"), len(requests), len(contexts), lm.arch.d_mlp
    )
    last = layers[-1]
    value_args: dict[str, Any] = {
        "contexts": contexts,
        "progress": editor.stats_config.progress and len(requests) > 1,
        **(values_with or {}),
    }
    values = optimise_values(
        lm, requests, layer=last, site="residual", hp=hp.value, position=hp.position, **value_args
    )
    z = values.target  # [n, d_model]
    deltas: dict[str, torch.Tensor] = {}
    tensors: dict[str, torch.Tensor] = {}
    applied: list[EditResult] = []
    try:
        for i, layer in enumerate(layers):
            keys = compute_keys(
                lm, [layer], requests, contexts, position=hp.position, mean=key_mode == "mean"
            )[layer]  # [n or n·contexts, d_mlp]
            h = current_values(lm, requests, layer=last, site="residual", position=hp.position)
            share = (z - h).T / (len(layers) - i)  # [d_model, n]
            if key_mode == "each":
                share = share.repeat_interleave(len(contexts), dim=1)
            share = _mlp_share(lm, layer, keys, share)
            delta = solve(layer, keys.T, share, stats[layer])
            name = f"{lm.arch.down_proj_name(layer)}.weight"
            stored = lm.arch.to_storage(delta).float().cpu()
            deltas[name] = stored
            tensors[f"keys.{layer}"] = keys.cpu()
            applied.append(EditResult(editor.name, lm.fingerprint, {name: stored}).apply(lm))
    finally:
        for step in reversed(applied):
            step.revert(lm)
    tensors[f"targets.{last}"] = z
    info = {
        "layers": layers,
        "value_prob": values.prob,
        "value_steps": values.steps,
        "key_mode": key_mode,
    }
    return EditResult(editor.name, lm.fingerprint, deltas, info=info, tensors=tensors)


class Memit(Editor):
    name: ClassVar[str] = "memit"
    hparams_class = MemitHparams

    def layers(self, lm: LoadedModel, hp: MemitHparams) -> list[int]:  # type: ignore[override]
        return fraction_layers(lm, hp.layers, hp.layer_fractions)

    def _compute(
        self,
        lm: LoadedModel,
        hp: MemitHparams,  # type: ignore[override]
        requests: list[EditRequest],
    ) -> EditResult:
        lam = hp.mom2_update_weight or LAMBDA_PER_DIM * lm.arch.d_mlp

        def solve(
            layer: int, keys: torch.Tensor, share: torch.Tensor, c: SecondMoment
        ) -> torch.Tensor:
            return least_squares_update(keys, share, c, lam)

        extra = self.values_with(lm, hp, requests)
        return spread_over_layers(self, lm, hp, requests, self.layers(lm, hp), solve, extra)

    def values_with(
        self, lm: LoadedModel, hp: MemitHparams, requests: list[EditRequest]
    ) -> dict[str, Any] | None:
        """Extra arguments of the value step (None: MEMIT's own); a variant on MEMIT's solve,
        such as CoRE, overrides only this."""
        return None

"""REP's training targets per adapted layer and request, from the edit's own keys.

``t`` is the loss target (``u = C⁻¹k*/‖C⁻¹k*‖`` for ``cfg.target="whitened"``, the raw ``k*``
for ``"raw"``; ``"released"`` mixes them by editor), ``u`` the whitened unit direction, ``w``
the row with ``β̃(k) = k·w`` and ``k`` the edit key itself. ``k*`` is the key the editor solved
each layer's update for (``edit_result.tensors["keys.<layer>"]``), so REP aims at what the
edit actually fires on.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from repedit.data.case import request_identity
from repedit.editors.keys import compute_keys
from repedit.errors import InvalidRequestError
from repedit.models.loading import LoadedModel
from repedit.models.tokens import Position
from repedit.rep.adapter import RepConfig
from repedit.rep.variants import RepItem
from repedit.stats.second_moment import SecondMoment

log = logging.getLogger(__name__)


@dataclass
class Targets:
    t: dict[int, torch.Tensor]  # [n, d] the loss target per layer
    u: dict[int, torch.Tensor]  # [n, d] whitened unit direction (reports)
    w: dict[int, torch.Tensor]  # [n, d] C⁻¹k*/(k*ᵀC⁻¹k*): β̃(k) = k·w (reports)
    k: dict[int, torch.Tensor]  # [n, d] k* itself (the ``match`` loss)
    source: dict[int, str]


def _request_rows(edit_result: Any, items: Sequence[RepItem]) -> list[int]:
    stored = [request_identity(dict(r)) for r in (getattr(edit_result, "requests", None) or [])]
    wanted = [it.request.identity() for it in items]
    if stored and all(w in stored for w in wanted):
        return [stored.index(w) for w in wanted]
    if not stored or len(stored) == len(items):
        return list(range(len(items)))
    raise InvalidRequestError(
        f"the edit holds {len(stored)} requests and none match the {len(items)} REP is asked to "
        "train for; pass the same requests (or cases) that were edited"
    )


def edit_targets(
    lm: LoadedModel,
    edit_result: Any,
    items: Sequence[RepItem],
    layers: Sequence[int],
    stats: Mapping[int, SecondMoment],
    cfg: RepConfig,
    *,
    contexts: Sequence[str] = ("{}",),
    position: Position = "last",
) -> Targets:
    """``t``, ``u`` and ``w`` per layer for each item's request (see the module docstring)."""
    rows = _request_rows(edit_result, items)
    n_stored = len(getattr(edit_result, "requests", None) or []) or len(items)
    tensors = getattr(edit_result, "tensors", {}) or {}
    mode = cfg.target
    if mode == "released":
        method = str(getattr(edit_result, "method", "")).lower()
        mode = "whitened" if method in ("rome", "r-rome") else "raw"
    out = Targets({}, {}, {}, {}, {})
    for layer in layers:
        if layer not in stats:
            raise InvalidRequestError(f"REP needs C for layer {layer} (stats has {sorted(stats)})")
        k = tensors.get(f"keys.{layer}")
        if k is not None and k.shape[0] != n_stored and k.shape[0] % n_stored == 0:
            # MEMIT key_mode="each": one key per context, request-major; k* is their mean
            k = k.reshape(n_stored, -1, k.shape[-1]).mean(1)
        if k is not None and k.shape[0] == n_stored:
            k_star = k[rows].float()
            out.source[layer] = "edit"
        else:
            reqs = [it.request for it in items]
            k_star = compute_keys(lm, [layer], reqs, list(contexts), position=position)[layer]
            out.source[layer] = "computed"
            log.warning("REP: no keys.%d in the edit result; k* recomputed on the model", layer)
        k_star = k_star.to(torch.float64).cpu()
        cinv = stats[layer].solve(k_star.T).T.reshape(k_star.shape)  # [n, d] C⁻¹k*
        u = cinv / cinv.norm(dim=-1, keepdim=True)
        w = cinv / (cinv * k_star).sum(-1, keepdim=True)
        dev = lm.device
        out.u[layer] = u.float().to(dev)
        out.w[layer] = w.float().to(dev)
        out.k[layer] = k_star.float().to(dev)
        out.t[layer] = (u if mode == "whitened" else k_star).float().to(dev)
    return out

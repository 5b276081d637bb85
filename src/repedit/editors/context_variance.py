"""CoRE's penalty: how far apart a request's hidden states lie across its training rows.

Every row of a request (the edit prompt after the bare slot, each context prefix, each extra
form) carries the same ``δ`` at the subject token. ``δ`` is shared, so it cannot by itself make
the rows agree at the injection layer; it can choose a direction that later layers turn into
nearly the same state whatever came before the subject. The penalty reads those later layers'
outputs at the subject token and charges their spread, so the optimiser prefers such a ``δ``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from repedit.errors import InvalidRequestError


@dataclass(frozen=True)
class ContextVariance:
    """The penalty's weight and which layers it reads (``None``: every layer above the edit)."""

    weight: float
    layers: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise InvalidRequestError(f"context variance weight must be >= 0, not {self.weight!r}")
        if self.layers is not None and self.layers < 1:
            raise InvalidRequestError(f"context variance layers must be >= 1, not {self.layers!r}")

    def monitored(self, layer: int, n_layers: int) -> list[int]:
        """The layers read for an edit injected at the output of ``layer``."""
        last = n_layers - 1 if self.layers is None else min(n_layers - 1, layer + self.layers)
        return list(range(layer + 1, last + 1))


def pairwise_spread(hidden: torch.Tensor, owner: torch.Tensor, n: int) -> torch.Tensor:
    """Per request, ``Σ_{i<j} ‖h_i − h_j‖² / d`` over its rows, averaged over layers [n].

    ``hidden``: [layers, rows, d]; ``owner``: [rows] request index. Uses
    ``Σ_{i<j} ‖h_i − h_j‖² = N Σ_i ‖h_i‖² − ‖Σ_i h_i‖²`` (N rows), one pass over the rows.
    A request with one row has spread 0; with no layers to read the spread is 0.
    """
    if hidden.shape[0] == 0:
        return torch.zeros(n, device=hidden.device)
    h = hidden.float()
    n_layers, _, d = h.shape
    count = torch.zeros(n, device=h.device).index_add(
        0, owner, torch.ones_like(owner, dtype=h.dtype)
    )
    sq = torch.zeros(n_layers, n, device=h.device).index_add(1, owner, h.pow(2).sum(-1))
    total = torch.zeros(n_layers, n, d, device=h.device).index_add(1, owner, h)
    spread = count * sq - total.pow(2).sum(-1)  # [layers, n]
    return spread.mean(0) / d

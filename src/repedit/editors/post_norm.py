"""Residual shares mapped through a post-MLP norm (Gemma 2/3).

MEMIT-style editors write a share ``s`` of a residual-stream target into each layer's MLP
output. Where the layer normalises that output before the residual add
(``h += norm(m)``, an RMS norm with gain ``g``), writing ``s`` into ``m`` moves the residual by
about ``g ⊙ s / rms(m)``: next to nothing when ``rms(m)`` is large. This module finds the MLP
output change that moves the *normalised* output by ``s`` instead.

The norm is scale-invariant, so its outputs lie on ``{g ⊙ u : rms(u) = 1}``: at the current
output one direction, ``û / g`` with ``û = m / rms(m)``, cannot be moved along at all. ``s`` loses
its component along that direction (the nearest reachable change), and the new output is
``u = û + s ⊙ g / (g² + f²)`` (``f`` damps channels whose gain is near zero, which the residual
barely sees), rescaled to ``rms(m)`` so that the change has no needless radial part. For a small
``s`` this is the first-order inverse of the norm.
"""

from __future__ import annotations

import torch
from torch import nn

#: damping of the gain inverse, as a fraction of the median |gain|
GAIN_FLOOR = 0.01


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean(dim=-1, keepdim=True).sqrt()


@torch.no_grad()
def norm_gain(
    norm: nn.Module, width: int, *, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The per-channel gain ``g`` of an RMS-style norm: its output for an all-ones input
    (``rms = 1``), so it holds for any parametrisation (``w`` or ``1 + w``)."""
    return norm(torch.ones(1, width, dtype=dtype, device=device)).reshape(width).float()


@torch.no_grad()
def through_post_norm(norm: nn.Module, outputs: torch.Tensor, share: torch.Tensor) -> torch.Tensor:
    """The MLP output change ``Δm`` (``[d_model, n]``) with ``norm(m + Δm) ≈ norm(m) + share``.

    ``outputs``: the layer's current MLP outputs ``m`` at the edited keys, ``[n, d_model]``;
    ``share``: the residual-stream change wanted there, ``[d_model, n]``.
    """
    m = outputs.float()
    gain = norm_gain(norm, m.shape[-1], dtype=outputs.dtype, device=outputs.device)
    floor = GAIN_FLOOR * gain.abs().median()
    inverse = gain / (gain.pow(2) + floor.pow(2))  # damped 1 / g
    scale = _rms(m)  # [n, 1]
    unit = m / scale
    wanted = share.T.float()
    normal = unit * inverse  # the one output direction the norm cannot move along
    wanted = wanted - normal * (wanted * normal).sum(-1, keepdim=True) / normal.pow(2).sum(
        -1, keepdim=True
    )
    u = unit + wanted * inverse
    target = u * (scale / _rms(u))
    return (target - m).T.to(share.dtype)

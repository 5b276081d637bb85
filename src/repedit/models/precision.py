"""Compute precision: the forwards of key statistics and scoring under bfloat16 autocast.

``model`` runs every forward in the weights' own dtype. ``bfloat16`` runs them under
``torch.autocast(..., dtype=bfloat16)``: about twice the speed on CPUs with AVX-512 BF16 or AMX
(and on CUDA), at about 0.5 % relative error in ``C``. It is opt-in because results then depend
on the machine, and :func:`compute_dtype` names it so caches and run directories can tell the
two apart. The edit's own optimisation never runs under it.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from repedit.errors import InvalidRequestError

Precision = Literal["model", "bfloat16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


def check_precision(precision: str) -> Precision:
    """``precision`` itself, or InvalidRequestError naming the choices."""
    if precision not in PRECISIONS:
        raise InvalidRequestError(
            f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}"
        )
    return precision  # type: ignore[return-value]


def precision_context(
    device: torch.device, precision: Precision
) -> contextlib.AbstractContextManager[Any]:
    """The autocast context for ``precision`` on ``device`` (a no-op for ``model``)."""
    if check_precision(precision) == "model":
        return contextlib.nullcontext()
    if not fast_bfloat16(device.type):
        warnings.warn(
            f"precision=bfloat16 on a {device.type} without bfloat16 instructions: it runs, "
            "emulated, slower than float32",
            stacklevel=2,
        )
    return torch.autocast(device.type, dtype=torch.bfloat16)


@functools.cache
def fast_bfloat16(device_type: str) -> bool:
    """Whether ``device_type`` computes bfloat16 natively (CPU: AVX-512 BF16 or AMX flags)."""
    if device_type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((ln for ln in text.splitlines() if ln.startswith("flags")), "").split()
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


def compute_dtype(weights: torch.dtype, precision: Precision) -> str:
    """What the forwards compute in, as a cache-key label: ``float32``, ``bfloat16`` (weights),
    or ``float32+autocast-bfloat16``."""
    name = str(weights).removeprefix("torch.")
    if check_precision(precision) == "model" or weights == torch.bfloat16:
        return name
    return f"{name}+autocast-bfloat16"

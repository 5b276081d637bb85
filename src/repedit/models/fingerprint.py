"""A short, stable identity for a base model, used to key caches and guard saved edits."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn

_VOLATILE_CONFIG_KEYS = {
    "_name_or_path",
    "transformers_version",
    "quantization_config",
    "dtype",
    "torch_dtype",
    "_commit_hash",
    "architectures",
    "use_cache",
    "_attn_implementation_autoset",
}
_SAMPLE = 64


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over the config and a sample of every weight tensor, first 16 hex digits.

    Samples are rounded to bfloat16 before hashing so the same checkpoint loaded in float32 or
    bfloat16 (or on another device) has the same fingerprint; a float16 copy may differ, since
    float32 → float16 → bfloat16 rounds some values differently. Compute it *before*
    editing: ``LoadedModel`` does so at load time.
    """
    h = hashlib.sha256()
    config_obj: Any = getattr(model, "config", None)
    config = config_obj.to_dict() if config_obj is not None else {}
    clean = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
    h.update(json.dumps(clean, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            sample = torch.cat([flat[:_SAMPLE], flat[-_SAMPLE:]]) if flat.numel() else flat
            if sample.is_floating_point():
                sample = sample.to("cpu", torch.bfloat16).view(torch.int16)
            h.update(name.encode())
            h.update(str(tuple(tensor.shape)).encode())
            h.update(sample.to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()[:16]

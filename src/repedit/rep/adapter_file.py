"""REP adapter files: adapters saved as safetensors with JSON metadata, and read back.

A file is tied to the base model's fingerprint, so loading it onto another model is refused;
one that is damaged or hand-edited is refused with a ``RepeditError`` before anything is
allocated from its sizes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from repedit import __version__
from repedit.errors import FingerprintMismatchError, RepeditError
from repedit.io import read_safetensors, write_safetensors
from repedit.models.loading import LoadedModel
from repedit.rep.adapter import FORMAT, Adapter, RepAdapter, RepConfig, RepStack, stack_adapters


def _members(adapter: Adapter) -> list[RepAdapter]:
    return list(adapter.adapters) if isinstance(adapter, RepStack) else [adapter]  # type: ignore[arg-type]


def save_adapters(
    path: str | Path,
    adapters: Mapping[int, Adapter],
    cfg: RepConfig | None = None,
    fingerprint: str | None = None,
    *,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write adapters to ``path`` (safetensors) with JSON metadata, atomically.

    Store them next to the edit, e.g. ``edit.safetensors`` + ``edit.rep.safetensors``.
    ``fingerprint``: the base model's (``lm.fingerprint``); loading refuses other models.
    """
    if not adapters:
        raise RepeditError("no adapters to save")
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    for layer, adapter in sorted(adapters.items()):
        members = _members(adapter)
        layers[str(layer)] = {"n": len(members), "d_mlp": members[0].d_mlp}
        for i, member in enumerate(members):
            for name, value in member.state_dict().items():
                tensors[f"layer.{layer}.{i}.{name}"] = value.detach().float().clone()
    first = _members(next(iter(adapters.values())))[0]
    cfg = cfg or first.cfg
    meta = {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "config": cfg.to_dict(),
        "member_configs": {
            str(layer): [m.cfg.to_dict() for m in _members(a)] for layer, a in adapters.items()
        },
        "layers": layers,
        "info": info or {},
        "repedit_version": __version__,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_safetensors(path, tensors, meta)
    return path


def _config_from(values: dict[str, Any]) -> RepConfig:
    known = RepConfig.field_names()
    # files written before ``prompt_only`` existed adapted every token: keep them doing so
    values = {"prompt_only": False, **values}
    return RepConfig().replace(**{k: v for k, v in values.items() if k in known})


def load_adapters(path: str | Path, lm: LoadedModel | None = None) -> dict[int, Adapter]:
    """Read adapters saved by :func:`save_adapters`, in eval mode (on ``lm``'s device).

    With ``lm``, a file made for another base model is refused (``FingerprintMismatchError``),
    as is one whose key width differs from the model's down-projections.
    """
    try:
        tensors, meta = read_safetensors(path)
    except FileNotFoundError:
        raise RepeditError(f"REP adapter file not found: {path}") from None
    except Exception as exc:
        raise RepeditError(f"{path} is not a readable REP adapter file: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise RepeditError(
            f"{path} is not a repedit REP adapter file (format {meta.get('format')})"
        )
    if lm is not None:
        saved = meta.get("fingerprint")
        if saved is not None and saved != lm.fingerprint:
            raise FingerprintMismatchError(
                f"these REP adapters were trained for base model {saved}, but the model "
                f"{getattr(lm, 'name', '')!r} has fingerprint {lm.fingerprint}; refusing to load"
            )
    try:
        return _build_adapters(tensors, meta, lm)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise RepeditError(
            f"{path}: malformed REP adapter file ({exc.__class__.__name__}: {exc}; damaged or "
            "hand-edited?)"
        ) from None


def _build_adapters(
    tensors: dict[str, torch.Tensor], meta: dict[str, Any], lm: LoadedModel | None
) -> dict[int, Adapter]:
    """The adapters described by an adapter file's metadata, filled with its tensors."""
    device = lm.device if lm is not None else None
    out: dict[int, Adapter] = {}
    for key, spec in meta["layers"].items():
        layer = int(key)
        if lm is not None:
            lm.arch.check_layer(layer)
            if lm.arch.d_mlp != spec["d_mlp"]:
                raise FingerprintMismatchError(
                    f"REP adapter for layer {layer} has d_mlp {spec['d_mlp']}, the model "
                    f"{lm.arch.d_mlp}"
                )
        configs = meta.get("member_configs", {}).get(key) or [meta["config"]] * spec["n"]
        members = []
        for i in range(spec["n"]):
            cfg = _config_from(configs[i])
            prefix = f"layer.{layer}.{i}."
            state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            _check_shapes(spec["d_mlp"], cfg, state, f"layer {layer} member {i}")
            adapter = RepAdapter(spec["d_mlp"], cfg)
            adapter.set_guard(state.pop("guard_w", torch.zeros(0, spec["d_mlp"])))
            adapter.set_prompt_keys(state.pop("prompt_k", torch.zeros(0, spec["d_mlp"])))
            state["guard_w"], state["prompt_k"] = adapter.guard_w, adapter.prompt_k
            adapter.load_state_dict(state)
            members.append(adapter.to(device=device, dtype=torch.float32).eval())
        if not members:
            raise ValueError(f"layer {layer} has no adapter")
        out[layer] = stack_adapters(members)
    return out


def _check_shapes(d_mlp: int, cfg: RepConfig, state: dict[str, torch.Tensor], what: str) -> None:
    """Refuse tensors that do not match ``cfg`` before allocating anything (sizes in a damaged
    file could ask for any amount of memory): the adapter is first built on the meta device."""
    with torch.device("meta"):
        probe = RepAdapter(d_mlp, cfg).state_dict()
    want = {k: tuple(v.shape) for k, v in probe.items() if k not in ("guard_w", "prompt_k")}
    have = {k: tuple(v.shape) for k, v in state.items() if k not in ("guard_w", "prompt_k")}
    if want != have:
        raise ValueError(f"{what}: its tensors do not match its configuration")


def read_adapter_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of an adapter file (config, fingerprint, training info)."""
    return read_safetensors(path)[1]

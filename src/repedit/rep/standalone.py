"""Load a model exported by ``repedit edit ... --rep --export DIR`` with its REP adapters.

``repedit`` copies this file into the export as ``DIR/load_with_rep.py``; it needs torch,
transformers and safetensors only::

    import sys; sys.path.insert(0, "DIR")
    import load_with_rep
    model, tokenizer = load_with_rep.load("DIR")       # the edited model, adapters attached
    for handle in model.rep_handles: handle.remove()    # the edited model without them

The weight edit is already in the exported weights. An adapter cannot be: it rewrites the input
``k`` of one MLP down-projection, per token, ``k̂ = k + Σᵢ 𝟙[gᵢ(k) > τᵢ]·Pᵢ(k)`` with
``P(k) = B·A·k·α/r`` and ``g(k) = σ(W₂·gelu(W₁·k̃) + b₂)`` (``k̃ = k/rms(k)`` when the gate
normalises its input); with ``beta_guard`` set, a token whose key already retrieves the edit
(``maxᵢ k·wᵢ ≥ beta_guard``, ``wᵢ`` the saved ``guard_w`` rows) keeps its key, and with
``keep_prompt_key`` so does the edit prompt's own subject key (a saved ``prompt_k`` row, to a
relative distance of ``PROMPT_KEY_TOLERANCE``). That is what
:class:`repedit.rep.adapter.RepAdapter` computes in eval mode;
``tests/rep/test_export.py`` checks that both give the same logits and the same greedy text.

With ``prompt_only`` (repedit's default) an adapter leaves the tokens a model generates alone:
a forward that continues a non-empty KV cache (a generation step after the prefill) is not
adapted. A single forward over prompt and answer together adapts every token; repedit's own
scoring declares the prompt's length instead (``repedit.models.spans``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open

ADAPTER_FILE = "rep_adapters.safetensors"
PROMPT_KEY_TOLERANCE = 1e-3  # as repedit.rep.adapter


def _read(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    with safe_open(str(directory / ADAPTER_FILE), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("repedit", "{}"))
        return {k: f.get_tensor(k) for k in f.keys()}, meta  # noqa: SIM118


def _member(
    tensors: dict[str, torch.Tensor], prefix: str, cfg: dict[str, Any], device: torch.device
) -> Any:
    """The eval-mode change ``k̂ − k`` (float32) of one adapter, its weights on ``device``."""
    t = {k[len(prefix) :]: v.to(device) for k, v in tensors.items() if k.startswith(prefix)}
    scale = float(cfg["alpha"]) / int(cfg["rank"])
    tau, gated, norm = float(cfg["tau"]), bool(cfg["use_gate"]), bool(cfg["gate_input_norm"])
    guard, guard_w = cfg.get("beta_guard"), t.get("guard_w")
    prompt_k = t.get("prompt_k") if cfg.get("keep_prompt_key") else None

    def delta(x: torch.Tensor) -> torch.Tensor:
        p = F.linear(F.linear(x, t["A.weight"]), t["B.weight"]) * scale
        open_ = torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
        if gated:
            xg = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-12) if norm else x
            h = F.gelu(F.linear(xg, t["gate_in.weight"], t["gate_in.bias"]))
            logit = F.linear(h, t["gate_out.weight"], t["gate_out.bias"]).squeeze(-1)
            open_ = torch.sigmoid(logit) > tau
        if guard is not None and guard_w is not None and guard_w.shape[0]:
            open_ = open_ & ((x @ guard_w.T).amax(-1) < float(guard))
        if prompt_k is not None:
            for row in prompt_k:  # direct differences (cdist's matmul shortcut is too coarse)
                open_ = open_ & ((x - row).norm(dim=-1) >= PROMPT_KEY_TOLERANCE * row.norm())
        return torch.where(open_.unsqueeze(-1), p, torch.zeros_like(p))

    return delta


def attach(model: torch.nn.Module, directory: str | Path) -> list[Any]:
    """Put the adapters of ``directory`` on ``model``'s down-projections (forward pre-hooks),
    on each module's device (attach after moving the model); returns the hook handles
    (removing them all takes the adapters off; the first one only watches the KV cache)."""
    tensors, meta = _read(Path(directory))
    state = {"generating": False}

    def note_past(m: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        past = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers >= 5: cache
        length = 0
        if past is not None and hasattr(past, "get_seq_length"):
            length = past.get_seq_length()
        state["generating"] = bool(length)

    handles = [model.register_forward_pre_hook(note_past, with_kwargs=True)]
    for layer, spec in sorted(meta["layers"].items(), key=lambda kv: int(kv[0])):
        configs = meta.get("member_configs", {}).get(layer) or [meta["config"]] * spec["n"]
        module = model.get_submodule(meta["info"]["modules"][layer])
        device = next(module.parameters()).device
        deltas = [
            (_member(tensors, f"layer.{layer}.{i}.", configs[i], device), configs[i])
            for i in range(spec["n"])
        ]

        def rewrite(m: torch.nn.Module, args: tuple, deltas: list = deltas) -> tuple:
            k = args[0]
            x = k.float()
            out = x
            for delta, cfg in deltas:
                if not (state["generating"] and cfg.get("prompt_only", False)):
                    out = out + delta(x)
            return (out.to(k.dtype), *args[1:])

        handles.append(module.register_forward_pre_hook(rewrite))
    return handles


def load(directory: str | Path, **from_pretrained: Any) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from ``directory`` with the adapters attached (eval mode); the hook
    handles are in ``model.rep_handles``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(directory, **from_pretrained).eval()
    model.rep_handles = attach(model, directory)
    return model, AutoTokenizer.from_pretrained(directory)

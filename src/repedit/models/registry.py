"""Where each architecture keeps the parts an editor touches.

Everything in repedit reaches decoder layers, MLP down-projections, the final norm and the LM
head through this registry; adding a family is one ``ArchSpec`` entry.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from repedit.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class ArchSpec:
    """Attribute paths (dotted, from the ``*ForCausalLM`` module) for one model family.

    ``a|b`` lists alternatives for names that changed across transformers versions.
    ``down_proj`` is relative to a decoder layer: its *input* is the key ``k`` [.., d_mlp] and
    its *output* the value ``v`` [.., d_model]. ``conv1d`` marks GPT-2's ``Conv1D``, whose
    weight is stored as [d_in, d_out] instead of ``nn.Linear``'s [d_out, d_in].
    ``post_mlp`` (relative to a decoder layer) is a module the layer applies to the MLP's output
    before adding it to the residual stream (Gemma 2/3's post-feed-forward norm); without one the
    MLP output is added as it is, so a changed value changes the layer's output by exactly the
    difference (what :class:`repedit.rep.reader.LayerwiseReader` relies on).
    """

    layers: str
    down_proj: str
    final_norm: str
    lm_head: str
    embed: str
    conv1d: bool = False
    post_mlp: str | None = None


_LLAMA_LIKE = ArchSpec(
    layers="model.layers",
    down_proj="mlp.down_proj",
    final_norm="model.norm",
    lm_head="lm_head",
    embed="model.embed_tokens",
)
_GEMMA_POST_NORM = replace(_LLAMA_LIKE, post_mlp="post_feedforward_layernorm")

REGISTRY: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _GEMMA_POST_NORM,
    "gemma3_text": _GEMMA_POST_NORM,
    "gpt2": ArchSpec(
        layers="transformer.h",
        down_proj="mlp.c_proj",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        embed="transformer.wte",
        conv1d=True,
    ),
    "gptj": ArchSpec(
        layers="transformer.h",
        down_proj="mlp.fc_out",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        embed="transformer.wte",
    ),
    "gpt_neox": ArchSpec(
        layers="gpt_neox.layers",
        down_proj="mlp.dense_4h_to_h",
        final_norm="gpt_neox.final_layer_norm",
        lm_head="lm_head|embed_out",
        embed="gpt_neox.embed_in",
    ),
}


def get_attr(root: nn.Module, path: str) -> nn.Module:
    """Resolve a dotted path; ``a|b`` tries alternatives (names differ across versions)."""
    if "|" in path:
        for alternative in path.split("|"):
            try:
                return get_attr(root, alternative)
            except AttributeError:
                continue
        raise AttributeError(f"none of {path!r} found on {type(root).__name__}")
    obj: object = root
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)  # type: ignore[index]
    return obj  # type: ignore[return-value]


def arch_of(model: nn.Module) -> ArchSpec:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    spec = REGISTRY.get(str(model_type))
    if spec is None:
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} is not in repedit's registry "
            f"(supported: {', '.join(sorted(REGISTRY))}); add an ArchSpec entry in "
            "repedit/models/registry.py"
        )
    return spec


class Arch:
    """A model bound to its ``ArchSpec``: the one place that knows module paths."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.spec = arch_of(model)

    @property
    def model_type(self) -> str:
        """The model's ``config.model_type``, the key it was looked up by in the registry."""
        return str(getattr(getattr(self.model, "config", None), "model_type", None))

    @property
    def n_layers(self) -> int:
        return len(self.layers())

    def layers(self) -> nn.ModuleList:
        return get_attr(self.model, self.spec.layers)  # type: ignore[return-value]

    def layer(self, index: int) -> nn.Module:
        self.check_layer(index)
        return self.layers()[index]

    def check_layer(self, index: int) -> None:
        n = self.n_layers
        if not isinstance(index, int) or not 0 <= index < n:
            raise UnsupportedArchitectureError(
                f"layer {index} is out of range: this model has layers 0..{n - 1}"
            )

    def down_proj(self, index: int) -> nn.Module:
        """The edited MLP down-projection of layer ``index``."""
        return get_attr(self.layer(index), self.spec.down_proj)

    def post_mlp(self, index: int) -> nn.Module | None:
        """What layer ``index`` applies to its MLP output before the residual add, if anything."""
        if self.spec.post_mlp is None:
            return None
        return get_attr(self.layer(index), self.spec.post_mlp)

    def down_proj_name(self, index: int) -> str:
        return f"{self.spec.layers}.{index}.{self.spec.down_proj}"

    def final_norm(self) -> nn.Module:
        return get_attr(self.model, self.spec.final_norm)

    def lm_head(self) -> nn.Module:
        return get_attr(self.model, self.spec.lm_head)

    def embed(self) -> nn.Module:
        return get_attr(self.model, self.spec.embed)

    def weight(self, index: int) -> nn.Parameter:
        """The down-projection's weight parameter, stored as the module keeps it."""
        return self.down_proj(index).weight  # type: ignore[return-value]

    def weight_matrix(self, index: int) -> torch.Tensor:
        """``W`` as [d_model, d_mlp] (so that ``v = W k``), whatever the storage orientation."""
        w = self.weight(index)
        return w.t() if self.spec.conv1d else w

    def to_storage(self, delta: torch.Tensor) -> torch.Tensor:
        """Turn a [d_model, d_mlp] update into the weight's storage orientation."""
        return delta.t() if self.spec.conv1d else delta

    @property
    def d_mlp(self) -> int:
        return self.weight_matrix(0).shape[1]

    @property
    def d_model(self) -> int:
        return self.weight_matrix(0).shape[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM logits from final-layer hidden states (final norm, head, Gemma-2/3 soft-capping)."""
        logits = self.lm_head()(self.final_norm()(hidden))
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

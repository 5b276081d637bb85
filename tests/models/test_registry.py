"""The architecture registry on every tiny family: where layers, down-projections, the final
norm, the LM head and the embedding live, and how ``W`` is oriented."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from numerics import tolerance
from repedit.errors import RepeditError, UnsupportedArchitectureError
from repedit.models import REGISTRY, Arch, Hooks, arch_of
from repedit.models.tiny import TINY_FAMILIES, tiny_model

D_MODEL, D_MLP, N_LAYERS, VOCAB = 64, 128, 4, 384


@pytest.fixture(params=TINY_FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def arch(family: str) -> Arch:
    return Arch(tiny_model(family))


def _ids(n: int = 7, batch: int = 2) -> torch.Tensor:
    return torch.arange(batch * n).reshape(batch, n) * 13 % VOCAB + 1


def test_every_registered_family_has_a_tiny_model() -> None:
    assert set(TINY_FAMILIES) == set(REGISTRY)


def test_layer_count_and_dims(arch: Arch) -> None:
    assert arch.n_layers == N_LAYERS
    assert len(arch.layers()) == N_LAYERS
    assert arch.d_mlp == D_MLP
    assert arch.d_model == D_MODEL
    assert arch.layer(N_LAYERS - 1) is arch.layers()[N_LAYERS - 1]


def test_down_proj_is_the_module_fed_by_d_mlp_features(arch: Arch) -> None:
    names = dict(arch.model.named_modules())
    for i in range(arch.n_layers):
        module = arch.down_proj(i)
        assert names[arch.down_proj_name(i)] is module
        # distinct module per layer
        assert all(module is not arch.down_proj(j) for j in range(arch.n_layers) if j != i)
    with Hooks() as h:
        for i in range(arch.n_layers):
            h.capture(f"in{i}", arch.down_proj(i))
            h.capture(f"out{i}", arch.down_proj(i), which="output")
        with torch.no_grad():
            h.run(arch.model, input_ids=_ids())
    for i in range(arch.n_layers):
        assert h[f"in{i}"].shape == (2, 7, D_MLP)
        assert h[f"out{i}"].shape == (2, 7, D_MODEL)


def _linear_tol(k: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> float:
    """``k Wᵀ + b`` two ways: one sum of ``d_mlp`` products plus the bias, on these magnitudes."""
    magnitude = (k.abs() @ w.detach().abs().T).max()
    if bias is not None:
        magnitude = magnitude + bias.detach().abs().max()
    return tolerance(torch.float32, terms=k.shape[-1] + 1, magnitude=float(magnitude))


@pytest.mark.numerics
def test_weight_matrix_orientation(arch: Arch, family: str) -> None:
    torch.manual_seed(1)
    k = torch.randn(5, D_MLP)
    for i in range(arch.n_layers):
        w = arch.weight_matrix(i)
        assert w.shape == (D_MODEL, D_MLP)
        module = arch.down_proj(i)
        bias = getattr(module, "bias", None)
        expected = k @ w.T + (bias if bias is not None else 0)
        with torch.no_grad():
            got = module(k)
        tol = _linear_tol(k, w, bias)
        torch.testing.assert_close(got, expected, rtol=0, atol=tol)
        # one key at a time: v = W k (+ b)
        with torch.no_grad():
            v = module(k[0])
        torch.testing.assert_close(
            v, w @ k[0] + (bias if bias is not None else 0), rtol=0, atol=tol
        )
    if family == "gpt2":  # Conv1D stores [d_in, d_out]
        assert arch.spec.conv1d
        assert tuple(arch.weight(0).shape) == (D_MLP, D_MODEL)
    else:
        assert tuple(arch.weight(0).shape) == (D_MODEL, D_MLP)


def test_weight_is_the_parameter_not_a_copy(arch: Arch) -> None:
    params = {id(p) for p in arch.model.parameters()}
    assert id(arch.weight(1)) in params
    assert arch.weight_matrix(1).data_ptr() == arch.weight(1).data_ptr()


@pytest.mark.numerics
def test_to_storage_round_trip(arch: Arch) -> None:
    torch.manual_seed(2)
    layer = 2
    delta = torch.randn(D_MODEL, D_MLP) * 0.01
    stored = arch.to_storage(delta)
    assert stored.shape == arch.weight(layer).shape
    assert torch.equal(arch.to_storage(stored.T).T if arch.spec.conv1d else stored, delta)
    w0 = arch.weight_matrix(layer).detach().clone()
    k = torch.randn(3, D_MLP)
    with torch.no_grad():
        before = arch.down_proj(layer)(k)
        arch.weight(layer).add_(stored)
        after = arch.down_proj(layer)(k)
    torch.testing.assert_close(arch.weight_matrix(layer), w0 + delta)
    # the update acts on keys as v += delta k: after and before each round on |W + Δ| |k|
    tol = 2 * _linear_tol(k, w0.abs() + delta.abs(), None)
    torch.testing.assert_close(after - before, k @ delta.T, rtol=0, atol=tol)


@pytest.mark.numerics
def test_final_norm_lm_head_embed(arch: Arch) -> None:
    model = arch.model
    embed, head, norm = arch.embed(), arch.lm_head(), arch.final_norm()
    assert isinstance(embed, nn.Embedding)
    assert tuple(embed.weight.shape) == (VOCAB, D_MODEL)
    assert isinstance(head, nn.Linear)
    assert tuple(head.weight.shape) == (VOCAB, D_MODEL)
    assert head is model.get_output_embeddings()
    assert embed is model.get_input_embeddings()
    assert norm.weight.shape == (D_MODEL,)
    ids = _ids()
    with Hooks() as h, torch.no_grad():
        h.capture("pre_norm", norm)
        h.capture("tok", embed, which="output")
        logits = h.run(model, input_ids=ids).logits
    # logits are exactly lm_head(final_norm(.)) of the last residual stream
    with torch.no_grad():
        recomputed = head(norm(h["pre_norm"]))
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        recomputed = torch.tanh(recomputed / cap) * cap
    # the final norm and the unembedding (d_model terms each), on rows of this size
    with torch.no_grad():
        normed = norm(h["pre_norm"])
    tol = tolerance(
        torch.float32,
        terms=D_MODEL,
        stages=2,
        magnitude=float((normed.abs() @ head.weight.detach().abs().T).max()),
    )
    torch.testing.assert_close(logits, recomputed, rtol=0, atol=tol)
    scale = getattr(embed, "embed_scale", 1.0)  # Gemma scales embeddings by sqrt(d_model)
    torch.testing.assert_close(h["tok"], embed.weight[ids] * scale)


def test_unknown_architecture_is_a_helpful_error() -> None:
    class Config:
        model_type = "mamba"

    model = nn.Linear(2, 2)
    model.config = Config()
    with pytest.raises(UnsupportedArchitectureError) as info:
        Arch(model)
    message = str(info.value)
    assert "'mamba'" in message
    assert "llama" in message and "gpt2" in message  # lists what is supported
    assert "registry.py" in message  # says where to add one
    assert isinstance(info.value, RepeditError)
    with pytest.raises(UnsupportedArchitectureError, match="None"):
        arch_of(nn.Linear(2, 2))  # no config at all


def test_real_hf_model_of_unregistered_family() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "opt",
        vocab_size=64,
        hidden_size=16,
        ffn_dim=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        word_embed_proj_dim=16,
    )
    with pytest.raises(UnsupportedArchitectureError, match="'opt'"):
        Arch(AutoModelForCausalLM.from_config(config))


@pytest.mark.parametrize("bad", [N_LAYERS, -1, 100, "1", 1.0])
def test_layer_out_of_range(bad: object) -> None:
    arch = Arch(tiny_model("llama"))
    with pytest.raises(RepeditError, match="out of range"):
        arch.down_proj(bad)  # type: ignore[arg-type]
    with pytest.raises(RepeditError, match=r"0\.\.3"):
        arch.layer(bad)  # type: ignore[arg-type]
    with pytest.raises(RepeditError):
        arch.check_layer(bad)  # type: ignore[arg-type]

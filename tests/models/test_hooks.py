"""``Hooks`` on every tiny family: capture, rewrite, early stop, and cleanup in all cases."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from numerics import forward_tolerance, max_error, tolerance
from repedit.models import Arch, Hooks, at_positions, module_inputs, select_positions
from repedit.models.tiny import TINY_FAMILIES, tiny_model

D_MLP, VOCAB = 128, 384


@pytest.fixture(params=TINY_FAMILIES)
def arch(request: pytest.FixtureRequest) -> Arch:
    return Arch(tiny_model(request.param))


def _inputs(batch: int = 3, seq: int = 9) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(1, VOCAB, (batch, seq), generator=g),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
    }


def _logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


def _logits_tol(arch: Arch, logits: torch.Tensor) -> float:
    """Two forwards of the whole model (other hooks, the same inputs) on logits of this size."""
    magnitude = float(logits.abs().max())
    return forward_tolerance(arch, blocks=arch.n_layers, magnitude=magnitude, seq_len=9)


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.numerics
def test_capture_input_at_positions(arch: Arch) -> None:
    inputs = _inputs()
    positions = torch.tensor([0, 4, 8])
    module = arch.down_proj(1)
    manual: list[torch.Tensor] = []  # an independent hook, not going through Hooks
    handle = module.register_forward_pre_hook(lambda m, args: manual.append(args[0].clone()))
    try:
        with Hooks() as h, torch.no_grad():
            h.capture("all", module)
            h.capture("at", module, positions=positions)
            h.capture("out", module, which="output")
            h.capture("out_at", module, which="output", positions=positions)
            h.run(arch.model, **inputs, use_cache=False)
    finally:
        handle.remove()
    assert len(manual) == 1
    assert h["all"].shape == (3, 9, D_MLP)
    assert torch.equal(h["all"], manual[0])
    assert h["at"].shape == (3, D_MLP)
    for b, p in enumerate(positions.tolist()):
        assert torch.equal(h["at"][b], manual[0][b, p])
    assert torch.equal(select_positions(h["all"], positions), h["at"])
    assert torch.equal(select_positions(h["all"], None), h["all"])
    # the captured input really is what produced the captured output
    with torch.no_grad():
        w, bias = module.weight, getattr(module, "bias", None)
        w = w if w.shape[-1] == D_MLP else w.T  # GPT-2's Conv1D stores [d_in, d_out]
        magnitude = (h["all"].abs() @ w.abs().T).max() + (0 if bias is None else bias.abs().max())
        tol = tolerance(torch.float32, terms=D_MLP + 1, magnitude=float(magnitude))
        torch.testing.assert_close(module(h["all"]), h["out"], rtol=0, atol=tol)
    assert torch.equal(h["out_at"], select_positions(h["out"], positions))


def test_capture_detaches_by_default() -> None:
    arch = Arch(tiny_model("llama"))
    with Hooks() as h:
        h.capture("k", arch.down_proj(0))
        h.capture("k_grad", arch.down_proj(0), detach=False)
        h.run(arch.model, **_inputs())
    assert not h["k"].requires_grad
    assert h["k_grad"].requires_grad


@pytest.mark.numerics
def test_rewrite_output_changes_logits_then_vanishes(arch: Arch) -> None:
    inputs = _inputs()
    before = _logits(arch.model, inputs)
    hooks_before = _hook_count(arch.model)
    # not a constant shift: LayerNorm families would subtract that exactly
    direction = torch.randn(arch.d_model, generator=torch.Generator().manual_seed(3))
    with Hooks() as h, torch.no_grad():
        h.rewrite(arch.down_proj(1), lambda v: v + direction, which="output")
        edited = h.run(arch.model, **inputs, use_cache=False).logits
    assert max_error(edited, before) > _logits_tol(arch, before)
    assert _hook_count(arch.model) == hooks_before
    assert torch.equal(_logits(arch.model, inputs), before)


@pytest.mark.numerics
def test_rewrite_input_at_positions_only_affects_later_tokens(arch: Arch) -> None:
    inputs = _inputs()
    before = _logits(arch.model, inputs)
    positions = torch.tensor([5, 5, 5])
    with Hooks() as h, torch.no_grad():
        h.rewrite(arch.down_proj(0), at_positions(positions, lambda k: k * 3.0 + 1.0))
        edited = h.run(arch.model, **inputs, use_cache=False).logits
    # causal: tokens before the rewritten position are untouched, the ones from it on change
    tol = _logits_tol(arch, before)
    torch.testing.assert_close(edited[:, :5], before[:, :5], rtol=0, atol=tol)
    assert max_error(edited[:, 5:], before[:, 5:]) > tol
    assert torch.equal(_logits(arch.model, inputs), before)


def test_at_positions_does_not_modify_its_input() -> None:
    x = torch.zeros(2, 4, 3)
    out = at_positions(torch.tensor([1, 3]), lambda r: r + 1)(x)
    assert torch.equal(x, torch.zeros(2, 4, 3))
    expected = torch.zeros(2, 4, 3)
    expected[0, 1] = 1
    expected[1, 3] = 1
    assert torch.equal(out, expected)


def test_hooks_removed_when_forward_raises(arch: Arch) -> None:
    inputs = _inputs()
    before = _logits(arch.model, inputs)
    hooks_before = _hook_count(arch.model)

    def boom(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom inside the forward")

    with pytest.raises(RuntimeError, match="boom"), Hooks() as h:
        h.capture("k", arch.down_proj(0))
        h.rewrite(arch.down_proj(0), lambda v: v * 0, which="output")
        h.rewrite(arch.down_proj(2), boom)
        h.stop_after(arch.down_proj(3))
        h.run(arch.model, **inputs, use_cache=False)
    assert _hook_count(arch.model) == hooks_before
    assert torch.equal(_logits(arch.model, inputs), before)


def test_hooks_removed_when_the_block_raises() -> None:
    arch = Arch(tiny_model("gpt2"))
    hooks_before = _hook_count(arch.model)
    with pytest.raises(KeyError), Hooks() as h:
        h.capture("k", arch.down_proj(0))
        h.stop_after(arch.down_proj(0))
        raise KeyError("not a forward error")
    assert _hook_count(arch.model) == hooks_before


def test_stop_after_skips_later_modules(arch: Arch) -> None:
    inputs = _inputs()
    stop_layer = 1
    calls: dict[str, int] = {}

    def counter(name: str):
        def hook(m: nn.Module, args: tuple, out: object) -> None:
            calls[name] = calls.get(name, 0) + 1

        return hook

    watched = {
        "down0": arch.down_proj(0),
        "down1": arch.down_proj(stop_layer),
        "layer2": arch.layer(2),
        "down3": arch.down_proj(3),
        "norm": arch.final_norm(),
        "head": arch.lm_head(),
    }
    handles = [m.register_forward_hook(counter(n)) for n, m in watched.items()]
    try:
        with Hooks() as h, torch.no_grad():
            h.capture("k", arch.down_proj(stop_layer))
            h.stop_after(arch.down_proj(stop_layer))
            out = h.run(arch.model, **inputs, use_cache=False)
        assert out is None
        assert h["k"].shape == (3, 9, D_MLP)
        assert calls == {"down0": 1, "down1": 1}
        calls.clear()
        # stop_before: the capture (registered first) still sees the input; the module never runs
        with Hooks() as h, torch.no_grad():
            h.capture("k2", arch.down_proj(stop_layer))
            h.stop_before(arch.down_proj(stop_layer))
            assert h.run(arch.model, **inputs, use_cache=False) is None
        assert h["k2"].shape == (3, 9, D_MLP)
        assert calls == {"down0": 1}
        calls.clear()
        _logits(arch.model, inputs)  # and a normal forward afterwards runs everything
        assert calls == dict.fromkeys(watched, 1)
    finally:
        for handle in handles:
            handle.remove()


def test_truncated_forward_captures_equal_full_forward(arch: Arch) -> None:
    inputs = _inputs()
    layers = [0, 2]
    with Hooks() as h, torch.no_grad():
        for i in layers:
            h.capture(str(i), arch.down_proj(i))
        full_out = h.run(arch.model, **inputs, use_cache=False)
        full = dict(h.captured)
    assert full_out is not None
    with Hooks() as h, torch.no_grad():
        for i in layers:
            h.capture(str(i), arch.down_proj(i))
        h.stop_after(arch.down_proj(max(layers)))
        assert h.run(arch.model, **inputs, use_cache=False) is None
        truncated = dict(h.captured)
    assert truncated.keys() == full.keys()
    for name in full:
        assert torch.equal(truncated[name], full[name]), name
    # the helper does the same thing
    with torch.no_grad():
        helper = module_inputs(
            arch.model,
            {str(i): arch.down_proj(i) for i in layers},
            inputs,
            stop_at=arch.down_proj(max(layers)),
        )
    assert helper.keys() == full.keys()
    for name in full:
        assert torch.equal(helper[name], full[name]), name


def test_module_inputs_at_positions() -> None:
    arch = Arch(tiny_model("qwen2"))
    inputs = _inputs()
    positions = torch.tensor([2, 0, 8])
    with torch.no_grad():
        all_k = module_inputs(arch.model, {"k": arch.down_proj(3)}, inputs)["k"]
        at_k = module_inputs(
            arch.model,
            {"k": arch.down_proj(3)},
            inputs,
            positions=positions,
            stop_at=arch.down_proj(3),
        )["k"]
    assert at_k.shape == (3, D_MLP)
    assert torch.equal(at_k, all_k[torch.arange(3), positions])
    assert _hook_count(arch.model) == 0


def test_hooks_can_be_removed_early_and_twice() -> None:
    arch = Arch(tiny_model("llama"))
    h = Hooks()
    h.capture("k", arch.down_proj(0))
    assert _hook_count(arch.model) == 1
    h.remove()
    h.remove()
    assert _hook_count(arch.model) == 0

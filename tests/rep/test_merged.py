"""A merged stack computes what its ``RepStack`` computes, in batched products.

Members differ in projections, gate weights (some open, some shut on a given token), β̃ guard
rows and stored prompt keys; the merged module must open the same (token, member) pairs and
return the same keys up to the rounding of its different summation order, alone and inside a
tiny model's forward.
"""

from __future__ import annotations

import pytest
import torch

from numerics import assert_within, forward_tolerance, tolerance
from repedit.errors import InvalidRequestError
from repedit.models.tiny import TINY_FAMILIES, tiny_loaded
from repedit.rep import RepAdapter, RepConfig, RepStack, rep_applied
from repedit.rep.merged import MergedStack, merge_adapters

N_MEMBERS = 7


def _member(d: int, seed: int, **cfg: object) -> RepAdapter:
    """A member whose gate opens on about half the tokens, with a moved projection."""
    torch.manual_seed(seed)
    adapter = RepAdapter(d, RepConfig(**cfg))  # type: ignore[arg-type]
    with torch.no_grad():
        adapter.B.weight.normal_(0, 0.5)
        adapter.gate_out.weight.mul_(40.0)
        adapter.gate_out.bias.zero_()
    return adapter.eval()


def _stack(d: int, keys: torch.Tensor, **cfg: object) -> RepStack:
    members = [_member(d, seed, **cfg) for seed in range(N_MEMBERS)]
    members[1].set_guard(torch.randn(2, d) / d)  # a guard with two rows
    members[2].set_prompt_keys(keys[3:4])  # token 3 is this member's own prompt key
    members[4].set_guard(keys[5:6] / keys[5].norm() ** 2)  # token 5 sits at β̃ = 1
    return RepStack(members).eval()


def _tol(stack: RepStack, keys: torch.Tensor) -> float:
    """Keys plus a sum over members of rank-r projections: three chained float32 reductions."""
    d, r = stack.d_mlp, stack.cfg.rank
    with torch.no_grad():
        change = sum(a.project(keys).abs() for a in stack.adapters)
    magnitude = float((keys.abs() + change).max())
    return tolerance(torch.float32, terms=max(d, N_MEMBERS * r), stages=3, magnitude=magnitude)


@pytest.mark.numerics
@pytest.mark.parametrize("use_gate", [True, False])
def test_merged_equals_the_stack(use_gate: bool) -> None:
    d = 48
    keys = torch.randn(2, 6, d, generator=torch.Generator().manual_seed(1)) * 3
    flat = keys.reshape(-1, d)
    stack = _stack(d, flat, use_gate=use_gate)
    merged = MergedStack(stack)
    with torch.no_grad():
        want, want_g = stack.forward_with_gate(keys)
        got, got_g = merged.forward_with_gate(keys)
        if use_gate:
            gates = torch.stack([a.gate(flat) for a in stack.adapters], 1)
            margin = (gates - stack.tau).abs().min()
            # the premise: no gate sits within rounding of the threshold, and gates differ
            assert float(margin) > 1e-4 and 0 < float((gates > stack.tau).float().mean()) < 1
            assert_within(merged.gates(flat), gates, _tol(stack, flat), "gates")
            assert_within(got_g, want_g, _tol(stack, flat), "reported gate")
        else:
            assert got_g is None and want_g is None
    assert not torch.equal(want, keys)
    assert_within(got, want, _tol(stack, flat), "adapted keys")
    kept = merged.kept(flat)
    assert kept is not None and bool(kept[3, 2]) and bool(kept[5, 4])


def test_shut_tokens_come_back_untouched() -> None:
    d = 32
    members = [_member(d, s) for s in range(3)]
    for m in members:
        with torch.no_grad():
            m.gate_out.bias.fill_(-1e4)
    keys = torch.randn(4, d)
    out, _ = MergedStack(members).forward_with_gate(keys)
    assert out is keys


def test_members_with_different_settings_are_refused() -> None:
    with pytest.raises(InvalidRequestError, match="tau"):
        MergedStack([_member(16, 0), _member(16, 1, tau=0.7)])
    with pytest.raises(InvalidRequestError, match="at least one"):
        MergedStack([])


@pytest.mark.numerics
@pytest.mark.parametrize("family", (*TINY_FAMILIES[:3], "gpt2"))
def test_merged_stack_in_a_forward(family: str) -> None:
    lm = tiny_loaded(family)
    d = lm.arch.d_mlp
    ids = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    members = [_member(d, seed) for seed in range(N_MEMBERS)]
    adapters = {1: RepStack(members).eval(), 2: _member(d, 99)}
    merged = merge_adapters(adapters)
    assert isinstance(merged[1], MergedStack) and merged[2] is adapters[2]
    with torch.no_grad():
        plain = lm.model(input_ids=ids).logits
        with rep_applied(lm, adapters):
            want = lm.model(input_ids=ids).logits
        with rep_applied(lm, merged):
            got = lm.model(input_ids=ids).logits
    tol = forward_tolerance(
        lm.arch, blocks=lm.arch.n_layers, magnitude=float(want.abs().max()), seq_len=ids.shape[1]
    )
    assert_within(got, want, tol, "logits with the merged stack")
    assert float((want - plain).abs().max()) > 100 * tol  # the premise: the adapters act

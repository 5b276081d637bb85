"""The candidate screen of a merged stack: exact when it lets every member through, and it
runs no gate for a key far from every member's edit while a key at a member's edit still opens
that member.

Members' gates are forced open (bias +40) so that any member the screen lets through acts:
what a token gets then shows which members the screen selected.
"""

from __future__ import annotations

import pytest
import torch

from numerics import assert_within, forward_tolerance, tolerance
from repedit.errors import InvalidRequestError
from repedit.models.tiny import TINY_FAMILIES, tiny_loaded
from repedit.rep import RepAdapter, RepConfig, RepStack, rep_applied
from repedit.rep.merged import WIDE, MergedStack

N_MEMBERS = 5
#: no guard and no prompt-key rule, so a screened-in member with an open gate always acts
OPEN = {"beta_guard": None, "keep_prompt_key": False}


def _member(d: int, seed: int, key: torch.Tensor | None, bias: float | None = None) -> RepAdapter:
    """A member with a moved projection and β̃ direction ``key/‖key‖²`` (β̃ = 1 at ``key``);
    ``bias``: the gate output's bias (None: random gate weights scaled to open on about half)."""
    torch.manual_seed(seed)
    adapter = RepAdapter(d, RepConfig(**OPEN))  # type: ignore[arg-type]
    with torch.no_grad():
        adapter.B.weight.normal_(0, 0.5)
        if bias is None:
            adapter.gate_out.weight.mul_(40.0)
            adapter.gate_out.bias.zero_()
        else:
            adapter.gate_out.bias.fill_(bias)
    if key is not None:
        adapter.set_guard(key / key.pow(2).sum())
    return adapter.eval()


def _orthogonal_keys(d: int, n: int, seed: int) -> torch.Tensor:
    """``n`` mutually orthogonal keys of norm ``d`` (β̃ of one against another's row is 0)."""
    q, _ = torch.linalg.qr(torch.randn(d, n, generator=torch.Generator().manual_seed(seed)))
    return q.T * d


def _tol(members: list[RepAdapter], keys: torch.Tensor) -> float:
    """As the merged stack's own test: keys plus a sum of rank-r projections, three reductions."""
    d, r = members[0].d_mlp, members[0].cfg.rank
    with torch.no_grad():
        change = sum(a.project(keys).abs() for a in members)
    magnitude = float((keys.abs() + change).max())
    return tolerance(torch.float32, terms=max(d, len(members) * r), stages=3, magnitude=magnitude)


@pytest.mark.numerics
@pytest.mark.parametrize("rules", [True, False])
@pytest.mark.parametrize("seq", [6, WIDE])
def test_screen_letting_every_member_through_is_the_stack(rules: bool, seq: int) -> None:
    """``rules``: the β̃ guard and the prompt-key rule on, one token at a member's prompt key
    and one at β̃ = 1 of another member's guard row. ``seq``: 2·seq tokens, so with
    ``seq = WIDE`` every member has more than ``WIDE`` tokens and runs alone."""
    d = 48
    keys = torch.randn(2, seq, d, generator=torch.Generator().manual_seed(1)) * 3
    flat = keys.reshape(-1, d)
    member_keys = _orthogonal_keys(d, N_MEMBERS, seed=2)
    members = [
        _member(d, s, member_keys[s] if s != 3 else None, 40.0 if rules and s in (2, 4) else None)
        for s in range(N_MEMBERS)
    ]
    if rules:  # members 2 and 4 open everywhere: only their rules keep tokens 3 and 5
        for m in members:
            m.cfg = m.cfg.replace(beta_guard=0.5, keep_prompt_key=True)
        members[2].set_prompt_keys(flat[3:4])
        members[4].set_guard(flat[5:6] / flat[5].pow(2).sum())
    stack = RepStack(members).eval()
    everyone = MergedStack(stack, candidates="key", threshold=float("-inf"))
    with torch.no_grad():
        want, want_g = stack.forward_with_gate(keys)
        got, got_g = everyone.forward_with_gate(keys)
        plain, plain_g = MergedStack(stack).forward_with_gate(keys)
    assert bool(everyone.screen(flat).all())
    assert want_g is not None and got_g is not None and plain_g is not None
    assert not torch.equal(want, keys)  # the premise: members act
    assert_within(got, want, _tol(members, flat), "screened-in stack against RepStack")
    assert_within(got, plain, _tol(members, flat), "screened-in stack against MergedStack")
    assert_within(got_g, want_g, _tol(members, flat), "reported gate")


def test_far_key_runs_no_gate_and_a_member_key_opens_its_member() -> None:
    d = 48
    member_keys = _orthogonal_keys(d, N_MEMBERS + 2, seed=3)
    members = [_member(d, s, member_keys[s], bias=40.0) for s in range(N_MEMBERS)]
    merged = MergedStack(members, candidates="key", threshold=0.5)
    far = member_keys[N_MEMBERS:]  # orthogonal to every member's key: β̃ = 0 for all
    seen: list[int] = []
    gate = merged.member_gates
    merged.member_gates = lambda lo, hi, xs: seen.append(int(xs.shape[1])) or gate(lo, hi, xs)  # type: ignore[method-assign]
    with torch.no_grad():
        out, top = merged.forward_with_gate(far)
        assert out is far and seen == [] and top is not None and not bool(top.any())
        at_member = torch.stack([far[0], member_keys[2], far[1]])
        got, top = merged.forward_with_gate(at_member)
        want = members[2](member_keys[2:3])[0]
    assert seen == [1]  # one gate evaluation, one token wide: the one screened-in token
    assert torch.equal(got[0], far[0]) and torch.equal(got[2], far[1])
    assert top is not None and float(top[1]) > merged.tau and float(top[0]) == 0.0
    assert_within(got[1], want, _tol(members, member_keys), "the member's own adaptation")
    assert not torch.equal(got[1], member_keys[2])
    # without the screen every always-open member acts on the far keys too
    assert not torch.equal(MergedStack(members)(far), far)


def test_top_keeps_the_best_member_per_token() -> None:
    d = 32
    member_keys = _orthogonal_keys(d, 3, seed=4)
    members = [_member(d, s, member_keys[s], bias=40.0) for s in range(3)]
    mix = (0.9 * member_keys[0] + 0.6 * member_keys[1])[None]
    both = MergedStack(members, candidates="key", threshold=0.5)
    best = MergedStack(members, candidates="key", threshold=0.5, top=1)
    assert both.screen(mix).tolist() == [[True, True, False]]
    assert best.screen(mix).tolist() == [[True, False, False]]


def test_bad_screen_settings_are_refused() -> None:
    member = _member(16, 0, torch.randn(16))
    with pytest.raises(InvalidRequestError, match="candidates"):
        MergedStack([member], candidates="nearest")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="top"):
        MergedStack([member], candidates="key", top=0)


@pytest.mark.numerics
@pytest.mark.parametrize("family", (*TINY_FAMILIES[:2], "gpt2"))
def test_screen_in_a_forward_adapts_only_the_member_key_token(family: str) -> None:
    """In a tiny model: one member's edit key is the key of token ``p``; every member's gate
    is open, yet with the screen the logits before ``p`` stay the plain model's (no key before
    ``p`` is near an edit) and those from ``p`` on change."""
    lm = tiny_loaded(family)
    d, layer, p = lm.arch.d_mlp, 1, 5
    ids = torch.randint(0, 200, (1, 9), generator=torch.Generator().manual_seed(0))
    keys: list[torch.Tensor] = []
    handle = lm.arch.down_proj(layer).register_forward_pre_hook(
        lambda _m, args: keys.append(args[0].detach()[0].float())
    )
    with torch.no_grad():
        plain = lm.model(input_ids=ids).logits
    handle.remove()
    k = keys[0]  # [seq, d]
    # other members' keys: orthogonal to every token's key before p, so they never pass
    basis, _ = torch.linalg.qr(k[: p + 1].T)
    others = torch.randn(N_MEMBERS - 1, d, generator=torch.Generator().manual_seed(5))
    others = others - (others @ basis) @ basis.T
    members = [_member(d, 0, k[p], bias=40.0)]
    members += [_member(d, s + 1, others[s] * d, bias=40.0) for s in range(N_MEMBERS - 1)]
    # β̃ of the earlier keys against k[p]'s row must stay below the threshold for the premise
    beta_before = k[:p] @ (k[p] / k[p].pow(2).sum())
    threshold = float(beta_before.max()) + 0.5 * (1.0 - float(beta_before.max()))
    assert threshold < 1.0
    screened = MergedStack(members, candidates="key", threshold=threshold)
    with torch.no_grad(), rep_applied(lm, {layer: screened}):
        got = lm.model(input_ids=ids).logits
    tol = forward_tolerance(
        lm.arch, blocks=lm.arch.n_layers, magnitude=float(plain.abs().max()), seq_len=ids.shape[1]
    )
    assert_within(got[:, :p], plain[:, :p], tol, "logits before the member's key token")
    assert float((got[:, p] - plain[:, p]).abs().max()) > 100 * tol

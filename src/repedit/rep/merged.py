"""A stack of REP adapters evaluated as one batched module, for inference over many edits.

A ``RepStack`` of N members runs N gates and N projections one after another: N small
matrix products per token and N Python calls per forward. ``MergedStack`` holds the same
weights stacked: every member's gate is one column block of a single matrix product, and a
member's projection is computed only for the (token, member) pairs whose gate is open, in one
single product over the members open at some token of the batch. The gates still cost
``N · h · d_mlp`` per token (an MLP gate has no exact shortcut); the projections cost in
proportion to the members that open, which a well-trained gate keeps near the number of
edits whose subject is in the batch. Outputs equal the stack's up to
the order of summation (eval mode only: it is an inference module).
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from repedit.errors import InvalidRequestError
from repedit.rep.adapter import PROMPT_KEY_TOLERANCE, RepAdapter, RepConfig, RepStack

#: inference settings every member must share to be merged (each is applied per member)
SHARED = ("use_gate", "gate_input_norm", "tau", "beta_guard", "keep_prompt_key", "prompt_only")
#: members per chunk when comparing tokens with stored prompt keys ([tokens, chunk, d] at once)
CHUNK = 64


def _padded(rows: list[torch.Tensor], d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-member row sets as [N, R, d] (zero padding) and a validity mask [N, R]."""
    width = max((r.shape[0] for r in rows), default=0)
    out = torch.zeros(len(rows), width, d)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r.float()
        valid[i, : r.shape[0]] = True
    return out, valid


class MergedStack(nn.Module):
    """The members of a ``RepStack`` (or a list of adapters) as stacked tensors; eval only."""

    d_mlp: int
    n: int
    A: torch.Tensor  # [N, r, d]
    B_t: torch.Tensor  # [N, r, d]
    scale: torch.Tensor  # [N]
    gate_in_w: torch.Tensor  # [N·h, d]
    gate_in_b: torch.Tensor  # [N·h]
    gate_out_w: torch.Tensor  # [N, h]
    gate_out_b: torch.Tensor  # [N]
    guard_w: torch.Tensor  # [N, G, d] β̃ directions, zero-padded (guard_ok marks real rows)
    guard_ok: torch.Tensor
    prompt_k: torch.Tensor  # [N, P, d] stored prompt keys, zero-padded (prompt_ok)
    prompt_ok: torch.Tensor

    def __init__(self, members: RepStack | list[RepAdapter]):
        super().__init__()
        adapters = cast(
            list[RepAdapter], list(members.adapters if isinstance(members, RepStack) else members)
        )
        if not adapters:
            raise InvalidRequestError("MergedStack needs at least one adapter")
        first = adapters[0]
        for i, a in enumerate(adapters):
            diff = [k for k in SHARED if getattr(a.cfg, k) != getattr(first.cfg, k)]
            if a.d_mlp != first.d_mlp or diff:
                raise InvalidRequestError(
                    f"adapter {i} cannot be merged with adapter 0: differs in {diff or ['d_mlp']}"
                )
        self.cfg: RepConfig = first.cfg
        self.d_mlp, self.n = first.d_mlp, len(adapters)
        stack = lambda ts: torch.stack([t.detach().float() for t in ts])  # noqa: E731
        self.register_buffer("A", stack([a.A.weight for a in adapters]))  # [N, r, d]
        # Bᵀ per member, [N, r, d]: all members' projections are then two matrix products
        self.register_buffer("B_t", stack([a.B.weight.T for a in adapters]))
        self.register_buffer("scale", torch.tensor([a.scale for a in adapters]))
        self.register_buffer("gate_in_w", torch.cat([a.gate_in.weight.detach() for a in adapters]))
        self.register_buffer("gate_in_b", torch.cat([a.gate_in.bias.detach() for a in adapters]))
        self.register_buffer("gate_out_w", stack([a.gate_out.weight[0] for a in adapters]))
        self.register_buffer("gate_out_b", stack([a.gate_out.bias for a in adapters])[:, 0])
        guard, guard_ok = _padded([a.guard_w for a in adapters], self.d_mlp)
        prompt, prompt_ok = _padded([a.prompt_k for a in adapters], self.d_mlp)
        self.register_buffer("guard_w", guard)
        self.register_buffer("guard_ok", guard_ok)
        self.register_buffer("prompt_k", prompt)
        self.register_buffer("prompt_ok", prompt_ok)
        self.to(first.A.weight.device)
        self.eval()

    @property
    def tau(self) -> float:
        return self.cfg.tau

    def __len__(self) -> int:
        return self.n

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's soft gate for tokens ``x`` [T, d]: [T, N] (one matrix product)."""
        if self.cfg.gate_input_norm:
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-12)
        hidden = nn.functional.gelu(x @ self.gate_in_w.T + self.gate_in_b)
        hidden = hidden.view(x.shape[0], self.n, -1)
        logit = torch.einsum("tnh,nh->tn", hidden, self.gate_out_w) + self.gate_out_b
        return torch.sigmoid(logit)

    def kept(self, x: torch.Tensor) -> torch.Tensor | None:
        """[T, N]: tokens a member leaves as they are although its gate may open (its β̃ guard
        or its prompt keys, as ``RepAdapter.guarded``); None when no member has either."""
        out = None
        if self.cfg.beta_guard is not None and bool(self.guard_ok.any()):
            beta = torch.einsum("td,ngd->tng", x, self.guard_w)
            beta = beta.masked_fill(~self.guard_ok, float("-inf"))
            out = beta.amax(-1) >= self.cfg.beta_guard
        if self.cfg.keep_prompt_key and bool(self.prompt_ok.any()):
            near = torch.zeros(x.shape[0], self.n, dtype=torch.bool, device=x.device)
            norms = self.prompt_k.norm(dim=-1)  # [N, P]
            for lo in range(0, self.n, CHUNK):
                rows, ok = self.prompt_k[lo : lo + CHUNK], self.prompt_ok[lo : lo + CHUNK]
                for j in range(rows.shape[1]):
                    dist = (x[:, None, :] - rows[None, :, j, :]).norm(dim=-1)  # [T, chunk]
                    hit = dist < PROMPT_KEY_TOLERANCE * norms[lo : lo + CHUNK, j]
                    near[:, lo : lo + CHUNK] |= hit & ok[:, j]
            out = near if out is None else out | near
        return out

    def guarded(self, k: torch.Tensor) -> torch.Tensor | None:
        """Tokens some member keeps as they are (bool ``[...]``), for the injection's counts."""
        kept = self.kept(k.float().reshape(-1, self.d_mlp))
        return None if kept is None else kept.any(-1).reshape(k.shape[:-1])

    def forward(self, k: torch.Tensor) -> torch.Tensor:
        return self.forward_with_gate(k)[0]

    def forward_with_gate(self, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(k + Σ open members' P(k), the largest gate or None)``, as ``RepStack``."""
        x = k.float().reshape(-1, self.d_mlp)
        g = self.gates(x) if self.cfg.use_gate else None
        open_ = g > self.tau if g is not None else torch.ones(x.shape[0], self.n, dtype=torch.bool)
        kept = self.kept(x)
        if kept is not None:
            open_ = open_ & ~kept
        top = None if g is None else g.amax(-1).reshape(k.shape[:-1])
        if not bool(open_.any()):
            return k, top  # every token shut in every member: the key itself, untouched
        used = open_.any(0)  # members open at some token: only their projections are computed
        a, b, scale = self.A, self.B_t, self.scale
        if not bool(used.all()):
            a, b, scale, open_ = a[used], b[used], scale[used], open_[:, used]
        m, r = a.shape[0], a.shape[1]
        low = (x @ a.reshape(m * r, self.d_mlp).T).view(-1, m, r)
        low = low * (open_.float() * scale)[..., None]
        out = x + low.reshape(-1, m * r) @ b.reshape(m * r, self.d_mlp)
        return out.reshape(k.shape).to(k.dtype), top

    def extra_repr(self) -> str:
        return f"members={self.n}, d_mlp={self.d_mlp}, tau={self.tau}"


def merge_adapters(adapters: dict[int, Any]) -> dict[int, Any]:
    """``{layer: adapter}`` with every ``RepStack`` replaced by its ``MergedStack``."""
    return {
        layer: MergedStack(a) if isinstance(a, RepStack) else a for layer, a in adapters.items()
    }

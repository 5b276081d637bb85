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

``candidates="key"`` adds a screening stage so that the gates' cost no longer grows with N:
every member's retrieval directions ``w = C⁻¹k*/(k*ᵀC⁻¹k*)`` (its β̃ guard rows; the stored
prompt key ``k_o/‖k_o‖²`` for a member without them) form one ``[N·G, d]`` matrix, so a
token's whitened similarity ``β̃ = k·w`` to every member's edit is one product of ``G·d`` per
member (against ``h·d`` for its gate, ``h ≈ 0.1·d``). Only the (token, member) pairs with
``β̃ ≥ threshold`` (and, with ``top``, among the token's ``top`` best) run the member's gate,
guard and projection, on that member's own tokens (batched over chunks of members, each
padded to the chunk's most-selected member). A member with neither guard rows nor prompt
keys is a candidate everywhere. ``threshold=-inf`` selects every pair and computes what
``candidates="all"`` computes, up to summation order.

The screen is not exact, and it is opt-in for that reason: a member whose gate would open on a
key with β̃ below the threshold leaves that key alone. Trained REP gates open mostly on keys
whose β̃ is small (the paraphrases the plain edit misses are what REP is for), so on them a
threshold that saves work also drops most of their adaptations (``docs/scale.md``). It suits
members whose gates are meant to open only near their edit's key.
"""

from __future__ import annotations

import math
from typing import Any, Literal, cast, get_args

import torch
from torch import nn

from repedit.errors import InvalidRequestError
from repedit.rep.adapter import PROMPT_KEY_TOLERANCE, RepAdapter, RepConfig, RepStack

#: inference settings every member must share to be merged (each is applied per member)
SHARED = ("use_gate", "gate_input_norm", "tau", "beta_guard", "keep_prompt_key", "prompt_only")
#: members per chunk when comparing tokens with stored prompt keys ([tokens, chunk, d] at once)
#: and when the candidate screen runs members on their own tokens
CHUNK = 64
#: the candidate screen batches members with at most this many tokens; wider ones run alone
WIDE = 16
#: a chunk where fewer than one member in this many has a pair runs those members one by one
#: (a batched product would also multiply the idle members' weights by padding)
SPARSE = 4
#: "all": every member's gate at every token; "key": screen members by β̃ first (module doc)
Candidates = Literal["all", "key"]
#: default β̃ a key must reach for a member to be screened in (``candidates="key"``)
CANDIDATE_THRESHOLD = 0.1


def _padded(rows: list[torch.Tensor], d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-member row sets as [N, R, d] (zero padding) and a validity mask [N, R]."""
    width = max((r.shape[0] for r in rows), default=0)
    out = torch.zeros(len(rows), width, d)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r.float()
        valid[i, : r.shape[0]] = True
    return out, valid


def _retrieval_rows(adapter: RepAdapter) -> torch.Tensor:
    """A member's β̃ directions for the candidate screen: its guard rows ``C⁻¹k*/(k*ᵀC⁻¹k*)``,
    else its prompt keys as ``k_o/‖k_o‖²`` (β̃ = 1 at ``k_o``), else none (always screened in)."""
    if adapter.guard_w.shape[0]:
        return adapter.guard_w
    k_o = adapter.prompt_k.float()
    return k_o / k_o.pow(2).sum(-1, keepdim=True).clamp_min(1e-30)


def _near_prompt(x: torch.Tensor, prompt_k: torch.Tensor, prompt_ok: torch.Tensor) -> torch.Tensor:
    """[T, N]: tokens within ``PROMPT_KEY_TOLERANCE`` of a member's stored prompt key (direct
    differences, a chunk of members at a time)."""
    n = prompt_k.shape[0]
    near = torch.zeros(x.shape[0], n, dtype=torch.bool, device=x.device)
    norms = prompt_k.norm(dim=-1)  # [N, P]
    for lo in range(0, n, CHUNK):
        rows, ok = prompt_k[lo : lo + CHUNK], prompt_ok[lo : lo + CHUNK]
        for j in range(rows.shape[1]):
            dist = (x[:, None, :] - rows[None, :, j, :]).norm(dim=-1)  # [T, chunk]
            hit = dist < PROMPT_KEY_TOLERANCE * norms[lo : lo + CHUNK, j]
            near[:, lo : lo + CHUNK] |= hit & ok[:, j]
    return near


def _shaped(top: torch.Tensor | None, k: torch.Tensor) -> torch.Tensor | None:
    return None if top is None else top.reshape(k.shape[:-1])


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
    key_w: torch.Tensor
    key_ok: torch.Tensor
    key_none: torch.Tensor

    def __init__(
        self,
        members: RepStack | list[RepAdapter],
        *,
        candidates: Candidates = "all",
        threshold: float = CANDIDATE_THRESHOLD,
        top: int | None = None,
    ):
        super().__init__()
        adapters = cast(
            list[RepAdapter], list(members.adapters if isinstance(members, RepStack) else members)
        )
        if not adapters:
            raise InvalidRequestError("MergedStack needs at least one adapter")
        if candidates not in get_args(Candidates):
            raise InvalidRequestError(f"candidates must be 'all' or 'key', got {candidates!r}")
        if math.isnan(threshold) or (top is not None and top < 1):
            raise InvalidRequestError(f"bad candidate screen: threshold={threshold}, top={top}")
        first = adapters[0]
        for i, a in enumerate(adapters):
            diff = [k for k in SHARED if getattr(a.cfg, k) != getattr(first.cfg, k)]
            if a.d_mlp != first.d_mlp or diff:
                raise InvalidRequestError(
                    f"adapter {i} cannot be merged with adapter 0: differs in {diff or ['d_mlp']}"
                )
        self.cfg: RepConfig = first.cfg
        self.d_mlp, self.n = first.d_mlp, len(adapters)
        self.candidates, self.threshold, self.top = candidates, float(threshold), top
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
        key_w, key_ok = _padded([_retrieval_rows(a) for a in adapters], self.d_mlp)
        self.register_buffer("key_w", key_w)  # [N, G, d] β̃ directions for the screen
        self.register_buffer("key_ok", key_ok)
        self.register_buffer("key_none", ~key_ok.any(-1))  # [N] members never screened out
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

    def screen(self, x: torch.Tensor) -> torch.Tensor:
        """[T, N] bool: the (token, member) pairs that pass the candidate screen (one product
        of the tokens with every member's retrieval rows, then the threshold and ``top``)."""
        g = self.key_w.shape[1]
        beta = (x @ self.key_w.reshape(-1, self.d_mlp).T).view(x.shape[0], self.n, g)
        beta = beta.masked_fill(~self.key_ok, float("-inf")).amax(-1)  # [T, N]
        cand = beta >= self.threshold
        if self.top is not None and self.top < self.n:
            best = beta.topk(self.top, dim=-1).indices
            cand &= torch.zeros_like(cand).scatter_(1, best, True)
        return cand | self.key_none

    def kept(self, x: torch.Tensor) -> torch.Tensor | None:
        """[T, N]: tokens a member leaves as they are although its gate may open (its β̃ guard
        or its prompt keys, as ``RepAdapter.guarded``); None when no member has either."""
        out = None
        if self.cfg.beta_guard is not None and bool(self.guard_ok.any()):
            beta = torch.einsum("td,ngd->tng", x, self.guard_w)
            beta = beta.masked_fill(~self.guard_ok, float("-inf"))
            out = beta.amax(-1) >= self.cfg.beta_guard
        if self.cfg.keep_prompt_key and bool(self.prompt_ok.any()):
            near = _near_prompt(x, self.prompt_k, self.prompt_ok)
            out = near if out is None else out | near
        return out

    def guarded(self, k: torch.Tensor) -> torch.Tensor | None:
        """Tokens some member keeps as they are (bool ``[...]``), for the injection's counts."""
        kept = self.kept(k.float().reshape(-1, self.d_mlp))
        return None if kept is None else kept.any(-1).reshape(k.shape[:-1])

    def forward(self, k: torch.Tensor) -> torch.Tensor:
        return self.forward_with_gate(k)[0]

    def forward_with_gate(self, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(k + Σ open members' P(k), the largest gate or None)``, as ``RepStack``; with the
        candidate screen, a member's gate counts only at tokens that screen it in (0 elsewhere)."""
        x = k.float().reshape(-1, self.d_mlp)
        if self.candidates == "all":
            out, top = self._adapt(x)
        else:
            out, top = self._adapt_pairs(x, self.screen(x))
        return (k if out is None else out.reshape(k.shape).to(k.dtype)), _shaped(top, k)

    def _adapt_pairs(
        self, x: torch.Tensor, cand: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Only the screened-in (token, member) pairs, as batched products: members with at
        most ``WIDE`` tokens together per chunk of ``CHUNK`` members (padded to the chunk's
        most); wider members, and those of a chunk where fewer than one in ``SPARSE`` members
        has a pair, one at a time. The cost follows the pairs, not ``N · T``."""
        top = torch.zeros(x.shape[0], device=x.device) if self.cfg.use_gate else None
        pairs = cand.T.nonzero()  # (member, token), member-major
        if pairs.shape[0] == 0:
            return None, top  # no token near any member's edit: no gate runs
        member = pairs[:, 0]
        counts = torch.bincount(member, minlength=self.n)
        slot = torch.arange(pairs.shape[0], device=x.device) - (counts.cumsum(0) - counts)[member]
        wide = counts > WIDE
        alone = wide.clone()  # members run on their own: wide ones, and those of sparse chunks
        for lo in range(0, self.n, CHUNK):
            busy = (counts[lo : lo + CHUNK] > 0) & ~wide[lo : lo + CHUNK]
            if int(busy.sum()) * SPARSE < busy.shape[0]:
                alone[lo : lo + CHUNK] |= busy
        out = None
        for lo in range(0, self.n, CHUNK):
            hi = min(lo + CHUNK, self.n)
            here = (member >= lo) & (member < hi) & ~alone[member]
            if bool(here.any()):
                out = self._run_pairs(x, out, top, (lo, hi), pairs[here], slot[here])
        starts = (counts.cumsum(0) - counts).tolist()
        for m in (alone & (counts > 0)).nonzero()[:, 0].tolist():
            a, b = starts[m], starts[m] + int(counts[m])  # pairs are member-major
            out = self._run_pairs(x, out, top, (m, m + 1), pairs[a:b], slot[a:b])
        return out, top

    def _run_pairs(
        self,
        x: torch.Tensor,
        out: torch.Tensor | None,
        top: torch.Tensor | None,
        span: tuple[int, int],
        pairs: torch.Tensor,
        slot: torch.Tensor,
    ) -> torch.Tensor | None:
        """Members ``span`` on their (member, token) ``pairs``: ``out`` (None: nothing adapted
        yet) with their changes added; their gates into ``top`` (in place)."""
        lo, hi = span
        m, t = pairs[:, 0] - lo, pairs[:, 1]
        width = int(slot.max()) + 1
        tok = torch.zeros(hi - lo, width, dtype=torch.long, device=x.device)
        keep = torch.zeros(hi - lo, width, dtype=torch.bool, device=x.device)
        tok[m, slot], keep[m, slot] = t, True
        xs = x[tok]  # [M, width, d]
        if top is not None:
            g = self.member_gates(lo, hi, xs)
            top.scatter_reduce_(0, t, g[m, slot], "amax")
            keep &= g > self.tau
        kept = self._kept_own(lo, hi, xs)
        if kept is not None:
            keep &= ~kept
        if not bool(keep.any()):
            return out
        low = torch.bmm(xs, self.A[lo:hi].transpose(1, 2))
        low = low * (keep.float() * self.scale[lo:hi, None])[..., None]
        delta = torch.bmm(low, self.B_t[lo:hi])  # [M, width, d]
        return (x.clone() if out is None else out).index_add_(0, tok[keep], delta[keep])

    def member_gates(self, lo: int, hi: int, xs: torch.Tensor) -> torch.Tensor:
        """Members ``lo..hi-1``'s soft gates, each on its own tokens ``xs[m]``: [M, width]."""
        if self.cfg.gate_input_norm:
            xs = xs * torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + 1e-12)
        h = self.gate_out_w.shape[1]
        w_in = self.gate_in_w[lo * h : hi * h].view(hi - lo, h, self.d_mlp)
        b_in = self.gate_in_b[lo * h : hi * h].view(hi - lo, 1, h)
        hidden = nn.functional.gelu(torch.baddbmm(b_in, xs, w_in.transpose(1, 2)))
        logit = (hidden * self.gate_out_w[lo:hi, None, :]).sum(-1) + self.gate_out_b[lo:hi, None]
        return torch.sigmoid(logit)

    def _kept_own(self, lo: int, hi: int, xs: torch.Tensor) -> torch.Tensor | None:
        """As :meth:`kept` for members ``lo..hi-1``, each on its own tokens ``xs[m]``."""
        out = None
        guard_ok, prompt_ok = self.guard_ok[lo:hi], self.prompt_ok[lo:hi]
        if self.cfg.beta_guard is not None and bool(guard_ok.any()):
            beta = torch.bmm(xs, self.guard_w[lo:hi].transpose(1, 2))  # [M, width, G]
            beta = beta.masked_fill(~guard_ok[:, None, :], float("-inf"))
            out = beta.amax(-1) >= self.cfg.beta_guard
        if self.cfg.keep_prompt_key and bool(prompt_ok.any()):
            rows = self.prompt_k[lo:hi]  # [M, P, d]
            dist = (xs[:, :, None, :] - rows[:, None, :, :]).norm(dim=-1)  # [M, width, P]
            hit = (dist < PROMPT_KEY_TOLERANCE * rows.norm(dim=-1)[:, None, :]) & prompt_ok[
                :, None, :
            ]
            near = hit.any(-1)
            out = near if out is None else out | near
        return out

    def _adapt(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Tokens ``x`` [T, d] through every member: (adapted keys, or None when nothing
        opens; the largest gate or None)."""
        g = self.gates(x) if self.cfg.use_gate else None
        open_ = (
            g > self.tau
            if g is not None
            else torch.ones(x.shape[0], self.n, dtype=torch.bool, device=x.device)
        )
        kept = self.kept(x)
        if kept is not None:
            open_ = open_ & ~kept
        top = None if g is None else g.amax(-1)
        if not bool(open_.any()):
            return None, top  # every token shut in every member: the key itself, untouched
        used = open_.any(0)  # members open at some token: only their projections are computed
        a, b, scale = self.A, self.B_t, self.scale
        if not bool(used.all()):
            a, b, scale, open_ = a[used], b[used], scale[used], open_[:, used]
        m, r = a.shape[0], a.shape[1]
        low = (x @ a.reshape(m * r, self.d_mlp).T).view(-1, m, r)
        low = low * (open_.float() * scale)[..., None]
        return x + low.reshape(-1, m * r) @ b.reshape(m * r, self.d_mlp), top

    def extra_repr(self) -> str:
        return f"members={self.n}, d_mlp={self.d_mlp}, tau={self.tau}"


def merge_adapters(adapters: dict[int, Any], **screen: Any) -> dict[int, Any]:
    """``{layer: adapter}`` with every ``RepStack`` replaced by its ``MergedStack`` (``screen``:
    its ``candidates``/``threshold``/``top`` arguments)."""
    return {
        layer: MergedStack(a, **screen) if isinstance(a, RepStack) else a
        for layer, a in adapters.items()
    }

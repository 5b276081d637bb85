"""REP's training loss for one step, summed over the adapted layers.

``agg_weight·L_agg + consistency·L_cons + gate_loss_weight·L_gate`` (``+ negative_weight·L_neg``
with ``cfg.negatives``):

* ``L_agg``: ``agg="match"`` pulls each subject-token key onto the edit key,
  ``‖k̂ − k*‖²/‖k*‖²``; ``agg="direction"`` maximises ``(k̂/‖k̂‖)·t`` (keys whose β̃ already
  reaches ``cfg.agg_beta_cap`` are not pushed further).
* ``L_cons``: the bare prompts' keys stay where they are (relative MSE for ``match``, plain MSE
  for ``direction``).
* ``L_gate``: BCE on the gate logits in three groups weighted alike: subject tokens → open;
  "near" negatives (the subject's earlier tokens and the few tokens after it) → shut; "far"
  negatives (every other token, the negative sequences; a random subset) → shut.
* ``L_neg``: ``mean |(k̂/‖k̂‖)·t|`` over the tokens of the negative sequences.

With ``cfg.decouple_gate`` the aggregation and consistency terms see ``k + P(k)``, what the hard
gate applies where it opens, and the gate learns from its BCE alone. Why: with the soft gate in
the loss the projection learns to make up for a half-open gate and overshoots once it opens.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from repedit.rep.adapter import Adapter, RepAdapter, RepConfig
from repedit.rep.targets import Targets
from repedit.rep.variants import RepExample

#: at most this many negative token keys enter one step's gate loss (a random subset)
MAX_NEGATIVE_TOKENS = 4096

Rows = list[tuple[int, RepExample]]


def open_gate(adapter: RepAdapter) -> Callable[[torch.Tensor], torch.Tensor]:
    """``k ↦ k + P(k)``: the adapter as the hard gate applies it where it opens."""
    return lambda k: k.float() + adapter.project(k)


@dataclass
class _Roles:
    """A batch's rows by role: subject-token rows, the anchored ones among them (the
    consistency term's), and the negative sequences (no subject token)."""

    pos: Rows
    anchors: Rows
    anchored: torch.Tensor
    neg_seq: Rows

    @classmethod
    def of(cls, batch: Sequence[RepExample], cfg: RepConfig) -> _Roles:
        pos = [(i, ex) for i, ex in enumerate(batch) if ex.position is not None]
        kinds = ("prompt",) if cfg.consistency_on == "prompt" else ("prompt", "original", "long")
        return cls(
            pos=pos,
            anchors=[(i, ex) for i, ex in pos if ex.kind in kinds],
            anchored=torch.tensor([ex.kind in kinds for _, ex in pos]),
            neg_seq=[(i, ex) for i, ex in enumerate(batch) if ex.position is None],
        )


def step_losses(
    adapters: Mapping[int, RepAdapter],
    batch: Sequence[RepExample],
    keys: Mapping[int, Sequence[torch.Tensor]],
    targets: Targets,
    request_map: Sequence[int],
    cfg: RepConfig,
    gen: torch.Generator,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The step's total loss (with a graph to the adapters) and its parts as floats."""
    total = torch.zeros(())
    parts = {"agg": 0.0, "cons": 0.0, "gate": 0.0, "neg": 0.0}
    roles = _Roles.of(batch, cfg)
    for layer, adapter in adapters.items():
        loss = _layer_loss(
            layer, adapter, keys[layer], roles, targets, request_map, cfg, gen, parts
        )
        total = total.to(loss.device) + loss
    parts["total"] = float(total.detach())
    return total, parts


def _layer_loss(
    layer: int,
    adapter: RepAdapter,
    ks: Sequence[torch.Tensor],
    roles: _Roles,
    targets: Targets,
    request_map: Sequence[int],
    cfg: RepConfig,
    gen: torch.Generator,
    parts: dict[str, float],
) -> torch.Tensor:
    """One layer's weighted loss; adds its parts to ``parts``."""
    dev = ks[0].device
    pos_k = torch.stack([ks[i][ex.position] for i, ex in roles.pos])  # [P, d]
    req = torch.tensor([request_map[ex.request] for _, ex in roles.pos], device=dev)
    # decoupled: P learns what the hard gate will apply where it opens (k + P(k)), the
    # gate only from its BCE; coupled (the paper): both through the soft k + g·P(k)
    adapt: Adapter | Callable[[torch.Tensor], torch.Tensor]
    adapt = open_gate(adapter) if cfg.decouple_gate and cfg.use_gate else adapter
    l_agg = _agg_loss(adapt(pos_k), layer, req, roles, targets, cfg)
    loss = cfg.agg_weight * l_agg
    parts["agg"] += float(l_agg.detach())
    if roles.anchors and cfg.consistency:
        k_o = torch.stack([ks[i][ex.position] for i, ex in roles.anchors])
        l_cons = _consistency_loss(adapt(k_o), k_o, cfg)
        loss = loss + cfg.consistency * l_cons
        parts["cons"] += float(l_cons.detach())
    near, far = _gate_negatives(ks, roles, cfg)
    if cfg.use_gate and cfg.gate_loss_weight:
        l_gate = _gate_loss(adapter, pos_k, near, far, cfg, gen)
        loss = loss + cfg.gate_loss_weight * l_gate
        parts["gate"] += float(l_gate.detach())
    if cfg.negatives and cfg.negative_weight and roles.neg_seq:
        l_neg = _negative_loss(adapter, ks, layer, roles, targets, request_map, cfg, gen)
        loss = loss + cfg.negative_weight * l_neg
        parts["neg"] += float(l_neg.detach())
    return loss


def _agg_loss(
    k_hat: torch.Tensor,
    layer: int,
    req: torch.Tensor,
    roles: _Roles,
    targets: Targets,
    cfg: RepConfig,
) -> torch.Tensor:
    """``L_agg`` over the subject-token keys that are not anchored by the consistency term."""
    dev = k_hat.device
    if cfg.agg == "match":
        k_star = targets.k[layer][req]
        agg = -((k_hat - k_star) ** 2).sum(-1) / (k_star**2).sum(-1)
    else:
        unit = F.normalize(k_hat, dim=-1) if cfg.use_norm else k_hat
        agg = (unit * targets.t[layer][req]).sum(-1)
        if cfg.abs_agg:
            agg = agg.abs()
    if cfg.agg_beta_cap is not None and cfg.agg == "direction":
        with torch.no_grad():
            beta = (k_hat * targets.w[layer][req]).sum(-1)
        agg = torch.where(beta < cfg.agg_beta_cap, agg, agg.detach())
    if cfg.consistency_on == "original":
        agg = agg[~roles.anchored.to(dev)]
    elif cfg.agg == "match":  # the bare prompt is anchored to its own key instead
        agg = agg[torch.tensor([ex.kind != "prompt" for _, ex in roles.pos], device=dev)]
    return -agg.mean() if agg.numel() else agg.sum()


def _consistency_loss(adapted: torch.Tensor, k_o: torch.Tensor, cfg: RepConfig) -> torch.Tensor:
    """``L_cons`` of the anchored keys ``k_o`` and their adapted form."""
    if cfg.agg == "match":  # relative, on the scale of the match loss
        return (((adapted - k_o) ** 2).sum(-1) / (k_o**2).sum(-1)).mean()
    return F.mse_loss(adapted, k_o)


def _gate_negatives(
    ks: Sequence[torch.Tensor], roles: _Roles, cfg: RepConfig
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The gate's negative keys in two groups: "near" (the subject's earlier tokens, the few
    tokens after the subject token and the other subject of a pool negative, whose keys
    resemble the positive one) and "far" (every other token and the negative sequences)."""
    near: list[torch.Tensor] = []
    far: list[torch.Tensor] = []
    if cfg.context_negatives:
        for i, ex in roles.pos:
            k = ks[i]
            assert ex.position is not None
            is_far = torch.ones(k.shape[0], dtype=torch.bool, device=k.device)
            is_near = torch.zeros(k.shape[0], dtype=torch.bool, device=k.device)
            start = ex.subject_start if ex.subject_start is not None else ex.position
            is_near[ex.position + 1 : ex.position + 1 + cfg.gate_near_after] = True
            if cfg.gate_subject_tokens == "negative":
                is_near[start : ex.position] = True
            is_far[start : ex.position + 1 + cfg.gate_near_after] = False
            near.append(k[is_near])
            far.append(k[is_far])
    for i, ex in roles.neg_seq:
        if ex.subject_end is None or ex.subject_start is None:
            far.append(ks[i])
            continue
        span = slice(ex.subject_start, ex.subject_end + 1)
        near.append(ks[i][span])
        far += [ks[i][: span.start], ks[i][span.stop :]]
    return near, far


def _gate_loss(
    adapter: RepAdapter,
    pos_k: torch.Tensor,
    near: list[torch.Tensor],
    far: list[torch.Tensor],
    cfg: RepConfig,
    gen: torch.Generator,
) -> torch.Tensor:
    """``L_gate``: positives open, each negative group (capped at random) shut."""
    dev = pos_k.device
    lp = adapter.gate_logit(pos_k)
    l_gate = F.binary_cross_entropy_with_logits(lp, torch.ones_like(lp))
    for group, cap in ((near, MAX_NEGATIVE_TOKENS), (far, cfg.gate_far_tokens)):
        kg = torch.cat(group) if group else pos_k[:0]
        if kg.shape[0] > cap:
            pick = torch.randperm(kg.shape[0], generator=gen)[:cap]
            kg = kg[pick.to(dev)]
        if kg.shape[0]:
            ln = adapter.gate_logit(kg)
            l_gate = l_gate + F.binary_cross_entropy_with_logits(ln, torch.zeros_like(ln))
    return l_gate


def _negative_loss(
    adapter: RepAdapter,
    ks: Sequence[torch.Tensor],
    layer: int,
    roles: _Roles,
    targets: Targets,
    request_map: Sequence[int],
    cfg: RepConfig,
    gen: torch.Generator,
) -> torch.Tensor:
    """``L_neg``: the negative sequences' adapted keys stay off the edit's target."""
    dev = ks[0].device
    rows, reqs = [], []
    for i, ex in roles.neg_seq:
        rows.append(ks[i])
        reqs += [request_map[ex.request]] * ks[i].shape[0]
    kn = torch.cat(rows)
    rq = torch.tensor(reqs, device=dev)
    if kn.shape[0] > MAX_NEGATIVE_TOKENS:
        pick = torch.randperm(kn.shape[0], generator=gen)[:MAX_NEGATIVE_TOKENS].to(dev)
        kn, rq = kn[pick], rq[pick]
    kh = adapter(kn)
    tn = targets.t[layer][rq]
    dots = (F.normalize(kh, dim=-1) * tn).sum(-1) if cfg.use_norm else (kh * tn).sum(-1)
    return dots.abs().mean()

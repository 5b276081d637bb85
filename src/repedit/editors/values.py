"""Step 2 of every editor: the value that makes the model say the new object.

A residual ``δ`` is added to one hidden state at the subject token (the MLP output of the edit
layer for ROME-style editors, the residual stream after the last edited layer for MEMIT-style
ones) and optimised so the target is likely after every context prefix, with a KL term that
keeps "{subject} is a" unchanged, weight decay and a norm clamp. The layers below the
injection point are run once (``UpperRunner``); each step runs only the layers above.
Rows beyond the contexts (other subject forms, long prefixes) and CoRE's penalty on the spread
of later hidden states across a request's rows plug into the same loss.

Positions before the subject token never see ``δ`` (causal attention), so by default the rows
are aligned at the subject token and those positions' keys/values are cached once
(``PrefixRunner``): each step then runs the upper layers on the few columns from the subject
on. ``VALUE_PATH`` forces either path; "auto" falls back to the full one, with one warning,
when a setup check raises ``PrefixUnavailable`` (an architecture or transformers version whose
cache cannot be restored); any other error propagates.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

from repedit.data.case import EditRequest
from repedit.editors.context_variance import ContextVariance, pairwise_spread
from repedit.editors.value_forms import Form, robust_forms
from repedit.editors.value_plan import Plan, RowBatch, ValuePath, make_plan
from repedit.editors.value_rows import RowParts
from repedit.errors import EditError, InvalidRequestError
from repedit.faults import kill_point
from repedit.models.hooks import Hooks
from repedit.models.loading import LoadedModel
from repedit.models.runner import UpperRunner, frozen
from repedit.models.tokens import Position, continuation_ids, locate, pad_id, pad_right
from repedit.progress import progress_bar

Site = Literal["mlp", "residual"]
Batching = Literal["fixed", "stream"]

#: "auto": cached prefix when it can be set up, else full rows; "prefix"/"full" force one
#: (for tests and benchmarks; a forced "prefix" raises instead of falling back)
VALUE_PATH: ValuePath = "auto"

log = logging.getLogger(__name__)


@dataclass
class ValueHparams:
    """Value-optimisation settings shared by every editor (defaults: ROME / REP code)."""

    steps: int = 25
    lr: float = 0.5
    kl_factor: float = 0.0625
    weight_decay: float = 1e-3
    clamp_norm_factor: float = 4.0
    stop_prob: float = 0.95
    kl_prompts: tuple[str, ...] = ("{} is a",)
    request_batch: int = 8  # requests per group under batching="fixed"
    #: value-side robustness (0 / () = off): this many of the subject's training-half
    #: scrambles, this many of the request's ``subject_forms`` (a case's in-domain
    #: paraphrases), and one corpus passage of each of these lengths (words) before the edit
    #: prompt, become extra rows of the loss (see :mod:`repedit.editors.value_forms`)
    robust_forms: int = 0
    robust_paraphrases: int = 0
    robust_prefix_lengths: tuple[int, ...] = ()
    #: "stream" (default): batches of up to ``group_tokens`` padded tokens from the subject on
    #: (what a step runs) that a converged request leaves at once and queued ones of similar
    #: width join, rebuilt by selecting recorded rows (``value_stream``); "fixed": groups of
    #: ``request_batch`` requests whose converged ones ride along until the group ends (a
    #: reference whose per-step work is easy to follow). Both optimise each request on its own
    #: loss and give the same result up to float rounding.
    batching: Batching = "stream"
    group_tokens: int = 2048

    def __post_init__(self) -> None:
        checks = {
            "steps": self.steps >= 0,
            "lr": math.isfinite(self.lr) and self.lr > 0,
            "kl_factor": math.isfinite(self.kl_factor) and self.kl_factor >= 0,
            "weight_decay": math.isfinite(self.weight_decay) and self.weight_decay >= 0,
            "clamp_norm_factor": math.isfinite(self.clamp_norm_factor)
            and self.clamp_norm_factor > 0,
            "stop_prob": 0 < self.stop_prob <= 1,
            "request_batch": self.request_batch >= 1,
            "robust_forms": self.robust_forms >= 0,
            "robust_paraphrases": self.robust_paraphrases >= 0,
            "robust_prefix_lengths": all(n >= 1 for n in self.robust_prefix_lengths),
            "batching": self.batching in ("fixed", "stream"),
            "group_tokens": self.group_tokens >= 1,
        }
        bad = [f"{k}={getattr(self, k)!r}" for k, ok in checks.items() if not ok]
        if bad:
            raise InvalidRequestError(f"invalid value hyper-parameter(s): {', '.join(bad)}")
        if any(p.count("{}") != 1 for p in self.kl_prompts):
            raise InvalidRequestError("every kl_prompt needs exactly one '{}' for the subject")


#: the value-side setting chosen on the validation cases (MEMIT's default): three in-domain
#: scrambles and one passage each of 50 and 300 words as extra rows of the value loss
ROBUST_VALUE: dict[str, Any] = {"robust_forms": 3, "robust_prefix_lengths": (50, 300)}


@dataclass
class ValueResult:
    """Per request: the hidden state before the edit, the optimised delta, and diagnostics."""

    init: torch.Tensor  # [n, d_model] float32, hidden state at the bare prompt's subject token
    delta: torch.Tensor  # [n, d_model] float32
    prob: list[float] = field(default_factory=list)  # mean target probability at the end
    steps: list[int] = field(default_factory=list)
    #: per request, the loss at each step until it stopped (to compare paths and runs)
    losses: list[list[float]] = field(default_factory=list)

    @property
    def target(self) -> torch.Tensor:
        return self.init + self.delta


def injection_module(lm: LoadedModel, layer: int, site: Site) -> torch.nn.Module:
    return lm.arch.down_proj(layer) if site == "mlp" else lm.arch.layer(layer)


def _build(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    contexts: Sequence[str],
    kl_prompts: Sequence[str],
    position: Position,
    forms: Sequence[Sequence[Form]] | None = None,
) -> RowBatch:
    """Rows per request: each context around its prompt, then its extra ``forms``, then its KL
    prompts. Every row but the KL ones scores the target."""
    tok = lm.tokenizer
    seqs: list[list[int]] = []
    subj, owner, t_rows, t_pos, t_ids, kl_rows, bare = [], [], [], [], [], [], []

    def add(row_ids: list[int], pos: int, r: int, target: list[int]) -> None:
        row = len(seqs)
        seqs.append(row_ids + target[:-1])
        subj.append(pos)
        owner.append(r)
        for j, t in enumerate(target):
            t_rows.append(row)
            t_pos.append(len(row_ids) - 1 + j)
            t_ids.append(t)

    for r, req in enumerate(requests):
        target = continuation_ids(tok, req.text, req.target_new)
        bare.append(len(seqs))
        rows = [(ctx.replace("{}", req.prompt), req.subject) for ctx in contexts]
        rows += [(f.template, f.subject) for f in (forms[r] if forms else ())]
        for template, subject in rows:
            add(*locate(tok, template, subject, position=position), r, target)
        for kl in kl_prompts:
            row_ids, pos = locate(tok, kl, req.subject, position=position)
            kl_rows.append(len(seqs))
            seqs.append(row_ids)
            subj.append(pos)
            owner.append(r)
    ids, mask = pad_right(seqs, pad_id(tok))
    as_t = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return RowBatch(
        ids,
        mask,
        as_t(subj),
        as_t(owner),
        as_t(t_rows),
        as_t(t_pos),
        as_t(t_ids),
        as_t(t_rows),
        as_t(kl_rows),
        as_t(bare),
    )


def optimise_values(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    contexts: Sequence[str],
    *,
    layer: int,
    site: Site,
    hp: ValueHparams,
    position: Position = "last",
    path: ValuePath | None = None,
    forms: Sequence[Sequence[Form]] | None = None,
    variance: ContextVariance | None = None,
    progress: bool = False,
) -> ValueResult:
    """Optimise one delta per request at ``site`` of ``layer`` (see module docstring).

    ``path`` overrides ``VALUE_PATH`` (both give the same deltas up to float rounding).
    ``forms``: extra rows per request (an editor's own, added to ``hp``'s robustness forms);
    ``variance``: CoRE's penalty on the spread of later hidden states across each request's
    rows (None or weight 0: off, and nothing is computed for it). ``progress``: a bar of the
    requests done (a mass edit's values take hours on a CPU).
    """
    if contexts[0] != "{}":
        raise ValueError("the first context must be the bare prompt '{}'")
    path = VALUE_PATH if path is None else path
    if path not in ("auto", "prefix", "full"):
        raise ValueError(f"value path must be auto, prefix or full, not {path!r}")
    extra = _training_forms(lm, requests, hp, forms)
    if variance is not None and variance.weight == 0:
        variance = None
    if hp.batching == "stream" and hp.steps > 0:
        # imported here: the streaming scheduler builds on this module's loss
        from repedit.editors.value_stream import optimise_stream

        with frozen(lm.model), progress_bar(progress) as bar:
            done = bar.add_task("values", total=len(requests))
            return optimise_stream(
                lm,
                requests,
                contexts,
                (layer, site, hp, position, path),
                extra,
                variance,
                advance=lambda k: bar.advance(done, k),
            )
    inits, deltas, probs, steps, losses = [], [], [], [], []
    with progress_bar(progress) as bar:
        done = bar.add_task("values", total=len(requests))
        for i in range(0, len(requests), hp.request_batch):
            group = requests[i : i + hp.request_batch]
            group_forms = extra[i : i + hp.request_batch] if extra else None
            with frozen(lm.model):
                res = _optimise_group(
                    lm, group, contexts, layer, site, hp, position, path, group_forms, variance
                )
            bar.advance(done, len(group))
            inits.append(res.init)
            deltas.append(res.delta)
            probs += res.prob
            steps += res.steps
            losses += res.losses
    return ValueResult(torch.cat(inits), torch.cat(deltas), probs, steps, losses)


def _training_forms(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    hp: ValueHparams,
    forms: Sequence[Sequence[Form]] | None,
) -> list[list[Form]] | None:
    """Each request's extra rows: the caller's, then ``hp``'s robustness forms (None: none)."""
    if forms is not None and len(forms) != len(requests):
        raise ValueError(f"{len(forms)} form lists for {len(requests)} requests")
    out = [list(forms[r]) if forms is not None else [] for r in range(len(requests))]
    if hp.robust_forms or hp.robust_paraphrases or hp.robust_prefix_lengths:
        for r, req in enumerate(requests):
            out[r] += robust_forms(
                lm,
                req,
                scrambles=hp.robust_forms,
                paraphrases=hp.robust_paraphrases,
                prefix_lengths=hp.robust_prefix_lengths,
            )
    return out if any(out) else None


@dataclass
class _Loss:
    """The group's loss as a function of ``δ``: the tensors every step reads, prepared once."""

    lm: LoadedModel
    module: torch.nn.Module
    runner: UpperRunner | RowParts  # RowParts: rows replayed in buckets of prefix width
    owner: torch.Tensor  # [rows] request of each row
    inject_pos: torch.Tensor  # [rows] column where δ is added
    t_rows: torch.Tensor  # [m] row, column, id and prompt of each scored target token
    t_pos: torch.Tensor
    t_ids: torch.Tensor
    t_prompt: torch.Tensor
    kl_rows: torch.Tensor  # [r] rows holding KL prompts
    kl_init: torch.Tensor  # [r, V] their log-distributions before the edit
    n: int  # requests in the group
    #: CoRE's penalty: its weight and the layers whose outputs it reads (none: off)
    variance_weight: float = 0.0
    monitored: tuple[torch.nn.Module, ...] = ()

    def forward(
        self, delta: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Log-probs of the target tokens [m], KL-prompt log-distributions [r, V] and the
        monitored layers' outputs at the subject token [layers, rows, d] (None: no penalty)."""
        if not isinstance(self.runner, RowParts):
            hidden, later = self._run(self.runner, delta, self.owner, self.inject_pos)
        else:
            parts = self.runner.parts
            runs = [self._run(r, delta, self.owner[i], self.inject_pos[i]) for i, r in parts]
            back = torch.argsort(torch.cat([i for i, _ in parts]))
            hidden = torch.cat([h for h, _ in runs])[back]
            watched = [x for _, x in runs if x is not None]
            later = torch.cat(watched, 1)[:, back] if watched else None
        logits = self.lm.arch.logits(hidden[self.t_rows, self.t_pos]).float()
        target_lp = logits.log_softmax(-1).gather(1, self.t_ids[:, None])[:, 0]
        kl_hidden = hidden[self.kl_rows, self.inject_pos[self.kl_rows]]
        kl_lp = self.lm.arch.logits(kl_hidden).float().log_softmax(-1)
        return target_lp, kl_lp, later

    def _run(
        self, runner: UpperRunner, delta: torch.Tensor, owner: torch.Tensor, pos: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One runner's final hidden states with ``δ`` added at ``pos``, and the monitored
        layers' outputs there (None without a penalty)."""
        rows = torch.arange(owner.shape[0], device=owner.device)

        def inject(out: torch.Tensor) -> torch.Tensor:
            add = torch.zeros_like(out)
            add[rows, pos] = delta[owner].to(out.dtype)
            return out + add

        with Hooks() as h:
            h.rewrite(self.module, inject, which="output")
            for j, module in enumerate(self.monitored):
                h.capture(f"m{j}", module, which="output", positions=pos, detach=False)
            hidden = runner.run()
            later = (
                torch.stack([h[f"m{j}"] for j in range(len(self.monitored))])
                if self.monitored
                else None
            )
        return hidden, later

    def spread(self, later: torch.Tensor | None) -> torch.Tensor:
        """The weighted penalty per request [n] over its scored rows (zeros when off)."""
        if later is None or self.variance_weight == 0:
            return torch.zeros(self.n, device=self.owner.device)
        scored = torch.ones(self.owner.shape[0], dtype=torch.bool, device=self.owner.device)
        scored[self.kl_rows] = False
        return self.variance_weight * pairwise_spread(later[:, scored], self.owner[scored], self.n)

    def terms(
        self, delta: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per request: the target NLL, the target probability, the KL term and the weighted
        context-variance penalty [n] each."""
        target_lp, kl_lp, later = self.forward(delta)
        n, device = self.n, delta.device
        n_prompts = self.owner.shape[0]
        # mean target log-prob per prompt (ROME: per-prompt token average), then per request
        per_prompt = torch.zeros(n_prompts, device=device).index_add(0, self.t_prompt, target_lp)
        n_tok = torch.zeros(n_prompts, device=device).index_add(
            0, self.t_prompt, torch.ones_like(target_lp)
        )
        scored = n_tok > 0
        per_prompt = per_prompt[scored] / n_tok[scored]
        owners = self.owner[scored]
        counts = torch.zeros(n, device=device).index_add(0, owners, torch.ones_like(per_prompt))
        nll = -torch.zeros(n, device=device).index_add(0, owners, per_prompt) / counts
        prob = torch.zeros(n, device=device).index_add(0, owners, per_prompt.exp()) / counts
        kl_owner = self.owner[self.kl_rows]
        kl_each = F.kl_div(kl_lp, self.kl_init, log_target=True, reduction="none").sum(-1)
        kl = torch.zeros(n, device=device).index_add(0, kl_owner, kl_each)
        kl = kl / torch.bincount(kl_owner, minlength=n).clamp_min(1)
        return nll, prob, kl, self.spread(later)


def _loss(
    lm: LoadedModel,
    b: RowBatch,
    module: torch.nn.Module,
    plan: Plan,
    n: int,
    variance: ContextVariance | None = None,
    layer: int = 0,
) -> _Loss:
    device = lm.device
    watched = variance.monitored(layer, lm.n_layers) if variance is not None else []
    kl_rows = b.kl_rows.to(device)
    with torch.no_grad():
        before = plan.runner.final_hidden[kl_rows, plan.inject_pos[kl_rows]]
        kl_init = lm.arch.logits(before).float().log_softmax(-1)
    return _Loss(
        lm,
        module,
        plan.runner,
        b.owner.to(device),
        plan.inject_pos,
        b.target_rows.to(device),
        plan.target_pos,
        b.target_ids.to(device),
        b.target_prompt.to(device),
        kl_rows,
        kl_init,
        n,
        variance.weight if variance is not None else 0.0,
        tuple(lm.arch.layer(j) for j in watched),
    )


def _check_finite(loss_each: torch.Tensor, requests: Sequence[EditRequest], step: int) -> None:
    if not torch.isfinite(loss_each).all():
        bad = [
            requests[i].case_id or requests[i].subject
            for i in torch.nonzero(~torch.isfinite(loss_each)).flatten().tolist()
        ]
        raise EditError(f"value optimisation diverged (NaN/inf) for {bad} at step {step}")


def _step_loss(
    objective: _Loss, delta: torch.Tensor, init: torch.Tensor, hp: ValueHparams
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per request: the loss a step minimises and the mean target probability [n] each."""
    nll, prob, kl, spread = objective.terms(delta)
    decay = delta.norm(dim=1) ** 2 / init.norm(dim=1).clamp_min(1e-8) ** 2
    return nll + hp.kl_factor * kl + hp.weight_decay * decay + spread, prob


def _apply_step(
    opt: torch.optim.Optimizer,
    delta: torch.Tensor,
    loss_each: torch.Tensor,
    done: torch.Tensor,
    max_norm: torch.Tensor,
) -> None:
    """One Adam step on the requests not yet done, then the norm clamp."""
    keep = delta.detach().clone()
    loss_each[~done].sum().backward()
    opt.step()
    with torch.no_grad():
        delta[done] = keep[done]
        delta.copy_(clamp_norm(delta, max_norm))
    kill_point("values.step")


def clamp_norm(delta: torch.Tensor, max_norm: torch.Tensor) -> torch.Tensor:
    """``delta`` [n, d] with each row scaled down to at most ``max_norm`` [n] in norm: the
    clamp after every step, shared by both batchings so they stay the same optimisation."""
    norms = delta.norm(dim=1)
    scale = torch.where(norms > max_norm, max_norm / norms.clamp_min(1e-12), torch.ones_like(norms))
    return delta * scale[:, None]


def _optimise_group(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    contexts: Sequence[str],
    layer: int,
    site: Site,
    hp: ValueHparams,
    position: Position,
    path: ValuePath,
    forms: Sequence[Sequence[Form]] | None = None,
    variance: ContextVariance | None = None,
) -> ValueResult:
    device = lm.device
    b = _build(lm, requests, contexts, hp.kl_prompts, position, forms)
    module = injection_module(lm, layer, site)
    plan = make_plan(lm, b, module, layer, path)
    n = len(requests)
    objective = _loss(lm, b, module, plan, n, variance, layer)
    init = plan.site_values[b.bare_rows.to(device)].float()  # [n, d_model]
    delta = torch.zeros_like(init, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.lr)
    max_norm = hp.clamp_norm_factor * init.norm(dim=1)  # [n]
    done = torch.zeros(n, dtype=torch.bool, device=device)
    prob = torch.zeros(n, device=device)
    used = [hp.steps] * n
    losses: list[list[float]] = [[] for _ in range(n)]
    for step in range(hp.steps):
        opt.zero_grad()
        loss_each, prob = _step_loss(objective, delta, init, hp)
        _check_finite(loss_each, requests, step)
        for i, (value, stopped) in enumerate(zip(loss_each.tolist(), done.tolist(), strict=True)):
            if not stopped:
                losses[i].append(value)
        newly = (prob.detach() >= hp.stop_prob) & ~done
        for i in torch.nonzero(newly).flatten().tolist():
            used[i] = step
        done |= newly
        if done.all():
            break
        _apply_step(opt, delta, loss_each, done, max_norm)
    final = [float(p) for p in prob.detach().cpu()]
    if any(math.isnan(p) for p in final):
        raise EditError("value optimisation produced NaN probabilities")
    return ValueResult(init.detach().cpu(), delta.detach().cpu(), final, used, losses)


def current_values(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    *,
    layer: int,
    site: Site,
    position: Position = "last",
) -> torch.Tensor:
    """The hidden state at ``site`` of ``layer`` at each bare prompt's subject token [n, d]."""
    seqs, subj = [], []
    for req in requests:
        row_ids, pos = locate(lm.tokenizer, req.prompt, req.subject, position=position)
        seqs.append(row_ids)
        subj.append(pos)
    ids, mask = pad_right(seqs, pad_id(lm.tokenizer))
    module = injection_module(lm, layer, site)
    with torch.no_grad(), Hooks() as h:
        h.capture("site", module, which="output", positions=torch.tensor(subj))
        h.stop_after(module)
        h.run(
            lm.model,
            input_ids=ids.to(lm.device),
            attention_mask=mask.to(lm.device),
            use_cache=False,
        )
        return h["site"].float().cpu()

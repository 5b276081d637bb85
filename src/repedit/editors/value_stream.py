"""``optimise_values`` with ``batching="stream"``: batches that requests leave and join.

Requests are packed into token-budget batches (``value_schedule.Schedule``); a request leaves
the step's batch as soon as it converges or uses up its steps, and the batch is rebuilt at
once from the requests still running plus queued ones that fit. A rebuild selects the
surviving rows of the batch's recorded tensors (``value_rows``) and runs the model only on
the rows of newly admitted requests, so every row goes through the layers below the edit
once, as in the fixed groups, while no step carries a converged row.
Each request keeps its own Adam state (``RowAdam``), so its iterates are the fixed path's up
to float rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from repedit.data.case import EditRequest
from repedit.editors import values
from repedit.editors.context_variance import ContextVariance
from repedit.editors.value_forms import Form
from repedit.editors.value_plan import RowBatch, ValuePath, make_plan, warn_fallback
from repedit.editors.value_rows import RowParts, Rows, concat, rows_from_plan, select
from repedit.editors.value_schedule import RowAdam, Schedule, suffix_shape
from repedit.editors.values import (
    Site,
    ValueHparams,
    ValueResult,
    _check_finite,
    _Loss,
    _loss,
    _step_loss,
    clamp_norm,
    injection_module,
)
from repedit.errors import EditError, PrefixUnavailable
from repedit.faults import kill_point
from repedit.models.loading import LoadedModel
from repedit.models.tokens import Position, pad_id


@dataclass
class _Stream:
    """Every request's state while ``optimise_stream`` runs (rows indexed by request)."""

    init: torch.Tensor  # [N, d] site value at the bare prompt, from the request's first batch
    delta: torch.Tensor  # [N, d]
    adam: RowAdam
    started: torch.Tensor  # [N] bool: init is set
    prob: list[float]
    used: list[int]
    losses: list[list[float]]


class _Batches:
    """Builds each step's batch: by selecting rows (``value_rows``) where the cached prefix
    can be set up, else (``path="full"``, or "auto" once a setup check raised
    ``PrefixUnavailable``) by running the model on the whole batch again."""

    def __init__(
        self,
        lm: LoadedModel,
        requests: Sequence[EditRequest],
        contexts: Sequence[str],
        args: tuple[int, Site, ValueHparams, Position, ValuePath],
        forms: Sequence[Sequence[Form]] | None = None,
        variance: ContextVariance | None = None,
    ):
        self.lm, self.requests, self.contexts = lm, requests, contexts
        self.layer, site, self.hp, self.position, self.path = args
        self.forms, self.variance = forms, variance
        self.module = injection_module(lm, self.layer, site)
        self.select_rows = self.path != "full"
        self.rows: Rows | None = None

    def build(self, batch: list[int], carried: int, st: _Stream) -> _Loss:
        """The loss of ``batch`` (request indices), whose first ``carried`` requests were the
        survivors of the previous batch, in order; sets ``init`` of newly admitted ones."""
        if self.select_rows:
            try:
                return self._by_selection(batch, carried, st)
            except PrefixUnavailable as exc:
                if self.path == "prefix":
                    raise
                warn_fallback(exc)
                self.select_rows = False
        b = self.rows_of(batch)
        plan = make_plan(self.lm, b, self.module, self.layer, self.path)
        self._start(st, batch, plan.site_values[b.bare_rows.to(self.lm.device)])
        return _loss(self.lm, b, self.module, plan, len(batch), self.variance, self.layer)

    def rows_of(self, batch: list[int]) -> RowBatch:
        """The token rows of requests ``batch`` (``values._build``), with their extra forms."""
        forms = [self.forms[i] for i in batch] if self.forms else None
        requests = [self.requests[i] for i in batch]
        kl, position = self.hp.kl_prompts, self.position
        return values._build(self.lm, requests, self.contexts, kl, position, forms)

    def _start(self, st: _Stream, batch: list[int], site: torch.Tensor) -> None:
        """Set ``init`` of the requests in ``batch`` that have none yet, from ``site`` [n, d]."""
        fresh = [j for j, i in enumerate(batch) if not bool(st.started[i])]
        if fresh:
            rows = torch.tensor([batch[j] for j in fresh])
            st.init[rows.to(self.lm.device)] = site[torch.tensor(fresh)].float()
            st.started[rows] = True

    def _by_selection(self, batch: list[int], carried: int, st: _Stream) -> _Loss:
        lm = self.lm
        kept = self.rows if carried else None
        new = batch[carried:]
        rows = kept
        if new:
            b = self.rows_of(new)
            plan = make_plan(lm, b, self.module, self.layer, "prefix")
            fresh = rows_from_plan(lm, b, plan)
            rows = fresh if kept is None else concat(kept, fresh, pad_id(lm.tokenizer))
        assert rows is not None
        self._start(st, batch, rows.site_values[rows.bare_rows])
        self.rows = rows
        return self._objective(rows)

    def _objective(self, rows: Rows) -> _Loss:
        runner = RowParts(self.lm, self.layer, rows)
        inject_pos = torch.zeros_like(rows.owner)
        v = self.variance
        watched = v.monitored(self.layer, self.lm.n_layers) if v is not None else []
        return _Loss(
            self.lm,
            self.module,
            runner,
            rows.owner,
            inject_pos,
            rows.target_rows,
            rows.target_pos,
            rows.target_ids,
            rows.target_prompt,
            rows.kl_rows,
            rows.kl_init,
            rows.n,
            v.weight if v is not None else 0.0,
            tuple(self.lm.arch.layer(j) for j in watched),
        )

    def keep(self, batch: list[int], live: list[int]) -> None:
        """Keep only the rows of ``live`` (requests of ``batch``, in that order): before a
        rebuild, so the rows carried into the next batch are its first."""
        if self.select_rows and self.rows is not None:
            where = {i: j for j, i in enumerate(batch)}
            self.rows = select(self.rows, [where[i] for i in live]) if live else None


def optimise_stream(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    contexts: Sequence[str],
    args: tuple[int, Site, ValueHparams, Position, ValuePath],
    forms: Sequence[Sequence[Form]] | None = None,
    variance: ContextVariance | None = None,
    advance: Callable[[int], None] = lambda k: None,
) -> ValueResult:
    """``optimise_values`` with ``batching="stream"`` (see the module docstring); ``args``:
    the layer, site, settings, subject position and value path; ``advance(k)`` is told as
    ``k`` requests finish."""
    hp = args[2]
    n, d, device = len(requests), lm.arch.d_model, lm.device
    batches = _Batches(lm, requests, contexts, args, forms, variance)
    shapes = []
    for i in range(n):  # each request's rows and widest suffix, without the model
        one = batches.rows_of([i])
        shapes.append(suffix_shape(one.subject_pos, one.mask.sum(1)))
    sched = Schedule(shapes, hp.group_tokens)
    st = _Stream(
        torch.zeros(n, d, device=device),
        torch.zeros(n, d, device=device),
        RowAdam((n, d), lr=hp.lr, device=device),
        torch.zeros(n, dtype=torch.bool),
        [0.0] * n,
        [hp.steps] * n,
        [[] for _ in range(n)],
    )
    taken = [0] * n  # steps applied to each request
    batch: list[int] = []
    live: list[int] = []
    while not sched.finished(live):
        if sched.should_rebuild(live, batch, cheap=batches.select_rows):
            batches.keep(batch, live)
            batch = sched.admit(live)
            objective = batches.build(batch, len(live), st)
            live = batch
        running = len(live)
        live = _step(objective, batch, live, requests, hp, st, taken)
        advance(running - len(live))
    if any(math.isnan(p) for p in st.prob):
        raise EditError("value optimisation produced NaN probabilities")
    return ValueResult(st.init.cpu(), st.delta.detach().cpu(), st.prob, st.used, st.losses)


def _step(
    objective: _Loss,
    batch: list[int],
    live: list[int],
    requests: Sequence[EditRequest],
    hp: ValueHparams,
    st: _Stream,
    taken: list[int],
) -> list[int]:
    """One step of the ``live`` requests of ``batch``; returns those still running after it."""
    device = st.delta.device
    where = {i: j for j, i in enumerate(batch)}
    idx = torch.tensor(batch, device=device)
    delta = st.delta[idx].clone().requires_grad_(True)
    loss_each, prob = _step_loss(objective, delta, st.init[idx], hp)
    cols = torch.tensor([where[i] for i in live], device=device)
    _check_finite(loss_each[cols], [requests[i] for i in live], max(taken[i] for i in live))
    losses, probs = loss_each[cols].tolist(), prob[cols].tolist()
    stay = []
    for i, value, p in zip(live, losses, probs, strict=True):
        st.losses[i].append(value)
        st.prob[i] = p
        if p >= hp.stop_prob:
            st.used[i] = taken[i]
        else:
            stay.append(i)
    if stay:
        keep = torch.tensor([where[i] for i in stay], device=device)
        loss_each[keep].sum().backward()
        assert delta.grad is not None
        rows = torch.tensor(stay, device=device)
        st.adam.step(st.delta, rows, delta.grad[keep])
        max_norm = hp.clamp_norm_factor * st.init[rows].norm(dim=1)
        st.delta[rows] = clamp_norm(st.delta[rows], max_norm)
        kill_point("values.step")
        for i in stay:
            taken[i] += 1
    return [i for i in stay if taken[i] < hp.steps]

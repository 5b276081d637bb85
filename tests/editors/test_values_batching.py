"""The streaming value batches equal the fixed groups, on every tiny family.

``batching="stream"`` packs requests into token-budget batches, drops a request from the step
once it converges, and rebuilds the batch (with queued requests) by selecting recorded rows;
each request is still optimised on its own loss with its own Adam state, so its losses, steps,
final delta and probability must match ``batching="fixed"`` up to float32 rounding, and a
MEMIT edit built on them must hit the same requests. The stop threshold is set between the
requests' own probabilities, so they stop at different steps and the batch is rebuilt.
"""

from __future__ import annotations

import itertools
import logging
from typing import ClassVar

import pytest
import torch

import repedit.editors.value_plan as plan_module
import repedit.editors.value_stream as stream_module
import repedit.editors.values as values_module
from numerics import assert_norm_within, assert_within, drift, forward_tolerance, tolerance
from repedit.data.case import EditRequest
from repedit.editors import StatsConfig, ValueHparams, make_editor
from repedit.editors.context_variance import ContextVariance
from repedit.editors.value_forms import Form
from repedit.editors.value_schedule import RowAdam, Schedule, suffix_shape
from repedit.editors.values import optimise_values
from repedit.errors import PrefixUnavailable
from repedit.models.tiny import TINY_FAMILIES, tiny_loaded

REQUESTS = (
    EditRequest("The Eiffel Tower is in {}", "Paris", "Italy", case_id="eiffel"),
    EditRequest("{} capital of Italy is", "The", "Michel Rocard", case_id="the"),
    EditRequest("{} was founded in", "Toyota", "Europe", case_id="toyota"),
    EditRequest("Toyota was founded in {}", "Japan", "Europe", case_id="toyota2"),
    EditRequest("The mother tongue of Michel Rocard is {}", "French", "Berlin", case_id="rocard"),
)
CONTEXTS = ("{}", "Rome. {}", "The capital of France is Paris. Apple was founded by {}")
STEPS = 10
#: large steps, so probabilities move far enough to cross a threshold on random weights
BASE = {"steps": STEPS, "lr": 1.0}
#: batches of three requests' rows (``_stream``): several batches, rebuilt as requests leave
STREAM = {"batching": "stream"}
FIXED = {"batching": "fixed", "request_batch": 2}


def _budget(lm, contexts=CONTEXTS) -> int:
    """A budget that admits three requests, and a fourth once one of them has left: a request
    carried into a rebuilt batch then meets one that has not stepped yet."""
    shapes = []
    for r in REQUESTS:
        b = values_module._build(lm, [r], contexts, ("{} is a",), "last")
        shapes.append(suffix_shape(b.subject_pos, b.mask.sum(1)))
    sched = Schedule(shapes, budget=1)
    order = list(sched.queue)
    return max(sched.cost(order[:3]), sched.cost(order[1:4]))


class _Recording(Schedule):
    """A schedule that records every batch it admits (as request ids)."""

    batches: ClassVar[list[list[str | None]]] = []

    def admit(self, live):
        batch = super().admit(live)
        self.batches.append([REQUESTS[i].case_id for i in batch])
        return batch


def _carried_and_admitted(batches) -> bool:
    """Some rebuilt batch kept a running request and admitted a new one."""
    return any(set(a) & set(b) and set(b) - set(a) for a, b in itertools.pairwise(batches))


def _run(lm, stop: float, path: str = "auto", extra: dict | None = None, **kw):
    """``extra``: ``optimise_values``'s forms and penalty."""
    if kw.get("batching") == "stream" and "group_tokens" not in kw:
        kw["group_tokens"] = _budget(lm)
    hp = ValueHparams(stop_prob=stop, **BASE, **kw)
    return optimise_values(
        lm, REQUESTS, CONTEXTS, layer=1, site="mlp", hp=hp, path=path, **(extra or {})
    )


def _staggered_stop(lm, extra: dict | None = None) -> float:
    """A stop probability some requests reach early and others never (from a full run)."""
    full = _run(lm, 1.0, extra=extra, **FIXED)
    finals = sorted(full.prob)
    return (finals[len(finals) // 2] + finals[len(finals) // 2 - 1]) / 2


def _check_same(lm, fixed, stream) -> None:
    per_step = forward_tolerance(lm.arch, blocks=lm.arch.n_layers)
    loss_tol = drift(steps=STEPS, per_step=per_step)
    assert stream.steps == fixed.steps
    for got, want in zip(stream.losses, fixed.losses, strict=True):
        assert len(got) == len(want)
        want_t = torch.tensor(want)
        scale = float(want_t.abs().max())
        assert_within(torch.tensor(got), want_t, loss_tol * scale, "loss at each step")
    init_tol = forward_tolerance(
        lm.arch, blocks=2, head=False, magnitude=float(fixed.init.abs().max())
    )
    assert_within(stream.init, fixed.init, init_tol, "site value at the subject")
    assert_norm_within(stream.delta, fixed.delta, loss_tol, "delta (norm-wise)")
    assert_within(
        torch.tensor(stream.prob), torch.tensor(fixed.prob), loss_tol, "final probability"
    )


class _LowerRows:
    """Counts the rows that run through the lowest layer's MLP (a real forward of it)."""

    def __init__(self, lm) -> None:
        self.rows = 0
        self.handle = lm.arch.down_proj(0).register_forward_hook(self._count)

    def _count(self, module, args, out) -> None:
        self.rows += int(out.shape[0])

    def __enter__(self) -> _LowerRows:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


@pytest.mark.numerics
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_stream_equals_fixed_groups(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    lm = tiny_loaded(family)
    stop = _staggered_stop(lm)
    with _LowerRows(lm) as fixed_rows:
        fixed = _run(lm, stop, **FIXED)
    budget = _budget(lm)
    monkeypatch.setattr(_Recording, "batches", [])
    monkeypatch.setattr(stream_module, "Schedule", _Recording)
    with _LowerRows(lm) as stream_rows:
        stream = _run(lm, stop, **STREAM, group_tokens=budget, path="prefix")
    # the premise: requests stopped at different steps, some never, and a request running in
    # one batch was carried into a rebuilt one that admitted a new request
    assert len(set(fixed.steps)) >= 2 and STEPS in fixed.steps
    batches = _Recording.batches
    assert len(batches[0]) >= 2 and _carried_and_admitted(batches), batches
    # rebuilds select rows: each row ran through the layers below the edit once, as in the
    # fixed groups (twice per forward pair: the cached prefix and the suffix)
    assert stream_rows.rows == fixed_rows.rows
    _check_same(lm, fixed, stream)


@pytest.mark.numerics
@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_stream_equals_fixed_with_forms_and_penalty(family: str) -> None:
    """Extra rows per request (other prefixes, as CoRE and the robustness forms add) and
    CoRE's penalty on the spread of later hidden states ride along in the selected rows."""
    lm = tiny_loaded(family)
    extra = {
        "forms": [[Form("In short, " + r.prompt, r.subject)] for r in REQUESTS],
        "variance": ContextVariance(weight=0.5, layers=None),
    }
    stop = _staggered_stop(lm, extra)
    fixed = _run(lm, stop, extra=extra, **FIXED)
    plain = _run(lm, stop, **FIXED)
    assert fixed.losses[1] != plain.losses[1]  # the premise: forms and penalty change the loss
    assert len(set(fixed.steps)) >= 2
    stream = _run(lm, stop, path="prefix", extra=extra, **STREAM)
    _check_same(lm, fixed, stream)


class _SharedCountAdam(RowAdam):
    """The likely bug: one step count for the whole batch, as torch's Adam keeps per tensor."""

    def step(self, param: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor) -> None:
        self.t[rows.cpu()] = int(self.t.max())
        super().step(param, rows, grad)


@pytest.mark.numerics
def test_comparison_catches_a_shared_step_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows that join a running batch with the batch's Adam step count fail the tolerances."""
    lm = tiny_loaded("llama")
    stop = _staggered_stop(lm)
    fixed = _run(lm, stop, **FIXED)
    monkeypatch.setattr(stream_module, "RowAdam", _SharedCountAdam)
    broken = _run(lm, stop, **STREAM)
    with pytest.raises(AssertionError, match="exceeds the derived tolerance"):
        _check_same(lm, fixed, broken)


def test_streaming_with_no_steps_matches_fixed() -> None:
    lm = tiny_loaded("llama")
    a = _run_steps(lm, 0, "fixed")
    b = _run_steps(lm, 0, "stream")
    torch.testing.assert_close(a.init, b.init, rtol=0, atol=0)
    assert b.steps == [0] * len(REQUESTS) and float(b.delta.abs().max()) == 0


def _run_steps(lm, steps: int, batching: str):
    hp = ValueHparams(steps=steps, batching=batching)  # type: ignore[arg-type]
    return optimise_values(lm, REQUESTS, CONTEXTS, layer=1, site="mlp", hp=hp)


def test_schedule_packs_by_width_and_budget_and_rebuilds() -> None:
    # (rows, width) per request; the queue runs narrowest first: 4, 0, 1, 2, 3
    sched = Schedule([(2, 10), (2, 10), (3, 20), (1, 500), (1, 5)], budget=100)
    first = sched.admit([])
    assert first == [4, 0, 1] and sched.cost(first) == 50  # with 2: 8 rows x 20 = 160
    assert not sched.should_rebuild([4, 0, 1], first)
    assert sched.should_rebuild([0, 1], first)
    # a rebuild that runs the model waits until a quarter have left; a selection does not
    assert sched.should_rebuild([1, 2, 3, 4], [0, 1, 2, 3, 4])
    assert not sched.should_rebuild([1, 2, 3, 4], [0, 1, 2, 3, 4], cheap=False)
    assert sched.should_rebuild([2, 3, 4], [0, 1, 2, 3, 4], cheap=False)
    assert sched.admit([0, 1]) == [0, 1]  # 2 would make 7 x 20 = 140
    assert sched.admit([]) == [2]
    assert sched.admit([]) == [3]  # larger than the budget: a batch of its own
    assert sched.finished([])
    with pytest.raises(ValueError, match="budget"):
        Schedule([1], budget=0)
    with pytest.raises(Exception, match="group_tokens"):
        ValueHparams(group_tokens=0)
    with pytest.raises(Exception, match="batching"):
        ValueHparams(batching="dynamic")  # type: ignore[arg-type]


@pytest.mark.numerics
def test_row_adam_follows_torch_adam_per_row() -> None:
    """Rows that start at different steps each follow torch's Adam on their own gradients."""
    gen = torch.Generator().manual_seed(0)
    n, d, steps, lr = 3, 16, 12, 0.5
    start = [0, 3, 7]  # the step at which each row joins
    grads = torch.randn(steps, n, d, generator=gen)
    param = torch.zeros(n, d)
    adam = RowAdam((n, d), lr=lr)
    for s in range(steps):
        rows = torch.tensor([r for r in range(n) if s >= start[r]])
        adam.step(param, rows, grads[s, rows])
    for r in range(n):
        want = torch.zeros(1, d, requires_grad=True)
        opt = torch.optim.Adam([want], lr=lr)
        for s in range(start[r], steps):
            want.grad = grads[s, r][None].clone()
            opt.step()
        taken = steps - start[r]
        # each step moves a coordinate by at most ~lr·(1-β1)/√(1-β2) ≈ 3.2·lr and rounds a
        # handful of element-wise operations against the parameter's size
        magnitude = taken * 3.2 * lr
        per_step = tolerance(torch.float32, terms=1, stages=8, magnitude=magnitude)
        assert_within(param[r], want.detach()[0], drift(steps=taken, per_step=per_step), "row")


# --------------------------------------------------------------------------- a MEMIT edit


def _memit(lm, stats: StatsConfig, value: dict):
    # MEMIT's value-side rows off: this is about the scheduling of the rows a request has
    plain = {"robust_forms": 0, "robust_prefix_lengths": ()}
    hp = {"contexts": ((3, 2),), "layers": (1, 2), "value": {**BASE, **plain, **value}}
    return make_editor("memit", hp, stats).edit(lm, list(REQUESTS), apply=False)


@pytest.mark.numerics
@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_memit_hits_the_same_requests(
    family: str, stats: StatsConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A MEMIT edit of several requests writes the same weight updates on both schedulings,
    with requests stopping at different steps and a rebuilt batch admitting new ones."""
    lm = tiny_loaded(family)
    finals = sorted(_memit(lm, stats, {**FIXED, "stop_prob": 1.0}).info["value_prob"])
    stop = (finals[len(finals) // 2] + finals[len(finals) // 2 - 1]) / 2
    editor = make_editor("memit", {"contexts": ((3, 2),)}, stats)
    budget = _budget(lm, editor.contexts(lm, editor.resolved(lm)))
    fixed = _memit(lm, stats, {**FIXED, "stop_prob": stop})
    monkeypatch.setattr(_Recording, "batches", [])
    monkeypatch.setattr(stream_module, "Schedule", _Recording)
    stream = _memit(lm, stats, {**STREAM, "stop_prob": stop, "group_tokens": budget})
    assert len(set(fixed.info["value_steps"])) >= 2  # the premise
    assert _carried_and_admitted(_Recording.batches), _Recording.batches
    assert stream.info["value_steps"] == fixed.info["value_steps"]
    # the weight updates are linear in the optimised values (float64 solves): their drift
    tol = drift(steps=STEPS, per_step=forward_tolerance(lm.arch, blocks=lm.arch.n_layers))
    for name, want in fixed.deltas.items():
        assert float(want.abs().max()) > 0
        got = stream.deltas[name]
        assert_norm_within(got.flatten(), want.flatten(), tol, f"weight update of {name}")


def test_a_bug_in_row_selection_propagates(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under path="auto" only ``PrefixUnavailable`` turns row selection off: any other
    error in a rebuild (here an IndexError from ``select``) reaches the caller."""
    lm = tiny_loaded("llama")

    def broken(rows, keep):
        raise IndexError("select: injected bug")

    monkeypatch.setattr(stream_module, "select", broken)
    with pytest.raises(IndexError, match="injected bug"):
        _run(lm, _staggered_stop(lm), **STREAM)


def test_unavailable_prefix_falls_back_once_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A setup check that raises ``PrefixUnavailable`` sends "auto" to full rows, with the
    same optimisation and one warning naming the reason."""
    lm = tiny_loaded("llama")
    stop = _staggered_stop(lm)
    want = _run(lm, stop, **FIXED)

    def unavailable(*args, **kwargs):
        raise PrefixUnavailable("layer_calls: injected")

    monkeypatch.setattr(plan_module, "_warned", set())
    monkeypatch.setattr(stream_module, "RowParts", unavailable)
    with caplog.at_level(logging.WARNING, logger="repedit.editors.value_plan"):
        got = _run(lm, stop, **STREAM)
    assert caplog.text.count("layer_calls: injected") == 1
    _check_same(lm, want, got)

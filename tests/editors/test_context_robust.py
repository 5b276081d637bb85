"""CoRE on tiny models: it edits, it is MEMIT when its two additions are off, its penalty lowers
the spread it measures, and its settings are checked.

The penalty's closed form is compared with the pairwise definition it stands for, and the
value optimisation with the penalty and extra rows is compared between the cached-prefix and
full-row paths, as for the plain loss.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from test_values_prefix import CONTEXTS, HP, REQUESTS, _check_same_optimisation, _run

from numerics import assert_within, tolerance
from repedit.data.case import EditRequest
from repedit.editors import CoreHparams, StatsConfig, ValueHparams, make_editor
from repedit.editors.context_robust import request_prefixes
from repedit.editors.context_variance import ContextVariance, pairwise_spread
from repedit.editors.value_forms import Form
from repedit.editors.value_plan import make_plan
from repedit.editors.values import _build, _loss, injection_module, optimise_values
from repedit.errors import InvalidRequestError
from repedit.evaluation.scoring import Probe, score_probes
from repedit.models.tiny import tiny_loaded

REQ = EditRequest(
    "The Eiffel Tower is in {}", "Paris", "Italy", target_true="France", case_id="eiffel"
)
#: MEMIT without its default value-side rows, so that CoRE's own additions are all that differ
FAST = {
    "contexts": ((3, 2),),
    "value": {"steps": 8, "robust_forms": 0, "robust_prefix_lengths": ()},
}


# --------------------------------------------------------------------------- the penalty


def test_spread_closed_form_equals_the_pairwise_sum() -> None:
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 16)  # [layers, rows, d]
    owner = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    got = pairwise_spread(hidden, owner, 3)
    want = torch.zeros(3)
    for r in range(3):
        rows = (owner == r).nonzero().flatten().tolist()
        for i, j in itertools.combinations(rows, 2):
            want[r] += (hidden[:, i] - hidden[:, j]).pow(2).sum() / 16 / 3
    # N Σ‖h‖² − ‖Σh‖² cancels down to the pairwise sum: the error is relative to N Σ‖h‖²
    magnitude = 4 * float(hidden.pow(2).sum(-1).max()) * 4 / 16
    assert_within(got, want, tolerance(torch.float32, terms=4 * 16, magnitude=magnitude), "spread")
    assert float(got[2]) == 0.0  # a request with no rows


def test_monitored_layers_are_the_ones_above_the_edit() -> None:
    assert ContextVariance(1.0).monitored(2, 6) == [3, 4, 5]
    assert ContextVariance(1.0, layers=2).monitored(2, 6) == [3, 4]
    assert ContextVariance(1.0, layers=9).monitored(2, 6) == [3, 4, 5]
    assert ContextVariance(1.0).monitored(5, 6) == []


@pytest.mark.parametrize(
    "kwargs", [{"weight": -1.0}, {"weight": float("nan")}, {"weight": 1.0, "layers": 0}]
)
def test_bad_penalty_settings_are_rejected(kwargs: dict) -> None:
    with pytest.raises(InvalidRequestError):
        ContextVariance(**kwargs)


def _spread_at(lm, delta: torch.Tensor, layer: int) -> float:
    """The unweighted spread of REQUESTS' rows with ``delta`` injected after ``layer``."""
    b = _build(lm, REQUESTS, CONTEXTS, HP.kl_prompts, "last")
    module = injection_module(lm, layer, "residual")
    plan = make_plan(lm, b, module, layer, "full")
    objective = _loss(lm, b, module, plan, len(REQUESTS), ContextVariance(1.0), layer)
    with torch.no_grad():
        return float(objective.terms(delta.to(lm.device))[3].sum())


def test_penalty_lowers_the_spread_across_contexts() -> None:
    lm = tiny_loaded("llama")
    layer = 1
    hp = ValueHparams(steps=12, stop_prob=1.0)
    plain = optimise_values(lm, REQUESTS, CONTEXTS, layer=layer, site="residual", hp=hp)
    weighted = optimise_values(
        lm,
        REQUESTS,
        CONTEXTS,
        layer=layer,
        site="residual",
        hp=hp,
        variance=ContextVariance(1.0),
    )
    assert not torch.equal(plain.delta, weighted.delta)
    assert _spread_at(lm, weighted.delta, layer) < _spread_at(lm, plain.delta, layer)


@pytest.mark.numerics
def test_prefix_path_equals_full_path_with_penalty_and_forms() -> None:
    """The penalty reads later layers at the subject column and extra rows join the batch; both
    must be where the full rows put them."""
    lm = tiny_loaded("llama")
    forms = [
        [Form("Rome is old. " + REQUESTS[0].prompt, REQUESTS[0].subject)],
        [],
        [Form(REQUESTS[2].prompt, "Toy ota")],
    ]
    kw = {"variance": ContextVariance(0.5), "forms": forms}
    full = _run(lm, "full", "residual", 1, **kw)
    prefix = _run(lm, "prefix", "residual", 1, **kw)
    _check_same_optimisation(lm, full, prefix, "residual", 1)


# --------------------------------------------------------------------------- the editor


def test_core_without_its_additions_is_memit(stats: StatsConfig) -> None:
    """λ = 0 and the shared contexts: the same computation as MEMIT, so the same bits."""
    lm = tiny_loaded("llama")
    memit = make_editor("memit", FAST, stats).edit(lm, REQ, apply=False)
    core = make_editor("core", {**FAST, "variance_weight": 0.0, "request_contexts": 0}, stats).edit(
        lm, REQ, apply=False
    )
    assert memit.deltas.keys() == core.deltas.keys()
    for name, delta in memit.deltas.items():
        assert torch.equal(core.deltas[name], delta), name


def test_core_edits_and_reverts(stats: StatsConfig) -> None:
    lm = tiny_loaded("llama")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    probe = [Probe(REQ.text, REQ.target_new)]
    lp_before = score_probes(lm, probe)[0].logprob
    result = make_editor("core", {**FAST, "request_contexts": 6}, stats).edit(lm, REQ)
    assert score_probes(lm, probe)[0].logprob > lp_before + 0.5
    result.revert(lm)
    after = lm.model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_core_penalty_changes_the_edit(stats: StatsConfig) -> None:
    lm = tiny_loaded("llama")
    base = {**FAST, "request_contexts": 3}
    off = make_editor("core", {**base, "variance_weight": 0.0}, stats).edit(lm, REQ, apply=False)
    on = make_editor("core", {**base, "variance_weight": 1.0}, stats).edit(lm, REQ, apply=False)
    last = max(off.deltas)
    assert not torch.equal(off.deltas[last], on.deltas[last])


def test_request_prefixes_come_from_each_source_and_are_seeded() -> None:
    lm = tiny_loaded("llama")
    hp = CoreHparams(request_contexts=6, request_context_length=3)
    first = request_prefixes(lm, REQ, hp)
    assert first == request_prefixes(lm, REQ, hp)
    assert len(first) == 6 and all(p.endswith(". ") and "{" not in p for p in first)
    want = ["France"] * 2 + ["Paris"] * 2 + ["Italy"] * 2
    assert all(p.startswith(w) for p, w in zip(first, want, strict=True)), first
    # no old object: the count is split over the two sources left
    bare = EditRequest(REQ.prompt, REQ.subject, REQ.target_new, case_id="eiffel")
    want = ["Paris"] * 3 + ["Italy"] * 3
    got = request_prefixes(lm, bare, hp)
    assert all(p.startswith(w) for p, w in zip(got, want, strict=True)), got
    assert request_prefixes(lm, REQ, hp.replace(request_contexts=0)) == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("variance_weight", -0.1),
        ("variance_weight", float("inf")),
        ("variance_layers", 0),
        ("request_contexts", -1),
        ("request_context_length", 0),
        ("request_context_top_k", 0),
        ("request_context_sources", ("old_object",)),
        ("request_context_sources", ()),
    ],
)
def test_bad_core_settings_are_rejected(field: str, value: object) -> None:
    with pytest.raises(InvalidRequestError, match=field):
        CoreHparams().replace(**{field: value})


def test_core_settings_round_trip_through_a_dict() -> None:
    hp = CoreHparams().replace(variance_weight=0.05, variance_layers=3, request_contexts=9)
    assert CoreHparams.from_dict(hp.to_dict()) == hp


def test_core_trains_rep_like_any_editor(stats: StatsConfig) -> None:
    """``--rep`` goes through ``train_rep_for_editor``: CoRE's result carries what REP reads."""
    from repedit.rep.adapter import RepConfig
    from repedit.rep.train import train_rep_for_editor

    lm = tiny_loaded("llama")
    editor = make_editor("core", {**FAST, "request_contexts": 3, "layers": (1, 2)}, stats)
    cfg = RepConfig().replace(long_context=False, steps=3, batch=6)
    result, rep = train_rep_for_editor(lm, editor, [REQ], cfg)
    try:
        assert rep.layers == [1, 2]
        assert all(torch.count_nonzero(rep.adapters[layer].B.weight) > 0 for layer in (1, 2))
    finally:
        result.revert(lm)

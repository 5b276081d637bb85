"""The cached-prefix value optimisation equals the full-row one, on every tiny family.

``optimise_values`` aligns rows at the subject token and caches the columns before it
(``PrefixRunner``); nothing there depends on the delta, so every step's loss, the final delta
and a whole ROME edit must match the plain path up to float32 rounding. The requests mix
prefix lengths (contexts of different lengths, a subject at position 0 with no context) and
multi-token targets, which is where left-padding, position ids and the cache restore can go
wrong.
"""

from __future__ import annotations

import functools
import logging

import pytest
import torch

import repedit.editors.value_plan as plan_module
import repedit.editors.values as values_module
from numerics import assert_norm_within, assert_within, drift, forward_tolerance
from repedit.data.case import EditRequest
from repedit.editors import StatsConfig, ValueHparams, make_editor
from repedit.editors.values import _build, injection_module, optimise_values
from repedit.errors import PrefixUnavailable
from repedit.models.batching import fits_width
from repedit.models.runner import PrefixRunner, UpperRunner, prefix_buckets
from repedit.models.tiny import TINY_FAMILIES, tiny_loaded

REQUESTS = (
    EditRequest("The Eiffel Tower is in {}", "Paris", "Italy", case_id="eiffel"),
    # a one-token subject that opens the prompt: with the bare context it sits at position 0
    EditRequest("{} capital of Italy is", "The", "Michel Rocard", case_id="the"),
    EditRequest("{} was founded in", "Toyota", "Europe", case_id="toyota"),
)
CONTEXTS = ("{}", "Rome. {}", "The capital of France is Paris. Apple was founded by {}")
#: no early stop, so both paths take every step and the loss lists line up
HP = ValueHparams(steps=6, stop_prob=1.0)
SITES = (("mlp", 1), ("residual", 2))


def _run(lm, path: str, site: str, layer: int, **kw):
    return optimise_values(
        lm, REQUESTS, CONTEXTS, layer=layer, site=site, hp=kw.pop("hp", HP), path=path, **kw
    )


def test_requests_cover_the_edge_cases() -> None:
    """The premise of the equivalence tests: mixed prefix lengths, position 0, long targets."""
    lm = tiny_loaded("llama")
    b = _build(lm, REQUESTS, CONTEXTS, HP.kl_prompts, "last")
    assert int(b.subject_pos.min()) == 0
    assert len(set(b.subject_pos.tolist())) >= 4
    per_row = torch.bincount(b.target_rows)
    assert int(per_row.max()) >= 3  # a target of several tokens


def _check_same_optimisation(lm, full, prefix, site: str, layer: int) -> dict[str, float]:
    """Both paths ran the same optimisation, up to the rounding bounds of ``numerics``.

    Returns each compared quantity's observed error (the tests assert it is within its bound).
    """
    arch = lm.arch
    blocks = arch.n_layers  # the lower blocks once, the upper ones at every step
    per_step = forward_tolerance(arch, blocks=blocks)  # relative error of one loss evaluation
    loss_tol = drift(steps=HP.steps, per_step=per_step)
    assert prefix.steps == full.steps == [HP.steps] * len(REQUESTS)
    assert len(prefix.losses) == len(REQUESTS)
    errors = {"losses": 0.0}
    for got, want in zip(prefix.losses, full.losses, strict=True):
        assert len(got) == len(want) == HP.steps
        want_t = torch.tensor(want)
        scale = float(want_t.abs().max())
        err = assert_within(torch.tensor(got), want_t, loss_tol * scale, "loss at each step")
        errors["losses"] = max(errors["losses"], err / scale)
    init_scale = float(full.init.abs().max())
    init_tol = forward_tolerance(arch, blocks=layer + 1, head=False, magnitude=init_scale)
    errors["init"] = assert_within(prefix.init, full.init, init_tol, "site value at the subject")
    assert float(full.delta.abs().max()) > 0
    errors["delta"] = assert_norm_within(prefix.delta, full.delta, loss_tol, "delta (norm-wise)")
    errors["prob"] = assert_within(
        torch.tensor(prefix.prob), torch.tensor(full.prob), per_step, "final target probability"
    )
    return errors


@pytest.mark.numerics
@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize(("site", "layer"), SITES)
def test_prefix_path_equals_full_path(family: str, site: str, layer: int) -> None:
    lm = tiny_loaded(family)
    full = _run(lm, "full", site, layer)
    prefix = _run(lm, "prefix", site, layer)
    _check_same_optimisation(lm, full, prefix, site, layer)


#: one context long enough that its rows get a prefix bucket of their own (``prefix_buckets``)
LONG_CONTEXTS = (*CONTEXTS, "Paris is a city. " * 12 + "{}")


def test_prefix_buckets_partition_rows_by_the_shared_length_rule() -> None:
    lengths = torch.tensor([3, 70, 12, 0, 40, 16, 33, 130])
    groups = prefix_buckets(lengths)
    assert sorted(torch.cat(groups).tolist()) == list(range(len(lengths)))
    for g in groups:  # the house rule (models.batching.fits_width), rows in ascending order
        assert g.tolist() == sorted(g.tolist())
        assert all(fits_width(int(lengths[g].min()), int(n)) for n in lengths[g])
    assert [sorted(lengths[g].tolist()) for g in groups] == [[0, 3], [12, 16], [33, 40, 70], [130]]


@pytest.mark.numerics
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_bucketed_prefix_equals_full_path(family: str) -> None:
    """A long context puts its rows in their own prefix bucket; the optimisation still equals
    the full rows'."""
    lm = tiny_loaded(family)
    b = _build(lm, REQUESTS, LONG_CONTEXTS, HP.kl_prompts, "last")
    assert len(prefix_buckets(b.subject_pos)) > 1  # the premise: more than one bucket
    run = functools.partial(
        optimise_values, lm, REQUESTS, LONG_CONTEXTS, layer=1, site="mlp", hp=HP
    )
    window = getattr(lm.model.config, "sliding_window", None)
    if window is not None and window <= b.ids.shape[1]:  # cannot be cached: said, not wrong
        with pytest.raises(PrefixUnavailable, match="sliding window"):
            run(path="prefix")
        return
    full, prefix = run(path="full"), run(path="prefix")
    _check_same_optimisation(lm, full, prefix, "mlp", 1)


@pytest.mark.numerics
def test_bucketed_rows_carry_the_context_variance_penalty(monkeypatch: pytest.MonkeyPatch) -> None:
    """CoRE's penalty reads every row's later layers: with the rows replayed in several buckets
    (``RowParts``) it, and so the optimisation, equals the full rows'."""
    import repedit.editors.value_stream as stream_module
    from repedit.editors.context_variance import ContextVariance
    from repedit.editors.value_rows import RowParts

    lm = tiny_loaded("llama")
    made: list[int] = []

    class Counted(RowParts):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(len(self.parts))

    monkeypatch.setattr(stream_module, "RowParts", Counted)
    penalty = ContextVariance(0.05)
    run = functools.partial(
        optimise_values, lm, REQUESTS, LONG_CONTEXTS, layer=1, site="mlp", hp=HP, variance=penalty
    )
    full, prefix = run(path="full"), run(path="prefix")
    assert made and max(made) > 1  # the premise: the rows ran in more than one bucket
    _check_same_optimisation(lm, full, prefix, "mlp", 1)


def _shifted_plan(field: str):
    """A ``prefix_plan`` whose ``field`` columns are one too far left: an off-by-one bug."""
    real = plan_module.prefix_plan

    def plan(*args, **kwargs):
        out = real(*args, **kwargs)
        cols = getattr(out, field)
        setattr(out, field, (cols - 1).clamp_min(0) if field == "target_pos" else cols + 1)
        return out

    return plan


@pytest.mark.numerics
@pytest.mark.parametrize("field", ["target_pos", "inject_pos"])
def test_prefix_comparison_catches_an_off_by_one_column(
    field: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scoring the wrong column or injecting δ one column late fails the derived tolerances."""
    lm = tiny_loaded("gemma")
    full = _run(lm, "full", "mlp", 1)
    monkeypatch.setattr(plan_module, "prefix_plan", _shifted_plan(field))
    broken = _run(lm, "prefix", "mlp", 1)
    with pytest.raises(AssertionError, match="exceeds the derived tolerance"):
        _check_same_optimisation(lm, full, broken, "mlp", 1)


@pytest.mark.numerics
def test_prefix_comparison_catches_a_dropped_target_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch that loses each target's last token (a dropped term of the loss) is caught."""
    lm = tiny_loaded("llama")
    full = _run(lm, "full", "mlp", 1)
    real = values_module._build

    def build(*args, **kwargs):
        b = real(*args, **kwargs)
        last = torch.ones_like(b.target_rows, dtype=torch.bool)
        last[:-1] = b.target_rows[1:] != b.target_rows[:-1]  # the last token of each row
        keep = ~last | (torch.bincount(b.target_rows)[b.target_rows] == 1)
        for name in ("target_rows", "target_pos", "target_ids", "target_prompt"):
            setattr(b, name, getattr(b, name)[keep])
        return b

    monkeypatch.setattr(values_module, "_build", build)
    broken = _run(lm, "prefix", "mlp", 1)
    with pytest.raises(AssertionError, match="exceeds the derived tolerance"):
        _check_same_optimisation(lm, full, broken, "mlp", 1)


def test_auto_uses_the_prefix_path(caplog: pytest.LogCaptureFixture) -> None:
    lm = tiny_loaded("llama")
    with caplog.at_level(logging.DEBUG, logger="repedit.editors.value_plan"):
        auto = _run(lm, "auto", "mlp", 1)
    assert "cached prefix" in caplog.text
    torch.testing.assert_close(auto.delta, _run(lm, "prefix", "mlp", 1).delta, rtol=0, atol=0)


def test_module_switch_selects_the_path(monkeypatch: pytest.MonkeyPatch) -> None:
    lm = tiny_loaded("gpt2")
    calls: list[str] = []
    real = plan_module.prefix_plan

    def spy(*args, **kwargs):
        calls.append("prefix")
        return real(*args, **kwargs)

    monkeypatch.setattr(plan_module, "prefix_plan", spy)
    monkeypatch.setattr(values_module, "VALUE_PATH", "full")
    _run(lm, None, "mlp", 1)  # type: ignore[arg-type]
    assert calls == []
    monkeypatch.setattr(values_module, "VALUE_PATH", "prefix")
    _run(lm, None, "mlp", 1)  # type: ignore[arg-type]
    assert calls == ["prefix"]
    with pytest.raises(ValueError, match="value path"):
        _run(lm, "fast", "mlp", 1)


def test_auto_falls_back_when_the_cache_setup_fails(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    lm = tiny_loaded("llama")
    want = _run(lm, "full", "mlp", 1)

    def broken(*args, **kwargs):
        raise RuntimeError("no cache for this family")

    monkeypatch.setattr(plan_module, "PrefixRunner", broken)
    monkeypatch.setattr(plan_module, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="repedit.editors.value_plan"):
        got = _run(lm, "auto", "mlp", 1)
    assert "full rows" in caplog.text and "no cache for this family" in caplog.text
    torch.testing.assert_close(got.delta, want.delta, rtol=0, atol=0)
    with pytest.raises(PrefixUnavailable, match="no cache for this family"):
        _run(lm, "prefix", "mlp", 1)


def test_no_prefix_falls_back_to_full_rows() -> None:
    """Every subject at position 0 leaves nothing to cache: "auto" runs the full rows."""
    lm = tiny_loaded("llama")
    req = [REQUESTS[1]]
    hp = ValueHparams(steps=3, stop_prob=1.0, kl_prompts=("{} is a",))
    args = {"layer": 1, "site": "mlp", "hp": hp}
    want = optimise_values(lm, req, ("{}",), path="full", **args)
    got = optimise_values(lm, req, ("{}",), path="auto", **args)
    torch.testing.assert_close(got.delta, want.delta, rtol=0, atol=0)
    with pytest.raises(PrefixUnavailable, match="no prefix"):
        optimise_values(lm, req, ("{}",), path="prefix", **args)


@pytest.mark.numerics
@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_prefix_runner_replays_like_the_full_forward(family: str) -> None:
    """Unmodified replays give the full rows' final hidden states, run after run."""
    lm = tiny_loaded(family)
    b = _build(lm, REQUESTS, CONTEXTS, HP.kl_prompts, "last")
    module = injection_module(lm, 1, "mlp")
    with torch.no_grad():
        plan = plan_module.prefix_plan(lm, b, module, 1)
        full = UpperRunner(lm, 1, b.ids, b.mask)
        runner = plan.runner
        assert isinstance(runner, PrefixRunner)
        first = runner.run()
        second = runner.run()
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    # the upper blocks above layer 1, on hidden states of this size (no logits head)
    tol = forward_tolerance(
        lm.arch,
        blocks=lm.arch.n_layers,
        head=False,
        magnitude=float(full.final_hidden.abs().max()),
        seq_len=b.ids.shape[1],
    )
    assert_within(first, runner.final_hidden, tol, "replay vs the runner's own forward")
    rows = torch.arange(b.ids.shape[0])
    # the subject column and every scored column hold the same states as the unpadded rows
    assert_within(
        first[rows, plan.inject_pos], full.final_hidden[rows, b.subject_pos], tol, "subject column"
    )
    assert_within(
        first[b.target_rows, plan.target_pos],
        full.final_hidden[b.target_rows, b.target_pos],
        tol,
        "scored columns",
    )
    # a replay that changed the cached prefix in place is refused, not silently wrong
    runner.reset()
    runner.cache.layers[-1].keys.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        runner.run()


# --------------------------------------------------------------------------- ROME


@pytest.mark.numerics
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_rome_edit_is_the_same_on_both_paths(
    family: str, stats: StatsConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    lm = tiny_loaded(family)
    editor = make_editor("rome", {"contexts": ((3, 2),), "value": {"steps": 8}}, stats)
    deltas = {}
    for path in ("full", "prefix"):
        monkeypatch.setattr(values_module, "VALUE_PATH", path)
        result = editor.edit(lm, REQUESTS[0])  # the same editor: the same sampled contexts
        deltas[path] = result.deltas
        result.revert(lm)
    assert deltas["full"].keys() == deltas["prefix"].keys()
    # the weight update is linear in the optimised value (float64 solve): the value's drift
    tol = drift(steps=8, per_step=forward_tolerance(lm.arch, blocks=lm.arch.n_layers))
    for name, want in deltas["full"].items():
        assert float(want.abs().max()) > 0
        got = deltas["prefix"][name]
        assert_norm_within(got.flatten(), want.flatten(), tol, f"weight update of {name}")

"""Every editor on tiny random models: an edit raises the target's log-probability, touches only
its layers' down-projections, reverts bit for bit, batches and chains; bad input fails before
any weight changes.

Requests put the subject at the *end* of the prompt. In a random-weight model attention carries
little from earlier positions, so an edit at a mid-prompt subject moves the prediction by a
fraction of a nat (and on some families not at all); at the last position the edited MLP output
feeds the next token directly, which makes "the target became more likely" a reliable check on
every family.
"""

from __future__ import annotations

import pytest
import torch

import repedit.editors.memit as memit_module
import repedit.editors.rome as rome_module
from numerics import tolerance
from repedit.data.case import EditRequest
from repedit.editors import EDITORS, StatsConfig, make_editor
from repedit.errors import EditError, InvalidRequestError
from repedit.evaluation.scoring import Probe, score_probes
from repedit.models import LoadedModel
from repedit.models.tiny import TINY_FAMILIES, tiny_loaded

METHODS = ("rome", "r-rome", "memit", "emmet", "alphaedit", "core")
BATCHED = ("memit", "emmet", "alphaedit", "core")
#: few contexts and steps: each edit takes a fraction of a second on a tiny model
FAST = {"contexts": ((3, 2),), "value": {"steps": 8}}
#: smallest log-prob gain (nats) that counts as "the edit moved the model"
MIN_GAIN = 0.5

REQ = EditRequest("The Eiffel Tower is in {}", "Paris", "Italy", case_id="eiffel")
OTHERS = (
    EditRequest("Toyota was founded in {}", "Japan", "Europe", case_id="toyota"),
    EditRequest("The mother tongue of Michel Rocard is {}", "French", "Berlin", case_id="rocard"),
)


def _combos() -> list[tuple[str, str]]:
    """All methods on llama, gpt2 and gemma3_text (a post-MLP norm); ROME and MEMIT on every
    other tiny family."""
    every = ("llama", "gpt2", "gemma3_text")
    out = [(family, method) for family in every for method in METHODS]
    out += [(f, m) for f in TINY_FAMILIES if f not in every for m in ("rome", "memit")]
    return out


# --------------------------------------------------------------------------- fixtures


def _snapshot(lm: LoadedModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def _assert_unchanged(lm: LoadedModel, before: dict[str, torch.Tensor]) -> None:
    after = lm.model.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
    assert not changed, f"weights changed: {changed}"


def _logprob(lm: LoadedModel, req: EditRequest) -> float:
    return score_probes(lm, [Probe(req.text, req.target_new)])[0].logprob


def _expected_names(lm: LoadedModel, editor) -> set[str]:
    layers = editor.layers(lm, editor.resolved(lm))
    return {f"{lm.arch.down_proj_name(layer)}.weight" for layer in layers}


def _rank(delta: torch.Tensor) -> int:
    """Numerical rank of a float32 delta (singular values above float32 noise)."""
    s = torch.linalg.svdvals(delta.double())
    return int((s > 1e-5 * s[0]).sum())


def _logits(lm: LoadedModel, text: str = "The Eiffel Tower is in Paris") -> torch.Tensor:
    ids = lm.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        return lm.model(input_ids=ids, use_cache=False).logits


# --------------------------------------------------------------------------- one edit


@pytest.mark.numerics
@pytest.mark.parametrize(("family", "method"), _combos())
def test_edit_raises_target_and_reverts_exactly(
    family: str, method: str, stats: StatsConfig
) -> None:
    lm = tiny_loaded(family)
    before = _snapshot(lm)
    lp_before = _logprob(lm, REQ)
    editor = make_editor(method, FAST, stats)

    result = editor.edit(lm, REQ)

    assert result.applied and result.method == editor.name
    assert result.fingerprint == lm.fingerprint
    lp_after = _logprob(lm, REQ)
    assert lp_after > lp_before + MIN_GAIN, (lp_before, lp_after)

    # only the expected layers' down-projections change, and by exactly the stored delta
    expected = _expected_names(lm, editor)
    assert set(result.deltas) == expected
    assert result.layers == editor.layers(lm, editor.resolved(lm))
    params = dict(lm.model.named_parameters())
    state = lm.model.state_dict()
    for name, delta in result.deltas.items():
        assert delta.shape == params[name].shape
        assert torch.isfinite(delta).all() and delta.abs().max() > 0
        # one float32 addition, rounded once (in place) against once (here)
        magnitude = float((before[name].abs() + delta.abs()).max())
        tol = tolerance(torch.float32, terms=2, magnitude=magnitude)
        torch.testing.assert_close(state[name], before[name] + delta, rtol=0, atol=tol)
    untouched = [k for k in before if k not in expected and not torch.equal(before[k], state[k])]
    assert not untouched, f"edit changed {untouched}"
    if method in ("rome", "r-rome"):
        (delta,) = result.deltas.values()
        assert _rank(delta) == 1

    result.revert(lm)
    assert not result.applied
    _assert_unchanged(lm, before)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", METHODS)
def test_apply_false_leaves_model_unchanged(family: str, method: str, stats: StatsConfig) -> None:
    lm = tiny_loaded(family)
    before = _snapshot(lm)
    editor = make_editor(method, FAST, stats)

    result = editor.edit(lm, REQ, apply=False)

    assert not result.applied
    _assert_unchanged(lm, before)
    assert set(result.deltas) == _expected_names(lm, editor)
    # the unapplied result is the same edit: applying it later gives the applied edit's model
    result.apply(lm)
    deferred = _logits(lm)
    result.revert(lm)
    # a fresh editor: AlphaEdit remembers the keys of every edit it computed
    applied = make_editor(method, FAST, stats).edit(lm, REQ)
    torch.testing.assert_close(_logits(lm), deferred, rtol=0, atol=1e-6)
    applied.revert(lm)
    _assert_unchanged(lm, before)


def test_explicit_layers_are_the_only_ones_edited(stats: StatsConfig) -> None:
    lm = tiny_loaded("llama")
    rome = make_editor("rome", {**FAST, "layer": 2}, stats).edit(lm, REQ, apply=False)
    assert set(rome.deltas) == {"model.layers.2.mlp.down_proj.weight"}
    memit = make_editor("memit", {**FAST, "layers": (1, 3)}, stats).edit(lm, REQ, apply=False)
    assert set(memit.deltas) == {
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.3.mlp.down_proj.weight",
    }
    assert memit.layers == [1, 3]


def test_result_records_requests_and_hparams(stats: StatsConfig) -> None:
    lm = tiny_loaded("llama")
    result = make_editor("memit", FAST, stats).edit(lm, REQ, apply=False)
    assert result.requests == [REQ.to_dict()]
    assert result.hparams["method"] == "memit"
    assert result.hparams["value"]["steps"] == 8
    assert result.info["seconds"] > 0
    assert result.tensors[f"targets.{result.layers[-1]}"].shape == (1, lm.arch.d_model)
    rome = make_editor("rome", FAST, stats).edit(lm, [REQ, OTHERS[0]], apply=False)
    (layer,) = rome.layers
    assert rome.tensors[f"keys.{layer}"].shape == (2, lm.arch.d_mlp)
    assert rome.tensors[f"values.{layer}"].shape == (2, lm.arch.d_model)


@pytest.mark.parametrize("key_mode", ["mean", "each"])
def test_memit_keys_per_key_mode(key_mode: str, stats: StatsConfig) -> None:
    """``mean``: one context-averaged key per request; ``each``: one per (request, context)."""
    lm = tiny_loaded("llama")
    editor = make_editor("memit", {**FAST, "key_mode": key_mode}, stats)
    n_contexts = len(editor.contexts(lm, editor.resolved(lm)))
    result = editor.edit(lm, [REQ, OTHERS[0]], apply=False)
    rows = 2 if key_mode == "mean" else 2 * n_contexts
    for layer in result.layers:
        assert result.tensors[f"keys.{layer}"].shape == (rows, lm.arch.d_mlp)


# --------------------------------------------------------------------------- batches


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", BATCHED)
def test_batch_of_three_in_one_call(family: str, method: str, stats: StatsConfig) -> None:
    lm = tiny_loaded(family)
    before = _snapshot(lm)
    requests = [REQ, *OTHERS]
    lp_before = [_logprob(lm, r) for r in requests]
    editor = make_editor(method, FAST, stats)

    result = editor.edit(lm, requests)

    lp_after = [_logprob(lm, r) for r in requests]
    for req, b, a in zip(requests, lp_before, lp_after, strict=True):
        assert a > b + MIN_GAIN, (req.case_id, b, a)
    assert set(result.deltas) == _expected_names(lm, editor)
    assert len(result.requests) == 3
    keys = result.tensors[f"keys.{result.layers[0]}"]  # one row per request (or per context)
    assert keys.shape[1] == lm.arch.d_mlp and keys.shape[0] % 3 == 0
    result.revert(lm)
    _assert_unchanged(lm, before)


@pytest.mark.numerics
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_rome_applies_several_requests_one_after_the_other(family: str, stats: StatsConfig) -> None:
    lm = tiny_loaded(family)
    before = _snapshot(lm)
    first, second = REQ, OTHERS[0]
    lp_before = [_logprob(lm, first), _logprob(lm, second)]
    editor = make_editor("rome", FAST, stats)

    # by hand: edit, then edit the edited model
    step1 = editor.edit(lm, first)
    step2 = editor.edit(lm, second)
    step2.revert(lm)
    step1.revert(lm)
    _assert_unchanged(lm, before)

    both = editor.edit(lm, [first, second])

    (name,) = both.deltas
    assert set(step1.deltas) == set(step2.deltas) == {name}
    summed = step1.deltas[name] + step2.deltas[name]
    # the two float32 updates summed here against accumulated in the weight and read back
    magnitude = float((step1.deltas[name].abs() + step2.deltas[name].abs()).max())
    tol = tolerance(torch.float32, terms=3, magnitude=magnitude)
    torch.testing.assert_close(both.deltas[name], summed, rtol=0, atol=tol)
    assert len(both.info["requests"]) == 2
    assert _rank(both.deltas[name]) == 2
    lp_after = [_logprob(lm, first), _logprob(lm, second)]
    assert lp_after[0] > lp_before[0] + MIN_GAIN, (lp_before, lp_after)
    assert lp_after[1] > lp_before[1] + MIN_GAIN, (lp_before, lp_after)
    both.revert(lm)
    _assert_unchanged(lm, before)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", METHODS)
def test_sequential_edits_both_hold(family: str, method: str, stats: StatsConfig) -> None:
    lm = tiny_loaded(family)
    before = _snapshot(lm)
    first, second = REQ, OTHERS[0]
    lp_before = [_logprob(lm, first), _logprob(lm, second)]
    editor = make_editor(method, FAST, stats)

    r1 = editor.edit(lm, first)
    r2 = editor.edit(lm, second)

    lp_after = [_logprob(lm, first), _logprob(lm, second)]
    assert lp_after[0] > lp_before[0] + MIN_GAIN, (lp_before, lp_after)
    assert lp_after[1] > lp_before[1] + MIN_GAIN, (lp_before, lp_after)
    r2.revert(lm)
    r1.revert(lm)
    _assert_unchanged(lm, before)


# --------------------------------------------------------------------------- bad input


def test_prompt_without_slot_is_rejected() -> None:
    with pytest.raises(InvalidRequestError, match=r"\{\}"):
        EditRequest("The Eiffel Tower is in Paris", "Paris", "Italy")
    with pytest.raises(InvalidRequestError):
        EditRequest("{} and {}", "Paris", "Italy")


@pytest.mark.parametrize("target", ["", "   "])
def test_empty_target_is_rejected(target: str) -> None:
    with pytest.raises(InvalidRequestError, match="target"):
        EditRequest("The Eiffel Tower is in {}", "Paris", target)


def test_subject_not_in_prompt_is_rejected() -> None:
    record = {"prompt": "Slovenia is located in", "subject": "Croatia", "target_new": "Asia"}
    with pytest.raises(InvalidRequestError, match="Croatia"):
        EditRequest.from_dict(record, where="record 0")


@pytest.mark.parametrize("method", METHODS)
def test_subject_position_missing_from_tokens_fails_before_editing(
    method: str, stats: StatsConfig
) -> None:
    """``first_after`` reads the token after the subject; a prompt ending in it has none."""
    lm = tiny_loaded("llama")
    before = _snapshot(lm)
    editor = make_editor(method, {**FAST, "position": "first_after"}, stats)
    with pytest.raises(InvalidRequestError, match="eiffel"):
        editor.edit(lm, REQ)
    _assert_unchanged(lm, before)


def test_no_requests_is_rejected(stats: StatsConfig) -> None:
    lm = tiny_loaded("llama")
    with pytest.raises(InvalidRequestError):
        make_editor("rome", FAST, stats).edit(lm, [])


def test_unknown_method() -> None:
    with pytest.raises(InvalidRequestError, match="rome"):
        make_editor("grace")
    # spelling variants resolve to the registered names
    assert make_editor("R_ROME").name == "r-rome"
    assert make_editor("rrome").name == "r-rome"
    assert set(EDITORS) == set(METHODS)


@pytest.mark.parametrize(
    ("method", "overrides"),
    [("rome", {"layer": 99}), ("r-rome", {"layer": -1}), ("memit", {"layers": (1, 99)})],
)
def test_layer_out_of_range(method: str, overrides: dict, stats: StatsConfig) -> None:
    lm = tiny_loaded("llama")
    before = _snapshot(lm)
    editor = make_editor(method, {**FAST, **overrides}, stats)
    with pytest.raises((InvalidRequestError, EditError), match=r"99|-1"):
        editor.edit(lm, REQ)
    _assert_unchanged(lm, before)


@pytest.mark.parametrize("method", METHODS)
def test_unknown_hparam_field(method: str) -> None:
    editor = make_editor(method)
    with pytest.raises(InvalidRequestError, match="nonexistent"):
        editor.hparams.replace(nonexistent=1)
    with pytest.raises(InvalidRequestError, match="nonexistent"):
        make_editor(method, {"nonexistent": 1})
    with pytest.raises(InvalidRequestError, match="nonexistent"):
        make_editor(method, {"value.nonexistent": 1})


@pytest.mark.parametrize("method", METHODS)
def test_nan_logits_raise_edit_error_and_leave_model_unchanged(
    method: str, stats: StatsConfig
) -> None:
    lm = tiny_loaded("llama")
    editor = make_editor(method, FAST, stats)
    editor.contexts(lm, editor.resolved(lm))  # generated before the head is broken
    before = _snapshot(lm)
    handle = lm.arch.lm_head().register_forward_hook(lambda m, i, out: out * float("nan"))
    try:
        with pytest.raises(EditError, match="NaN"):
            editor.edit(lm, REQ)
    finally:
        handle.remove()
    _assert_unchanged(lm, before)


@pytest.mark.parametrize("lr", [float("inf"), float("nan")])
@pytest.mark.parametrize("method", ["rome", "memit"])
def test_non_finite_value_lr_raises_edit_error(method: str, lr: float, stats: StatsConfig) -> None:
    lm = tiny_loaded("llama")
    before = _snapshot(lm)
    with pytest.raises((EditError, InvalidRequestError)):  # rejected as early as construction
        make_editor(method, {**FAST, "value.lr": lr}, stats).edit(lm, REQ)
    _assert_unchanged(lm, before)


def test_rome_failure_on_a_later_request_undoes_the_earlier_ones(
    stats: StatsConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ROME applies request 1 before computing request 2; a failure there must undo it."""
    lm = tiny_loaded("llama")
    before = _snapshot(lm)
    real = rome_module.optimise_values
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise EditError("value optimisation diverged (injected)")
        return real(*args, **kwargs)

    monkeypatch.setattr(rome_module, "optimise_values", flaky)
    with pytest.raises(EditError, match="injected"):
        make_editor("rome", FAST, stats).edit(lm, [REQ, OTHERS[0]])
    assert len(calls) == 2
    _assert_unchanged(lm, before)


def test_memit_failure_in_a_later_layer_undoes_the_earlier_ones(
    stats: StatsConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    lm = tiny_loaded("llama")
    before = _snapshot(lm)
    real = memit_module.least_squares_update
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise EditError("ill-conditioned (injected)")
        return real(*args, **kwargs)

    monkeypatch.setattr(memit_module, "least_squares_update", flaky)
    with pytest.raises(EditError, match="injected"):
        make_editor("memit", {**FAST, "layers": (1, 2)}, stats).edit(lm, REQ)
    assert len(calls) == 2
    _assert_unchanged(lm, before)

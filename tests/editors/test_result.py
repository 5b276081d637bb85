"""``EditResult``: apply/revert bookkeeping, merging, save/load with the fingerprint guard, and
export as a Hugging Face model directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from numerics import forward_tolerance
from repedit.data.case import EditRequest
from repedit.editors import EditResult, StatsConfig, make_editor, merge_results
from repedit.errors import EditError, FingerprintMismatchError, RepeditError
from repedit.io import write_safetensors
from repedit.models import LoadedModel
from repedit.models.tiny import tiny_loaded

FAST = {"contexts": ((3, 2),), "value": {"steps": 8}}
REQ = EditRequest("The Eiffel Tower is in {}", "Paris", "Italy", case_id="eiffel")
TEXTS = ["The Eiffel Tower is in Paris", "Toyota was founded in Japan. The capital of France is"]


def _snapshot(lm: LoadedModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def _assert_unchanged(lm: LoadedModel, before: dict[str, torch.Tensor]) -> None:
    after = lm.model.state_dict()
    changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
    assert not changed, f"weights changed: {changed}"


def _logits(model: torch.nn.Module, tokenizer) -> torch.Tensor:
    enc = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model(**enc, use_cache=False).logits
    return out[enc["attention_mask"].bool()]


def _reload_tol(lm: LoadedModel, logits: torch.Tensor) -> float:
    """The same weights run by a freshly loaded model (its own attention kernel and layout)."""
    magnitude = float(logits.abs().max())
    return forward_tolerance(lm.arch, blocks=lm.arch.n_layers, magnitude=magnitude)


def _synthetic(lm: LoadedModel, layer: int = 2, scale: float = 0.05) -> EditResult:
    param = lm.arch.weight(layer)
    delta = scale * torch.randn(param.shape, generator=torch.Generator().manual_seed(layer))
    name = f"{lm.arch.down_proj_name(layer)}.weight"
    return EditResult("test", lm.fingerprint, {name: delta})


# --------------------------------------------------------------------------- apply / revert


def test_apply_adds_the_delta_and_revert_restores_bits() -> None:
    lm = tiny_loaded("llama")
    before = _snapshot(lm)
    result = _synthetic(lm)
    (name,) = result.deltas

    assert result.apply(lm) is result and result.applied
    state = lm.model.state_dict()
    assert torch.equal(state[name], before[name] + result.deltas[name])
    assert all(torch.equal(before[k], state[k]) for k in before if k != name)
    assert result.layers == [2]

    assert result.revert(lm) is result and not result.applied
    _assert_unchanged(lm, before)


def test_apply_twice_and_revert_unapplied_are_errors() -> None:
    lm = tiny_loaded("llama")
    result = _synthetic(lm)
    with pytest.raises(EditError, match="not applied"):
        result.revert(lm)
    result.apply(lm)
    with pytest.raises(EditError, match="already applied"):
        result.apply(lm)
    result.revert(lm)


def test_apply_to_another_model_is_refused() -> None:
    lm, other = tiny_loaded("llama"), tiny_loaded("llama", seed=1)
    before = _snapshot(other)
    result = _synthetic(lm)
    with pytest.raises(FingerprintMismatchError, match=lm.fingerprint):
        result.apply(other)
    assert not result.applied
    _assert_unchanged(other, before)


def test_delta_of_the_wrong_shape_is_refused_without_changes() -> None:
    lm = tiny_loaded("llama")
    before = _snapshot(lm)
    good = _synthetic(lm, layer=1)
    bad_name = f"{lm.arch.down_proj_name(2)}.weight"
    deltas = {**good.deltas, bad_name: torch.zeros(3, 3)}
    result = EditResult("test", lm.fingerprint, deltas)
    with pytest.raises(FingerprintMismatchError, match="shape"):
        result.apply(lm)
    assert not result.applied
    _assert_unchanged(lm, before)  # the good delta was not applied either


def test_revert_is_exact_in_bfloat16() -> None:
    """Adding then subtracting a delta would not round-trip in low precision; revert must."""
    lm = tiny_loaded("llama")
    lm.model.to(torch.bfloat16)
    before = _snapshot(lm)
    result = _synthetic(lm, scale=1e-3)
    result.apply(lm)
    (name,) = result.deltas
    assert not torch.equal(lm.model.state_dict()[name], before[name])
    result.revert(lm)
    _assert_unchanged(lm, before)


def test_merge_results_sums_deltas() -> None:
    lm = tiny_loaded("llama")
    a, b, c = _synthetic(lm, 1), _synthetic(lm, 2), _synthetic(lm, 2, scale=0.01)
    a.requests, b.requests, c.requests = [{"x": 1}], [{"x": 2}], [{"x": 3}]
    merged = merge_results([a, b, c])
    name1, name2 = next(iter(a.deltas)), next(iter(b.deltas))
    assert set(merged.deltas) == {name1, name2}
    assert torch.equal(merged.deltas[name1], a.deltas[name1])
    assert torch.equal(merged.deltas[name2], b.deltas[name2] + c.deltas[name2])
    assert merged.requests == [{"x": 1}, {"x": 2}, {"x": 3}]
    assert merged.info["merged"] == 3
    # merging copies: the inputs are unchanged
    assert not torch.equal(b.deltas[name2], merged.deltas[name2])
    with pytest.raises(EditError):
        merge_results([])


# --------------------------------------------------------------------------- save / load


@pytest.mark.parametrize(("family", "method"), [("llama", "rome"), ("gpt2", "memit")])
def test_save_load_apply_reproduces_the_edit(
    family: str, method: str, stats: StatsConfig, tmp_path: Path
) -> None:
    lm = tiny_loaded(family)
    before = _snapshot(lm)
    editor = make_editor(method, FAST, stats)
    result = editor.edit(lm, REQ)
    edited = _logits(lm.model, lm.tokenizer)
    path = result.save(tmp_path / "edit.safetensors")
    result.revert(lm)
    _assert_unchanged(lm, before)

    loaded = EditResult.load(path, lm)

    assert loaded.method == result.method and loaded.fingerprint == lm.fingerprint
    assert loaded.requests == result.requests == [REQ.to_dict()]
    assert loaded.hparams == json.loads(json.dumps(result.hparams))  # tuples become lists
    # the saved hyper-parameters rebuild the editor that made the edit
    saved = {k: v for k, v in loaded.hparams.items() if k != "method"}
    assert make_editor(loaded.hparams["method"], saved).hparams == editor.resolved(lm)
    assert loaded.info["seconds"] == result.info["seconds"]
    assert set(loaded.deltas) == set(result.deltas)
    for name, delta in result.deltas.items():
        assert torch.equal(loaded.deltas[name], delta)
    assert set(loaded.tensors) == set(result.tensors)
    for name, tensor in result.tensors.items():
        assert torch.equal(loaded.tensors[name], tensor.float())
    assert not loaded.applied

    loaded.apply(lm)
    assert torch.equal(_logits(lm.model, lm.tokenizer), edited)
    loaded.revert(lm)
    _assert_unchanged(lm, before)


@pytest.mark.parametrize(("family", "seed"), [("llama", 1), ("mistral", 0), ("gpt2", 0)])
def test_load_for_another_model_is_refused(family: str, seed: int, tmp_path: Path) -> None:
    lm = tiny_loaded("llama")
    other = tiny_loaded(family, seed=seed)
    assert other.fingerprint != lm.fingerprint
    path = _synthetic(lm).save(tmp_path / "edit.safetensors")
    with pytest.raises(FingerprintMismatchError, match=lm.fingerprint):
        EditResult.load(path, other)
    # without a model it loads, and then refuses to apply
    loaded = EditResult.load(path)
    with pytest.raises(FingerprintMismatchError):
        loaded.apply(other)


def test_load_garbage_is_a_repedit_error(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 this is not a safetensors file" * 10)
    with pytest.raises(RepeditError, match="garbage"):
        EditResult.load(garbage)
    with pytest.raises(RepeditError, match="not found"):
        EditResult.load(tmp_path / "missing.safetensors")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(RepeditError):
        EditResult.load(empty)


def test_load_truncated_file_is_a_repedit_error(tmp_path: Path) -> None:
    lm = tiny_loaded("llama")
    path = _synthetic(lm).save(tmp_path / "edit.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(RepeditError):
        EditResult.load(path, lm)


def test_load_safetensors_without_repedit_metadata(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    write_safetensors(path, {"w": torch.zeros(2, 2)}, {"note": "not an edit"})
    with pytest.raises(RepeditError, match="metadata"):
        EditResult.load(path)


# --------------------------------------------------------------------------- export


@pytest.mark.numerics
@pytest.mark.parametrize(("family", "method"), [("llama", "rome"), ("gpt2", "rome")])
def test_export_unapplied_edit(
    family: str, method: str, stats: StatsConfig, tmp_path: Path
) -> None:
    lm = tiny_loaded(family)
    before = _snapshot(lm)
    result = make_editor(method, FAST, stats).edit(lm, REQ, apply=False)
    result.apply(lm)
    edited = _logits(lm.model, lm.tokenizer)
    result.revert(lm)

    out = result.export(lm, tmp_path / "edited")

    assert out == tmp_path / "edited"
    assert not result.applied
    _assert_unchanged(lm, before)  # the in-memory model is back to the base weights
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    probe = "The Eiffel Tower"
    assert tokenizer(probe)["input_ids"] == lm.tokenizer(probe)["input_ids"]
    tol = _reload_tol(lm, edited)
    torch.testing.assert_close(_logits(model, tokenizer), edited, rtol=0, atol=tol)
    name = next(iter(result.deltas))
    torch.testing.assert_close(
        model.state_dict()[name], before[name] + result.deltas[name], rtol=0, atol=0
    )
    # the exported model is a different base model
    assert LoadedModel(model, tokenizer).fingerprint != lm.fingerprint


@pytest.mark.numerics
def test_export_applied_edit_stays_applied(stats: StatsConfig, tmp_path: Path) -> None:
    lm = tiny_loaded("llama")
    before = _snapshot(lm)
    result = make_editor("memit", FAST, stats).edit(lm, REQ)
    edited = _logits(lm.model, lm.tokenizer)

    result.export(lm, tmp_path / "edited")

    assert result.applied
    torch.testing.assert_close(_logits(lm.model, lm.tokenizer), edited, rtol=0, atol=0)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "edited", dtype=torch.float32)
    tol = _reload_tol(lm, edited)
    torch.testing.assert_close(_logits(model.eval(), lm.tokenizer), edited, rtol=0, atol=tol)
    result.revert(lm)
    _assert_unchanged(lm, before)


def test_export_refuses_another_model(tmp_path: Path) -> None:
    lm, other = tiny_loaded("llama"), tiny_loaded("llama", seed=1)
    before = _snapshot(other)
    with pytest.raises(FingerprintMismatchError):
        _synthetic(lm).export(other, tmp_path / "edited")
    _assert_unchanged(other, before)
    assert not (tmp_path / "edited").exists()

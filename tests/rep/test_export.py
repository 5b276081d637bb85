"""Exporting an edit with REP adapters: the directory loads with transformers and the copied
standalone loader alone, and gives the logits repedit gives (edit applied, adapters attached)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from numerics import assert_within, forward_tolerance, max_error
from repedit.data.case import EditRequest
from repedit.editors import make_editor
from repedit.evaluation.scoring import greedy_completion
from repedit.models.hooks import Hooks
from repedit.models.loading import LoadedModel, load_model
from repedit.models.tiny import tiny_loaded
from repedit.rep import RepAdapter, RepConfig, RepStack, export_with_rep, load_adapters, rep_applied
from repedit.rep.ablations import set_tau

TEXTS = ["The Eiffel Tower is in Paris and Rome", "Toyota was founded in Japan, Microsoft in"]


def _half_open(d: int, seed: int, **cfg: object) -> RepAdapter:
    """An adapter with a moved projection and a gate open on some tokens, shut on others."""
    torch.manual_seed(seed)
    adapter = RepAdapter(d, RepConfig(tau=0.5, **cfg))  # type: ignore[arg-type]
    with torch.no_grad():
        adapter.B.weight.normal_(0, 0.5)
        adapter.gate_out.weight.mul_(40.0)
        adapter.gate_out.bias.zero_()
    return adapter.eval()


def _logits(model: torch.nn.Module, tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def _forward_tol(lm: LoadedModel, logits: torch.Tensor) -> float:
    """Two runs of the same weights and adapters (in memory, exported and reloaded)."""
    magnitude = float(logits.abs().max())
    return forward_tolerance(
        lm.arch, blocks=lm.arch.n_layers, magnitude=magnitude, seq_len=logits.shape[-2]
    )


def _import_loader(directory: Path):
    spec = importlib.util.spec_from_file_location("load_with_rep", directory / "load_with_rep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.numerics
@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text"])
def test_export_loads_without_repedit_with_the_same_logits(family: str, tmp_path: Path) -> None:
    lm = tiny_loaded(family)
    d = lm.arch.d_mlp
    result = make_editor("rome", {"contexts": ((3, 2),), "value": {"steps": 4}}).edit(
        lm, [EditRequest("The Eiffel Tower is in {}", "Paris", "Italy")], apply=False
    )
    adapters = {
        1: _half_open(d, 0),
        2: RepStack([_half_open(d, 1), _half_open(d, 2, gate_input_norm=False)]).eval(),
    }
    set_tau(adapters, 0.55)  # a τ set after training is the one exported
    # the β̃ guard keeps half of TEXTS[0]'s tokens at layer 1, and the edit prompt's own key
    # (keep_prompt_key) one more, where the gate is open
    ids = lm.tokenizer(TEXTS[0], return_tensors="pt")["input_ids"]
    result.apply(lm)
    with torch.no_grad(), Hooks() as h:
        h.capture("k", lm.arch.down_proj(1))
        h.run(lm.model, input_ids=ids)
    result.revert(lm)
    k = h["k"][0].float()
    torch.manual_seed(3)
    adapters[1].set_guard(torch.randn(2, d) / d**0.5)
    guard = float((k @ adapters[1].guard_w.T).amax(-1).median())
    adapters[1].beta_guard = guard
    with torch.no_grad():
        opened = adapters[1].open_mask(k, adapters[1].gate(k))
    assert 0 < int(opened.sum()) < len(k)
    adapters[1].set_prompt_keys(k[int(opened.float().argmax())])
    out = export_with_rep(lm, result, adapters, tmp_path / "export")
    assert not result.applied  # the export applied the edit only while writing
    result.apply(lm)
    try:
        plain = {t: _logits(lm.model, lm.tokenizer, t) for t in TEXTS}
        with rep_applied(lm, adapters, count=True) as inj:
            want = {t: _logits(lm.model, lm.tokenizer, t) for t in TEXTS}
        rates = inj.gate_rates()
        assert all(0 < r["open"] < r["tokens"] for r in rates.values())  # gates do both
        adapters[1].beta_guard = None
        with rep_applied(lm, adapters):
            unguarded = {t: _logits(lm.model, lm.tokenizer, t) for t in TEXTS}
        adapters[1].beta_guard = guard
        tol = {t: _forward_tol(lm, want[t]) for t in TEXTS}
        assert any(max_error(unguarded[t], want[t]) > tol[t] for t in TEXTS)
        adapters[1].cfg = adapters[1].cfg.replace(keep_prompt_key=False)
        with rep_applied(lm, adapters):
            unkept = _logits(lm.model, lm.tokenizer, TEXTS[0])
        adapters[1].cfg = adapters[1].cfg.replace(keep_prompt_key=True)
        assert max_error(unkept, want[TEXTS[0]]) > tol[TEXTS[0]]  # the prompt key matters
        with rep_applied(lm, adapters):  # prompt_only: the adapters act on the prefill only
            want_text = greedy_completion(lm, TEXTS, 6)
    finally:
        result.revert(lm)

    loader = _import_loader(out)
    model, tokenizer = loader.load(out)
    for t in TEXTS:
        got = _logits(model, tokenizer, t)
        assert_within(got, want[t], tol[t], f"exported model with adapters on {t!r}")
        assert max_error(got, plain[t]) > tol[t]
    # the standalone hooks skip generation steps (a forward that continues a KV cache) too
    exported_lm = LoadedModel(model, tokenizer)
    assert greedy_completion(exported_lm, TEXTS, 6) == want_text
    for handle in model.rep_handles:
        handle.remove()
    for t in TEXTS:  # without the adapters: the edited weights alone
        assert_within(_logits(model, tokenizer, t), plain[t], tol[t], f"edited weights on {t!r}")

    # repedit itself loads the export and its adapters (the file carries the edited model's
    # fingerprint), and refuses them on the unedited model
    exported = load_model(str(out), device="cpu")
    loaded = load_adapters(out / "rep_adapters.safetensors", exported)
    assert sorted(loaded) == [1, 2]
    assert loaded[1].beta_guard == guard and loaded[1].guard_w.shape == (2, d)
    assert torch.equal(loaded[1].prompt_k, adapters[1].prompt_k)
    assert loaded[1].tau == 0.55 and [a.tau for a in loaded[2].adapters] == [0.55, 0.55]
    with pytest.raises(Exception, match="fingerprint"):
        load_adapters(out / "rep_adapters.safetensors", lm)

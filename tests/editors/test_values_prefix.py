"""The cached-prefix value optimisation equals the full-row one, on every tiny family.

``optimise_values`` aligns rows at the subject token and caches the columns before it
(``PrefixRunner``); nothing there depends on the delta, so every step's loss, the final delta
and a whole ROME edit must match the plain path up to float32 rounding. The requests mix
prefix lengths (contexts of different lengths, a subject at position 0 with no context) and
multi-token targets, which is where left-padding, position ids and the cache restore can go
wrong.
"""

from __future__ import annotations

import logging
import random

import pytest
import torch

import repedit.editors.values as values_module
from repedit.data.case import EditRequest
from repedit.editors import StatsConfig, ValueHparams, make_editor
from repedit.editors.values import _build, injection_module, optimise_values
from repedit.models.runner import PrefixRunner, UpperRunner
from repedit.models.tiny import TINY_FAMILIES, tiny_loaded, tiny_tokenizer

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


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize(("site", "layer"), SITES)
def test_prefix_path_equals_full_path(family: str, site: str, layer: int) -> None:
    lm = tiny_loaded(family)
    full = _run(lm, "full", site, layer)
    prefix = _run(lm, "prefix", site, layer)

    assert prefix.steps == full.steps == [HP.steps] * len(REQUESTS)
    assert len(prefix.losses) == len(REQUESTS)
    for got, want in zip(prefix.losses, full.losses, strict=True):
        assert len(got) == len(want) == HP.steps
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(prefix.init, full.init, rtol=1e-4, atol=1e-5)
    scale = float(full.delta.abs().max())
    assert scale > 0
    torch.testing.assert_close(prefix.delta, full.delta, rtol=1e-4, atol=1e-4 * scale)
    torch.testing.assert_close(
        torch.tensor(prefix.prob), torch.tensor(full.prob), rtol=1e-4, atol=1e-7
    )


def test_auto_uses_the_prefix_path(caplog: pytest.LogCaptureFixture) -> None:
    lm = tiny_loaded("llama")
    with caplog.at_level(logging.DEBUG, logger="repedit.editors.values"):
        auto = _run(lm, "auto", "mlp", 1)
    assert "cached prefix" in caplog.text
    torch.testing.assert_close(auto.delta, _run(lm, "prefix", "mlp", 1).delta, rtol=0, atol=0)


def test_module_switch_selects_the_path(monkeypatch: pytest.MonkeyPatch) -> None:
    lm = tiny_loaded("gpt2")
    calls: list[str] = []
    real = values_module._prefix_plan

    def spy(*args, **kwargs):
        calls.append("prefix")
        return real(*args, **kwargs)

    monkeypatch.setattr(values_module, "_prefix_plan", spy)
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

    monkeypatch.setattr(values_module, "PrefixRunner", broken)
    with caplog.at_level(logging.DEBUG, logger="repedit.editors.values"):
        got = _run(lm, "auto", "mlp", 1)
    assert "full rows" in caplog.text and "no cache for this family" in caplog.text
    torch.testing.assert_close(got.delta, want.delta, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="no cache for this family"):
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
    with pytest.raises(ValueError, match="no prefix"):
        optimise_values(lm, req, ("{}",), path="prefix", **args)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_prefix_runner_replays_like_the_full_forward(family: str) -> None:
    """Unmodified replays give the full rows' final hidden states, run after run."""
    lm = tiny_loaded(family)
    b = _build(lm, REQUESTS, CONTEXTS, HP.kl_prompts, "last")
    module = injection_module(lm, 1, "mlp")
    with torch.no_grad():
        plan = values_module._prefix_plan(lm, b, module, 1)
        full = UpperRunner(lm, 1, b.ids, b.mask)
        runner = plan.runner
        assert isinstance(runner, PrefixRunner)
        first = runner.run()
        second = runner.run()
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, runner.final_hidden, rtol=1e-5, atol=1e-5)
    rows = torch.arange(b.ids.shape[0])
    # the subject column and every scored column hold the same states as the unpadded rows
    torch.testing.assert_close(
        first[rows, plan.inject_pos], full.final_hidden[rows, b.subject_pos], rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close(
        first[b.target_rows, plan.target_pos],
        full.final_hidden[b.target_rows, b.target_pos],
        rtol=1e-4,
        atol=1e-5,
    )
    # a replay that changed the cached prefix in place is refused, not silently wrong
    runner.reset()
    runner.cache.layers[-1].keys.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        runner.run()


# --------------------------------------------------------------------------- ROME


@pytest.fixture(scope="module")
def stats(tmp_path_factory: pytest.TempPathFactory) -> StatsConfig:
    """``C`` from a small random text over the tiny vocabulary (as in test_editors_tiny)."""
    root = tmp_path_factory.mktemp("prefix-stats")
    rng = random.Random(0)
    vocab = tiny_tokenizer().get_vocab()
    pieces = sorted(k.replace("Ġ", " ") for k in vocab if k.replace("Ġ", "").isalpha())
    lines = ["".join(rng.choice(pieces) for _ in range(40)).strip() + "." for _ in range(150)]
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(lines))
    return StatsConfig(corpus=str(corpus), n_tokens=3000, cache=str(root / "cache"), progress=False)


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
    for name, want in deltas["full"].items():
        got = deltas["prefix"][name]
        scale = float(want.abs().max())
        assert scale > 0
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * scale)

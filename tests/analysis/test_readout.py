"""``repedit analyze readout`` on tiny models: the layer sweep, the hidden-state patch (its donor,
its token positions, its right-to-left pairing), the report and the command end to end."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from numerics import forward_tolerance
from repedit.analysis.ceiling import (
    Item,
    case_items,
    mean_rates,
    patched_probe_scores,
    reference_ids,
)
from repedit.analysis.readout import (
    check_layers,
    donor_states,
    hidden_oracle,
    oracle_names,
    readout_markdown,
    sweep_layers,
)
from repedit.data import load_cases
from repedit.errors import InvalidRequestError
from repedit.evaluation.probes import SuiteConfig, case_keys
from repedit.evaluation.scoring import score_probes
from repedit.models.hooks import Hooks
from repedit.models.tiny import tiny_loaded, tiny_model, tiny_tokenizer
from repedit.models.tokens import prompt_ids
from tiny_text import tiny_corpus_text

CASES = Path(__file__).parents[1] / "golden" / "analysis" / "cases.json"


@pytest.fixture(scope="module")
def lm():
    return tiny_loaded("llama")


@pytest.fixture(scope="module")
def items(lm):
    cases = load_cases(str(CASES), id_split=2).cases
    suite = SuiteConfig(long_context_passages=0)
    return case_items(lm, cases[3], case_keys(cases)[3], suite, None, None)


def _edit(items) -> Item:
    return next(i for i in items if i.probe.test == "efficacy")


def test_sweep_layers_runs_from_below_the_edit_to_the_second_last_layer() -> None:
    assert sweep_layers(30, [5]) == [4, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 28]
    assert sweep_layers(30, [3, 4, 5, 6, 7], step=5) == [2, 3, 8, 13, 18, 23, 28]
    assert sweep_layers(4, [0]) == [0, 2]
    assert check_layers(30, [9, 4, 9]) == [4, 9]
    with pytest.raises(InvalidRequestError, match="layer 30"):
        check_layers(30, [4, 30])
    with pytest.raises(InvalidRequestError, match="step"):
        sweep_layers(30, [5], step=0)


def _logprob(lm, item: Item, ref, install=None) -> float:
    """The probe's target log-prob scored alone by the padded scorer, with ``install``'s patch."""
    if install is None:
        return score_probes(lm, [item.probe], reference=[ref], impl="reference")[0].logprob
    got = patched_probe_scores(lm, [item], [ref], lambda i: i.last, install, 8)
    return got[0].logprob


def test_the_edit_prompts_own_state_reproduces_its_output_and_a_wrong_token_does_not(
    lm, items
) -> None:
    """hidden@l on the edit prompt writes back the state it already has: the output is the
    model's own at every layer. The same state written at the prompt's first token changes it
    by far more than rounding (below the last layer), so a patch at the wrong position is
    caught."""
    edit = _edit(items)
    assert edit.last is not None and edit.last[0] >= 1
    ref = reference_ids(lm, [edit], 8)[0]
    plain = _logprob(lm, edit, ref)
    layers = list(range(lm.n_layers))
    donors = donor_states(lm, edit, layers)
    tol = forward_tolerance(lm.arch, blocks=lm.n_layers, magnitude=abs(plain))
    early = replace(edit, last=(0,))
    for layer in layers:
        _, install = hidden_oracle(lm, layer, donors[layer], all_tokens=False)
        assert _logprob(lm, edit, ref, install) == pytest.approx(plain, abs=tol), layer
        moved = _logprob(lm, early, ref, install)
        if layer < lm.n_layers - 1:
            assert abs(moved - plain) > 10 * tol, layer
        else:  # the last layer's output at a prompt token feeds no other position
            assert moved == pytest.approx(plain, abs=tol)


def _layer_output(lm, ids: list[int], layer: int, install=None, pos=()) -> torch.Tensor:
    """Layer ``layer``'s output for one sequence, after ``install``'s rewrite at ``pos``."""
    with Hooks() as hooks, torch.no_grad():
        if install is not None:
            install(hooks, pos)
        hooks.capture("h", lm.arch.layer(layer), which="output")
        x = torch.tensor([ids])
        hooks.run(lm.model, input_ids=x, attention_mask=torch.ones_like(x), use_cache=False)
        return hooks["h"][0]


def test_donor_is_the_layer_output_at_the_edit_prompts_subject_tokens(lm, items) -> None:
    edit = _edit(items)
    ids = prompt_ids(lm.tokenizer, edit.probe.prompt)
    donors = donor_states(lm, edit, [1, 2])
    for layer in (1, 2):
        want = _layer_output(lm, ids, layer)[list(edit.every)]
        assert torch.equal(donors[layer], want)


def test_hidden_all_pairs_subject_tokens_right_to_left(lm, items) -> None:
    """A three-token probe subject and a two-token donor: the last two probe tokens get the
    donor's two rows in order, the first subject token and everything else stay as they were."""
    probe = next(i for i in items if i.every is not None and len(i.every) >= 3)
    ids = prompt_ids(lm.tokenizer, probe.probe.prompt)
    every = probe.every[-3:]
    donor = torch.randn(2, lm.arch.d_model, generator=torch.Generator().manual_seed(0))
    where, install = hidden_oracle(lm, 1, donor, all_tokens=True)
    assert where(probe) == probe.every
    before = _layer_output(lm, ids, 1)
    after = _layer_output(lm, ids, 1, install, every)
    assert torch.equal(after[every[1]], donor[0]) and torch.equal(after[every[2]], donor[1])
    untouched = [t for t in range(len(ids)) if t not in every[1:]]
    assert torch.equal(after[untouched], before[untouched])
    # one pair only (a one-token donor): no positions, hidden@l's rewrite stands for it
    where_one, _ = hidden_oracle(lm, 1, donor[:1], all_tokens=True)
    assert where_one(probe) is None
    last_only, _ = hidden_oracle(lm, 1, donor, all_tokens=False)
    assert last_only(probe) == probe.last


def test_report_columns_and_table() -> None:
    names = oracle_names([4, 6], all_tokens=True)
    assert names == [
        "plain", "oracle_key", "hidden@4", "hidden@6", "hidden_all@4", "hidden_all@6"
    ]  # fmt: skip
    hit = dict.fromkeys(names, 1.0)
    rows = [("efficacy", hit), ("long_context", {**hit, "hidden@6": 0.0}), ("long_context", hit)]
    doc = {
        "layers": [4, 6],
        "alignment": "right-to-left",
        "tests": mean_rates(rows, names),
    }
    assert doc["tests"]["long_context"]["hidden@6"] == 0.5
    assert doc["tests"]["long_context"]["n"] == 2
    text = readout_markdown(doc)
    assert "| test | n | plain | oracle key | hidden@4 | hidden@6 |" in text
    assert "| long_context | 2 | 100.0 | 100.0 | 100.0 | 50.0 |" in text
    assert "hidden_all@6" in text
    assert "hidden_all" not in readout_markdown(
        {**doc, "tests": mean_rates(rows, oracle_names([4, 6], all_tokens=False))}
    )


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("readout-tiny")
    tiny_model("llama", seed=0).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("readout-corpus") / "corpus.txt"
    path.write_text(tiny_corpus_text())
    return path


def test_cli_analyze_readout_end_to_end(tmp_path, tiny_dir, corpus, tmp_cache, capsys) -> None:
    from repedit.cli import main

    out = tmp_path / "readout"
    argv = [
        "analyze", "readout", "--model", str(tiny_dir), "--threads", "1",
        "--corpus", str(corpus), "--stats-tokens", "2000", "--cache-dir", str(tmp_cache),
        "--data", str(CASES), "--n", "2", "--id-split", "2",
        "--tests", "efficacy,subject_paraphrase,scrambled_subject,long_context,neighbourhood",
        "--long-context-corpus", str(corpus), "--long-context-tokens", "30",
        "--set", "contexts=[[3, 2]]", "--set", "value.steps=6",
        "--out", str(out), "--json",
    ]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    doc = json.loads((out / "readout.json").read_text())
    assert doc == json.loads(capsys.readouterr().out)
    assert doc["layers"] == sweep_layers(4, doc["edited_layers"])
    assert doc["oracles"] == oracle_names(doc["layers"], all_tokens=True)
    tests = doc["tests"]
    assert {"efficacy", "subject_paraphrase", "long_context", "scrambled_subject_id"} <= set(tests)
    assert "neighbourhood" not in tests  # no subject to patch: not scored
    for t in tests.values():
        assert set(t) == {"n", *doc["oracles"]} and t["n"] > 0
        assert all(0.0 <= t[m] <= 1.0 for m in doc["oracles"])
    assert tests["efficacy"]["n"] == 2
    # the edit prompt patched with its own states scores as the plain edit at every layer
    eff = tests["efficacy"]
    assert all(eff[f"hidden@{x}"] == eff["plain"] for x in doc["layers"])
    assert "| efficacy | 2 |" in (out / "readout.md").read_text()
    assert (out / "readout.png").stat().st_size > 0

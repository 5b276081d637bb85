"""Smoke test of benchmarks/mass_edit.py on a tiny model: a few CounterFact-layout facts edited
in two sequential batches produce the JSON (edit seconds, efficacy, the first batch's curve),
the table and the plot, for every batched method and both key modes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench_scripts import benchmark_module

FACTS = (
    ("Danielle Darrieux", "The mother tongue of {} is", "English", "French"),
    ("Toyota", "{} was founded in", "Europe", "Japan"),
    ("Paris", "{} is the capital of", "Berlin", "France"),
    ("Slovenia", "{} is located in the continent of", "Antarctica", "Europe"),
)


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("mass_edit") as module:
        yield module


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Records in the EasyEdit CounterFact layout of the real data file."""
    records = [
        {
            "case_id": i,
            "prompt": prompt.format(subject),
            "subject": subject,
            "target_new": new,
            "ground_truth": true,
            "rephrase_prompt": "In short, " + prompt.format(subject),
            "locality_prompt": "The river runs through the city of",
            "locality_ground_truth": "Paris",
        }
        for i, (subject, prompt, new, true) in enumerate(FACTS)
    ]
    path = tmp_path_factory.mktemp("cf") / "counterfact.json"
    path.write_text(json.dumps(records))
    return path


@pytest.mark.parametrize(
    ("method", "key_mode"),
    [("memit", "each"), ("memit", "mean"), ("emmet", "each"), ("alphaedit", "each")],
)
def test_mass_edit_runs_in_sequence(
    bench, tiny_dir, corpus, data_file, tmp_path, capsys, method, key_mode
):
    threads = torch.get_num_threads()
    out = tmp_path / "out"
    try:
        report = bench.main(
            [
                "--model", str(tiny_dir), "--method", method, "--n", "4", "--batch-size", "2",
                "--dataset", str(data_file), "--corpus", str(corpus), "--stats-tokens", "2000",
                "--cache", str(tmp_path / "cache"), "--sample", "3", "--fluency-tokens", "8",
                "--value-steps", "4", "--key-mode", key_mode, "--out", str(out),
            ]
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert json.loads(printed[: printed.rindex("}") + 1])["benchmark"] == "mass_edit"
    assert "first batch efficacy" in printed
    saved = json.loads((out / "mass_edit.json").read_text())
    assert saved["edit_seconds"] == report["edit_seconds"] > 0
    assert 0 < report["value_seconds"] <= report["edit_seconds"]
    assert report["n"] == 4 and report["sequential"] and len(report["batches"]) == 2
    assert report["hparams"]["key_mode"] == key_mode
    assert 0 <= report["efficacy"] <= 1 and report["sample_size"] == 3
    assert [p["edits"] for p in report["first_batch_curve"]] == [2, 4]
    for scores in (report["before"], report["after"]):
        assert {"efficacy", "paraphrase", "neighbourhood", "fluency"} <= set(scores)
        assert scores["fluency"] > 0
    assert report["peak_rss_mb"] >= report["peak_rss_mb_before_edits"] > 0
    assert isinstance(report["cpu_flags"], list) and report["threads"] >= 1
    assert 0 <= report["after"]["neighbourhood_agree"] <= 1
    assert (out / "mass_edit.png").read_bytes()[:4] == b"\x89PNG"


def test_second_key_mode_reuses_the_values(bench, tiny_dir, corpus, data_file, tmp_path):
    """``--also-key-mode`` solves the one batch again without a second value optimisation."""
    threads = torch.get_num_threads()
    calls: list[int] = []
    optimise = bench.ReusedValues.__call__

    def counting(self, lm, requests, *a, **kw):
        calls.append(len(requests))
        return optimise(self, lm, requests, *a, **kw)

    bench.ReusedValues.__call__ = counting
    try:
        report = bench.main(
            [
                "--model", str(tiny_dir), "--method", "memit", "--n", "3",
                "--dataset", str(data_file), "--corpus", str(corpus), "--stats-tokens", "2000",
                "--cache", str(tmp_path / "cache"), "--sample", "2", "--fluency-tokens", "4",
                "--value-steps", "3", "--key-mode", "each", "--also-key-mode", "mean",
                "--out", str(tmp_path / "out"),
            ]
        )  # fmt: skip
    finally:
        bench.ReusedValues.__call__ = optimise
        torch.set_num_threads(threads)
    other = report["other_key_mode"]
    assert calls == [3, 3] and other["values_reused"] and other["key_mode"] == "mean"
    assert 0 <= other["efficacy"] <= 1 and other["edit_seconds_without_values"] > 0
    assert {"paraphrase", "neighbourhood", "fluency"} <= set(other["after"])
    assert bench.parse_args(["--n", "4", "--batch-size", "4", "--also-key-mode", "mean"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--n", "4", "--batch-size", "2", "--also-key-mode", "mean"])


def test_reused_values_give_the_fresh_edit(bench, corpus, tmp_path, monkeypatch):
    """A MEMIT "mean" edit on values recorded during an "each" edit equals, bit for bit, a
    fresh "mean" edit: the values do not depend on the key mode, so reusing them is exact."""
    import repedit.editors.memit as memit
    from repedit.data.case import EditRequest
    from repedit.editors import StatsConfig, make_editor
    from repedit.models.tiny import tiny_loaded

    lm = tiny_loaded("llama")
    stats = StatsConfig(corpus=str(corpus), n_tokens=2000, cache=str(tmp_path), progress=False)
    fast = {"contexts": ((3, 2),), "value": {"steps": 3}}
    requests = [
        EditRequest("The Eiffel Tower is in {}", "Paris", "Italy", case_id="eiffel"),
        EditRequest("Toyota was founded in {}", "Japan", "Europe", case_id="toyota"),
    ]
    fresh = make_editor("memit", {**fast, "key_mode": "mean"}, stats).edit(
        lm, requests, apply=False
    )
    values = bench.ReusedValues()
    monkeypatch.setattr(memit, "optimise_values", values)
    each = make_editor("memit", {**fast, "key_mode": "each"}, stats).edit(lm, requests, apply=False)
    reused = make_editor("memit", {**fast, "key_mode": "mean"}, stats).edit(
        lm, requests, apply=False
    )
    assert values.reused == 1
    assert any(not torch.equal(each.deltas[k], fresh.deltas[k]) for k in fresh.deltas)
    for name, delta in fresh.deltas.items():
        assert torch.equal(reused.deltas[name], delta), name


def test_set_overrides_reach_the_editor_beside_the_named_options(bench) -> None:
    args = bench.parse_args(
        ["--value-steps", "3", "--set", "value.robust_forms=0",
         "--set", "value.robust_prefix_lengths=", "--set", "key_mode=mean"]
    )  # fmt: skip
    hp = bench.editor_hparams(args)
    assert hp == {"value": {"steps": 3}, "value.robust_forms": 0,
                  "value.robust_prefix_lengths": "", "key_mode": "mean"}  # fmt: skip
    from repedit.editors import MemitHparams, ValueHparams
    from repedit.errors import InvalidRequestError

    assert MemitHparams().replace(**hp).value == ValueHparams(steps=3)
    with pytest.raises(InvalidRequestError, match="key=value"):
        bench.editor_hparams(bench.parse_args(["--set", "robust"]))

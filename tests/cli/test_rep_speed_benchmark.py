"""Smoke test of benchmarks/rep_speed.py on a tiny model (here for the CLI fixtures: a saved
tiny llama and a corpus). The script patches names in ``repedit.rep.train`` and
``repedit.rep.reader`` for its phase split, so a rename there must fail here, not at run time."""

from __future__ import annotations

import json

import pytest
import torch

from bench_scripts import benchmark_module


@pytest.fixture(scope="module")
def bench():
    # as `python benchmarks/rep_speed.py` does, the script's folder is on sys.path (bench_common)
    with benchmark_module("rep_speed") as module:
        yield module


def test_rep_speed_runs_and_splits_the_time(bench, tiny_dir, corpus, tmp_path, capsys):
    import repedit.rep.reader as reader
    import repedit.rep.train as train

    originals = {name: getattr(train, name) for name in ("edit_targets", "step_losses", "measure")}
    read_keys = reader.read_keys
    advance = reader.LayerwiseReader.__dict__["advance"]
    threads = torch.get_num_threads()
    try:
        report = bench.main(
            [
                "--model", str(tiny_dir), "--methods", "rome,memit", "--cases", "1",
                "--corpus", str(corpus), "--data-dir", str(tmp_path / "no-data"),
                "--stats-tokens", "2000", "--cache", str(tmp_path / "cache"),
                "--rep-set", "steps=3",
            ]
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert json.loads(out[: out.rindex("}") + 1])["benchmark"] == "rep_speed"
    assert "REP/edit" in out
    assert report["rep_config"]["steps"] == 3
    for method in ("rome", "memit"):
        res = report["methods"][method]
        assert res["source"] == "builtin"
        (run,) = res["runs"]
        assert run["edit_s"] > 0 and run["rep_s"] > 0
        phases = run["phases"]
        assert set(phases) == {"targets", "pool", "keys", "losses", "report", "other"}
        assert phases["keys"] > 0 and phases["losses"] > 0 and phases["report"] > 0
        assert sum(phases.values()) == pytest.approx(run["rep_s"], abs=0.01)
    assert len(report["methods"]["memit"]["runs"][0]["layers"]) > 1
    # the timers are taken off again
    for name, fn in originals.items():
        assert getattr(train, name) is fn
    assert reader.read_keys is read_keys
    assert reader.LayerwiseReader.__dict__["advance"] is advance

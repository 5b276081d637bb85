"""Smoke test of benchmarks/rep_scale.py on a tiny model: RepStack and MergedStack timed for a
few adapter counts, with the two stacked forwards agreeing."""

from __future__ import annotations

import json

import pytest
import torch

from bench_scripts import benchmark_module


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("rep_scale") as module:
        yield module


def test_rep_scale_runs(bench, tiny_dir, tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        report = bench.main(
            [
                "--model", str(tiny_dir), "--data-dir", str(tmp_path / "no-data"),
                "--cases", "4", "--sizes", "1,3", "--layers", "1,2", "--repeats", "1",
                "--cache", str(tmp_path / "cache"),
            ]
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert json.loads(out[: out.rindex("}") + 1])["benchmark"] == "rep_scale"
    assert report["prompts"] == "builtin" and report["layers"] == [1, 2]
    assert [r["n"] for r in report["runs"]] == [1, 3]
    for run in report["runs"]:
        assert run["merged_wall"] > 0 and run["stack_wall"] > 0
        assert run["max_logit_diff"] >= 0  # equality itself: tests/rep/test_merged.py
    assert "merged" in out

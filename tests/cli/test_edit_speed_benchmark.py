"""Smoke test of benchmarks/edit_speed.py on a tiny model: ``--set`` reaches the editors and is
recorded in the JSON beside the thread count and the CPU flags."""

from __future__ import annotations

import json

import pytest
import torch

from bench_scripts import benchmark_module
from repedit.errors import InvalidRequestError


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("edit_speed") as module:
        yield module


def _run(bench, tiny_dir, corpus, tmp_path, *extra: str):
    threads = torch.get_num_threads()
    try:
        return bench.main(
            [
                "--model", str(tiny_dir), "--corpus", str(corpus), "--stats-tokens", "2000",
                "--cache", str(tmp_path / "cache"), "--batches", "", "--repeats", "1", *extra,
            ]
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)


def test_overrides_reach_the_editor_and_the_report(bench, tiny_dir, corpus, tmp_path, capsys):
    seen: list[int] = []
    real = bench.timed_edit

    def spy(lm, editor, requests, timer):
        seen.append(editor.resolved(lm).value.steps)
        return real(lm, editor, requests, timer)

    bench.timed_edit = spy
    try:
        report = _run(bench, tiny_dir, corpus, tmp_path, "--set", "value.steps=3")
    finally:
        bench.timed_edit = real
    assert seen == [3]
    assert report["overrides"] == {"value.steps": 3}
    assert isinstance(report["cpu_flags"], list) and report["threads"] >= 1
    assert report["rome"]["seconds_per_edit"] > 0
    printed = capsys.readouterr().out
    assert json.loads(printed[: printed.rindex("}") + 1])["overrides"] == {"value.steps": 3}
    assert "value.steps=3" in printed


def test_a_malformed_override_is_refused(bench, tiny_dir, corpus, tmp_path):
    with pytest.raises(InvalidRequestError, match="key=value"):
        _run(bench, tiny_dir, corpus, tmp_path, "--set", "value.steps")

"""Smoke test of benchmarks/value_batching.py on a tiny model: both schedulers run on a few
CounterFact-layout facts, and the report holds their timings, steps and agreement."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from bench_scripts import benchmark_module
from repedit.models.tiny import tiny_model, tiny_tokenizer

FACTS = (
    ("Danielle Darrieux", "The mother tongue of {} is", "English", "French"),
    ("Toyota", "{} was founded in", "Europe", "Japan"),
    ("Paris", "{} is the capital of", "Berlin", "France"),
)


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    path = tmp_path / "tiny-llama"
    tiny_model("llama", seed=0).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    records = [
        {
            "case_id": i,
            "prompt": prompt.format(subject),
            "subject": subject,
            "target_new": new,
            "ground_truth": true,
        }
        for i, (subject, prompt, new, true) in enumerate(FACTS)
    ]
    path = tmp_path / "counterfact.json"
    path.write_text(json.dumps(records))
    return path


def test_value_batching_benchmark_compares_both_schedulers(
    tiny_dir: Path, data_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    threads = torch.get_num_threads()
    out = tmp_path / "out"
    try:
        with benchmark_module("value_batching") as bench:
            report = bench.main(
                [
                    "--model", str(tiny_dir), "--n", "2,3", "--steps", "3",
                    "--dataset", str(data_file), "--cache", str(tmp_path / "cache"),
                    "--out", str(out),
                ]
            )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert json.loads((out / "value_batching.json").read_text()) == report
    assert "stream_vs_fixed" in capsys.readouterr().out
    assert [s["n"] for s in report["sizes"]] == [2, 3]
    for size in report["sizes"]:
        assert set(size["runs"]) == {"fixed", "stream"}
        for run in size["runs"].values():
            assert run["cpu_seconds"] > 0 and len(run["steps"]) == size["n"]
            assert all(0 <= s <= 3 for s in run["steps"])
        agree = size["agreement"]["stream_vs_fixed"]
        # the equivalence itself is tested, with derived bounds, in test_values_batching
        assert agree["same_steps"] and math.isfinite(agree["delta_max_relative_difference"])
    assert isinstance(report["cpu_flags"], list) and report["threads"] == 1

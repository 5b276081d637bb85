"""benchmarks/cuda_smoke.py on the CPU and tiny models only (what can run without a GPU): every
step passes, the table and JSON come out, and a missing CUDA device is a clear refusal."""

from __future__ import annotations

import json

import pytest
import torch

from bench_scripts import benchmark_module


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("cuda_smoke") as module:
        yield module


def test_tiny_models_on_the_cpu(bench, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("REPEDIT_DATA", str(tmp_path / "no-data"))
    rc = bench.main(["--device", "cpu", "--tiny-only", "--families", "llama,gpt2"])
    out = capsys.readouterr().out
    report = json.loads(out[: out.rindex("}") + 1])
    assert rc == 0, report["steps"]
    steps = report["steps"]
    assert [s["step"] for s in steps] == [
        f"tiny-{f} cpu {d}: edit + REP + revert"
        for d in ("float32", "bfloat16")
        for f in ("llama", "gpt2")
    ]
    assert all(s["ok"] and s["reverted_bit_for_bit"] for s in steps)
    assert "4/4 steps passed" in out


def test_a_failed_step_is_reported_and_exits_1(bench, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("planted")

    monkeypatch.setattr("repedit.rep.train_rep_after", broken)
    rc = bench.main(
        ["--device", "cpu", "--tiny-only", "--families", "llama", "--dtypes", "float32"]
    )
    assert rc == 1
    assert "FAILED: RuntimeError: planted" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_no_cuda_is_a_clear_refusal(bench):
    with pytest.raises(SystemExit, match="no CUDA device"):
        bench.main(["--tiny-only"])

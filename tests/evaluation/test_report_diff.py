"""``repedit report --diff`` (two runs' records compared) and ``--markdown`` (the table as
Markdown), on run directories written by hand."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest

from repedit.cli import main
from repedit.evaluation.config import RunConfig, prepare
from repedit.evaluation.diff import diff_runs
from repedit.evaluation.rundir import RunDir, append_jsonl
from repedit.evaluation.summary import summarize


def _record(key: str, exact: bool, logprob: float, seconds: float = 2.0) -> dict:
    probes = [
        {"exact": exact, "beats_alt": True, "token_acc": float(exact), "logprob": logprob},
        {"exact": False, "beats_alt": False, "token_acc": 0.0, "logprob": -9.0},
    ]
    return {
        "case_id": key,
        "error": None,
        "edit_seconds": seconds,
        "eval_seconds": seconds / 2,
        "tests": {
            "efficacy": {"n": 2, "means": {}, "probes": probes},
            "neighbourhood": {
                "n": 1,
                "means": {},
                "probes": [{"agree": 0.5, "exact": False, "token_acc": 0.5, "logprob": -3.0}],
            },
            "fluency": {"n": 1, "means": {"entropy": 4.0}, "scores": [4.0], "texts": ["a b c"]},
        },
    }


RECORDS = [_record("1", True, -0.5), _record("2", False, -2.0), _record("3", True, -0.1)]


def _run(path: Path, records: list[dict], method: str = "rome") -> Path:
    cfg = RunConfig(model="tiny", method=method, data="demo", out=str(path))
    prepare(RunDir(path), cfg, {"model_fingerprint": "abc", "data_sha256": None})
    for rec in records:
        append_jsonl(path / "results.jsonl", rec)
    summarize(path)
    return path


def test_same_records_in_another_order_with_other_timings_match(tmp_path: Path) -> None:
    a = _run(tmp_path / "a", RECORDS)
    shuffled = [copy.deepcopy(r) for r in reversed(RECORDS)]
    for r in shuffled:
        r["edit_seconds"] *= 3
    b = _run(tmp_path / "b", shuffled)
    assert diff_runs(a, b) == []
    assert main(["report", "--diff", str(a), str(b)]) == 0


def test_a_flipped_flag_a_moved_probability_and_a_missing_case_are_listed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = _run(tmp_path / "a", RECORDS)
    changed = copy.deepcopy(RECORDS[:2])
    changed[0]["tests"]["efficacy"]["probes"][0]["exact"] = False
    changed[1]["tests"]["efficacy"]["probes"][0]["logprob"] = -2.0 + 1e-3  # 1e-3 relative
    changed[1]["tests"]["fluency"]["texts"] = ["a b d"]
    b = _run(tmp_path / "b", changed)
    found = diff_runs(a, b)
    assert any(d.startswith("case 1: efficacy[0].exact") for d in found)
    assert any(d.startswith("case 2: efficacy[0].probability") for d in found)
    assert "case 2: fluency texts differ" in found
    assert f"case 3: only in {a}" in found
    capsys.readouterr()
    assert main(["report", "--diff", str(a), str(b)]) == 1
    printed = capsys.readouterr().out
    assert "differ" in printed and "efficacy[0].exact: True vs False" in printed


def test_ignore_texts_skips_only_the_fluency_texts(tmp_path: Path) -> None:
    a = _run(tmp_path / "a", RECORDS)
    texts = copy.deepcopy(RECORDS)
    texts[0]["tests"]["fluency"]["texts"] = ["x y z"]
    b = _run(tmp_path / "b", texts)
    assert diff_runs(a, b) == ["case 1: fluency texts differ"]
    assert diff_runs(a, b, texts=False) == []
    assert main(["report", "--diff", str(a), str(b), "--ignore-texts"]) == 0
    texts[1]["tests"]["efficacy"]["probes"][0]["exact"] = True
    c = _run(tmp_path / "c", texts)
    assert diff_runs(a, c, texts=False) == ["case 2: efficacy[0].exact: False vs True"]


def test_probabilities_within_the_relative_tolerance_match(tmp_path: Path) -> None:
    a = _run(tmp_path / "a", RECORDS)
    near = copy.deepcopy(RECORDS)
    # 5e-5 relative in the probability: inside 1e-4
    near[0]["tests"]["efficacy"]["probes"][0]["logprob"] = -0.5 + math.log1p(5e-5)
    assert diff_runs(a, _run(tmp_path / "b", near)) == []


def test_diff_needs_two_run_directories(tmp_path: Path, capsys) -> None:
    a = _run(tmp_path / "a", RECORDS)
    assert main(["report", "--diff", str(a), str(tmp_path / "nothing")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_markdown_table_of_two_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # where a report of several runs would go
    a = _run(tmp_path / "rome", RECORDS)
    b = _run(tmp_path / "memit", RECORDS[:2], method="memit")
    assert main(["report", str(a), str(b), "--markdown"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| test (%; fluency in bits) | rome | memit |"
    assert lines[1] == "|---|---:|---:|"
    efficacy = next(line for line in lines if line.startswith("| efficacy |"))
    # case-level micro-averages: 2 of 6 probes, then 1 of 4
    assert "33.3" in efficacy and "25.0" in efficacy
    assert not (tmp_path / "report.html").exists()

"""``repedit eval --workers N``: real worker processes on a tiny model, one coordinator that
writes. Each run is compared with a one-process run by ``repedit report --diff``."""

from __future__ import annotations

from pathlib import Path

import pytest
from worker_runs import Inputs, case_ids, records, same_results

from repedit.evaluation.shard import CRASH_ENV

#: the cases of harness_cases.CASES, by id
ALL = ["1", "2", "3", "4"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    return Inputs(tmp_path_factory.mktemp("workers"))


@pytest.fixture(scope="module")
def single(inputs: Inputs) -> Path:
    """The one-process single-mode run every sharded run is compared with."""
    out = inputs.root / "single"
    assert inputs.eval(out) == 0
    return out


def test_two_workers_give_the_records_of_one_process(inputs: Inputs, single: Path) -> None:
    out = inputs.root / "w2"
    assert inputs.eval(out, "--workers", "2") == 0
    assert case_ids(out) == ALL  # each case written once
    assert case_ids(out, "reference.jsonl") == case_ids(single, "reference.jsonl")
    assert same_results(single, out)


def test_batch_mode_shards_by_batch(inputs: Inputs) -> None:
    one, two = inputs.root / "b1", inputs.root / "b2"
    assert inputs.eval(one, "--mode", "batch", "--batch-size", "2") == 0
    assert inputs.eval(two, "--mode", "batch", "--batch-size", "2", "--workers", "2") == 0
    assert case_ids(two) == ALL
    assert sorted((r["case_id"], r["chunk"]) for r in records(two)) == sorted(
        (r["case_id"], r["chunk"]) for r in records(one)
    )
    assert same_results(one, two)


def test_resumed_run_sends_only_missing_cases(inputs: Inputs, single: Path) -> None:
    out = inputs.root / "resumed"
    assert inputs.eval(out, "--workers", "2", "--n", "2") == 0
    first = records(out)
    assert case_ids(out) == ALL[:2]
    assert inputs.eval(out, "--workers", "2") == 0
    assert case_ids(out) == ALL
    assert records(out)[:2] == first  # the first session's lines are untouched
    assert same_results(single, out)


def test_killed_worker_case_is_retried_on_a_fresh_worker(
    inputs: Inputs, single: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marks = inputs.root / "crash-once"
    monkeypatch.setenv(CRASH_ENV, f"3:1:{marks}")
    out = inputs.root / "crash-once-run"
    assert inputs.eval(out, "--workers", "2") == 0
    assert len(list(marks.iterdir())) == 1  # the worker really died once
    assert case_ids(out) == ALL
    assert same_results(single, out)


def test_case_whose_worker_dies_twice_is_recorded_as_an_error(
    inputs: Inputs, single: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marks = inputs.root / "crash-always"
    monkeypatch.setenv(CRASH_ENV, f"3:99:{marks}")
    out = inputs.root / "crash-always-run"
    assert inputs.eval(out, "--workers", "2") == 0
    assert len(list(marks.iterdir())) == 2  # tried once, retried once, never a third time
    got = {str(r["case_id"]): r for r in records(out)}
    assert sorted(got) == ALL and len(records(out)) == 4
    assert got["3"]["error"]["type"] == "WorkerCrashed"
    assert "3" in got["3"]["error"]["message"]
    want = {str(r["case_id"]): r for r in records(single)}
    for key in ("1", "2", "4"):
        assert got[key]["error"] == want[key]["error"]
        assert got[key]["tests"]["efficacy"]["means"] == want[key]["tests"]["efficacy"]["means"]


def test_workers_with_sequential_mode_are_refused(
    inputs: Inputs, capsys: pytest.CaptureFixture[str]
) -> None:
    out = inputs.root / "seq"
    assert inputs.eval(out, "--mode", "sequential", "--workers", "2") == 2
    assert "sequential" in capsys.readouterr().err
    assert not (out / "results.jsonl").exists()

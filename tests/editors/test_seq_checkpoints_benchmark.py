"""benchmarks/seq_checkpoints.py on a hand-made sequential run directory: the measured phase
sums and unit costs, the checkpoint schedules it projects, and the projected shares."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench_scripts import benchmark_module


def _jsonl(path: Path, rows: list[dict[str, object]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """Four edits at 2 s each, scoring 0.5 s each, one failed case, checkpoints after 2 and 4
    edits re-scoring 2 and 4 cases at 0.25 s a case; 20 s of wall time in all."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(
        json.dumps({"run_config": {"method": "memit", "eval_every": 2, "eval_sample": 3}})
    )
    ok = [
        {"case_id": str(i), "edit_seconds": 2.0, "score_seconds": 0.5, "error": None}
        for i in range(3)
    ]  # the fourth has fluency too: its scoring is eval_seconds, probes and fluency
    ok.append({"case_id": "3", "edit_seconds": 2.0, "score_seconds": 0.2, "eval_seconds": 0.5})
    _jsonl(run / "results.jsonl", [*ok, {"case_id": "9", "error": "boom", "edit_seconds": 7.0}])
    _jsonl(run / "reference.jsonl", [{"case_id": str(i), "seconds": 0.25} for i in range(4)])
    _jsonl(
        run / "sequential.jsonl",
        [
            {"n_edits": 2, "n_eval": 2, "cases": ["0", "1"], "seconds": 0.5},
            {"n_edits": 4, "n_eval": 3, "cases": ["0", "1", "2"], "seconds": 0.75},
        ],
    )
    (run / "sessions.json").write_text(json.dumps([{"wall_seconds": 12.0}, {"wall_seconds": 8.0}]))
    return run


def test_measured_phases_and_unit_costs(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with benchmark_module("seq_checkpoints") as bench:
        report = bench.main([str(run_dir), "--cases", "100", "--eval-every", "log,10", "--json"])
    m = report["measured"]
    assert m["cases"] == 4  # the failed case is left out
    assert m["seconds"]["edit"] == pytest.approx(8.0)
    assert m["seconds"]["score"] == pytest.approx(2.0)
    assert m["seconds"]["reference"] == pytest.approx(1.0)
    assert m["seconds"]["checkpoint"] == pytest.approx(1.25)
    assert m["seconds"]["wall"] == pytest.approx(20.0)
    assert m["seconds"]["other"] == pytest.approx(20.0 - 12.25)
    assert m["per_checkpoint_case"] == pytest.approx(1.25 / 5)
    assert m["checkpoint_share_of_phases"] == pytest.approx(1.25 / 12.25)
    assert json.loads(capsys.readouterr().out) == report


def test_projected_schedules_and_shares(run_dir: Path) -> None:
    with benchmark_module("seq_checkpoints") as bench:
        assert bench.schedule(100, "log", 20) == [(10, 10), (20, 20), (40, 20), (80, 20), (100, 20)]
        assert bench.schedule(5, "log", 20) == [(5, 5)]  # too short for 10: only the end
        assert bench.schedule(30, 10, 0) == [(10, 10), (20, 20), (30, 30)]
        report = bench.main([str(run_dir), "--cases", "100", "--eval-every", "log,10"])
    log, every10 = report["projection"]
    # the run's eval_sample is 3: every checkpoint re-scores 3 cases
    assert (log["checkpoints"], log["rescored_cases"]) == (5, 15)
    assert (every10["checkpoints"], every10["rescored_cases"]) == (10, 30)
    work = 100 * (2.0 + 0.5)
    assert log["checkpoint_share"] == pytest.approx(15 * 0.25 / (work + 15 * 0.25))
    assert every10["checkpoint_share"] == pytest.approx(30 * 0.25 / (work + 30 * 0.25))


def test_a_run_without_checkpoints_is_refused(run_dir: Path) -> None:
    (run_dir / "sequential.jsonl").unlink()
    with (
        benchmark_module("seq_checkpoints") as bench,
        pytest.raises(bench.RepeditError, match="no checkpoints"),
    ):
        bench.main([str(run_dir)])


def test_a_bad_schedule_is_refused_as_the_cli_refuses_it(run_dir: Path) -> None:
    """``--eval-every`` is parsed by the library's ``parse_eval_every``, as ``repedit eval``'s."""
    with (
        benchmark_module("seq_checkpoints") as bench,
        pytest.raises(bench.RepeditError, match="eval_every"),
    ):
        bench.main([str(run_dir), "--eval-every", "log,0"])

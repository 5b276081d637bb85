"""The coordinator's side of sharding (tasks, retry rule, writing) with a scripted in-process
backend: which worker dies when is decided by the test, so every path is deterministic."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from repedit.data.case import EditCase, EditRequest
from repedit.errors import InvalidRequestError, RepeditError
from repedit.evaluation.case import CaseItem
from repedit.evaluation.config import ParallelConfig
from repedit.evaluation.modes import Recorder
from repedit.evaluation.rundir import RunDir, new_session, read_jsonl
from repedit.evaluation.shard import Task, plan_tasks, run_sharded


def _items(n: int) -> list[CaseItem]:
    return [
        CaseItem(i, str(i), EditCase(EditRequest("{} is in", f"S{i}", "Asia", "Europe", str(i))))
        for i in range(n)
    ]


class Scripted:
    """Workers whose fate per (case, attempt) is scripted: ``die[key]`` attempts die."""

    def __init__(self, size: int, die: dict[str, int] | None = None, start: str = "ok"):
        self.size = size
        self.die = die or {}
        self.start_mode = start
        self.inbox: list[tuple[int, dict[str, Any]]] = []
        self.starts: Counter[int] = Counter()
        self.runs: Counter[str] = Counter()
        self.closed = False

    def start(self, slot: int) -> None:
        self.starts[slot] += 1
        if self.start_mode == "ok":
            self.inbox.append((slot, {"kind": "ready"}))
        elif self.start_mode == "error":
            self.inbox.append((slot, {"kind": "init_error", "reason": "no model here"}))
        else:
            self.inbox.append((slot, {"kind": "dead", "reason": "killed at start"}))

    def submit(self, slot: int, task: Task) -> None:
        for key in task.todo:
            self.runs[key] += 1
        if any(self.runs[k] <= self.die.get(k, 0) for k in task.todo):
            self.inbox.append((slot, {"kind": "dead", "reason": "exit -9"}))
            return
        recs = [{"case_id": k, "mode": task.mode, "error": None, "chunk": task.chunk}
                for k in task.todo]  # fmt: skip
        refs = [
            {"case_id": k, "sig": "s", "pred": []} for k in task.todo if k not in task.references
        ]
        self.inbox.append((slot, {"kind": "done", "records": recs, "references": refs}))

    def poll(self, timeout: float) -> list[tuple[int, dict[str, Any]]]:
        out, self.inbox = self.inbox, []
        return out

    def close(self) -> None:
        self.closed = True


def _recorder(path: Path) -> Recorder:
    return Recorder(RunDir(path), done=set(), session=new_session(time.time(), 0))


def _results(path: Path) -> list[dict[str, Any]]:
    return read_jsonl(path / "results.jsonl")


def test_every_case_is_written_once_with_its_references(tmp_path: Path) -> None:
    backend, rec = Scripted(2), _recorder(tmp_path)
    references: dict[str, Any] = {"1": {"case_id": "1", "sig": "s", "pred": []}}
    run_sharded(backend, plan_tasks(_items(5), set(), "single", 1), rec, references)
    assert sorted(r["case_id"] for r in _results(tmp_path)) == ["0", "1", "2", "3", "4"]
    # the one reference the run had is sent, not recomputed; the others are written once
    assert sorted(r["case_id"] for r in read_jsonl(tmp_path / "reference.jsonl")) == [
        "0", "2", "3", "4"
    ]  # fmt: skip
    assert set(references) == {"0", "1", "2", "3", "4"}


def test_a_dead_workers_case_runs_again_on_a_fresh_worker(tmp_path: Path) -> None:
    backend, rec = Scripted(2, die={"3": 1}), _recorder(tmp_path)
    run_sharded(backend, plan_tasks(_items(5), set(), "single", 1), rec, {})
    got = _results(tmp_path)
    assert sorted(r["case_id"] for r in got) == ["0", "1", "2", "3", "4"]
    assert all(r["error"] is None for r in got)
    assert backend.runs["3"] == 2
    assert sum(backend.starts.values()) == 3  # two workers, one replacement


def test_a_case_whose_workers_die_twice_is_recorded_failed(tmp_path: Path) -> None:
    backend, rec = Scripted(2, die={"3": 99}), _recorder(tmp_path)
    run_sharded(backend, plan_tasks(_items(5), set(), "single", 1), rec, {})
    got = {r["case_id"]: r for r in _results(tmp_path)}
    assert len(_results(tmp_path)) == 5
    assert backend.runs["3"] == 2  # once, and once more: never a third time
    assert got["3"]["error"]["type"] == "WorkerCrashed"
    assert got["3"]["subject"] == "S3"
    assert all(got[k]["error"] is None for k in ("0", "1", "2", "4"))


def test_batch_tasks_are_the_fixed_chunks_and_fail_together(tmp_path: Path) -> None:
    items = _items(5)
    tasks = plan_tasks(items, {"2"}, "batch", 2)
    assert [(t.chunk, [it.key for it in t.items], t.todo) for t in tasks] == [
        (0, ["0", "1"], ["0", "1"]),
        (1, ["2", "3"], ["3"]),  # a resumed chunk keeps its companion
        (2, ["4"], ["4"]),
    ]
    backend, rec = Scripted(2, die={"0": 99}), _recorder(tmp_path)
    run_sharded(backend, tasks, rec, {})
    got = {r["case_id"]: r for r in _results(tmp_path)}
    assert sorted(got) == ["0", "1", "3", "4"]
    assert [got[k]["error"]["type"] for k in ("0", "1")] == ["WorkerCrashed"] * 2
    assert got["1"]["chunk"] == 0 and got["3"]["chunk"] == 1


def test_done_cases_make_no_tasks() -> None:
    assert plan_tasks(_items(3), {"0", "1", "2"}, "single", 1) == []


def test_a_worker_that_cannot_start_stops_the_run(tmp_path: Path) -> None:
    with pytest.raises(RepeditError, match="could not start: no model here"):
        run_sharded(Scripted(2, start="error"), plan_tasks(_items(2), set(), "single", 1),
                    _recorder(tmp_path), {})  # fmt: skip


def test_workers_dying_before_any_task_stop_the_run(tmp_path: Path) -> None:
    backend = Scripted(2, start="dead")
    with pytest.raises(RepeditError, match="before taking a task"):
        run_sharded(backend, plan_tasks(_items(2), set(), "single", 1), _recorder(tmp_path), {})
    assert sum(backend.starts.values()) <= 2 + 2 * 2 + 1


@pytest.mark.parametrize(
    ("argv", "want"),
    [
        ([], ParallelConfig(workers=None, threads=None, ray=False)),
        (["--threads", "3"], ParallelConfig(threads=None)),  # one process: --threads is its own
        (["--workers", "2"], ParallelConfig(workers=2)),
        (["--workers", "2", "--threads", "2"], ParallelConfig(workers=2, threads=2)),
        (["--ray"], ParallelConfig(ray=True)),
        (["--ray", "head:6379", "--workers", "4"],
         ParallelConfig(workers=4, ray=True, ray_address="head:6379")),
    ],
)  # fmt: skip
def test_worker_options(argv: list[str], want: ParallelConfig) -> None:
    from repedit.cli import build_parser
    from repedit.cli.eval import parallel_config

    got = parallel_config(build_parser().parse_args(["eval", *argv]))
    assert got == want
    assert got.worker_threads == (want.threads or 1)
    assert got.sharded == (want.ray or (want.workers or 1) > 1)


def test_sequential_mode_cannot_be_sharded() -> None:
    ParallelConfig().check("sequential")
    ParallelConfig(workers=2).check("batch")
    for par in (ParallelConfig(workers=2), ParallelConfig(ray=True)):
        with pytest.raises(InvalidRequestError, match="sequential"):
            par.check("sequential")

"""``repedit eval`` SIGKILLed mid-case, mid-write of ``results.jsonl``, mid-write of its config
and mid-way through its key statistics: the run directory holds only whole records and
readable state files, and rerunning the same command completes it with every case exactly once,
scored as an uninterrupted run scores it.

The run is driven through the command line (``main(argv)``) in a forked child on the tiny model
and the built-in facts.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
from childproc import run_child

pytestmark = pytest.mark.slow

N_CASES = 3


def _argv(model: Path, corpus: Path, cache: Path, out: Path) -> list[str]:
    return [
        "eval",
        *("--model", str(model), "--device", "cpu", "--dtype", "float32"),
        *("--data", "demo", "--n", str(N_CASES)),
        *("--corpus", str(corpus), "--stats-tokens", "960", "--cache-dir", str(cache)),
        *("--set", "value.steps=4", "--tests", "efficacy,prompt_paraphrase,neighbourhood"),
        *("--out", str(out), "--no-progress"),
    ]


def _kill_at_nth_edit(n: int) -> None:
    """Child setup: SIGKILL when the editor is asked for its ``n``-th edit (mid-case: the
    case's reference predictions are done, its edit and record are not)."""
    from repedit.editors.base import Editor

    original = Editor.edit
    calls = [0]

    def edit(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, *args, **kwargs)

    Editor.edit = edit  # type: ignore[method-assign]


def _kill_mid_record(n: int) -> None:
    """Child setup: when the ``n``-th record of results.jsonl is about to be made durable
    (the harness appends, flushes, then fsyncs), cut that line in half and SIGKILL: the file
    ends as a write interrupted halfway does."""
    original = os.fsync
    calls = [0]

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith("/results.jsonl"):
            calls[0] += 1
            if calls[0] == n:
                size = os.fstat(fd).st_size
                with open(f"/proc/self/fd/{fd}", "rb") as f:
                    data = f.read()
                start = data.rstrip(b"\n").rfind(b"\n") + 1  # the line just appended
                os.truncate(f"/proc/self/fd/{fd}", start + (size - start) // 2)
                os.kill(os.getpid(), signal.SIGKILL)
        original(fd)

    os.fsync = fsync


@pytest.fixture(scope="module")
def reference(tiny_dir: Path, corpus_file: Path, tmp_path_factory: pytest.TempPathFactory):
    """An uninterrupted run: ``(cache with its statistics, {case_id: record})``."""
    root = tmp_path_factory.mktemp("eval-ref")
    cache, out = root / "cache", root / "run"
    code, text = run_child(_argv(tiny_dir, corpus_file, cache, out), root / "log")
    assert code == 0, text
    return cache, {r["case_id"]: r for r in _records(out / "results.jsonl")}


def _records(path: Path) -> list[dict[str, Any]]:
    """Every line of a finished results.jsonl, which must all be whole records."""
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines]


def _check_after_kill(out: Path) -> list[str]:
    """Whatever the kill left is readable; the complete records' case ids."""
    from repedit.evaluation.harness import RunDir

    for name in ("config.json", "sessions.json"):
        if (out / name).exists():
            json.loads((out / name).read_text())  # never half-written
    raw = (out / "results.jsonl").read_bytes() if (out / "results.jsonl").exists() else b""
    lines = raw.split(b"\n")
    for line in lines[:-1]:  # every newline-terminated line is a whole record
        json.loads(line)
    records = RunDir(out).results()
    for rec in records:
        assert rec["error"] is None and "tests" in rec
    return [r["case_id"] for r in records]


POINTS = {
    "mid-case 2": ({}, lambda: _kill_at_nth_edit(2), 1),
    "mid-case 3": ({}, lambda: _kill_at_nth_edit(3), 2),
    "mid-write of record 1": ({}, lambda: _kill_mid_record(1), 0),
    "mid-write of record 2": ({}, lambda: _kill_mid_record(2), 1),
    "mid-write of config.json": ({"REPEDIT_TEST_KILL_AT": "io.write:1"}, None, 0),
    "mid-way through key statistics": ({"REPEDIT_TEST_KILL_AT": "stats.batch:1"}, None, 0),
}


@pytest.mark.parametrize("point", list(POINTS))
def test_killed_eval_resumes_to_the_same_results(
    point: str, tmp_path: Path, tiny_dir: Path, corpus_file: Path, reference: Any
) -> None:
    ref_cache, expected = reference
    env, setup, done_before = POINTS[point]
    cache = tmp_path / "cache"
    if "statistics" not in point:
        shutil.copytree(ref_cache, cache)  # statistics ready: the kill lands in the eval
    out = tmp_path / "run"
    argv = _argv(tiny_dir, corpus_file, cache, out)
    code, text = run_child(argv, tmp_path / "killed.log", env=env, setup=setup)
    assert code == -signal.SIGKILL, f"{point} was never reached:\n{text}"
    assert len(_check_after_kill(out)) == done_before

    code, text = run_child(argv, tmp_path / "resumed.log")
    assert code == 0, text
    records = _records(out / "results.jsonl")  # repaired: no cut line remains
    ids = [r["case_id"] for r in records]
    assert sorted(ids) == sorted(expected), "every case exactly once"
    for rec in records:
        assert rec["tests"] == expected[rec["case_id"]]["tests"], rec["case_id"]
    assert json.loads((out / "summary.json").read_text())

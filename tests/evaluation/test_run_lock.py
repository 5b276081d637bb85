"""One owner per run directory: the lock refuses a second owner naming the first one's pid,
``--wait`` queues behind it, and the kernel frees it when its owner dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness_cases import write_files

from repedit.evaluation.rundir import LOCK, RESULTS, RunBusyError, RunDir, RunLock, read_jsonl
from repedit.models.tiny import tiny_model, tiny_tokenizer

CLI = [sys.executable, "-c", "import sys; from repedit.cli import main; sys.exit(main())"]


def test_second_owner_is_refused_with_the_owner_pid(tmp_path: Path) -> None:
    with RunDir(tmp_path / "run").lock():
        assert (tmp_path / "run" / LOCK).read_text().strip() == str(os.getpid())
        with pytest.raises(RunBusyError, match=f"pid {os.getpid()}"):
            RunLock(tmp_path / "run").acquire()
    RunLock(tmp_path / "run").acquire().release()  # released: free again


def test_a_dead_owner_leaves_no_stale_lock(tmp_path: Path) -> None:
    run = tmp_path / "run"
    code = (
        "import os, sys; from repedit.evaluation.rundir import RunLock; "
        f"RunLock({str(run)!r}).acquire(); os.kill(os.getpid(), 9)"
    )
    proc = subprocess.run([sys.executable, "-c", code], timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert (run / LOCK).exists()
    RunLock(run).acquire().release()  # the kernel dropped the dead owner's lock


def _args(model: Path, files: dict[str, Path], out: Path, n: int) -> list[str]:
    return [
        "eval", "--model", str(model), "--threads", "1", "--data", str(files["data"]),
        "--n", str(n), "--out", str(out), "--corpus", str(files["corpus"]),
        "--stats-tokens", "2000", "--cache-dir", str(files["cache"]),
        "--set", "contexts=[[3,2]]", "--set", "value.steps=3",
        "--tests", "efficacy,neighbourhood", "--no-progress",
    ]  # fmt: skip


def test_two_evals_into_one_run_directory(tmp_path: Path) -> None:
    """A second ``repedit eval`` is refused naming the owner; ``--wait`` waits, then resumes
    with nothing run twice."""
    files = write_files(tmp_path)
    model = tmp_path / "model"
    tiny_model("llama", seed=0).save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    owner = subprocess.Popen([*CLI, *_args(model, files, out, 2)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    waiter = None
    try:
        deadline = time.time() + 240
        while time.time() < deadline and owner.poll() is None:
            if (out / LOCK).exists() and (out / LOCK).read_text().strip() == str(owner.pid):
                break
            time.sleep(0.05)
        assert owner.poll() is None, owner.stderr.read().decode()[-2000:] if owner.stderr else ""
        owner.send_signal(signal.SIGSTOP)  # it holds the lock until it is continued
        refused = subprocess.run([*CLI, *_args(model, files, out, 2)], env=env,
                                 capture_output=True, text=True, timeout=300)  # fmt: skip
        assert refused.returncode == 2, refused.stderr[-2000:]
        said = " ".join(refused.stderr.split())  # the console may wrap the message
        assert f"pid {owner.pid}" in said and "--wait" in said
        waiter = subprocess.Popen([*CLI, *_args(model, files, out, 3), "--wait"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
        time.sleep(3)
        assert waiter.poll() is None  # queued behind the stopped owner
        owner.send_signal(signal.SIGCONT)
        assert owner.wait(timeout=300) == 0
        assert waiter.wait(timeout=300) == 0, waiter.stderr.read().decode()[-2000:]
    finally:
        for proc in (owner, waiter):
            if proc is not None:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGCONT)
                    proc.kill()
                proc.wait(timeout=30)
                if proc.stderr:
                    proc.stderr.close()
    ids = [r["case_id"] for r in read_jsonl(out / RESULTS)]
    assert sorted(ids) == ["1", "2", "3"]  # each case once: the waiter ran only case 3

"""The evaluation harness end to end on a tiny model: files, resume, refusal, failures, modes,
and a real kill of ``repedit eval`` halfway through."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from harness_cases import FAST_ROME, run_config, same_weights, stats_config, weights, write_files

from repedit.editors import make_editor
from repedit.errors import EditError, InvalidRequestError, RepeditError
from repedit.evaluation.harness import run_eval
from repedit.evaluation.modes import checkpoint_due, checkpoint_points, parse_eval_every
from repedit.evaluation.probes import TESTS
from repedit.evaluation.rundir import RESULTS, read_jsonl
from repedit.models.tiny import tiny_loaded

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def lm():
    return tiny_loaded("llama")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return write_files(tmp_path_factory.mktemp("harness"))


def _editor(files: dict[str, Path]) -> Any:
    return make_editor("rome", FAST_ROME, stats_config(files))


_cfg = run_config


class Spy:
    """Wraps an editor: counts edit calls, can fail (after scribbling on the weights)."""

    def __init__(self, inner: Any, fail_on: set[str] = frozenset(), exc: type = EditError):
        self.inner = inner
        self.calls: list[list[str]] = []
        self.fail_on = set(fail_on)
        self.exc = exc

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def edit(self, lm: Any, requests: Any, **kw: Any) -> Any:
        ids = [r.case_id for r in requests]
        self.calls.append(ids)
        if self.fail_on & set(ids):
            layer = self.inner.layers(lm, self.inner.resolved(lm))[0]
            with torch.no_grad():
                lm.arch.down_proj(layer).weight.add_(1.0)  # a half-done edit
            raise self.exc(f"synthetic failure for {ids}")
        return self.inner.edit(lm, requests, **kw)


class ZeroEdit(Spy):
    """A real edit computation whose delta is then zeroed: the model never changes."""

    def edit(self, lm: Any, requests: Any, apply: bool = True) -> Any:
        self.calls.append([r.case_id for r in requests])
        result = self.inner.edit(lm, requests, apply=False)
        result.deltas = {k: torch.zeros_like(v) for k, v in result.deltas.items()}
        return result.apply(lm) if apply else result


def _records(out: Path) -> list[dict]:
    return read_jsonl(out / RESULTS)


# --------------------------------------------------------------------------- single mode


def test_single_end_to_end(lm, files, tmp_path):
    before = weights(lm)
    out = run_eval(_cfg(files, tmp_path / "run"), lm=lm, editor=_editor(files), progress=False)
    assert same_weights(lm, before)
    for name in ("config.json", "results.jsonl", "reference.jsonl", "summary.json", "summary.md"):
        assert (out / name).exists(), name
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["tests"]) == set(TESTS)
    assert {"tests", "config", "seconds_per_edit", "extra"} <= set(summary)
    assert summary["seconds_per_edit"] > 0
    t = summary["tests"]
    assert t["efficacy"]["n"] == 4
    assert t["prompt_paraphrase"]["n"] == 2  # the repeated edit prompt is dropped
    assert t["subject_paraphrase"]["n"] == 5 + 2 + 2 + 1
    assert t["ood_subject_paraphrase"]["n"] == 1
    assert t["long_context"]["n"] == 4
    assert t["neighbourhood"]["n"] == 5
    assert t["fluency"]["n"] == 4 and t["fluency"]["mean"] > 0
    assert summary["extra"]["scramble_n_zero"] == 1
    assert summary["extra"]["probes_per_s"] > 0
    assert summary["config"]["data_sha256"] and summary["config"]["model_fingerprint"]
    recs = _records(out)
    assert [r["case_id"] for r in recs] == ["1", "2", "3", "4"]
    rec = recs[0]
    assert rec["error"] is None and rec["edit_seconds"] > 0 and rec["eval_seconds"] > 0
    assert "requests" in rec["info"]
    probe = rec["tests"]["subject_paraphrase"]["probes"][0]
    assert {"exact", "beats_alt", "token_acc", "meta"} <= set(probe)
    assert "agree" in rec["tests"]["neighbourhood"]["probes"][0]
    assert set(rec["tests"]["efficacy"]["means"]) == {"exact", "beats_alt"}
    assert recs[3]["scramble_n"] == 0


def test_zero_edit_agrees_with_reference(lm, files, tmp_path):
    """With an edit that changes nothing, the neighbourhood agrees perfectly."""
    spy = ZeroEdit(_editor(files))
    cfg = _cfg(files, tmp_path / "run", tests="efficacy,neighbourhood", n=3)
    out = run_eval(cfg, lm=lm, editor=spy, progress=False, report=False)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tests"]["neighbourhood"]["mean"] == 1.0
    assert summary["tests"]["fluency"]["n"] == 0
    assert not (out / "report.html").exists()


# --------------------------------------------------------------------------- resume


def test_resume_only_new_cases(lm, files, tmp_path):
    out = tmp_path / "run"
    spy = Spy(_editor(files))
    run_eval(_cfg(files, out, n=2), lm=lm, editor=spy, progress=False, report=False)
    assert spy.calls == [["1"], ["2"]]
    spy.calls.clear()
    run_eval(_cfg(files, out, n=4), lm=lm, editor=spy, progress=False, report=False)
    assert spy.calls == [["3"], ["4"]]
    assert [r["case_id"] for r in _records(out)] == ["1", "2", "3", "4"]
    refs = read_jsonl(out / "reference.jsonl")
    assert len(refs) == len({r["case_id"] for r in refs}) == 4
    sessions = json.loads((out / "sessions.json").read_text())
    assert len(sessions) == 2


def test_truncated_last_line_is_redone(lm, files, tmp_path):
    out = tmp_path / "run"
    spy = Spy(_editor(files))
    cfg = _cfg(files, out, n=3, tests="efficacy,neighbourhood")
    run_eval(cfg, lm=lm, editor=spy, progress=False, report=False)
    raw = (out / RESULTS).read_bytes()
    last = raw.rstrip(b"\n").rfind(b"\n")
    (out / RESULTS).write_bytes(raw[: last + 1] + raw[last + 1 : last + 40])  # a cut write
    spy.calls.clear()
    run_eval(cfg, lm=lm, editor=spy, progress=False, report=False)
    assert spy.calls == [["3"]]
    lines = (out / RESULTS).read_text().splitlines()
    assert [json.loads(x)["case_id"] for x in lines] == ["1", "2", "3"]


def test_changed_config_is_refused(lm, files, tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(files, out, n=1, tests="efficacy")
    run_eval(cfg, lm=lm, editor=_editor(files), progress=False, report=False)
    spy = Spy(_editor(files))
    with pytest.raises(RepeditError, match=r"different configuration.*seed"):
        run_eval(_cfg(files, out, n=1, tests="efficacy", seed=1), lm=lm, editor=spy)
    assert spy.calls == []
    with pytest.raises(RepeditError, match="tests"):
        run_eval(_cfg(files, out, n=1, tests="efficacy,fluency"), lm=lm, editor=spy)
    run_eval(
        _cfg(files, out, n=1, tests="efficacy", seed=1, overwrite=True),
        lm=lm,
        editor=spy,
        progress=False,
        report=False,
    )
    assert spy.calls == [["1"]]
    assert json.loads((out / "config.json").read_text())["run_config"]["suite"]["seed"] == 1


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize("exc", [EditError, RuntimeError])
def test_failing_case_is_recorded_and_weights_restored(lm, files, tmp_path, exc):
    before = weights(lm)
    spy = Spy(_editor(files), fail_on={"2"}, exc=exc)
    cfg = _cfg(files, tmp_path / "run", tests="efficacy,neighbourhood")
    out = run_eval(cfg, lm=lm, editor=spy, progress=False, report=False)
    assert same_weights(lm, before)
    recs = {r["case_id"]: r for r in _records(out)}
    assert set(recs) == {"1", "2", "3", "4"}
    assert recs["2"]["error"]["type"] == exc.__name__
    assert "synthetic failure" in recs["2"]["error"]["message"]
    assert recs["2"]["weights_restored"]
    assert all(recs[k]["error"] is None for k in ("1", "3", "4"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["extra"]["n_failed"] == 1
    assert summary["tests"]["efficacy"]["n"] == 3
    # the case after the failure saw the unedited model: same references as a clean run
    clean = run_eval(
        _cfg(files, tmp_path / "clean", tests="efficacy,neighbourhood"),
        lm=lm,
        editor=_editor(files),
        progress=False,
        report=False,
    )
    again = {r["case_id"]: r for r in _records(clean)}
    assert again["3"]["tests"] == recs["3"]["tests"]


# --------------------------------------------------------------------------- other modes


def test_batch_mode(lm, files, tmp_path):
    before = weights(lm)
    spy = Spy(_editor(files))
    cfg = _cfg(files, tmp_path / "run", mode="batch", batch_size=3, n=4, tests="efficacy")
    out = run_eval(cfg, lm=lm, editor=spy, progress=False)
    assert same_weights(lm, before)
    assert spy.calls == [["1", "2", "3"], ["4"]]
    recs = _records(out)
    assert [r["chunk"] for r in recs] == [0, 0, 0, 1]
    assert recs[0]["chunk_size"] == 3
    assert (out / "summary.json").exists() and (out / "report.html").exists()


def test_precision_is_part_of_a_runs_identity(lm, files, tmp_path):
    """A run scored in float32 cannot be resumed under bfloat16 autocast, nor the reverse;
    a bfloat16 run goes end to end (statistics and scoring under autocast)."""
    out = tmp_path / "run"
    run_eval(_cfg(files, out, n=1, tests="efficacy"), lm=lm, editor=_editor(files), report=False)
    bf16 = _cfg(files, out, n=1, tests="efficacy")
    bf16.suite.precision = "bfloat16"
    with pytest.raises(RepeditError, match=r"different configuration.*precision"):
        run_eval(bf16, lm=lm, editor=_editor(files), progress=False, report=False)
    bf16.overwrite = True
    bf16.stats.precision = "bfloat16"
    stats = dataclasses.replace(stats_config(files), precision="bfloat16")
    run_eval(bf16, lm=lm, editor=make_editor("rome", FAST_ROME, stats), progress=False)
    (rec,) = _records(out)
    assert rec["tests"]["efficacy"]["n"] == 1
    stored = json.loads((out / "config.json").read_text())["run_config"]
    assert stored["suite"]["precision"] == stored["stats"]["precision"] == "bfloat16"


def test_sequential_mode_and_resume(lm, files, tmp_path):
    before = weights(lm)
    tests = "efficacy,subject_paraphrase,neighbourhood"
    full = _cfg(files, tmp_path / "full", mode="sequential", eval_every=2, tests=tests)
    spy = Spy(_editor(files))
    out = run_eval(full, lm=lm, editor=spy, progress=False)
    assert same_weights(lm, before)
    assert len(spy.calls) == 4
    points = read_jsonl(out / "sequential.jsonl")
    assert [p["n_edits"] for p in points] == [2, 4]
    assert points[1]["n_eval"] == 4 and set(points[1]["means"]) == {
        "efficacy",
        "subject_paraphrase",
        "neighbourhood",
    }
    assert (out / "sequential_state.safetensors").exists()
    assert [r["n_edits"] for r in _records(out)] == [1, 2, 3, 4]
    assert "Sequential editing" in (out / "report.html").read_text()
    # interrupted after two edits, then resumed: the same results as the straight run
    part = tmp_path / "part"
    kw = {"mode": "sequential", "eval_every": 2, "tests": tests}
    run_eval(_cfg(files, part, n=2, **kw), lm=lm, editor=_editor(files), progress=False)
    assert same_weights(lm, before)
    spy = Spy(_editor(files))
    run_eval(_cfg(files, part, n=4, **kw), lm=lm, editor=spy, progress=False, report=False)
    assert spy.calls == [["3"], ["4"]]
    assert same_weights(lm, before)
    straight = {r["case_id"]: r["tests"] for r in _records(out)}
    resumed = {r["case_id"]: r["tests"] for r in _records(part)}
    assert resumed == straight
    assert [p["n_edits"] for p in read_jsonl(part / "sequential.jsonl")] == [2, 4]


def test_log_checkpoints_double_and_close_the_run(lm, files, tmp_path):
    due = [n for n in range(1, 700) if checkpoint_due(n, "log")]
    assert due == [10, 20, 40, 80, 160, 320, 640]
    assert checkpoint_points(1000, "log") == [*due, 1000]
    assert checkpoint_points(12, "log") == [10, 12] and checkpoint_points(20, "log") == [10, 20]
    assert checkpoint_points(9, 3) == [3, 6, 9] and checkpoint_points(10, 3) == [3, 6, 9]
    assert parse_eval_every("LOG") == "log" and parse_eval_every("7") == 7
    for bad in (0, -2, "often", True, 2.5, "3.0"):
        with pytest.raises(InvalidRequestError, match="eval_every"):
            _cfg(files, tmp_path / "bad", mode="sequential", eval_every=bad)
    # the default: 4 edits, no doubling point reached, so one checkpoint at the end
    cfg = _cfg(files, tmp_path / "log", mode="sequential", tests="efficacy")
    assert cfg.eval_every == "log"
    out = run_eval(cfg, lm=lm, editor=_editor(files), progress=False, report=False)
    points = read_jsonl(out / "sequential.jsonl")
    assert [p["n_edits"] for p in points] == [4] and points[0]["n_eval"] == 4
    # rerunning the finished run adds no second end-of-run checkpoint
    run_eval(cfg, lm=lm, editor=_editor(files), progress=False, report=False)
    assert [p["n_edits"] for p in read_jsonl(out / "sequential.jsonl")] == [4]


# --------------------------------------------------------------------------- kill and rerun


def test_kill_mid_run_then_rerun(lm, files, tmp_path):
    """``repedit eval`` killed after its first result line; the rerun completes the run."""
    model_dir = tmp_path / "model"
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)
    out = tmp_path / "run"
    args = [
        "eval",
        "--model",
        str(model_dir),
        "--threads",
        "1",
        "--data",
        "demo",
        "--n",
        "8",
        "--out",
        str(out),
        "--corpus",
        str(files["corpus"]),
        "--stats-tokens",
        "2000",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--set",
        "contexts=[[3,2]]",
        "--set",
        "value.steps=5",
        "--tests",
        "efficacy,subject_paraphrase,neighbourhood,fluency",
        "--fluency-tokens",
        "8",
        "--no-progress",
    ]
    cmd = [sys.executable, "-c", "import sys; from repedit.cli import main; sys.exit(main())"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [*cmd, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    results = out / RESULTS
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if results.exists() and results.read_bytes().count(b"\n") >= 1:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        if proc.stderr:
            proc.stderr.close()
    first = [r["case_id"] for r in read_jsonl(results)]  # a line cut by the kill is skipped
    assert 1 <= len(first) < 8
    done = subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    ids = [r["case_id"] for r in read_jsonl(results)]
    assert len(ids) == len(set(ids)) == 8
    assert ids[: len(first)] == first
    assert json.loads((out / "summary.json").read_text())["tests"]["efficacy"]["n"] == 8
    assert "efficacy" in done.stdout

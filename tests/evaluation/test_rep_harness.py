"""REP in the evaluation harness, on a tiny model: records carry REP timing and training
summaries, the adapters are on while scoring, batch mode shares one adapter set, a τ sweep
writes one resumable sub-run per τ, and configurations REP cannot run are refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from harness_cases import (
    CASES,
    FAST_ROME,
    run_config,
    same_weights,
    stats_config,
    weights,
    write_files,
)

from repedit.editors import make_editor
from repedit.errors import InvalidRequestError, RepeditError
from repedit.evaluation.config import RunConfig, check_resumable, prepare
from repedit.evaluation.harness import run_eval
from repedit.evaluation.rundir import RESULTS, RunDir, read_jsonl, sweep_dirs
from repedit.models.tiny import tiny_loaded

torch.set_num_threads(1)

#: no fluency: the token count of an evaluation does not depend on the adapters
TESTS = "efficacy,subject_paraphrase,scrambled_subject,long_context,neighbourhood"
#: few steps and short passages: a REP training takes a fraction of a second on a tiny model
REP = {"steps": 3, "batch": 6, "long_context_length": 30}


@pytest.fixture(scope="module")
def lm():
    return tiny_loaded("llama")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return write_files(tmp_path_factory.mktemp("rep-harness"), CASES[:3])


class Spy:
    """Counts the editor's edit calls."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.calls: list[list[str]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def edit(self, lm: Any, requests: Any, **kw: Any) -> Any:
        self.calls.append([r.case_id for r in requests])
        return self.inner.edit(lm, requests, **kw)


def _editor(files: dict[str, Path]) -> Spy:
    return Spy(make_editor("rome", FAST_ROME, stats_config(files)))


def _cfg(files: dict[str, Path], out: Path, **kw: Any) -> RunConfig:
    return run_config(files, out, **{"tests": TESTS, **kw})


def _logprobs(rec: dict) -> list[float]:
    return [p["logprob"] for t in rec["tests"].values() for p in t.get("probes", [])]


def test_single_mode_with_rep_records_timing_and_summary(lm, files, tmp_path):
    before = weights(lm)
    cfg = _cfg(files, tmp_path / "run", n=2, rep=REP)
    out = run_eval(cfg, lm=lm, editor=_editor(files), progress=False)
    assert same_weights(lm, before)
    recs = read_jsonl(out / RESULTS)
    assert [r["case_id"] for r in recs] == ["1", "2"]
    for rec in recs:
        assert rec["error"] is None
        assert rec["edit_seconds"] > 0 and rec["rep_seconds"] > 0 and rec["eval_seconds"] > 0
        rep = rec["rep"]
        assert rep["layers"] == [1] and rep["groups"] == 1
        assert rep["pool"]["prompt"] == 1 and rep["pool"]["long"] > 0  # suite corpus reused
        layer = rep["1"]
        assert len(layer["open_pos"]) == 2 and len(layer["open_neg"]) == 2  # before, after
        assert len(rep["loss"]) == 2
        assert rec["rep_eval_gate"]["1"]["tokens"] > 0
    config = json.loads((out / "config.json").read_text())["run_config"]
    assert config["rep"] == {"batch": 6, "long_context_length": 30, "steps": 3}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["label"] == "rome+rep(batch=6, long_context_length=30, steps=3)"
    assert summary["extra"]["rep_seconds_mean"] > 0
    assert summary["extra"]["edit_seconds_mean"] == pytest.approx(summary["seconds_per_edit"])
    assert summary["extra"]["rep_open_pos"] is not None
    assert "rep_seconds (mean, s)" in (out / "summary.md").read_text()
    assert "Robustness vs. specificity" in (out / "report.html").read_text()


def test_adapters_are_on_while_scoring(lm, files, tmp_path):
    """Without a gate the trained projection acts on every token: scores must move."""
    plain = run_eval(
        _cfg(files, tmp_path / "plain", n=1), lm=lm, editor=_editor(files), progress=False
    )
    rep = run_eval(
        _cfg(files, tmp_path / "rep", n=1, rep={**REP, "use_gate": False}),
        lm=lm,
        editor=_editor(files),
        progress=False,
        report=False,
    )
    a, b = read_jsonl(plain / RESULTS)[0], read_jsonl(rep / RESULTS)[0]
    assert "rep" not in a and "rep_seconds" not in a
    assert len(_logprobs(a)) == len(_logprobs(b))
    assert max(abs(x - y) for x, y in zip(_logprobs(a), _logprobs(b), strict=True)) > 1e-4


def test_batch_mode_shares_one_adapter_set_unless_told(lm, files, tmp_path):
    before = weights(lm)
    kw = {"mode": "batch", "batch_size": 2, "n": 2}
    shared = run_eval(
        _cfg(files, tmp_path / "shared", rep=REP, **kw),
        lm=lm,
        editor=_editor(files),
        progress=False,
        report=False,
    )
    own = run_eval(
        _cfg(files, tmp_path / "own", rep={**REP, "shared": False}, **kw),
        lm=lm,
        editor=_editor(files),
        progress=False,
        report=False,
    )
    assert same_weights(lm, before)
    for out, groups in ((shared, 1), (own, 2)):
        recs = read_jsonl(out / RESULTS)
        assert len(recs) == 2
        for rec in recs:
            assert rec["error"] is None and rec["rep"]["groups"] == groups
            assert rec["chunk_rep_seconds"] == pytest.approx(2 * rec["rep_seconds"])
            assert rec["rep"]["pool"]


def test_tau_sweep_one_subrun_per_tau_and_resume(lm, files, tmp_path):
    before = weights(lm)
    out = tmp_path / "sweep"
    spy = _editor(files)
    cfg = _cfg(files, out, n=2, rep=REP, rep_taus=(0.5, 0.9))
    assert run_eval(cfg, lm=lm, editor=spy, progress=False) == out
    assert same_weights(lm, before)
    assert spy.calls == [["1"], ["2"]]  # trained once per case, whatever the number of τ
    subs = sweep_dirs(out)
    assert subs == [out / "tau-0.5", out / "tau-0.9"]
    assert not (out / RESULTS).exists() and (out / "reference.jsonl").exists()
    html = (out / "report.html").read_text()
    assert "τ=0.5" in html and "τ=0.9" in html  # the sweep's report compares the τ values
    opened = {}
    for tau, sub in zip((0.5, 0.9), subs, strict=True):
        config = json.loads((sub / "config.json").read_text())["run_config"]
        assert config["rep"]["tau"] == tau and config["rep_taus"] == []
        recs = read_jsonl(sub / RESULTS)
        assert [r["case_id"] for r in recs] == ["1", "2"]
        assert all(r["rep_tau"] == tau and r["error"] is None for r in recs)
        summary = json.loads((sub / "summary.json").read_text())
        assert summary["config"]["label"].endswith(f"τ={tau:g}")
        assert (sub / "report.html").exists()
        opened[tau] = sum(r["rep_eval_gate"]["1"]["open"] for r in recs)
        tokens = [r["rep_eval_gate"]["1"]["tokens"] for r in recs]
        opened[f"tokens-{tau}"] = tokens
    # the same tokens scored at both thresholds; a lower τ opens more gates
    assert opened["tokens-0.5"] == opened["tokens-0.9"]
    assert opened[0.5] > opened[0.9]

    # resume with one more case: only that case is edited, and it lands in both sub-runs
    spy.calls.clear()
    run_eval(_cfg(files, out, n=3, rep=REP, rep_taus=(0.5, 0.9)), lm=lm, editor=spy, progress=False)
    assert spy.calls == [["3"]]
    for sub in subs:
        assert [r["case_id"] for r in read_jsonl(sub / RESULTS)] == ["1", "2", "3"]

    # a case missing from one sub-run only is redone, and written where it is missing
    path = subs[1] / RESULTS
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:2]))
    spy.calls.clear()
    run_eval(_cfg(files, out, n=3, rep=REP, rep_taus=(0.5, 0.9)), lm=lm, editor=spy, progress=False)
    assert spy.calls == [["3"]]
    assert [r["case_id"] for r in read_jsonl(subs[0] / RESULTS)] == ["1", "2", "3"]
    assert [r["case_id"] for r in read_jsonl(subs[1] / RESULTS)] == ["1", "2", "3"]

    # another τ list or REP config into the same directory is refused
    with pytest.raises(RepeditError, match="rep_taus"):
        run_eval(_cfg(files, out, n=3, rep=REP, rep_taus=(0.5, 0.7)), lm=lm, editor=spy)
    with pytest.raises(RepeditError, match="rep"):
        run_eval(
            _cfg(files, out, n=3, rep={**REP, "steps": 4}, rep_taus=(0.5, 0.9)), lm=lm, editor=spy
        )


def test_sequential_rep_stacks_adapters_and_resumes(lm, files, tmp_path):
    """Each sequential edit gets its own adapters; all of them act in later evaluations; a
    resumed run reloads them and matches the straight run; a lost adapter file is refused."""
    before = weights(lm)
    rep = {**REP, "use_gate": False}  # always on: every adapter set shows in the scores
    kw = {"mode": "sequential", "eval_every": 1, "tests": "efficacy,subject_paraphrase"}
    straight = tmp_path / "straight"
    spy = _editor(files)
    run_eval(_cfg(files, straight, n=3, rep=rep, **kw), lm=lm, editor=spy, progress=False)
    assert same_weights(lm, before) and len(spy.calls) == 3
    recs = read_jsonl(straight / RESULTS)
    assert all("rep_seconds" in r and "rep" in r and "rep_eval_gate" in r for r in recs)
    assert len(list((straight / "sequential_rep").glob("*.safetensors"))) == 3
    plain = tmp_path / "plain"
    run_eval(_cfg(files, plain, n=3, **kw), lm=lm, editor=_editor(files), progress=False)
    plain_recs = read_jsonl(plain / RESULTS)
    assert [_logprobs(r) for r in recs] != [_logprobs(r) for r in plain_recs]
    # stopped after two edits, then resumed: the third edit is scored with all three adapter
    # sets, the checkpoints re-score the earlier cases with theirs
    part = tmp_path / "part"
    run_eval(_cfg(files, part, n=2, rep=rep, **kw), lm=lm, editor=_editor(files), progress=False)
    spy = _editor(files)
    run_eval(_cfg(files, part, n=3, rep=rep, **kw), lm=lm, editor=spy, progress=False)
    assert spy.calls == [["3"]] and same_weights(lm, before)
    assert [r["tests"] for r in read_jsonl(part / RESULTS)] == [r["tests"] for r in recs]
    assert [p["means"] for p in read_jsonl(part / "sequential.jsonl")] == [
        p["means"] for p in read_jsonl(straight / "sequential.jsonl")
    ]
    next(iter((part / "sequential_rep").glob("*.safetensors"))).unlink()
    with pytest.raises(RepeditError, match=r"REP adapters .* are missing"):
        run_eval(_cfg(files, part, n=4, rep=rep, **kw), lm=lm, editor=_editor(files))
    assert same_weights(lm, before)


def test_resumed_run_needs_the_same_rep_config(lm, files, tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(files, out, n=1, tests="efficacy", rep=REP)
    run_eval(cfg, lm=lm, editor=_editor(files), progress=False, report=False)
    spy = _editor(files)
    with pytest.raises(RepeditError, match=r"different configuration.*rep"):
        run_eval(
            _cfg(files, out, n=1, tests="efficacy", rep={**REP, "steps": 4}), lm=lm, editor=spy
        )
    with pytest.raises(RepeditError, match=r"different configuration.*rep"):
        run_eval(_cfg(files, out, n=1, tests="efficacy"), lm=lm, editor=spy)
    assert spy.calls == []


def test_rep_config_validation():
    with pytest.raises(InvalidRequestError, match="cannot run in sequential mode"):
        RunConfig(mode="sequential", rep_taus="0.5,0.9")
    assert RunConfig(mode="sequential", rep={}).rep_config() is not None
    with pytest.raises(InvalidRequestError, match="unknown rep hyper-parameter"):
        RunConfig(rep={"bogus": 1})
    with pytest.raises(InvalidRequestError, match="tau must be in"):
        RunConfig(rep={"tau": 1.5})
    with pytest.raises(InvalidRequestError, match="τ given twice"):
        RunConfig(rep={"tau": 0.8}, rep_taus=(0.5, 0.7))
    # values are coerced to the declared field types; one τ is just rep.tau
    cfg = RunConfig(rep={"rank": "8", "use_gate": "false"}, rep_taus=[0.7])
    assert cfg.rep == {"rank": 8, "tau": 0.7, "use_gate": False} and cfg.rep_taus == ()
    assert cfg.rep_config().rank == 8 and cfg.rep_config().tau == 0.7
    # a sweep implies REP; batch mode shares adapters unless told otherwise
    sweep = RunConfig(rep_taus="0.5,0.9", mode="batch", out="o")
    assert sweep.rep == {} and sweep.rep_config().shared is True
    assert [(t, c.out, c.rep) for t, c in sweep.sweep()] == [
        (0.5, str(Path("o") / "tau-0.5"), {"tau": 0.5}),
        (0.9, str(Path("o") / "tau-0.9"), {"tau": 0.9}),
    ]
    assert RunConfig(mode="batch", rep={"shared": False}).rep_config().shared is False
    assert RunConfig().rep_config() is None and RunConfig().sweep() == []
    # round trip through config.json
    again = RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again.comparable() == cfg.comparable()


def test_resume_refuses_when_rep_defaults_changed(tmp_path: Path) -> None:
    """A run stores its resolved REP config; a resume under other defaults is refused."""
    cfg = RunConfig(out=str(tmp_path / "run"), rep={})
    meta = {"model_fingerprint": "f", "data_sha256": "d", "hparams_resolved": {"a": 1}}
    meta["rep_resolved"] = cfg.rep_config().to_dict()
    run = RunDir(cfg.out)
    prepare(run, cfg, meta)
    check_resumable(run, cfg, meta)  # same: fine
    changed = {**meta, "rep_resolved": {**meta["rep_resolved"], "lr": 0.5}}
    with pytest.raises(RepeditError, match="rep_resolved"):
        check_resumable(run, cfg, changed)

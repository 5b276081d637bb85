"""RunConfig: nested on disk, an earlier version's flat config.json still read and resumed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from repedit.errors import RepeditError
from repedit.evaluation.config import RunConfig, check_resumable, flat_fields, prepare
from repedit.evaluation.probes import SuiteConfig
from repedit.evaluation.rundir import CONFIG, RunDir
from repedit.evaluation.summary import build_summary

#: the run_config an earlier version wrote (flat fields)
FLAT = {
    "model": "tiny", "method": "rome", "hparams": {}, "data": "demo", "data_dir": None,
    "n": 3, "mode": "single", "batch_size": 10, "eval_every": 10, "eval_sample": 20,
    "tests": ["efficacy", "neighbourhood"], "seed": 2, "skip_invalid": False, "id_split": 5,
    "out": "runs/old", "overwrite": False, "device": None, "dtype": "auto",
    "stats_corpus": "wiki", "stats_tokens": 5000, "stats_seq_len": 128, "cache_dir": None,
    "long_context_corpus": None, "long_context_length": 300, "long_context_unit": "words",
    "long_context_passages": 1, "fluency_samples": 1, "fluency_tokens": 100,
    "score_batch_size": 16, "rep": None, "rep_taus": [],
}  # fmt: skip
META = {"model_fingerprint": "abc", "data_sha256": "d"}


def test_round_trip_is_nested() -> None:
    cfg = RunConfig(suite=SuiteConfig(tests=("efficacy",), seed=3), rep={"steps": 4})
    stored = json.loads(json.dumps(cfg.to_dict()))
    assert stored["suite"]["seed"] == 3 and stored["stats"]["corpus"] == "auto"
    assert "cache" not in stored["stats"] and "progress" not in stored["stats"]
    again = RunConfig.from_dict(stored)
    assert again.comparable() == cfg.comparable()
    assert flat_fields(stored)["seed"] == 3 and flat_fields(stored)["tests"] == ["efficacy"]


def test_flat_config_of_an_earlier_version_is_read() -> None:
    cfg = RunConfig.from_dict(FLAT)
    assert cfg.suite.seed == 2 and cfg.suite.long_context_unit == "words"
    assert cfg.suite.batch_size == 16 and cfg.suite.tests == ("efficacy", "neighbourhood")
    assert (cfg.stats.corpus, cfg.stats.n_tokens, cfg.stats.seq_len) == ("wiki", 5000, 128)
    with pytest.raises(RepeditError, match="unknown RunConfig field"):
        RunConfig.from_dict({**FLAT, "bogus": 1})


def _old_run(path: Path) -> RunDir:
    path.mkdir()
    (path / CONFIG).write_text(json.dumps({"run_config": FLAT, **META}))
    return RunDir(path)


def test_an_old_run_directory_resumes_and_summarises(tmp_path: Path) -> None:
    run = _old_run(tmp_path / "old")
    same = RunConfig.from_dict({**FLAT, "n": 5, "out": str(run.path)})  # n may change
    prepare(run, same, META)  # resumes: nothing raised, the old config kept
    assert json.loads((run / CONFIG).read_text())["run_config"] == FLAT
    summary = build_summary(run.path)
    assert summary["config"]["stats"] == {"corpus": "wiki", "n_tokens": 5000, "seq_len": 128}
    assert summary["config"]["seed"] == 2 and summary["tests"]["fluency"]["n"] == 0


def test_an_old_run_directory_refuses_another_configuration(tmp_path: Path) -> None:
    run = _old_run(tmp_path / "old")
    other = RunConfig.from_dict({**FLAT, "seed": 3})
    with pytest.raises(RepeditError, match=r"suite\.seed: 2 -> 3"):
        check_resumable(run, other, META)


def test_an_unreadable_config_is_refused_clearly(tmp_path: Path) -> None:
    (tmp_path / CONFIG).write_text("{not json")
    with pytest.raises(RepeditError, match="unreadable; pass --overwrite"):
        check_resumable(RunDir(tmp_path), RunConfig(), META)
    (tmp_path / CONFIG).write_text(json.dumps({"run_config": {"suite": {"bogus": 1}}}))
    with pytest.raises(RepeditError, match="written by another version"):
        check_resumable(RunDir(tmp_path), RunConfig(), META)

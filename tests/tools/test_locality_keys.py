"""tools/locality_keys.py: the share of a ROME edit that reaches a key, with keys held."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

_SPEC = importlib.util.spec_from_file_location(
    "locality_keys", Path(__file__).resolve().parents[2] / "tools" / "locality_keys.py"
)
assert _SPEC and _SPEC.loader
locality_keys = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(locality_keys)

E = torch.eye(3, dtype=torch.float64)


@pytest.mark.parametrize("mu", [0.0, 0.5, 1.0, 9.0])
def test_a_held_key_keeps_the_closed_form_share(mu: float) -> None:
    # C = I, k* = e1 + e2, e2 held: u = e1 + e2/(1+μ), so s(e2) = 1/(2+μ) and s(k*) = 1
    k_star = E[0] + E[1]
    probes = {"held": [E[1:2]], "own": [k_star[None]], "other": [E[2:3]], "both": [E[1:3]]}
    got = locality_keys.overlap_ratios(E, k_star, E[:, 1:2], probes, mu)
    assert got["held"] == pytest.approx(1 / (2 + mu), rel=1e-12)
    assert got["own"] == pytest.approx(1.0, rel=1e-12)
    assert got["other"] == pytest.approx(0.0, abs=1e-12)
    assert got["both"] == got["held"]  # the largest |s| over a probe's keys


def test_no_weight_or_no_keys_is_plain_rome() -> None:
    c = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 3.0]], dtype=torch.float64)
    k_star = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    probe = {"p": [torch.tensor([[0.3, 0.1, -2.0], [1.0, 1.0, 1.0]], dtype=torch.float64)]}
    u = torch.linalg.solve(c, k_star)
    want = float((probe["p"][0] @ u / (u @ k_star)).abs().max())
    held = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert locality_keys.overlap_ratios(c, k_star, held, probe, 0.0)["p"] == want
    assert locality_keys.overlap_ratios(c, k_star, held[:, :0], probe, 5.0)["p"] == want
    assert locality_keys.overlap_ratios(c, k_star, held, probe, 5.0)["p"] != want


def test_table_has_a_row_per_setting() -> None:
    doc = {"rows": [{"held": 20, "mu": 0.0, "neighbourhood": 0.08123},
                    {"held": 20, "mu": 1.0, "neighbourhood": 0.0761}]}  # fmt: skip
    lines = locality_keys.table(doc).splitlines()
    assert lines[0] == "| held keys | μ | neighbourhood |"
    assert lines[2:] == ["| 20 | 0 | 0.081 |", "| 20 | 1 | 0.076 |"]

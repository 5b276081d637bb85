"""MEMIT-style editors reach their residual target through a post-MLP norm (Gemma 2/3)."""

from __future__ import annotations

import pytest
import torch

import repedit.editors.memit as memit_module
from repedit.data.case import EditRequest
from repedit.editors import StatsConfig, make_editor
from repedit.editors.post_norm import through_post_norm
from repedit.editors.values import current_values
from repedit.models.tiny import tiny_loaded

REQ = EditRequest("The Eiffel Tower is in {}", "Paris", "Italy", case_id="eiffel")


def _norm(seed: int = 0) -> torch.nn.Module:
    """The tiny Gemma 3 post-MLP norm in float64 with gains spread over (1, 6)."""
    norm = tiny_loaded("gemma3_text").arch.post_mlp(1)
    assert norm is not None
    norm = norm.double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(norm.weight.shape, generator=gen, dtype=torch.float64) * 5)
    return norm


def _outputs(norm: torch.nn.Module, n: int = 4, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, norm.weight.shape[0], generator=gen, dtype=torch.float64) * 20


def test_a_reachable_change_is_recovered_to_second_order() -> None:
    """A change the norm can make (``norm(m + δ) − norm(m)``) comes back with an error that
    falls as ``|δ|²``: ten times smaller ``δ``, at least fifty times smaller error (a first-order
    error would fall ten times)."""
    norm = _norm()
    m = _outputs(norm)
    errors = []
    for size in (1e-1, 1e-2):
        delta = _outputs(norm, seed=2) * size
        with torch.no_grad():
            wanted = (norm(m + delta) - norm(m)).T
            got = norm(m + through_post_norm(norm, m, wanted).T) - norm(m)
        errors.append(float((got - wanted.T).norm()))
        relative = errors[-1] / float(wanted.norm())
        assert relative < 0.05
    assert errors[1] < errors[0] / 50


def test_writing_the_share_unmapped_misses_it() -> None:
    """The check above can fail: the raw share, written as it is, lands far from itself."""
    norm = _norm()
    m = _outputs(norm)
    with torch.no_grad():
        wanted = (norm(m + _outputs(norm, seed=2) * 1e-2) - norm(m)).T
        raw = norm(m + wanted.T) - norm(m)
    assert float((raw - wanted.T).norm() / wanted.norm()) > 0.5


def test_without_a_post_norm_the_share_is_written_as_is() -> None:
    lm = tiny_loaded("llama")
    share = torch.randn(lm.arch.d_model, 3)
    assert memit_module._mlp_share(lm, 1, torch.randn(3, lm.arch.d_mlp), share) is share


def _residual_miss(family: str, stats: StatsConfig) -> float:
    """|z − h| after a MEMIT edit over |z − h| before, at the last edited layer, on a tiny model
    whose post-MLP norms have gain 10 (real Gemma 3 layers have median gains of 1–300)."""
    lm = tiny_loaded(family)
    for layer in range(lm.n_layers):
        norm = lm.arch.post_mlp(layer)
        assert norm is not None
        with torch.no_grad():
            norm.weight.fill_(9.0)  # Gemma's norms scale by 1 + weight
    editor = make_editor("memit", {"contexts": ((3, 2),), "value": {"steps": 20}}, stats)
    result = editor.edit(lm, [REQ], apply=False)
    last = result.info["layers"][-1]
    z = result.tensors[f"targets.{last}"]
    before = current_values(lm, [REQ], layer=last, site="residual")
    result.apply(lm)
    try:
        after = current_values(lm, [REQ], layer=last, site="residual")
    finally:
        result.revert(lm)
    return float((z - after).norm() / (z - before).norm())


@pytest.mark.parametrize("family", ["gemma3_text", "gemma2"])
def test_memit_reaches_its_target_through_the_norm(
    family: str, stats: StatsConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _residual_miss(family, stats) < 0.5
    monkeypatch.setattr(memit_module, "_mlp_share", lambda lm, layer, keys, share: share)
    assert _residual_miss(family, stats) > 0.9  # unmapped, the edit overshoots or misses

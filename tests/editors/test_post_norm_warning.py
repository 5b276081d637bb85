"""MEMIT-style editors warn on architectures whose MLP output is normalised before the residual."""

from __future__ import annotations

import warnings

import pytest

from repedit.editors.memit import _warn_post_norm
from repedit.models.tiny import tiny_loaded


@pytest.mark.parametrize(("family", "warns"), [("gemma3_text", True), ("llama", False)])
def test_residual_solve_warns_only_under_a_post_mlp_norm(family: str, warns: bool) -> None:
    lm = tiny_loaded(family)
    assert (lm.arch.post_mlp(1) is not None) is warns
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _warn_post_norm(lm, [0, 1])
    assert any("post-MLP norm" in str(w.message) for w in seen) is warns

"""Shared fixtures of the editor tests."""

from __future__ import annotations

import pytest

from repedit.editors import StatsConfig
from tiny_text import tiny_corpus_text


@pytest.fixture(scope="module")
def stats(tmp_path_factory: pytest.TempPathFactory) -> StatsConfig:
    """``C`` from a small random text over the tiny tokenizer's vocabulary, cached on disk
    (one per test module).

    The text uses most of the vocabulary: families whose first MLP sees only the token
    (parallel attention, rotary positions: GPT-J, GPT-NeoX) would otherwise get a
    rank-deficient ``C`` at layer 0.
    """
    root = tmp_path_factory.mktemp("editor-stats")
    corpus = root / "corpus.txt"
    corpus.write_text(tiny_corpus_text())
    return StatsConfig(corpus=str(corpus), n_tokens=3000, cache=str(root / "cache"), progress=False)

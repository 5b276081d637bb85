"""Shared fixtures of the editor tests."""

from __future__ import annotations

import random

import pytest

from repedit.editors import StatsConfig
from repedit.models.tiny import tiny_tokenizer


@pytest.fixture(scope="module")
def stats(tmp_path_factory: pytest.TempPathFactory) -> StatsConfig:
    """``C`` from a small random text over the tiny tokenizer's vocabulary, cached on disk
    (one per test module).

    The text uses most of the vocabulary: families whose first MLP sees only the token
    (parallel attention, rotary positions: GPT-J, GPT-NeoX) would otherwise get a
    rank-deficient ``C`` at layer 0.
    """
    root = tmp_path_factory.mktemp("editor-stats")
    rng = random.Random(0)
    vocab = tiny_tokenizer().get_vocab()
    pieces = sorted(k.replace("Ġ", " ") for k in vocab if k.replace("Ġ", "").isalpha())
    lines = ["".join(rng.choice(pieces) for _ in range(40)).strip() + "." for _ in range(150)]
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(lines))
    return StatsConfig(corpus=str(corpus), n_tokens=3000, cache=str(root / "cache"), progress=False)

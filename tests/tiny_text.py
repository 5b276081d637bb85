"""Random text over the tiny tokenizer's vocabulary, for key statistics in tests.

It uses most of the vocabulary, so ``C`` is well conditioned at every layer of every tiny
family (those whose first MLP sees only the token would otherwise get a rank-deficient one).
"""

from __future__ import annotations

import random

from repedit.models.tiny import tiny_tokenizer


def tiny_corpus_text(seed: int = 0, lines: int = 150, words: int = 40) -> str:
    """``lines`` paragraphs of ``words`` alphabetic tokens each, drawn with ``seed``."""
    rng = random.Random(seed)
    vocab = tiny_tokenizer().get_vocab()
    pieces = sorted(k.replace("Ġ", " ") for k in vocab if k.replace("Ġ", "").isalpha())
    rows = ["".join(rng.choice(pieces) for _ in range(words)).strip() + "." for _ in range(lines)]
    return "\n\n".join(rows)

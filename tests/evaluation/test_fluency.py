"""ROME's n-gram entropy and the seeded top-k sampler."""

from __future__ import annotations

import math

import pytest
import torch

from repedit.errors import InvalidRequestError
from repedit.evaluation.fluency import generate_texts, ngram_entropy, text_ngram_entropy, words
from repedit.evaluation.scoring import greedy_completion
from repedit.models.tiny import tiny_loaded

torch.set_num_threads(1)


def _h(*probs: float) -> float:
    return -sum(p * math.log2(p) for p in probs)


def test_hand_computed_value():
    # "a b a b a b": bigrams ab x3, ba x2 -> H2 = H(3/5, 2/5); trigrams aba x2, bab x2 -> 1 bit.
    expected = (2 / 3 * _h(0.6, 0.4) + 4 / 3 * 1.0) / 2
    assert ngram_entropy(["a b a b a b"]) == pytest.approx(expected)
    assert expected == pytest.approx(0.990317, abs=1e-6)
    # All-distinct n-grams: 6 words -> 5 bigrams, 4 trigrams, each uniform.
    distinct = (2 / 3 * math.log2(5) + 4 / 3 * math.log2(4)) / 2
    assert text_ngram_entropy("one two three four five six") == pytest.approx(distinct)
    # Mean over texts, and ROME's mean(w * H) for non-default weights.
    assert ngram_entropy(["a b a b a b", "one two three four five six"]) == pytest.approx(
        (expected + distinct) / 2
    )
    assert ngram_entropy(["one two three four five six"], ns=(2,), weights=(1.0,)) == (
        pytest.approx(math.log2(5))
    )


def test_punctuation_is_a_word_and_short_texts_are_zero():
    assert words("Paris, France.") == ["Paris", ",", "France", "."]
    assert ngram_entropy(["single"]) == 0.0
    with pytest.raises(InvalidRequestError):
        ngram_entropy([])
    with pytest.raises(InvalidRequestError):
        ngram_entropy(["a b"], ns=(2, 3), weights=(1.0,))


def test_repetitive_text_has_lower_entropy():
    repetitive = "the cat the cat the cat the cat the cat the cat the cat"
    varied = "the quick brown fox jumps over a lazy dog near the old river bank"
    assert ngram_entropy([repetitive]) < ngram_entropy([varied]) - 1.0


def test_generate_texts_is_seeded_and_leaves_global_rng_alone():
    lm = tiny_loaded("llama")
    prompts = ["The capital of France is", "Rome"]
    state = torch.get_rng_state()
    a = generate_texts(lm, prompts, max_new_tokens=12, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    b = generate_texts(lm, prompts, max_new_tokens=12, seed=0)
    c = generate_texts(lm, prompts, max_new_tokens=12, seed=1)
    assert a == b
    assert a != c
    assert all(text.startswith(p) for text, p in zip(a, prompts, strict=True))
    new = generate_texts(lm, prompts, max_new_tokens=12, seed=0, include_prompt=False)
    assert [p + n for p, n in zip(prompts, new, strict=True)] == a


def test_top_k_is_honoured():
    lm = tiny_loaded("gpt2")
    prompts = ["The capital of France is", "Rome"]
    top1 = generate_texts(lm, prompts, max_new_tokens=8, top_k=1, include_prompt=False)
    assert top1 == greedy_completion(lm, prompts, max_new_tokens=8)

"""Generation-scored probes: greedy continuations of the target's length plus two tokens."""

from __future__ import annotations

import pytest
import torch

from repedit.errors import InvalidRequestError
from repedit.evaluation.scoring import (
    Probe,
    begins_with,
    continuations,
    generate_scores,
    greedy_completion,
    normalise,
    tokenize_probe,
)
from repedit.models.tiny import tiny_loaded

torch.set_num_threads(1)

PROMPTS = ["The capital of France is", "Rome is", "The mother tongue of Michel Rocard is"]


def test_normalise_and_begins_with():
    assert normalise("  Paris\n and\tRome ") == "paris and rome"
    assert begins_with(" PARIS, France", "Paris")
    assert begins_with("Paris", " paris ")
    assert not begins_with(" Parisian food", "Paris")  # not at a word boundary
    assert not begins_with(" London", "Paris")
    assert not begins_with(" Paris", "  ")


def test_continuation_length_is_the_targets_plus_two():
    lm = tiny_loaded("llama")
    probes = [Probe(PROMPTS[0], "Paris"), Probe(PROMPTS[1], "the capital of Italy")]
    got = continuations(lm, probes)
    for probe, text in zip(probes, got, strict=True):
        n = len(tokenize_probe(lm.tokenizer, probe.prompt, probe.target)[1]) + 2
        assert text == greedy_completion(lm, [probe.prompt], n)[0]


def test_success_and_agreement_follow_the_continuation():
    lm = tiny_loaded("llama")
    said = greedy_completion(lm, PROMPTS, 6)
    # a target the model does continue with (its first word), and one it does not
    hits = [Probe(p, s.split()[0]) for p, s in zip(PROMPTS, said, strict=True) if s.split()]
    assert hits
    misses = [Probe(p.prompt, "zebra crossing") for p in hits]
    assert all(s.exact for s in generate_scores(lm, hits))
    assert not any(s.exact for s in generate_scores(lm, misses))
    mine = continuations(lm, hits)
    agreed = generate_scores(lm, hits, reference=mine)
    assert [s.agree for s in agreed] == [True] * len(hits)
    other = generate_scores(lm, hits, reference=[t + " zebra" for t in mine])
    assert [s.agree for s in other] == [False] * len(hits)
    assert generate_scores(lm, hits)[0].agree is None


def test_reference_count_must_match():
    with pytest.raises(InvalidRequestError, match="reference"):
        generate_scores(tiny_loaded("llama"), [Probe("Rome is", "big")], reference=[])

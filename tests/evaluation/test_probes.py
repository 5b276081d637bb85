"""The robustness suite's probe families, built on the tiny tokenizer (no model forward needed
except for fluency)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch

from repedit.data import EditCase, EditRequest, Neighbour, load_cases, scrambled_subjects
from repedit.errors import InvalidRequestError
from repedit.evaluation.probes import (
    TESTS,
    CaseProbes,
    SuiteConfig,
    build_probes,
    case_fluency,
    fluency_prompts,
    parse_tests,
    passage_sampler,
)
from repedit.models.tiny import tiny_loaded

torch.set_num_threads(1)

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "fixtures" / "rep_counterfact.json"
CORPUS = "= Title =\n" + "".join(
    f"Line {i} says that the capital of France is Paris and item {7 * i} is in Europe.\n"
    for i in range(200)
)


@pytest.fixture(scope="module")
def lm():
    return tiny_loaded("llama")


@pytest.fixture(scope="module")
def cases():
    return load_cases(FIXTURE).cases


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS)
    return path


def _no_long(**kw) -> SuiteConfig:
    return SuiteConfig(tests=[t for t in TESTS if t != "long_context"], **kw)


def test_families_and_counts(lm, cases):
    slovenia = cases[0]
    fam = build_probes(slovenia, lm, _no_long())
    assert set(fam) == {t for t in TESTS if t not in ("long_context", "fluency")}
    req = slovenia.request
    (eff,) = fam["efficacy"]
    assert (eff.prompt, eff.target, eff.alt, eff.test) == (
        req.text,
        req.target_new,
        req.target_true,
        "efficacy",
    )
    # prompt paraphrases: deduplicated, whitespace-normalised, never the edit prompt itself
    prompts = [p.prompt for p in fam["prompt_paraphrase"]]
    assert len(prompts) == len(set(prompts))
    assert req.text not in prompts
    assert all(
        p.target == req.target_new and p.alt == req.target_true for p in fam["prompt_paraphrase"]
    )
    # subject paraphrases substituted into the relation template; ID = first 5, OOD = rest
    assert [p.prompt for p in fam["subject_paraphrase"]] == [
        req.prompt.format(s) for s in slovenia.subject_paraphrases[:5]
    ]
    assert [p.prompt for p in fam["ood_subject_paraphrase"]] == [
        req.prompt.format(s) for s in slovenia.subject_paraphrases[5:]
    ]
    assert fam["ood_subject_paraphrase"][0].meta["index"] == 5
    assert all(p.alt == "Europe" for p in fam["subject_paraphrase"])
    # neighbourhood: the dataset's prompts and answers, no alt
    assert [(p.prompt, p.target, p.alt) for p in fam["neighbourhood"]] == [
        (n.prompt, n.target, None) for n in slovenia.neighbourhood
    ]


def test_case_without_held_out_paraphrases_or_neighbours(lm, cases):
    darrieux = cases[2]  # three subject paraphrases, no neighbours, no prompt paraphrases
    fam = build_probes(darrieux, lm, _no_long())
    assert len(fam["subject_paraphrase"]) == 3
    assert fam["ood_subject_paraphrase"] == []
    assert fam["neighbourhood"] == []
    assert fam["prompt_paraphrase"] == []


def test_scrambles_deterministic_with_halves(lm, cases):
    case = cases[0]
    a = build_probes(case, lm, SuiteConfig(tests="scrambled_subject"))["scrambled_subject"]
    b = build_probes(case, lm, SuiteConfig(tests="scrambled_subject"))["scrambled_subject"]
    assert [p.prompt for p in a] == [p.prompt for p in b]
    expected = scrambled_subjects(
        case.request.subject, lm.tokenizer, n_max=10, seed=0, key=case.case_id
    )
    assert [p.meta["subject"] for p in a] == expected
    assert len(a) >= 1
    halves = [p.meta["half"] for p in a]
    k = math.ceil(len(a) / 2)
    assert halves == ["id"] * k + ["ood"] * (len(a) - k)
    assert all(p.meta["subject"] != case.request.subject for p in a)
    assert all(p.prompt == case.request.prompt.format(p.meta["subject"]) for p in a)


def _one_token_subject(tokenizer) -> str:
    for word in ("Paris", "capital", "France", "The", "is", "in"):
        if len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1:
            return word
    pytest.skip("no one-token word found in the tiny tokenizer")


def test_one_token_subject_has_no_scramble(lm):
    subject = _one_token_subject(lm.tokenizer)
    case = EditCase(EditRequest("{} is located in", subject, "Asia", "Europe", "one"))
    fam = build_probes(case, lm, SuiteConfig(tests="scrambled_subject"))
    assert fam["scrambled_subject"] == []
    assert CaseProbes("one", fam).spans == {"scrambled_subject": (0, 0)}


def test_long_context_words(lm, cases, corpus):
    cfg = SuiteConfig(
        tests="long_context",
        long_context_corpus=str(corpus),
        long_context_length=40,
        long_context_unit="words",
        long_context_passages=2,
    )
    sampler = passage_sampler(lm, cfg)
    fam = build_probes(cases[0], lm, cfg, sampler=sampler)
    probes = fam["long_context"]
    assert len(probes) == 2
    text = cases[0].request.text
    for p in probes:
        assert p.prompt.endswith(" " + text)
        prefix = p.prompt[: -len(text) - 1]
        assert len(prefix.split()) == 40
        assert p.target == cases[0].request.target_new
        assert p.meta["unit"] == "words" and p.meta["length"] == 40
    # seeded per case: the same again, different for another case
    again = build_probes(cases[0], lm, cfg, sampler=sampler)["long_context"]
    assert [p.prompt for p in again] == [p.prompt for p in probes]
    other = build_probes(cases[1], lm, cfg, sampler=sampler)["long_context"]
    assert other[0].prompt != probes[0].prompt
    assert "=" not in probes[0].prompt  # headings dropped


def test_long_context_tokens_length(lm, cases, corpus):
    cfg = SuiteConfig(tests="long_context", long_context_corpus=str(corpus), long_context_length=64)
    (probe,) = build_probes(cases[0], lm, cfg)["long_context"]
    text = cases[0].request.text
    prefix = probe.prompt[: -len(text) - 1]
    n = len(lm.tokenizer(prefix, add_special_tokens=False)["input_ids"])
    assert abs(n - 64) <= 4  # decoded and whitespace-normalised, then re-tokenised


def test_long_context_without_corpus_warns(lm, cases, tmp_path, monkeypatch):
    monkeypatch.setenv("REPEDIT_DATA", str(tmp_path / "nothing-here"))
    cfg = SuiteConfig(tests="long_context")
    with pytest.warns(UserWarning, match="long-context corpus not found"):
        fam = build_probes(cases[0], lm, cfg)
    assert fam["long_context"] == []


def test_long_context_disabled_by_selection_does_not_warn(lm, cases, monkeypatch, tmp_path):
    monkeypatch.setenv("REPEDIT_DATA", str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fam = build_probes(cases[0], lm, SuiteConfig(tests="efficacy,neighbourhood"))
    assert set(fam) == {"efficacy", "neighbourhood"}


def test_parse_tests():
    assert parse_tests("all") == TESTS
    assert parse_tests(None) == TESTS
    assert parse_tests("neighbourhood, efficacy") == ("efficacy", "neighbourhood")
    assert parse_tests(["locality", "scrambled"]) == ("scrambled_subject", "neighbourhood")
    with pytest.raises(InvalidRequestError, match="unknown test"):
        parse_tests("efficacy,bogus")
    with pytest.raises(InvalidRequestError):
        SuiteConfig(long_context_unit="lines")  # type: ignore[arg-type]


def test_flat_spans_cover_all_probes(lm, cases):
    cp = CaseProbes("143", build_probes(cases[0], lm, _no_long()))
    flat = cp.flat
    covered = []
    for test, (lo, hi) in cp.spans.items():
        assert all(p.test == test for p in flat[lo:hi])
        covered += list(range(lo, hi))
    assert covered == list(range(len(flat)))


def test_fluency_prompts_and_score(lm):
    case = EditCase(
        EditRequest("{} is located in", "Slovenia", "Asia", "Europe", "x"),
        neighbourhood=[Neighbour("Austria is located in", "Europe")],
    )
    assert fluency_prompts(case) == ["Slovenia is located in"]
    case.generation_prompts = ["Slovenia is", "Slovenia has"]
    assert fluency_prompts(case, SuiteConfig(fluency_samples=3)) == [
        "Slovenia is",
        "Slovenia has",
        "Slovenia is",
    ]
    cfg = SuiteConfig(fluency_samples=2, fluency_tokens=8)
    a = case_fluency(lm, case, cfg)
    b = case_fluency(lm, case, cfg)
    assert a["n"] == 2 and len(a["texts"]) == 2
    assert a["texts"] == b["texts"]  # seeded per case
    assert a["entropy"] == pytest.approx(sum(a["scores"]) / 2)
    assert case_fluency(lm, case, SuiteConfig(fluency_samples=0))["n"] == 0

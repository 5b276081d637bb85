"""Typed case variants: spans, halves, the no-leakage rule between REP's training forms and the
evaluation's held-out probes, look-alike subjects, and length buckets."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from repedit.data import EditCase, EditRequest, PassageSampler, load_cases
from repedit.data.augment import (
    AUGMENT_KINDS,
    Forbidden,
    augment_forms,
    fold,
    is_reordering,
    probe_texts,
)
from repedit.data.case import Neighbour
from repedit.data.variants import (
    NearSubjects,
    case_variants,
    normalise,
    scrambled_subjects,
    training_forms,
)
from repedit.evaluation.probes import SuiteConfig, build_probes, case_keys
from repedit.models.batching import fits_width, length_buckets
from repedit.models.tiny import tiny_loaded, tiny_tokenizer
from repedit.rep import RepConfig
from repedit.rep.variants import build_pool, rep_items

CASES = Path(__file__).parents[1] / "golden" / "analysis" / "cases.json"
CONTEXTS = ["{}", "The capital of France is Paris. {}"]


@pytest.fixture(scope="module")
def lm():
    return tiny_loaded("llama")


@pytest.fixture(scope="module")
def cases():
    return load_cases(str(CASES), id_split=2).cases


@pytest.fixture(scope="module")
def sampler(lm, tmp_path_factory: pytest.TempPathFactory) -> PassageSampler:
    rng = random.Random(0)
    words = [
        "the",
        "of",
        "river",
        "city",
        "king",
        "music",
        "school",
        "war",
        "team",
        "Paris",
        "Berlin",
        "Japan",
    ]
    text = "\n".join(" ".join(rng.choice(words) for _ in range(50)) for _ in range(20))
    path = tmp_path_factory.mktemp("variants") / "corpus.txt"
    path.write_text(text)
    return PassageSampler.from_file(path, length=20, unit="tokens", tokenizer=lm.tokenizer)


def test_every_variant_points_at_its_subject(lm, cases, sampler) -> None:
    for case, key in zip(cases, case_keys(cases), strict=True):
        vs = case_variants(case, lm.tokenizer, key=key, sampler=sampler, train_passages=2)
        assert vs[0].kind == "original" and vs[0].half == "edit"
        assert vs[0].text == case.request.text
        for v in vs:
            if v.subject_span is not None:
                a, b = v.subject_span
                assert v.text[a:b] == v.subject
                assert v.template.format(v.subject) == v.text
        halves = {(v.kind, v.half) for v in vs}
        assert ("ood_subject_paraphrase", "train") not in halves
        assert ("long_context", "train") in halves and ("long_context", "heldout") in halves


def _heldout_probe_texts(case, lm, key, sampler) -> set[str]:
    suite = SuiteConfig(long_context_length=20, long_context_passages=1)
    fams = build_probes(case, lm, suite, sampler=sampler, key=key)
    held = [p.prompt for p in fams["ood_subject_paraphrase"]]
    held += [p.prompt for p in fams["scrambled_subject"] if p.meta["half"] == "ood"]
    held += [p.prompt for p in fams["long_context"]]
    return {normalise(t) for t in held}


def _pool_texts(lm, case, key, sampler) -> set[str]:
    cfg = RepConfig(n_long=3, long_context_length=20, long_context_unit="tokens")
    pool = build_pool(lm, rep_items([case], [key]), CONTEXTS, cfg, sampler=sampler)
    return {normalise(ex.text) for ex in pool.all_examples()}


def test_no_form_rep_trains_on_is_a_heldout_probe(lm, cases, sampler) -> None:
    for case, key in zip(cases, case_keys(cases), strict=True):
        held = _heldout_probe_texts(case, lm, key, sampler)
        assert held, "the fixture cases have held-out probes"
        assert not held & _pool_texts(lm, case, key, sampler)


def test_a_colliding_training_form_is_dropped_not_shared(lm, sampler) -> None:
    # the in-domain paraphrase is spelt like the held-out one: REP must not train on it
    req = EditRequest("{} is located in", "Eiffel Tower", "Rome", "Paris", "c1")
    case = EditCase(req, subject_paraphrases=["the  Tower", "the Tower"], id_split=1)
    vs = case_variants(case, lm.tokenizer, key="c1")
    assert [v.subject for v in vs if v.kind == "subject_paraphrase"] == ["the  Tower"]
    assert not [v for v in training_forms(vs) if v.kind == "subject_paraphrase"]
    held = _heldout_probe_texts(case, lm, "c1", sampler)
    assert "the Tower is located in" in held
    assert not held & _pool_texts(lm, case, "c1", sampler)


#: every kind, and more forms per kind than any kind has, so every candidate is tried
ALL_AUGMENTS = {"augment": AUGMENT_KINDS, "n_augment": 1000}


def _probe_sets(case, lm, key, sampler, near) -> tuple[set[str], str]:
    """The folded texts and subjects of every evaluation probe of ``case`` but the edit prompt,
    and the edit prompt's text (compared without case folding: a ``case`` form differs from
    the subject in case only)."""
    suite = SuiteConfig(long_context_length=20, long_context_passages=2)
    fams = build_probes(case, lm, suite, sampler=sampler, key=key, near=near)
    texts = {fold(p.prompt) for fam, ps in fams.items() if fam != "efficacy" for p in ps}
    texts |= {fold(p.meta["subject"]) for p in fams["near_subject"]}
    texts |= {fold(s) for s in case.subject_paraphrases}
    held = [v.subject for v in case_variants(case, lm.tokenizer, key=key)]
    texts |= {fold(s) for s in held if normalise(s) != normalise(case.request.subject)}
    return texts, normalise(fams["efficacy"][0].prompt)


def _check_augments(lm, cases, sampler, *, pool_every: int) -> tuple[int, int]:
    """No generated form or training sequence is a probe of its case; returns how many forms
    were kept and how many the filter dropped."""
    near = NearSubjects(cases, lm.tokenizer)
    cfg = RepConfig(n_long=2, long_context_length=20, long_context_unit="tokens", **ALL_AUGMENTS)
    made = dropped = 0
    for i, (case, key) in enumerate(zip(cases, case_keys(cases), strict=True)):
        probes, efficacy = _probe_sets(case, lm, key, sampler, near)
        subject = case.request.subject
        variants = case_variants(case, lm.tokenizer, key=key, sampler=sampler, passages=2)
        forms = augment_forms(
            subject, AUGMENT_KINDS, 1000, tokenizer=lm.tokenizer, key=key,
            forbidden=Forbidden(subject, probe_texts(variants), near.subjects),
        )  # fmt: skip
        pieces = [lm.tokenizer.decode([t]) for t in lm.tokenizer(subject)["input_ids"]]
        pieces = ["".join(p.split()).casefold() for p in pieces if p.strip()]
        for f in forms:
            assert fold(f.text) not in probes, (key, f)
            assert not is_reordering(f.text, subject, pieces), (key, f)
        made += len(forms)
        dropped += len(augment_forms(subject, AUGMENT_KINDS, 1000, tokenizer=lm.tokenizer, key=key))
        dropped -= len(forms)
        if i % pool_every:
            continue
        pool = build_pool(
            lm, rep_items([case], [key]), CONTEXTS, cfg, sampler=sampler,
            exclude_subjects=near.subjects,
        )  # fmt: skip
        augmented = [ex for ex in pool.positives if ex.kind == "augment"]
        assert augmented or not forms
        for ex in augmented:
            assert fold(ex.text) not in probes and normalise(ex.text) != efficacy, (key, ex.text)
    return made, dropped


def test_no_generated_form_is_a_probe(lm, cases, sampler) -> None:
    assert _check_augments(lm, cases, sampler, pool_every=1)[0] > 0


def test_no_generated_form_is_a_probe_on_rep_counterfact(lm, sampler, shared_data) -> None:
    path = shared_data / "rep" / "valid.counterfact_para_prompt_para_subject.json"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    cases = load_cases(str(path), n=150).cases
    made, dropped = _check_augments(lm, cases, sampler, pool_every=15)
    assert made > 10 * len(cases) and dropped > 0  # real collisions exist and are removed


def test_forced_collisions_are_filtered_from_the_pool(lm) -> None:
    # the probes and a look-alike spell forms of several kinds, up to case and spaces
    req = EditRequest("{} was born in", "Steve Jobs", "Paris", "San Francisco", "c1")
    case = EditCase(
        req,
        subject_paraphrases=["the Steve Jobs", "Steve  Jobs,", "S. Jobs", "SJ", "STEVE-JOBS"],
        id_split=1,
    )
    lookalike = EditCase(EditRequest("{} was founded in", "jobs", "x", "Cupertino", "c2"))
    near = NearSubjects([case, lookalike], lm.tokenizer)
    clashes = ("the Steve Jobs", "Steve Jobs,", "S. Jobs", "SJ", "Steve-Jobs", "Jobs")
    unfiltered = augment_forms("Steve Jobs", AUGMENT_KINDS, 1000, tokenizer=lm.tokenizer)
    assert {fold(c) for c in clashes} <= {fold(f.text) for f in unfiltered}
    cfg = RepConfig(long_context=False, **ALL_AUGMENTS)
    items = rep_items([case], ["c1"])
    pools = {
        "free": build_pool(lm, items, CONTEXTS, cfg),
        "near": build_pool(lm, items, CONTEXTS, cfg, exclude_subjects=near.subjects),
    }
    texts = {
        name: {fold(ex.text) for ex in pool.positives if ex.kind == "augment"}
        for name, pool in pools.items()
    }
    probes, _ = _probe_sets(case, lm, "c1", None, near)
    assert fold("Jobs") in probes  # the look-alike is a near_subject probe ...
    assert fold("Jobs was born in") in texts["free"]  # ... only the look-alike list removes
    assert fold(req.subject) in near.subjects  # the edited subject is no look-alike of itself:
    assert fold("steve jobs was born in") in texts["near"]  # its case forms stay
    for form in clashes:
        assert fold(f"{form} was born in") not in texts["near"], form
    assert texts["near"] and not texts["near"] & probes


def test_few_permutations_give_fewer_training_scrambles(lm) -> None:
    tok = tiny_tokenizer()
    subject = next(
        s
        for s in ("Paris", "Berlin", "Japan", "Rome", "Italy")
        if len(tok(s, add_special_tokens=False)["input_ids"]) == 2
    )
    assert len(scrambled_subjects(subject, tok)) == 1
    case = EditCase(EditRequest("{} is a city in", subject, "Asia", "Europe", "k"))
    vs = case_variants(case, tok, key="k")
    train = [v for v in training_forms(vs) if v.kind == "scrambled_subject"]
    held = [v for v in vs if v.kind == "scrambled_subject" and v.half == "heldout"]
    assert len(train) == 1 and not held


def test_near_subjects_are_other_cases_sharing_tokens(lm, cases) -> None:
    near = NearSubjects(cases, lm.tokenizer)
    slovenia = next(c for c in cases if c.request.subject == "Slovenia")
    found = near.lookalikes(slovenia, 5, key="4")
    subjects = [c.request.subject for c, _ in found]
    assert "Slovakia" in subjects and "Slovenia" not in subjects
    for other, shared in found:
        assert shared and set(shared) <= near.pieces(other.request.subject)
        assert set(shared) <= near.pieces("Slovenia")
    fams = build_probes(slovenia, lm, SuiteConfig(tests="near_subject"), near=near, key="4")
    probes = fams["near_subject"]
    assert [p.meta["subject"] for p in probes] == subjects
    slovakia = next(p for p in probes if p.meta["subject"] == "Slovakia")
    assert slovakia.prompt == "The official language of Slovakia is"
    assert slovakia.target == "Slovak" and slovakia.alt is None
    assert build_probes(slovenia, lm, SuiteConfig(tests="near_subject"))["near_subject"] == []


def test_near_subjects_skip_the_edited_subjects_own_forms(lm) -> None:
    a = EditCase(
        EditRequest("{} is in", "Slovenia", "Asia", "Europe", "a"),
        subject_paraphrases=["Slovenija"],
        neighbourhood=[Neighbour("x", "y")],
    )
    b = EditCase(EditRequest("{} borders", "Slovenija", "Peru", "Italy", "b"))
    c = EditCase(EditRequest("{} borders", "Slovakia", "Peru", None, "c"))  # no true answer
    assert NearSubjects([a, b, c], lm.tokenizer).lookalikes(a, 5) == []


def test_length_buckets_cover_every_index_once_and_respect_limits() -> None:
    rng = random.Random(1)
    lengths = [rng.choice([3, 5, 12, 40, 41, 300, 700]) for _ in range(60)]
    for kwargs in ({}, {"max_rows": 4}, {"max_tokens": 800}):
        buckets = length_buckets(lengths, **kwargs)
        flat = sorted(i for b in buckets for i in b)
        assert flat == list(range(len(lengths)))
        for b in buckets:
            widths = [lengths[i] for i in b]
            assert widths == sorted(widths)
            assert fits_width(widths[0], widths[-1])
            if "max_rows" in kwargs:
                assert len(b) <= kwargs["max_rows"]
            if "max_tokens" in kwargs and len(b) > 1:
                assert widths[-1] * len(b) <= kwargs["max_tokens"]
    assert length_buckets([]) == []
    with pytest.raises(ValueError):
        length_buckets([1], max_rows=0)

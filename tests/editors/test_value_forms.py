"""The value-side robustness option: off by default and then without effect, on it adds the
subject's training-half scrambles and corpus-passage prefixes as scored rows, and none of those
rows is an evaluation probe of the case."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import repedit.editors.values as values_module
from repedit.data.case import EditCase, EditRequest
from repedit.data.loaders import DATA_ENV, PASSAGE_CORPUS
from repedit.data.variants import scrambled_subjects, split_half
from repedit.editors import ValueHparams
from repedit.editors.value_forms import (
    TARGET_ROOM,
    Form,
    fit_passage,
    robust_forms,
    training_passages,
    training_scrambles,
)
from repedit.editors.values import _build, _training_forms, optimise_values
from repedit.errors import InvalidRequestError
from repedit.evaluation.probes import SuiteConfig, build_probes
from repedit.models.tiny import tiny_loaded
from repedit.models.tokens import prompt_ids

#: subjects of four to six tokens on the tiny tokenizer: several scrambles in each half
REQUESTS = (
    EditRequest("{} is located in", "The Eiffel Tower", "Italy", "France", case_id="eiffel"),
    EditRequest("{} was founded in", "Toyota Motor Corporation", "Europe", case_id="toyota"),
)
CONTEXTS = ("{}", "Rome. {}")
HP = ValueHparams(steps=4, stop_prob=1.0, batching="fixed")  # one row build per call


@pytest.fixture
def corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data directory whose passage corpus is 2000 numbered words (passages are traceable)."""
    path = tmp_path / PASSAGE_CORPUS
    path.parent.mkdir(parents=True)
    path.write_text("\n".join(" ".join(f"w{i * 10 + j}" for j in range(10)) for i in range(200)))
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    return path


def test_defaults_are_off_and_build_the_same_batch() -> None:
    lm = tiny_loaded("llama")
    hp = ValueHparams()
    assert hp.robust_forms == 0 and hp.robust_prefix_lengths == ()
    assert _training_forms(lm, REQUESTS, hp, None) is None
    plain = _build(lm, REQUESTS, CONTEXTS, hp.kl_prompts, "last")
    empty = _build(lm, REQUESTS, CONTEXTS, hp.kl_prompts, "last", [[], []])
    for name in plain.__dataclass_fields__:
        assert torch.equal(getattr(plain, name), getattr(empty, name)), name


def test_forms_become_scored_rows_of_their_request() -> None:
    lm = tiny_loaded("llama")
    forms = [[Form("Rome. " + REQUESTS[0].prompt, "Eiffel The Tower")], []]
    plain = _build(lm, REQUESTS, CONTEXTS, HP.kl_prompts, "last")
    b = _build(lm, REQUESTS, CONTEXTS, HP.kl_prompts, "last", forms)
    assert b.ids.shape[0] == plain.ids.shape[0] + 1
    row = len(CONTEXTS)  # request 0: its contexts, then its form
    assert int(b.owner[row]) == 0
    text = lm.tokenizer.decode(b.ids[row][b.mask[row].bool()])
    assert "Rome. Eiffel The Tower is located in" in text
    n_target = int((plain.target_rows == 0).sum())
    assert int((b.target_rows == row).sum()) == n_target  # the whole target is scored there
    assert int(b.kl_rows[0]) == row + 1


def test_option_on_puts_scrambles_and_passages_in_the_loss(
    corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lm = tiny_loaded("llama")
    seen: list = []
    real = values_module._build

    def spy(*args, **kwargs):
        b = real(*args, **kwargs)
        seen.append(b)
        return b

    monkeypatch.setattr(values_module, "_build", spy)
    on = dataclasses.replace(HP, robust_forms=2, robust_prefix_lengths=(5, 40))
    plain = optimise_values(lm, REQUESTS, CONTEXTS, layer=1, site="mlp", hp=HP)
    robust = optimise_values(lm, REQUESTS, CONTEXTS, layer=1, site="mlp", hp=on)
    rows_plain, rows_on = (b.ids.shape[0] for b in seen)
    assert rows_on == rows_plain + 2 * (2 + 2)
    texts = [
        lm.tokenizer.decode(ids[m.bool()]) for ids, m in zip(seen[1].ids, seen[1].mask, strict=True)
    ]
    for req in REQUESTS:
        for s in training_scrambles(req, lm.tokenizer, 2):
            assert any(req.prompt.format(s) in t for t in texts), s
    passage_rows = [t for t in texts if t.split()[0][:1] == "w" and t.split()[0][1:].isdigit()]
    assert len(passage_rows) == 2 * 2  # one passage row per length and request
    assert not torch.equal(plain.delta, robust.delta)


def test_no_robustness_row_is_an_evaluation_probe(corpus: Path) -> None:
    lm = tiny_loaded("llama")
    for req in REQUESTS:
        case = EditCase(req, subject_paraphrases=["Eiffel", "Tower of Paris"], id_split=1)
        cfg = SuiteConfig(long_context_unit="words", long_context_length=40)
        probes = build_probes(case, lm, cfg)
        held_out = {
            p.meta["subject"] for p in probes["scrambled_subject"] if p.meta["half"] == "ood"
        }
        in_domain = {
            p.meta["subject"] for p in probes["scrambled_subject"] if p.meta["half"] == "id"
        }
        assert held_out and in_domain
        forms = robust_forms(lm, req, scrambles=100, prefix_lengths=(40, 300))
        subjects = {f.subject for f in forms} - {req.subject}
        assert subjects == in_domain  # asking for more than the half never reaches past it
        assert not subjects & set(case.ood_paraphrases)
        # every probe but the in-domain scrambles (REP's rule: the suite reports those apart)
        held = [p for family in probes.values() for p in family if p.meta.get("half") != "id"]
        prompts = {p.prompt for p in held}
        assert len(prompts) > len(held_out)
        rows = {f.template.replace("{{", "{").replace("}}", "}").format(f.subject) for f in forms}
        assert not rows & prompts
        test_passage = probes["long_context"][0].prompt[: -len(req.text) - 1]
        assert len(test_passage.split()) == 40
        for f in forms:
            if f.subject == req.subject:  # a passage row: not the test passage, nor inside it
                assert not f.template.startswith(test_passage)
                assert f.template[: -len(req.prompt) - 1] not in test_passage


def test_scrambles_are_the_suite_half_for_its_defaults() -> None:
    lm = tiny_loaded("llama")
    req = REQUESTS[1]
    every = scrambled_subjects(req.subject, lm.tokenizer, n_max=10, seed=0, key="toyota")
    assert training_scrambles(req, lm.tokenizer, 3) == split_half(every)[0][:3]


def test_missing_corpus_warns_and_adds_no_passage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    lm = tiny_loaded("llama")
    with pytest.warns(UserWarning, match="corpus not found"):
        forms = robust_forms(lm, REQUESTS[0], scrambles=0, prefix_lengths=(10,))
    assert forms == []


@pytest.mark.parametrize(
    ("field", "value"),
    [("robust_forms", -1), ("robust_paraphrases", -1), ("robust_prefix_lengths", (10, 0))],
)
def test_bad_robustness_settings_are_rejected(field: str, value: object) -> None:
    with pytest.raises(InvalidRequestError, match=field):
        ValueHparams(**{field: value})


def test_paraphrase_rows_come_from_the_request_and_only_its_in_domain_half() -> None:
    """``robust_paraphrases=N`` adds the first N ``subject_forms``; a case fills those with its
    in-domain paraphrases, so a held-out one never becomes a training row."""
    lm = tiny_loaded("llama")
    case = EditCase(
        REQUESTS[0], subject_paraphrases=["Eiffel", "Paris tower", "La Tour Eiffel"], id_split=2
    )
    req = case.edit_request
    assert req.subject_forms == ("Eiffel", "Paris tower")
    assert req.identity() == REQUESTS[0].to_dict()  # the same fact
    forms = robust_forms(lm, req, scrambles=0, paraphrases=5, prefix_lengths=())
    assert forms == [Form(req.prompt, "Eiffel"), Form(req.prompt, "Paris tower")]
    assert robust_forms(lm, req, scrambles=0, paraphrases=1, prefix_lengths=()) == forms[:1]
    assert robust_forms(lm, REQUESTS[0], scrambles=0, paraphrases=3, prefix_lengths=()) == []
    hp = dataclasses.replace(HP, robust_paraphrases=2)
    rows = _training_forms(lm, [req, REQUESTS[1]], hp, None)
    assert rows == [forms, []]


def test_subject_forms_change_nothing_while_the_option_is_off() -> None:
    """Carrying forms is not using them: the same value with and without them."""
    lm = tiny_loaded("llama")
    with_forms = dataclasses.replace(REQUESTS[0], subject_forms=("Eiffel",))
    a = optimise_values(lm, [REQUESTS[0]], CONTEXTS, layer=1, site="mlp", hp=HP)
    b = optimise_values(lm, [with_forms], CONTEXTS, layer=1, site="mlp", hp=HP)
    assert torch.equal(a.delta, b.delta)
    on = dataclasses.replace(HP, robust_paraphrases=1)
    c = optimise_values(lm, [with_forms], CONTEXTS, layer=1, site="mlp", hp=on)
    assert not torch.equal(a.delta, c.delta)


def test_a_passage_longer_than_the_model_reads_is_cut_from_its_front(corpus: Path) -> None:
    lm = tiny_loaded("llama")
    limit = lm.max_positions
    assert limit == 512  # the tiny models' position table
    req = REQUESTS[0]
    (row,) = [f for f in robust_forms(lm, req, scrambles=0, prefix_lengths=(1000,))]
    passage = row.template[: -len(req.prompt) - 1]
    whole = training_passages(req, (1000,))[0]
    assert whole.endswith(passage) and len(passage.split()) < 1000
    tokens = len(prompt_ids(lm.tokenizer, passage + " " + req.text))
    assert limit - TARGET_ROOM - 10 < tokens <= limit - TARGET_ROOM  # the longest that fits
    assert fit_passage(lm, "w1 w2 w3", req.text) == "w1 w2 w3"  # fits: unchanged


def test_no_position_limit_keeps_the_passage(monkeypatch: pytest.MonkeyPatch) -> None:
    assert tiny_loaded("gpt2").max_positions == 512  # read from ``n_positions`` there
    lm = tiny_loaded("llama")
    monkeypatch.setattr(type(lm), "max_positions", property(lambda self: None))
    long = " ".join(f"w{i}" for i in range(5000))
    assert fit_passage(lm, long, REQUESTS[0].text) == long

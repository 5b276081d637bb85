"""load_cases: every record layout, name resolution, malformed records, the ID/OOD split."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from repedit.data import EditCase, load_cases
from repedit.data.loaders import (
    DATA_ENV,
    DATASETS,
    PASSAGE_CORPUS,
    dataset_names,
    passage_corpus,
    resolve_data_dir,
)
from repedit.errors import DataError, RepeditError

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def _shared_data() -> Path | None:
    """The research data: $REPEDIT_DATA, else the ``shared`` folder beside the checkout."""
    env = os.environ.get(DATA_ENV)
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2].parent / "shared" / "data")
    return next((c for c in candidates if (c / "rep").is_dir()), None)


SHARED = _shared_data()
needs_shared = pytest.mark.skipif(SHARED is None, reason="shared research data not present")


def _write(tmp_path: Path, records: object, name: str = "data.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def _rep_record(**over: object) -> dict:
    rec = {
        "case_id": 1,
        "prompt": "Slovenia is located in the continent of",
        "target_new": "Antarctica",
        "target_true": "Europe",
        "subject": "Slovenia",
        "rephrase_prompt": ["Slovenia lies in"],
        "rephrase_target": "Antarctica",
        "locality_prompt": ["Austria is located in the continent of"],
        "locality_ground_truth": "Europe",
        "subject_rephrase": [f"Slovenia form {i}" for i in range(10)],
    }
    rec.update(over)
    return rec


# --- layouts, on hand-written fixtures -------------------------------------------------------


def test_rome_counterfact_fixture() -> None:
    res = load_cases(FIXTURES / "rome_counterfact.json")
    assert res.format == "rome-counterfact"
    assert [c.case_id for c in res.cases] == ["0", "1", "7"]
    c = res.cases[0]
    assert c.request.prompt == "The mother tongue of {} is"
    assert c.request.subject == "Danielle Darrieux"
    assert (c.request.target_new, c.request.target_true) == ("English", "French")
    assert c.request.text == "The mother tongue of Danielle Darrieux is"
    assert len(c.prompt_paraphrases) == 2
    assert [nb.target for nb in c.neighbourhood] == ["French"] * 3
    assert c.neighbourhood[1].prompt == "Jacques Chirac is a native speaker of"
    assert c.generation_prompts[0] == "Danielle Darrieux's mother tongue is"
    assert c.source == "rome_counterfact.json:0"
    assert c.subject_paraphrases == []
    # the unchanged edit prompt and duplicates are not paraphrases
    assert res.cases[1].prompt_paraphrases == ["Slovenia belongs to the continent of"]
    # braces in a subject survive: the slot is filled, not re-parsed
    assert res.cases[2].request.text == "Windows {Server} 2003, developed by"
    assert res.path == FIXTURES / "rome_counterfact.json"
    expected = hashlib.sha256((FIXTURES / "rome_counterfact.json").read_bytes()).hexdigest()
    assert res.sha256 == expected


def test_mend_zsre_mem_eval_fixture() -> None:
    res = load_cases(FIXTURES / "zsre_mem-eval.json")
    assert res.format == "mend-zsre"
    assert [c.case_id for c in res.cases] == ["0", "1", "2"]
    c = res.cases[0]
    assert c.request.prompt == "What university did {} attend?"
    assert c.request.target_new == "University of Michigan"
    assert c.request.target_true == "Illinois Institute of Technology"
    assert c.prompt_paraphrases == ["What university did Watts Humphrey take part in?"]
    assert c.neighbourhood[0].prompt.startswith("nq question: ")
    assert c.neighbourhood[0].target == "Hugo Weaving"
    # leading space on a target is stripped; answers[0] is the true object
    assert res.cases[1].request.target_new == "Lecanorales"
    assert res.cases[1].request.target_true == "Lecanorales"
    # a rephrase identical to the edit prompt is no paraphrase
    assert res.cases[1].prompt_paraphrases == []
    assert res.cases[2].source == "zsre_mem-eval.json:2"


def test_rep_fixture() -> None:
    res = load_cases(FIXTURES / "rep_counterfact.json")
    assert res.format == "rep"
    a, b, c = res.cases
    assert a.request.prompt == "{} is located in the continent of"
    # deduplicated, whitespace variants of the edit prompt excluded, order kept
    assert a.prompt_paraphrases == [
        "Slovenia lies on the continent of",
        "Ljubljana is the capital of Slovenia, which is in",
    ]
    assert (a.neighbourhood[0].prompt, a.neighbourhood[0].target) == (
        "Austria is located in the continent of",
        "Europe",
    )
    assert len(a.subject_paraphrases) == 10
    assert a.id_paraphrases == a.subject_paraphrases[:5]
    assert a.ood_paraphrases[-1] == "Slovenia"  # data quirk kept: the subject itself
    # zsRE-style record: null rephrase list, one "nq question" neighbour, stripped target
    assert b.prompt_paraphrases == []
    assert b.request.target_new == "Jan Bartels"
    assert b.neighbourhood[0].target == "Ja'Net DuBois"
    # braces in the prompt text are escaped, the subject slot is the first occurrence
    assert c.request.text == "The mother tongue of {Danielle} Darrieux is"
    assert c.neighbourhood == []


def test_empty_subject_paraphrases_never_cross_the_split() -> None:
    b = load_cases(FIXTURES / "rep_counterfact.json").cases[1]
    # raw: 0..4 in-domain with index 2 empty; 5..9 held out with index 9 empty
    assert b.id_paraphrases == [
        "The Lahti rifle",  # "\n" collapsed
        "The L-39 anti-tank rifle",
        "Lahti's L-39",
        "The Finnish L-39",
    ]
    assert b.ood_paraphrases == [
        "The Norsupyssy",
        "The elephant gun L-39",
        "The Lahti 20 mm rifle",
        "The L-39 by Lahti",
    ]


def test_easyedit_counterfact_fixture() -> None:
    res = load_cases(FIXTURES / "easyedit_counterfact.json")
    assert res.format == "easyedit-counterfact"
    a, b, _ = res.cases
    assert a.request.prompt == "The mother tongue of {} is"
    assert (a.request.target_new, a.request.target_true) == ("English", "French")
    assert a.prompt_paraphrases == ["Danielle Darrieux grew up speaking"]
    assert a.neighbourhood[0].target == "French"
    assert b.prompt_paraphrases == []  # the rephrase equals the prompt
    assert res.cases[2].request.prompt == "{} was created by"  # first occurrence of "Apple A5"


@pytest.mark.parametrize("id_split", [0, 3, 5, 10])
def test_id_split_is_configurable(id_split: int) -> None:
    a = load_cases(FIXTURES / "rep_counterfact.json", id_split=id_split).cases[0]
    assert a.id_split == id_split
    assert a.id_paraphrases + a.ood_paraphrases == a.subject_paraphrases
    assert len(a.id_paraphrases) == min(id_split, 10)


def test_n_takes_first_valid_cases(tmp_path: Path) -> None:
    recs = [_rep_record(case_id=i) for i in range(5)]
    recs[1]["target_new"] = ""
    path = _write(tmp_path, recs)
    res = load_cases(path, n=3, skip_invalid=True)
    assert [c.case_id for c in res.cases] == ["0", "2", "3"]
    assert len(res.skipped) == 1
    assert load_cases(path, n=0).cases == []
    assert [c.case_id for c in load_cases(path, n=1).cases] == ["0"]  # stops before the bad one


# --- malformed records -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ({"subject": "Croatia"}, "does not occur"),
        ({"target_new": "  "}, "target_new"),
        ({"target_new": 3}, "target_new"),
        ({"subject_rephrase": "one string"}, None),
        ({"subject_rephrase": [1, 2]}, "subject_rephrase"),
        ({"locality_prompt": ["x"], "locality_ground_truth": ""}, "locality_ground_truth"),
        ({"rephrase_prompt": {"a": 1}}, "rephrase_prompt"),
    ],
)
def test_malformed_record_names_file_index_and_case(
    tmp_path: Path, override: dict, needle: str | None
) -> None:
    recs = [_rep_record(case_id=10), _rep_record(case_id=11, **override)]
    path = _write(tmp_path, recs, "bad.json")
    if needle is None:  # a bare string is accepted as a one-element list
        assert len(load_cases(path).cases) == 2
        return
    with pytest.raises(DataError) as err:
        load_cases(path)
    msg = str(err.value)
    assert "bad.json" in msg and "record 1" in msg and "case_id 11" in msg
    assert needle in msg
    res = load_cases(path, skip_invalid=True)
    assert [c.case_id for c in res.cases] == ["10"]
    assert len(res.skipped) == 1 and "record 1" in res.skipped[0]


def test_missing_field_and_non_object(tmp_path: Path) -> None:
    rec = _rep_record()
    del rec["target_true"]
    path = _write(tmp_path, [_rep_record(), rec, "not a record"])
    with pytest.raises(DataError, match=r"record 1 \(case_id 1\): missing field 'target_true'"):
        load_cases(path)
    res = load_cases(path, skip_invalid=True)
    assert len(res.cases) == 1 and len(res.skipped) == 2
    assert "record 2" in res.skipped[1] and "str" in res.skipped[1]


def test_malformed_without_case_id_names_index(tmp_path: Path) -> None:
    recs = json.loads((FIXTURES / "zsre_mem-eval.json").read_text())
    recs[2]["answers"] = []
    path = _write(tmp_path, recs, "zs.json")
    with pytest.raises(DataError, match=r"zs\.json: record 2: .*answers"):
        load_cases(path)


def test_rome_malformed(tmp_path: Path) -> None:
    recs = json.loads((FIXTURES / "rome_counterfact.json").read_text())
    recs[1]["requested_rewrite"]["prompt"] = "No slot here"
    recs[2]["requested_rewrite"]["target_new"] = {"id": "Q1"}
    path = _write(tmp_path, recs, "cf.json")
    with pytest.raises(DataError, match=r"record 1 \(case_id 1\)"):
        load_cases(path)
    res = load_cases(path, skip_invalid=True)
    assert [c.case_id for c in res.cases] == ["0"]
    assert "'str'" in res.skipped[1]


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("{not json", "not valid JSON"),
        ('{"a": 1}', "JSON array"),
        ("[]", "no records"),
        ('[{"foo": 1}]', "unknown record layout"),
        ("[1, 2]", "JSON objects"),
    ],
)
def test_bad_files(tmp_path: Path, content: str, needle: str) -> None:
    path = tmp_path / "x.json"
    path.write_text(content)
    with pytest.raises(DataError, match=needle):
        load_cases(path)


def test_bad_arguments() -> None:
    with pytest.raises(DataError):
        load_cases("demo", n=-1)
    with pytest.raises(DataError):
        load_cases("demo", id_split=-1)


# --- names and paths -------------------------------------------------------------------------


def test_names_resolve_under_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_ENV, raising=False)
    target = tmp_path / DATASETS["rep-counterfact-valid"]
    target.parent.mkdir(parents=True)
    target.write_bytes((FIXTURES / "rep_counterfact.json").read_bytes())
    assert load_cases("rep-counterfact-valid", data_dir=tmp_path).path == target
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    res = load_cases("rep-counterfact-valid")
    assert res.path == target and len(res.cases) == 3
    # a relative path is also tried under the data directory
    assert load_cases(DATASETS["rep-counterfact-valid"]).path == target


def test_resolve_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_ENV, raising=False)
    assert resolve_data_dir() is None
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert resolve_data_dir() == tmp_path
    assert resolve_data_dir(tmp_path / "x") == tmp_path / "x"


def test_passage_corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One rule for the long-context text (probes, REP, analysis, the CLI): an explicit file,
    else DATA_DIR/wikitext/wiki.test.raw, else None with where it was looked for."""
    monkeypatch.delenv(DATA_ENV, raising=False)
    assert passage_corpus() == (None, f"${DATA_ENV}/wikitext/wiki.test.raw")
    text = tmp_path / PASSAGE_CORPUS
    text.parent.mkdir()
    assert passage_corpus(None, tmp_path) == (None, str(text))  # not written yet
    text.write_text("Some text.")
    assert passage_corpus(None, tmp_path) == (text, str(text))
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert passage_corpus()[0] == text
    other = tmp_path / "other.txt"
    assert passage_corpus(other) == (None, str(other))  # an explicit file wins, even if absent
    other.write_text("More text.")
    assert passage_corpus(str(other))[0] == other


def test_missing_named_file_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_ENV, raising=False)
    with pytest.raises(DataError) as err:
        load_cases("counterfact", data_dir=tmp_path)
    msg = str(err.value)
    assert DATA_ENV in msg and "is not set" in msg
    assert str((tmp_path / "counterfact" / "counterfact-edit.json").resolve()) in msg
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    with pytest.raises(DataError) as err:
        load_cases("zsre")
    msg = str(err.value)
    assert str((tmp_path / "zsre" / "zsre_mend_train-1k.json").resolve()) in msg
    assert "is not set" not in msg


def test_named_dataset_without_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_ENV, raising=False)
    with pytest.raises(DataError, match=f"{DATA_ENV} is not set") as err:
        load_cases("rep-zsre")
    assert DATASETS["rep-zsre"] in str(err.value)


def test_unknown_spec_lists_names(tmp_path: Path) -> None:
    with pytest.raises(RepeditError, match="known names: demo, counterfact"):
        load_cases(tmp_path / "nope.json")


def test_every_name_listed() -> None:
    assert set(dataset_names()) == {
        "demo",
        "counterfact",
        "zsre",
        "rep-counterfact",
        "rep-counterfact-mistral",
        "rep-counterfact-qwen",
        "rep-counterfact-valid",
        "rep-zsre",
        "rep-zsre-mistral",
        "rep-zsre-qwen",
    }


def test_demo_needs_no_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_ENV, raising=False)
    res = load_cases("demo")
    assert res.format == "builtin" and res.path is None and res.sha256 is None
    assert len(res.cases) >= 24 and all(isinstance(c, EditCase) for c in res.cases)
    assert len(load_cases("demo", n=4).cases) == 4
    assert {c.id_split for c in load_cases("demo", id_split=3).cases} == {3}


# --- the real shared files -------------------------------------------------------------------

_SHA = {
    "counterfact": "bfe31a7081932739406e282bb625d74222549c3386c15b1df3dfbc3978c69eec",
    "zsre": "e62596101d8ed551889c26c0d2a5277f92eaef3b14416d8eaee39b04a244ab60",
    "rep-counterfact-valid": "3e825a600d8cec66c6e79ba54583bdb9e3ebe37997968376eba58bc9c3fcbdf9",
}


@needs_shared
@pytest.mark.parametrize(
    "name", [k for k in DATASETS if k.startswith("rep-")], ids=lambda s: s.replace("rep-", "")
)
def test_real_rep_files(name: str) -> None:
    res = load_cases(name, data_dir=SHARED)
    assert res.format == "rep" and res.skipped == []
    assert len(res.cases) == (100 if name.endswith("valid") else 400)
    zsre = "zsre" in name
    for c in res.cases:
        assert c.request.prompt.count("{}") == 1
        assert c.request.text.count(c.request.subject) >= 1
        assert c.request.target_new == c.request.target_new.strip() != ""
        assert c.request.text not in c.prompt_paraphrases
        assert len(set(c.prompt_paraphrases)) == len(c.prompt_paraphrases)
        assert all(p.strip() for p in c.subject_paraphrases)
        assert len(c.id_paraphrases) <= 5
        assert len(c.neighbourhood) == (1 if zsre else 10)
        if zsre:
            assert c.prompt_paraphrases == []
        else:
            assert len(c.subject_paraphrases) == 10 and len(c.id_paraphrases) == 5
    if name in _SHA:
        assert res.sha256 == _SHA[name]


@needs_shared
def test_real_counterfact() -> None:
    res = load_cases("counterfact", data_dir=SHARED)
    assert res.format == "easyedit-counterfact" and res.sha256 == _SHA["counterfact"]
    assert len(res.cases) == 10_000
    c = res.cases[0]
    assert c.case_id == "0" and c.request.prompt == "The mother tongue of {} is"
    assert c.request.target_true == "French" and c.neighbourhood[0].target == "French"
    assert c.source == "counterfact-edit.json:0"


@needs_shared
def test_real_zsre_has_two_empty_targets() -> None:
    with pytest.raises(DataError, match=r"zsre_mend_train-1k\.json: record 534: .*'alt' is empty"):
        load_cases("zsre", data_dir=SHARED)
    res = load_cases("zsre", data_dir=SHARED, skip_invalid=True)
    assert res.format == "mend-zsre" and res.sha256 == _SHA["zsre"]
    assert len(res.cases) == 998 and len(res.skipped) == 2
    c = res.cases[0]
    assert c.case_id == "0" and c.request.prompt == "What is the product made by {}?"
    assert (c.request.target_new, c.request.target_true) == ("unmanned aircraft", "uniform")
    assert c.neighbourhood[0].target == "Walter Sobchak"
    assert len(load_cases("zsre", data_dir=SHARED, n=100).cases) == 100


@needs_shared
def test_real_rep_quirk_prompt_in_rephrases_removed() -> None:
    raw = json.loads((SHARED / DATASETS["rep-counterfact"]).read_text())
    assert sum(r["prompt"] in r["rephrase_prompt"] for r in raw) > 100
    cases = load_cases("rep-counterfact", data_dir=SHARED).cases
    assert not any(c.request.text in c.prompt_paraphrases for c in cases)
    assert cases[0].case_id == "143"

"""Property tests over everything a user hands repedit: dataset files, edit requests, ``--set``
overrides, and saved edit and adapter files.

The contract, for every input: it works, or it raises a ``RepeditError`` whose message says
what is wrong; never another exception type, and never a file written. Each test names which
of the two its input class must give. Hypothesis runs derandomised with a fixed number of
examples per test, so the module is deterministic and its run time bounded.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from childproc import files_under
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from repedit.cli.common import parse_overrides
from repedit.data import EditRequest
from repedit.data.case import SUBJECT_SLOT, template_from_prompt
from repedit.data.loaders import load_cases
from repedit.editors import EDITORS, EditResult, make_editor
from repedit.errors import DataError, InvalidRequestError, RepeditError
from repedit.io import read_safetensors, write_safetensors
from repedit.models.tiny import tiny_loaded
from repedit.rep import RepConfig, load_adapters, save_adapters
from repedit.rep.adapter import make_adapters

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "fixtures"


def fuzz(n: int) -> Any:
    """Deterministic, bounded hypothesis settings (``n`` examples)."""
    return settings(
        derandomize=True,
        max_examples=n,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
#: visible text of any script, including braces, newlines and combining marks
texts = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40)
words = st.text(st.characters(blacklist_categories=("Cs", "Zs", "Cc")), min_size=1, max_size=12)


@contextlib.contextmanager
def quiet_dir() -> Iterator[Path]:
    """A scratch directory; on exit it must hold exactly what the test itself put there."""
    with tempfile.TemporaryDirectory(prefix="repedit-fuzz-") as name:
        path = Path(name)
        yield path


def _load(path: Path, **kw: Any) -> Any:
    """``load_cases``, asserting that it wrote nothing next to the file."""
    before = files_under(path.parent)
    try:
        return load_cases(path, **kw)
    finally:
        assert files_under(path.parent) == before


# ----------------------------------------------------------------------------- dataset files


@fuzz(150)
@given(doc=json_values)
def test_arbitrary_json_document(doc: Any) -> None:
    """Any JSON document: a list of records in a known layout loads, everything else is
    refused with a DataError naming the file. A top-level non-list or an empty list is
    always refused."""
    with quiet_dir() as d:
        path = d / "data.json"
        path.write_text(json.dumps(doc))
        try:
            result = _load(path)
        except DataError as exc:
            assert str(path) in str(exc) or path.name in str(exc)
            return
        assert isinstance(doc, list) and doc
        assert all(c.request.text for c in result.cases)


@fuzz(60)
@given(raw=st.binary(max_size=200))
def test_arbitrary_bytes_as_a_dataset(raw: bytes) -> None:
    """Random bytes: refused (not JSON, or not a list of records) unless they happen to spell
    a valid dataset, which 200 random bytes never do."""
    with quiet_dir() as d:
        path = d / "data.json"
        path.write_bytes(raw)
        with pytest.raises(DataError):
            _load(path)


def _templates() -> dict[str, dict[str, Any]]:
    return {
        name: json.loads((FIXTURES / f"{name}.json").read_text())[0]
        for name in ("rep_counterfact", "easyedit_counterfact", "zsre_mem-eval", "rome_counterfact")
    }


TEMPLATES = _templates()


@fuzz(200)
@given(
    layout=st.sampled_from(sorted(TEMPLATES)),
    changes=st.lists(st.tuples(st.integers(0, 30), json_values | st.just("<drop>")), max_size=3),
)
def test_records_with_fields_of_the_wrong_type(layout: str, changes: list[Any]) -> None:
    """A record of a known layout with fields replaced by arbitrary JSON or dropped: it loads
    (the change was harmless, e.g. an optional field) or is refused with a DataError that names
    the record; with ``skip_invalid`` it is skipped instead and the valid record after it loads."""
    record = json.loads(json.dumps(TEMPLATES[layout]))
    keys = sorted(record)
    for index, value in changes:
        key = keys[index % len(keys)]
        if value == "<drop>":
            record.pop(key, None)
        else:
            record[key] = value
    good = TEMPLATES[layout]
    with quiet_dir() as d:
        path = d / "data.json"
        path.write_text(json.dumps([good, record]))
        try:
            strict = _load(path)
            assert len(strict.cases) == 2
        except DataError as exc:
            assert "record 1" in str(exc)
        lenient = _load(path, skip_invalid=True)
        assert len(lenient.cases) + len(lenient.skipped) == 2
        assert lenient.cases[0].request.subject == _load(path, n=1).cases[0].request.subject


@fuzz(100)
@given(
    subject=texts.filter(str.strip),
    before=st.text(max_size=30),
    after=st.text(max_size=30),
    target=texts.filter(str.strip),
    huge=st.integers(0, 3),
    empty_lists=st.booleans(),
)
def test_valid_records_with_unicode_huge_strings_and_empty_lists_load(
    subject: str, before: str, after: str, target: str, huge: int, empty_lists: bool
) -> None:
    """A well-formed REP record whose texts are any unicode (braces, newlines, RTL, combining
    marks), up to 100k characters, with empty paraphrase lists: always loads, the subject kept
    (stripped) and the edit text equal to the stripped prompt."""
    subject = subject * (10**huge // len(subject) + 1) if huge == 3 else subject
    prompt = before + subject + after
    record = {
        "prompt": prompt,
        "subject": subject,
        "target_new": target,
        "target_true": target + "x",
        "subject_rephrase": [] if empty_lists else [subject, ""],
        "rephrase_prompt": [] if empty_lists else None,
        "locality_prompt": [],
        "locality_ground_truth": "y",
    }
    with quiet_dir() as d:
        path = d / "data.json"
        path.write_text(json.dumps([record]))
        case = _load(path).cases[0]
    assert case.request.subject == subject.strip()
    assert case.request.target_new == target.strip()
    assert case.request.text == prompt.strip()


# ----------------------------------------------------------------------------- edit requests


@fuzz(150)
@given(
    fields=st.fixed_dictionaries(
        {},
        optional={
            k: json_values
            for k in (
                "prompt",
                "subject",
                "target_new",
                "target_true",
                "case_id",
                "target",
                "ground_truth",
            )
        },
    )
)
def test_request_records_of_any_shape(fields: dict[str, Any]) -> None:
    """``EditRequest.from_dict`` on any mapping: a request, or InvalidRequestError."""
    try:
        req = EditRequest.from_dict(fields, where="fuzz")
    except InvalidRequestError as exc:
        assert str(exc)
        return
    assert req.text.count(req.subject) >= 1


@fuzz(30)
@given(record=json_values)
def test_request_records_that_are_not_mappings(record: Any) -> None:
    """A request record that is a list, a string, a number: refused."""
    if isinstance(record, dict):
        return
    with pytest.raises(InvalidRequestError):
        EditRequest.from_dict(record, where="fuzz")


@fuzz(100)
@given(prompt=st.text(max_size=30), subject=texts)
def test_prompt_templates_with_stray_braces(prompt: str, subject: str) -> None:
    """A template whose braces are not exactly one ``{}`` slot (``{x}``, ``{0}``, a lone
    ``{``) is refused when the request is made, never later when the prompt is filled."""
    try:
        req = EditRequest(prompt, subject, "target")
    except InvalidRequestError:
        return
    assert req.text  # filling the slot works for every accepted template


@pytest.fixture(scope="module")
def lm() -> Any:
    return tiny_loaded("llama")


@fuzz(80)
@given(
    a=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="{}"), max_size=12),
    b=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="{}"), max_size=12),
    c=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="{}"), max_size=12),
    subject=words,
)
def test_repeated_subject_is_edited_at_its_first_occurrence(
    a: str, b: str, c: str, subject: str, lm: Any
) -> None:
    """A prompt naming the subject twice (or overlapping itself, "aa" in "aaa"): accepted, and
    the edit slot is the FIRST occurrence, as CounterFact's prompts read. Documented in
    ``template_from_prompt``."""
    prompt = a + subject + b + subject + c
    template = template_from_prompt(prompt, subject)
    first = prompt.index(subject)
    assert template.index(SUBJECT_SLOT) == first
    assert template.format(subject) == prompt
    req = EditRequest.from_dict({"prompt": prompt, "subject": subject, "target_new": "Paris"})
    assert req.prompt == template
    make_editor("rome").validate(lm, [req])  # the subject tokens are found at that slot


@fuzz(40)
@given(prompt=st.text(max_size=30), subject=words)
def test_subject_absent_from_prompt_is_refused(prompt: str, subject: str) -> None:
    """A prompt with no ``{}`` that does not contain the subject: refused, naming both."""
    if subject in prompt or SUBJECT_SLOT in prompt:
        return
    with pytest.raises(InvalidRequestError, match="does not occur"):
        EditRequest.from_dict({"prompt": prompt, "subject": subject, "target_new": "x"})


@fuzz(60)
@given(target=st.text(max_size=12))
def test_targets_that_tokenise_to_nothing_are_refused(target: str, lm: Any) -> None:
    """A target that is empty or only whitespace (nothing to tokenise) is refused when the
    request is made; any other target (control characters, any script) passes validation on
    the model, or is refused by it with InvalidRequestError."""
    if not target.strip():
        with pytest.raises(InvalidRequestError, match="empty target"):
            EditRequest("{} is in", "Paris", target)
        return
    req = EditRequest("{} is in", "Paris", target)
    try:
        make_editor("rome").validate(lm, [req])
    except InvalidRequestError as exc:
        assert "tokenises to nothing" in str(exc) or "target" in str(exc)


# ----------------------------------------------------------------------------- --set overrides

FIELDS = sorted(
    {f for cls in EDITORS.values() for f in cls.hparams_class.field_names()}
    | {f"value.{f}" for f in ("lr", "steps", "weight_decay", "kl_factor", "clamp_norm")}
)
override_keys = st.sampled_from(FIELDS) | st.text(max_size=12)
override_values = (
    st.text(max_size=12)
    | st.integers(-(10**400), 10**400).map(str)
    | st.sampled_from(["1e999", "-1e999", "NaN", "null", "true", "[1,2]", "[]", "{}", "0.5", "3"])
    | json_values.map(json.dumps)
)


@fuzz(250)
@given(
    method=st.sampled_from(sorted(EDITORS)),
    items=st.lists(st.tuples(override_keys, override_values), max_size=3),
    separator=st.sampled_from(["=", "=", " = ", ":"]),
)
def test_set_overrides(method: str, items: list[tuple[str, str]], separator: str) -> None:
    """``--set KEY=VALUE`` with any key and value text: the editor is built with every field of
    its declared type, or InvalidRequestError names the key or the value."""
    argv = [f"{k}{separator}{v}" for k, v in items]
    try:
        editor = make_editor(method, parse_overrides(argv))
    except InvalidRequestError as exc:
        assert str(exc)
        return
    hp = editor.hparams
    for name, value in hp.to_dict().items():
        declared = type(getattr(type(hp)(), name))
        if value is not None and getattr(type(hp)(), name) is not None:
            assert isinstance(getattr(hp, name), declared), (name, value)


# ----------------------------------------------------------------------------- saved files


@pytest.fixture(scope="module")
def saved(lm: Any, corpus_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """A valid edit file and a valid adapter file for the tiny model, as bytes."""
    d = tmp_path_factory.mktemp("saved")
    editor = make_editor("rome", {"value.steps": 2})
    from repedit.editors import StatsConfig

    editor.stats_config = StatsConfig(
        corpus=str(corpus_file), n_tokens=960, cache=str(d), progress=False
    )
    result = editor.edit(lm, EditRequest("{} is in", "Paris", "Rome"), apply=False)
    result.save(d / "edit.safetensors")
    adapters = make_adapters(lm.arch.d_mlp, [1], RepConfig())
    save_adapters(d / "rep.safetensors", adapters, fingerprint=lm.fingerprint)
    return {
        "edit": (d / "edit.safetensors").read_bytes(),
        "rep": (d / "rep.safetensors").read_bytes(),
    }


def _open(kind: str, path: Path, lm: Any) -> None:
    """Load (and for an edit, apply then revert) a saved file on the tiny model."""
    if kind == "edit":
        result = EditResult.load(path, lm)
        before = {k: v.clone() for k, v in lm.model.state_dict().items()}
        result.apply(lm)
        result.revert(lm)
        after = lm.model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
    else:
        load_adapters(path, lm)


def _refused_or_fine(kind: str, path: Path, lm: Any) -> bool:
    """True if opened fine, False if refused with a RepeditError; nothing else escapes."""
    before = files_under(path.parent)
    try:
        _open(kind, path, lm)
        return True
    except RepeditError as exc:
        assert str(exc)
        return False
    finally:
        assert files_under(path.parent) == before


@fuzz(40)
@given(kind=st.sampled_from(["edit", "rep"]), raw=st.binary(max_size=300))
def test_random_bytes_as_a_saved_file(kind: str, raw: bytes, lm: Any) -> None:
    """Random bytes: refused."""
    with quiet_dir() as d:
        path = d / "file.safetensors"
        path.write_bytes(raw)
        assert not _refused_or_fine(kind, path, lm)


@fuzz(60)
@given(kind=st.sampled_from(["edit", "rep"]), cut=st.floats(0, 1, exclude_max=True))
def test_truncated_saved_file(kind: str, cut: float, lm: Any, saved: dict[str, bytes]) -> None:
    """A valid file cut short anywhere: refused."""
    raw = saved[kind]
    with quiet_dir() as d:
        path = d / "file.safetensors"
        path.write_bytes(raw[: int(cut * len(raw))])
        assert not _refused_or_fine(kind, path, lm)


@fuzz(200)
@given(
    kind=st.sampled_from(["edit", "rep"]),
    changes=st.lists(
        st.tuples(
            st.lists(st.integers(0, 30), min_size=1, max_size=3), json_values | st.just("<drop>")
        ),
        min_size=1,
        max_size=3,
    ),
    rename=st.one_of(st.none(), st.text(max_size=20)),
)
def test_saved_file_with_altered_metadata(
    kind: str, changes: list[Any], rename: str | None, lm: Any, saved: dict[str, bytes]
) -> None:
    """A valid file whose JSON metadata was edited (a value anywhere in it replaced by any
    JSON, or dropped) and, optionally, a tensor renamed: it opens and applies/reverts cleanly,
    or is refused with a RepeditError."""
    with quiet_dir() as d:
        path = d / "file.safetensors"
        path.write_bytes(saved[kind])
        tensors, meta = read_safetensors(path)
        for route, value in changes:
            _alter(meta, route, value)
        if rename is not None:
            first = sorted(tensors)[0]
            tensors[first.rsplit("/", 1)[0] + "/" + rename if "/" in first else rename] = (
                tensors.pop(first)
            )
        write_safetensors(path, tensors, meta)
        _refused_or_fine(kind, path, lm)


def _alter(node: Any, route: list[int], value: Any) -> None:
    """Replace (or drop) the value reached by following ``route`` (indices into sorted keys)."""
    for i, step in enumerate(route):
        if isinstance(node, dict) and node:
            key = sorted(node)[step % len(node)]
        elif isinstance(node, list) and node:
            key = step % len(node)
        else:
            return
        if i == len(route) - 1 or not isinstance(node[key], dict | list):
            if value == "<drop>":
                del node[key]
            else:
                node[key] = value
            return
        node = node[key]

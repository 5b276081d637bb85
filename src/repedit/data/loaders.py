"""Read edit datasets in the layouts people actually hold, into :class:`EditCase` objects.

One entry point, :func:`load_cases`, takes a dataset name (resolved under a data directory)
or a file path, and detects the record layout from the first record's keys, so users can point
it at the original public files unchanged. Supported layouts:

``rep``
    REP robustness files (RobustKeyEdit ``data/``): ``subject_rephrase`` with 10 subject
    paraphrases, ``rephrase_prompt`` list (or null), ``locality_prompt`` list.
``easyedit-counterfact``
    EasyEdit's CounterFact split: ``ground_truth`` and one string each for
    ``rephrase_prompt`` / ``locality_prompt``.
``mend-zsre``
    MEND/EasyEdit zsRE (``zsre_mend_train*.json``, ``zsre_mem-eval.json``): ``src``, ``alt``,
    ``answers``, ``rephrase``, ``loc``, ``loc_ans``.
``rome-counterfact``
    ROME's original ``counterfact.json``: ``requested_rewrite`` plus ``paraphrase_prompts``,
    ``neighborhood_prompts`` and ``generation_prompts``.

Normalisation (the same for every layout, so every method sees identical cases): targets and
prompts are stripped (scoring inserts the one separating space itself, and some files carry a
leading space on targets); prompt paraphrases are deduplicated and never repeat the edit
prompt; empty subject paraphrases are dropped without moving any paraphrase across the
in-domain / held-out boundary.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from repedit.data.case import SUBJECT_SLOT, EditCase, EditRequest, Neighbour, template_from_prompt
from repedit.data.facts import builtin_facts
from repedit.errors import DataError, InvalidRequestError

DATA_ENV = "REPEDIT_DATA"
DEMO = "demo"

DATASETS: MappingProxyType[str, str] = MappingProxyType(
    {
        "counterfact": "counterfact/counterfact-edit.json",
        "zsre": "zsre/zsre_mend_train-1k.json",
        "rep-counterfact": "rep/test.counterfact_para_prompt_para_subject_llama2-7b.json",
        "rep-counterfact-mistral": "rep/test.counterfact_para_prompt_para_subject_mistral.json",
        "rep-counterfact-qwen": "rep/test.counterfact_para_prompt_para_subject_qwen.json",
        "rep-counterfact-valid": "rep/valid.counterfact_para_prompt_para_subject.json",
        "rep-zsre": "rep/test.zsre_para_prompt_para_subject_llama2-7b.json",
        "rep-zsre-mistral": "rep/test.zsre_para_prompt_para_subject_mistral.json",
        "rep-zsre-qwen": "rep/test.zsre_para_prompt_para_subject_qwen.json",
    }
)
"""Dataset names and their paths relative to the data directory (``demo`` needs no file)."""


@dataclass
class LoadResult:
    """The cases read, what was skipped, and enough provenance to reproduce the run."""

    cases: list[EditCase]
    skipped: list[str] = field(default_factory=list)
    path: Path | None = None
    sha256: str | None = None
    format: str = ""


def dataset_names() -> list[str]:
    """Every name :func:`load_cases` accepts besides a path."""
    return [DEMO, *DATASETS]


def resolve_data_dir(data_dir: str | Path | None = None) -> Path | None:
    """The directory dataset names resolve under: ``data_dir``, else ``$REPEDIT_DATA``, else None.

    There is deliberately no built-in default, so a run never silently reads some other copy.
    """
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_ENV, "").strip()
    return Path(env).expanduser() if env else None


#: the text long-context passages are cut from (evaluation probes and REP training), relative
#: to the data directory
PASSAGE_CORPUS = Path("wikitext") / "wiki.test.raw"


def passage_corpus(
    override: str | Path | None = None, data_dir: str | Path | None = None
) -> tuple[Path | None, str]:
    """``(file, where)``: the long-context corpus, ``override`` else
    ``DATA_DIR/wikitext/wiki.test.raw`` (:func:`resolve_data_dir`; None when that is not a
    file), and where it was looked for (for the caller's warning)."""
    if override:
        path: Path | None = Path(override).expanduser()
        where = str(override)
    else:
        root = resolve_data_dir(data_dir)
        path = root / PASSAGE_CORPUS if root is not None else None
        where = str(path) if path is not None else f"${DATA_ENV}/{PASSAGE_CORPUS.as_posix()}"
    return (path if path is not None and path.is_file() else None), where


def load_cases(
    spec: str | Path,
    *,
    data_dir: str | Path | None = None,
    n: int | None = None,
    skip_invalid: bool = False,
    id_split: int = 5,
) -> LoadResult:
    """Load edit cases from a dataset name (see :data:`DATASETS`, or ``demo``) or a JSON file.

    ``n`` keeps the first ``n`` valid cases. A malformed record raises :class:`DataError`
    naming the file, the record index and case id; with ``skip_invalid`` it is skipped and the
    message kept in ``LoadResult.skipped``. ``id_split`` is how many subject paraphrases count
    as in-domain (REP trains on those; the rest are held out).
    """
    if n is not None and n < 0:
        raise DataError(f"n must be >= 0, got {n}")
    if id_split < 0:
        raise DataError(f"id_split must be >= 0, got {id_split}")
    if str(spec) == DEMO:
        cases = [replace(c, id_split=id_split) for c in builtin_facts()]
        return LoadResult(cases=cases[:n] if n is not None else cases, format="builtin")
    path = _resolve_path(spec, data_dir)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    records = _parse_json(raw, path)
    fmt = detect_format(records[0], path)
    cases, skipped = _build_cases(records, fmt, path, n, skip_invalid, id_split)
    return LoadResult(
        cases=cases,
        skipped=skipped,
        path=path,
        sha256=hashlib.sha256(raw).hexdigest(),
        format=fmt,
    )


def dataset_path(spec: str | Path, data_dir: str | Path | None = None) -> Path:
    """The file a dataset name or path resolves to, as :func:`load_cases` reads it
    (:class:`DataError`, with what was looked for, when there is none)."""
    if str(spec) == DEMO:
        raise DataError(f"{DEMO!r} is built in, not a file")
    return _resolve_path(spec, data_dir)


def _resolve_path(spec: str | Path, data_dir: str | Path | None) -> Path:
    name = str(spec)
    base = resolve_data_dir(data_dir)
    env_unset = not os.environ.get(DATA_ENV, "").strip()
    if name in DATASETS:
        rel = DATASETS[name]
        if base is None:
            raise DataError(
                f"dataset {name!r} needs a data directory, but {DATA_ENV} is not set and no "
                f"data_dir was given: set {DATA_ENV} to the folder that holds {rel} "
                f"(expected ${DATA_ENV}/{rel})"
            )
        path = base / rel
        if not path.is_file():
            origin = "data_dir" if data_dir not in (None, "") else DATA_ENV
            hint = f"; {DATA_ENV} is not set" if env_unset else ""
            raise DataError(
                f"dataset {name!r} not found: expected {path.resolve()} (data directory {base} "
                f"from {origin}){hint}; set {DATA_ENV} to the folder that holds {rel}"
            )
        return path
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if base is not None and not path.is_absolute() and (base / path).is_file():
        return base / path
    hint = f" ({DATA_ENV} is not set)" if env_unset and base is None else ""
    raise DataError(
        f"no dataset file {str(spec)!r} (looked at {path.resolve()}"
        + (f" and {(base / path).resolve()}" if base is not None and not path.is_absolute() else "")
        + f"){hint}; known names: {', '.join(dataset_names())}"
    )


def _parse_json(raw: bytes, path: Path) -> list[Any]:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
    if not data:
        raise DataError(f"{path}: the file holds no records")
    return data


def detect_format(record: Any, path: Path | str = "<record>") -> str:
    """Name the layout of ``record`` (the first of a file) from its keys."""
    if not isinstance(record, dict):
        raise DataError(f"{path}: records must be JSON objects, got {type(record).__name__}")
    keys = set(record)
    if "requested_rewrite" in keys:
        return "rome-counterfact"
    if "subject_rephrase" in keys:
        return "rep"
    if {"src", "alt", "answers"} <= keys:
        return "mend-zsre"
    if {"prompt", "ground_truth"} <= keys:
        return "easyedit-counterfact"
    raise DataError(
        f"{path}: unknown record layout (keys: {', '.join(sorted(keys))}); expected REP, "
        "EasyEdit CounterFact, MEND zsRE or ROME counterfact.json records"
    )


def _build_cases(
    records: list[Any],
    fmt: str,
    path: Path,
    n: int | None,
    skip_invalid: bool,
    id_split: int,
) -> tuple[list[EditCase], list[str]]:
    parse = _PARSERS[fmt]
    cases: list[EditCase] = []
    skipped: list[str] = []
    for index, record in enumerate(records):
        if n is not None and len(cases) >= n:
            break
        where = f"{path.name}:{index}"
        try:
            if not isinstance(record, dict):
                raise InvalidRequestError(f"record is a {type(record).__name__}, not an object")
            case = parse(record, str(index), id_split)
        except (InvalidRequestError, DataError) as exc:
            cid = record.get("case_id") if isinstance(record, dict) else None
            label = f"{path}: record {index}" + (f" (case_id {cid})" if cid is not None else "")
            msg = f"{label}: {_strip_where(str(exc))}"
            if not skip_invalid:
                raise DataError(msg + " (pass skip_invalid=True to skip such records)") from None
            skipped.append(msg)
            continue
        case.source = where
        cases.append(case)
    return cases, skipped


def _strip_where(msg: str) -> str:
    """Drop the empty ``": "`` prefix that case.py adds when given no location."""
    return msg[2:] if msg.startswith(": ") else msg


# --- field helpers -------------------------------------------------------------------------


def _get(record: dict[str, Any], key: str) -> Any:
    if key not in record:
        raise InvalidRequestError(f"missing field {key!r}")
    return record[key]


def _text(record: dict[str, Any], key: str, *, required: bool = True) -> str:
    """A non-empty string field, stripped."""
    value = _get(record, key) if required else record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise InvalidRequestError(f"field {key!r} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise InvalidRequestError(f"field {key!r} is empty")
    return value.strip()


def _texts(record: dict[str, Any], key: str) -> list[str]:
    """A field that may be absent/null, one string, or a list of strings."""
    value = record.get(key)
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidRequestError(f"field {key!r} must be a string or a list of strings")
    return value


def _norm(text: str) -> str:
    return " ".join(text.split())


def _prompt_paraphrases(texts: Iterable[str], edit_text: str) -> list[str]:
    """Distinct, non-empty paraphrases that differ from the edit prompt itself."""
    seen = {_norm(edit_text)}
    out: list[str] = []
    for t in texts:
        key = _norm(t)
        if key and key not in seen:
            seen.add(key)
            out.append(t.strip())
    return out


def _subject_paraphrases(texts: list[str], id_split: int) -> tuple[list[str], int]:
    """Whitespace-normalised paraphrases without empty entries, and the adjusted split.

    Dropping an empty in-domain entry lowers the split by one, so no held-out paraphrase ever
    moves into the in-domain half that REP trains on.
    """
    kept = [(i, _norm(t)) for i, t in enumerate(texts)]
    kept = [(i, t) for i, t in kept if t]
    return [t for _, t in kept], sum(1 for i, _ in kept if i < id_split)


def _case_id(record: dict[str, Any], index: str) -> str:
    cid = record.get("case_id")
    return index if cid is None else str(cid)


def _neighbours(prompts: list[str], target: str) -> list[Neighbour]:
    return [Neighbour(p.strip(), target) for p in prompts if p.strip()]


def _verbatim_request(
    prompt: str, subject: str, target_new: str, target_true: str, case_id: str
) -> EditRequest:
    """A request from a prompt that holds the subject verbatim (first occurrence = slot)."""
    template = template_from_prompt(prompt, subject).strip()
    return EditRequest(template, subject, target_new, target_true, case_id)


# --- one parser per layout -------------------------------------------------------------------


def _parse_rep(record: dict[str, Any], index: str, id_split: int) -> EditCase:
    prompt, subject = _text(record, "prompt"), _text(record, "subject")
    request = _verbatim_request(
        prompt,
        subject,
        _text(record, "target_new"),
        _text(record, "target_true"),
        _case_id(record, index),
    )
    if record.get("subject_rephrase") is None:
        raise InvalidRequestError("missing field 'subject_rephrase'")
    subjects, split = _subject_paraphrases(_texts(record, "subject_rephrase"), id_split)
    loc = _texts(record, "locality_prompt")
    neighbours = _neighbours(loc, _text(record, "locality_ground_truth")) if loc else []
    return EditCase(
        request=request,
        prompt_paraphrases=_prompt_paraphrases(_texts(record, "rephrase_prompt"), request.text),
        subject_paraphrases=subjects,
        neighbourhood=neighbours,
        id_split=split,
    )


def _parse_easyedit_counterfact(record: dict[str, Any], index: str, id_split: int) -> EditCase:
    request = _verbatim_request(
        _text(record, "prompt"),
        _text(record, "subject"),
        _text(record, "target_new"),
        _text(record, "ground_truth"),
        _case_id(record, index),
    )
    loc = _texts(record, "locality_prompt")
    neighbours = _neighbours(loc, _text(record, "locality_ground_truth")) if loc else []
    return EditCase(
        request=request,
        prompt_paraphrases=_prompt_paraphrases(_texts(record, "rephrase_prompt"), request.text),
        neighbourhood=neighbours,
        id_split=id_split,
    )


def _parse_mend_zsre(record: dict[str, Any], index: str, id_split: int) -> EditCase:
    answers = _get(record, "answers")
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not answers or not isinstance(answers[0], str):
        raise InvalidRequestError("field 'answers' must be a non-empty list of strings")
    request = _verbatim_request(
        _text(record, "src"),
        _text(record, "subject"),
        _text(record, "alt"),
        answers[0].strip(),
        _case_id(record, index),
    )
    loc = _text(record, "loc", required=False)
    neighbours = [Neighbour(loc, _text(record, "loc_ans"))] if loc else []
    return EditCase(
        request=request,
        prompt_paraphrases=_prompt_paraphrases(_texts(record, "rephrase"), request.text),
        neighbourhood=neighbours,
        id_split=id_split,
    )


def _parse_rome_counterfact(record: dict[str, Any], index: str, id_split: int) -> EditCase:
    rw = _get(record, "requested_rewrite")
    if not isinstance(rw, dict):
        raise InvalidRequestError("field 'requested_rewrite' must be an object")
    prompt, subject = _text(rw, "prompt"), _text(rw, "subject")
    target_new, target_true = _rome_target(rw, "target_new"), _rome_target(rw, "target_true")
    cid = _case_id(record, index)
    if SUBJECT_SLOT in prompt:
        request = EditRequest(prompt, subject, target_new, target_true, cid)
    else:
        request = _verbatim_request(prompt, subject, target_new, target_true, cid)
    return EditCase(
        request=request,
        prompt_paraphrases=_prompt_paraphrases(_texts(record, "paraphrase_prompts"), request.text),
        neighbourhood=_neighbours(_texts(record, "neighborhood_prompts"), target_true),
        generation_prompts=[g.strip() for g in _texts(record, "generation_prompts") if g.strip()],
        id_split=id_split,
    )


def _rome_target(rw: dict[str, Any], key: str) -> str:
    value = _get(rw, key)
    if isinstance(value, dict):
        return _text(value, "str")
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise InvalidRequestError(f"field 'requested_rewrite.{key}' must be an object with 'str'")


_PARSERS: MappingProxyType[str, Callable[[dict[str, Any], str, int], EditCase]] = MappingProxyType(
    {
        "rep": _parse_rep,
        "easyedit-counterfact": _parse_easyedit_counterfact,
        "mend-zsre": _parse_mend_zsre,
        "rome-counterfact": _parse_rome_counterfact,
    }
)

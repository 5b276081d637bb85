"""Golden outputs of the variant builders and of ``repedit analyze keys`` on a tiny model.

The fixtures under ``tests/golden/analysis/`` were written by this module before the variant
and analysis code was restructured; these tests pin that behaviour: identical texts, subjects,
halves, positions and success flags, and scores within a relative 1e-5 (float32 keys read in
batches of different padding differ only by rounding, far below that) of the largest value the
fixture holds under the same field name. A whitened similarity ``kᵀC⁻¹k*`` near zero is a sum
of terms as large as the largest similarities (hundreds), so its rounding, which differs
between CPUs (AVX2, AVX-512), is relative to those, not to itself.

Regenerate, only on purpose, with ``REPEDIT_UPDATE_GOLDEN=1 pytest tests/golden``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

from repedit.data import PassageSampler, load_cases
from repedit.evaluation.probes import SuiteConfig, build_probes, case_keys
from repedit.models.tiny import tiny_loaded, tiny_model, tiny_tokenizer
from repedit.rep import RepConfig
from repedit.rep.adapter import LISTED_FORMS
from repedit.rep.variants import build_pool, heldout_examples, rep_items
from tiny_text import tiny_corpus_text

HERE = Path(__file__).parent / "analysis"
CASES = HERE / "cases.json"
UPDATE = os.environ.get("REPEDIT_UPDATE_GOLDEN") == "1"
CONTEXTS = ["{}", "The capital of France is Paris. {}", "Rome is the capital of Italy. {}"]
ID_SPLIT = 2
RTOL = 1e-5
#: scores near zero (a cosine of 1e-7) are compared on the scale of the quantity's own range
ATOL = 1e-6


def _corpus_text() -> str:
    """Random text over the tiny vocabulary's alphabetic tokens (a well-conditioned C)."""
    return tiny_corpus_text()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("golden-corpus") / "corpus.txt"
    path.write_text(_corpus_text())
    return path


@pytest.fixture(scope="module")
def lm():
    return tiny_loaded("llama")


@pytest.fixture(scope="module")
def cases():
    return load_cases(str(CASES), id_split=ID_SPLIT).cases


def _check(name: str, got: Any) -> None:
    path = HERE / name
    if UPDATE:
        path.write_text(json.dumps(got, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        return
    want = json.loads(path.read_text(encoding="utf-8"))
    scales: dict[str, float] = {}
    _field_scales(want, "", scales)
    _compare(want, got, name, "", scales)


def _field_scales(doc: Any, field: str, scales: dict[str, float]) -> None:
    """Into ``scales``: per field name, the largest magnitude of a float under it in ``doc``."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            _field_scales(v, k, scales)
    elif isinstance(doc, list):
        for v in doc:
            _field_scales(v, field, scales)
    elif isinstance(doc, float):
        scales[field] = max(scales.get(field, 0.0), abs(doc))


def _compare(want: Any, got: Any, where: str, field: str, scales: dict[str, float]) -> None:
    """``got`` equal to ``want``; a float within ``RTOL`` of itself or of its field's scale."""
    if isinstance(want, dict):
        assert isinstance(got, dict), where
        assert sorted(want) == sorted(got), f"{where}: keys {sorted(got)} != {sorted(want)}"
        for k in want:
            _compare(want[k], got[k], f"{where}.{k}", k, scales)
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{where}: length differs"
        for i, (w, g) in enumerate(zip(want, got, strict=True)):
            _compare(w, g, f"{where}[{i}]", field, scales)
    elif isinstance(want, float) and not isinstance(got, bool):
        assert isinstance(got, int | float), f"{where}: {got!r} is not a number"
        tol = max(ATOL, RTOL * scales.get(field, 0.0))
        assert math.isclose(got, want, rel_tol=RTOL, abs_tol=tol), f"{where}: {got} != {want}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def test_a_score_is_compared_on_its_field_s_scale() -> None:
    """A similarity near zero may move by rounding at the scale of the largest ones, not more."""
    want = {"rows": [{"beta": 900.0}, {"beta": -2.7662}], "p": [0.5]}
    scales: dict[str, float] = {}
    _field_scales(want, "", scales)
    assert scales == {"beta": 900.0, "p": 0.5}
    _compare(want, {"rows": [{"beta": 900.0}, {"beta": -2.7663}], "p": [0.5]}, "w", "", scales)
    with pytest.raises(AssertionError, match=r"rows\[1\]\.beta"):
        _compare(want, {"rows": [{"beta": 900.0}, {"beta": -2.8}], "p": [0.5]}, "w", "", scales)
    with pytest.raises(AssertionError, match=r"w\.p\[0\]"):
        got = {"rows": [{"beta": 900.0}, {"beta": -2.7662}], "p": [0.5001]}
        _compare(want, got, "w", "", scales)


# --------------------------------------------------------------------------- probes and pool


def _suite(corpus: Path) -> SuiteConfig:
    return SuiteConfig(
        long_context_corpus=str(corpus),
        long_context_length=30,
        long_context_unit="tokens",
        long_context_passages=2,
        scramble_max=10,
    )


def probes_record(lm: Any, cases: list, corpus: Path) -> dict[str, Any]:
    """Every probe of every case: test → [{prompt, target, alt, meta}]."""
    suite = _suite(corpus)
    sampler = PassageSampler.from_file(corpus, length=30, unit="tokens", tokenizer=lm.tokenizer)
    out = {}
    for case, key in zip(cases, case_keys(cases), strict=True):
        fams = build_probes(case, lm, suite, sampler=sampler, key=key)
        out[key] = {
            test: [
                {"prompt": p.prompt, "target": p.target, "alt": p.alt, "meta": p.meta}
                for p in probes
            ]
            for test, probes in fams.items()
            if test in GOLDEN_TESTS
        }
    return out


#: the probe families that existed when the fixture was written
GOLDEN_TESTS = (
    "efficacy",
    "prompt_paraphrase",
    "subject_paraphrase",
    "ood_subject_paraphrase",
    "scrambled_subject",
    "long_context",
    "neighbourhood",
)


def _rep_cfg(corpus: Path) -> RepConfig:
    """The pool as it was pinned: the listed forms only (generated forms and pool negatives,
    defaults since, have their own tests)."""
    return RepConfig(
        **LISTED_FORMS,
        long_context_corpus=str(corpus),
        long_context_length=30,
        long_context_unit="tokens",
        n_long=2,
        negatives=True,
        n_negative_text=1,
    )


def pool_record(lm: Any, cases: list, corpus: Path) -> dict[str, Any]:
    """REP's training pool per case (and the gate-report probes): kind, text, positions."""
    cfg = _rep_cfg(corpus)
    sampler = PassageSampler.from_file(corpus, length=30, unit="tokens", tokenizer=lm.tokenizer)
    items = rep_items(cases, case_keys(cases))
    others = [c.request.subject for c in cases]
    out: dict[str, Any] = {}
    for item in items:
        pool = build_pool(
            lm,
            [item],
            CONTEXTS,
            cfg,
            sampler=sampler,
            negative_subjects=[s for s in others if s != item.request.subject],
        )

        def rows(examples: list) -> list[dict[str, Any]]:
            return [
                {
                    "kind": e.kind,
                    "text": e.text,
                    "position": e.position,
                    "subject_start": e.subject_start,
                    "n_ids": len(e.ids),
                }
                for e in examples
            ]

        held = heldout_examples(lm, cases[items.index(item)], key=item.key, sampler=sampler)
        out[item.key] = {
            "prompts": rows(pool.prompts),
            "positives": rows(pool.positives),
            "negatives": rows(pool.negatives),
            "skipped": [list(s) for s in pool.skipped],
            "heldout": {k: rows(v) for k, v in held.items()},
        }
    return out


def test_golden_probes(lm, cases, corpus: Path) -> None:
    _check("probes.json", probes_record(lm, cases, corpus))


def test_golden_rep_pool(lm, cases, corpus: Path) -> None:
    _check("rep_pool.json", pool_record(lm, cases, corpus))


# --------------------------------------------------------------------------- analyze keys


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("golden-tiny-llama")
    tiny_model("llama", seed=0).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _keys_record(report: dict[str, Any]) -> dict[str, Any]:
    """What the golden pins of ``similarity.json``: everything but timings and paths."""
    drop = {"timings", "data", "data_path", "model", "fingerprint"}
    out = {k: v for k, v in report.items() if k not in drop}
    opts = dict(out["options"])
    for k in ("long_context_corpus", "stats", "data", "run"):
        opts.pop(k, None)
    out["options"] = opts
    return out


def test_golden_analyze_keys(tmp_path: Path, tiny_dir: Path, corpus: Path, tmp_cache) -> None:
    from repedit.cli import main

    out = tmp_path / "out"
    argv = [
        "analyze", "keys", "--model", str(tiny_dir), "--threads", "1",
        "--corpus", str(corpus), "--stats-tokens", "2000", "--cache-dir", str(tmp_cache),
        "--data", str(CASES), "--id-split", str(ID_SPLIT),
        "--long-context-corpus", str(corpus), "--long-context-tokens", "30",
        "--long-context-passages", "2", "--n-unrelated", "3", "--with-success",
        "--set", "contexts=[[3, 2]]", "--set", "value.steps=6", "--no-progress",
        "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "similarity.json").read_text(encoding="utf-8"))
    _check("keys.json", _keys_record(report))
    headings = [ln for ln in (out / "findings.md").read_text().splitlines() if ln.startswith("#")]
    _check("findings_headings.json", headings)

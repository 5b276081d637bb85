"""The unedited model's answers that the locality tests are measured against, and the
generate-scored results of a case's probes.

A locality test (:data:`~repedit.evaluation.probes.LOCALITY_TESTS`) asks whether the edit
left a prompt alone, so each needs the unedited model's answer: its teacher-forced predictions
(``pred``: argmax ids at the target positions) and, when the run scores by generation, its
greedy continuations (``gen``). They are computed once per case while the model is unedited
and kept in ``reference.jsonl``, one line per case::

    {"case_id", "tests": {TEST: {"sig", "pred", "gen"?}}, "seconds"}

``sig`` hashes the test's (prompt, target) pairs, so a reference is reused only for the same
probes. A line written before this layout (``{"case_id", "sig", "pred"}``, the neighbourhood
alone) is read as the neighbourhood's entry; a later line for a case replaces an earlier one.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from repedit.evaluation.probes import LOCALITY_TESTS, CaseProbes
from repedit.evaluation.rundir import short_sha
from repedit.evaluation.scoring import Impl, Probe, continuations, generate_scores, predictions
from repedit.models.loading import LoadedModel
from repedit.models.precision import Precision


def probes_sig(probes: Sequence[Probe]) -> str:
    """The key of a test's reference: its (prompt, target) pairs."""
    return short_sha([[p.prompt, p.target] for p in probes])


def stored_tests(rec: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """A ``reference.jsonl`` line's per-test entries (an older, neighbourhood-only line too)."""
    if not rec:
        return {}
    if "tests" in rec:
        return dict(rec["tests"])
    if "pred" in rec:
        return {"neighbourhood": {"sig": rec.get("sig"), "pred": rec["pred"]}}
    return {}


def usable(entry: dict[str, Any] | None, probes: Sequence[Probe], *, gen: bool) -> bool:
    """Whether a stored entry serves these probes (and holds continuations when ``gen``)."""
    if not entry or entry.get("sig") != probes_sig(probes):
        return False
    return not gen or entry.get("gen") is not None


def locality_families(cp: CaseProbes) -> dict[str, list[Probe]]:
    """The case's non-empty locality families."""
    return {t: cp.families[t] for t in LOCALITY_TESTS if cp.families.get(t)}


def update_reference(
    lm: LoadedModel,
    cp: CaseProbes,
    have: dict[str, Any] | None,
    *,
    gen: bool,
    batch_size: int = 32,
    impl: Impl = "fast",
    precision: Precision = "model",
) -> dict[str, Any] | None:
    """A new ``reference.jsonl`` line for the case when ``have`` (its stored line) lacks an
    entry the probes need, else None. Entries still valid are carried over, so the new line
    alone is complete. Must be called while the model is unedited."""
    families = locality_families(cp)
    tests = stored_tests(have)
    missing = [t for t, probes in families.items() if not usable(tests.get(t), probes, gen=gen)]
    if not missing:
        return None
    t0 = time.perf_counter()
    for test in missing:
        probes = families[test]
        entry: dict[str, Any] = {
            "sig": probes_sig(probes),
            "pred": predictions(lm, probes, batch_size=batch_size, impl=impl, precision=precision),
        }
        if gen:
            entry["gen"] = continuations(lm, probes, batch_size=batch_size, precision=precision)
        tests[test] = entry
    return {"case_id": cp.key, "tests": tests, "seconds": time.perf_counter() - t0}


def reference_preds(
    have: dict[str, Any] | None, cp: CaseProbes, field: str = "pred"
) -> dict[str, list[Any]]:
    """``{test: stored field}`` for the locality families whose stored entry matches."""
    tests = stored_tests(have)
    out = {}
    for test, probes in locality_families(cp).items():
        entry = tests.get(test)
        if usable(entry, probes, gen=False) and entry is not None and entry.get(field) is not None:
            out[test] = list(entry[field])
    return out


def add_generated(
    lm: LoadedModel,
    cp: CaseProbes,
    tests: dict[str, dict[str, Any]],
    have: dict[str, Any] | None,
    *,
    batch_size: int = 32,
    precision: Precision = "model",
) -> None:
    """Score every probe of ``cp`` by greedy generation into ``tests`` (the case's records):
    each probe gains ``gen_text`` and ``gen_exact`` (success tests: the continuation begins
    with the target) or ``gen_agree`` (locality tests: it equals the unedited model's, None
    without a reference); each test's ``means`` gain the mean of that flag."""
    refs = reference_preds(have, cp, "gen")
    for test, (lo, hi) in cp.spans.items():
        probes = cp.flat[lo:hi]
        if not probes:
            continue
        local = test in LOCALITY_TESTS
        scores = generate_scores(
            lm,
            probes,
            reference=refs.get(test) if local else None,
            batch_size=batch_size,
            precision=precision,
        )
        records = tests[test]["probes"]
        for rec, score in zip(records, scores, strict=True):
            rec["gen_text"] = score.continuation
            if local:
                rec["gen_agree"] = score.agree
            else:
                rec["gen_exact"] = score.exact
        key = "gen_agree" if local else "gen_exact"
        values = [float(r[key]) for r in records if r.get(key) is not None]
        tests[test]["means"][key] = sum(values) / len(values) if values else None


def unscored_tests(cp: CaseProbes) -> dict[str, dict[str, Any]]:
    """A case's probe records before any scoring (a generate-only run fills them)."""
    return {
        test: {
            "n": hi - lo,
            "means": {},
            "probes": [{"meta": p.meta} if p.meta else {} for p in cp.flat[lo:hi]],
        }
        for test, (lo, hi) in cp.spans.items()
    }

"""Whether two run directories hold the same results: the check behind ``repedit report --diff``.

Two runs match when they evaluated the same cases with the same outcome: timings dropped,
records compared case by case (sorted by case id), identical errors, success flags and
fluency texts, and every probe's probability within a relative tolerance (1e-4 by default).
Runs on different hardware or with a different batching can move a probability in its last
digits but must not flip a flag, so this is the test that a new execution path (workers, a
faster scorer) changed nothing. A τ sweep is compared sub-run by sub-run.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from repedit.evaluation.rundir import RunDir, sweep_dirs

#: relative tolerance on a probe's probability
REL_TOL = 1e-4
#: per-probe fields that must be identical (outcomes, not measurements)
FLAG_FIELDS = ("exact", "beats_alt", "agree", "token_acc")


def diff_runs(
    a: str | Path, b: str | Path, *, rel_tol: float = REL_TOL, texts: bool = True
) -> list[str]:
    """Readable differences between runs ``a`` and ``b`` (empty: they match). ``texts=False``
    skips the fluency texts: sampling follows the logits' last bits, which change with the
    thread count, so runs at different thread counts match in everything else only."""
    subs_a, subs_b = sweep_dirs(a), sweep_dirs(b)
    if subs_a or subs_b:
        names_a, names_b = [p.name for p in subs_a], [p.name for p in subs_b]
        if names_a != names_b:
            return [f"τ sweeps differ: {names_a or 'no sweep'} vs {names_b or 'no sweep'}"]
        return [
            f"{sa.name}: {d}"
            for sa, sb in zip(subs_a, subs_b, strict=True)
            for d in diff_runs(sa, sb, rel_tol=rel_tol, texts=texts)
        ]
    recs_a = {str(r["case_id"]): r for r in RunDir(a).results()}
    recs_b = {str(r["case_id"]): r for r in RunDir(b).results()}
    out = [f"case {k}: only in {a}" for k in sorted(set(recs_a) - set(recs_b))]
    out += [f"case {k}: only in {b}" for k in sorted(set(recs_b) - set(recs_a))]
    for key in sorted(set(recs_a) & set(recs_b)):
        found = diff_records(recs_a[key], recs_b[key], rel_tol, texts=texts)
        out += [f"case {key}: {d}" for d in found]
    return out


def diff_records(
    a: dict[str, Any], b: dict[str, Any], rel_tol: float = REL_TOL, *, texts: bool = True
) -> list[str]:
    """Differences between two records of one case (timings are never compared)."""
    err_a, err_b = (a.get("error") or {}).get("type"), (b.get("error") or {}).get("type")
    if err_a != err_b:
        return [f"error {err_a} vs {err_b}"]
    tests_a, tests_b = a.get("tests") or {}, b.get("tests") or {}
    if sorted(tests_a) != sorted(tests_b):
        return [f"tests {sorted(tests_a)} vs {sorted(tests_b)}"]
    out = []
    for test in sorted(tests_a):
        ta, tb = tests_a[test], tests_b[test]
        if test == "fluency":
            if texts and ta.get("texts") != tb.get("texts"):
                out.append("fluency texts differ")
            continue
        pa, pb = ta.get("probes") or [], tb.get("probes") or []
        if len(pa) != len(pb):
            out.append(f"{test}: {len(pa)} vs {len(pb)} probes")
            continue
        for i, (x, y) in enumerate(zip(pa, pb, strict=True)):
            out += [f"{test}[{i}].{d}" for d in _diff_probe(x, y, rel_tol)]
    return out


def _diff_probe(x: dict[str, Any], y: dict[str, Any], rel_tol: float) -> list[str]:
    out = [f"{k}: {x.get(k)!r} vs {y.get(k)!r}" for k in FLAG_FIELDS if x.get(k) != y.get(k)]
    px, py = _prob(x.get("logprob")), _prob(y.get("logprob"))
    if px is None or py is None:
        if (px is None) != (py is None):
            out.append(f"probability: {px!r} vs {py!r}")
    elif not math.isclose(px, py, rel_tol=rel_tol, abs_tol=0.0):
        out.append(f"probability: {px:.6g} vs {py:.6g} (relative tolerance {rel_tol:g})")
    return out


def _prob(logprob: Any) -> float | None:
    return None if logprob is None else math.exp(float(logprob))

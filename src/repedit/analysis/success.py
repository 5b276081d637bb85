"""Whitened similarity against edit success: every key's β̃ joined with whether the edited
model passes the probe of the same text, from an evaluation run or from editing each case."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from repedit.analysis.records import BETA_BINS, VARIANT_OF_TEST, VARIANTS, CaseSimilarity
from repedit.data.case import EditCase
from repedit.editors import make_editor
from repedit.errors import InvalidRequestError, RepeditError
from repedit.evaluation.probes import case_keys
from repedit.evaluation.rundir import RESULTS, read_jsonl
from repedit.evaluation.scoring import Probe, score_probes
from repedit.models.loading import LoadedModel


@dataclass
class SuccessAnalysis:
    """Per-probe (β̃, success) rows and their summary (see :func:`success_summary`)."""

    source: str
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "summary": self.summary,
            "notes": self.notes,
            "rows": self.rows,
        }


def _row(cs: CaseSimilarity, variant: str, j: int, success: bool, **extra: Any) -> dict[str, Any]:
    vk = cs.variants[variant]
    return {
        "case_id": cs.case_id,
        "variant": variant,
        "index": vk.index[j],
        "beta": vk.beta[j],
        "beta_norm": vk.beta_norm[j],
        "success": bool(success),
        **extra,
    }


def _join_run(results: Sequence[CaseSimilarity], run_dir: Path) -> SuccessAnalysis:
    """Rows from an evaluation run's ``results.jsonl`` (per-probe ``exact``), joined on
    (case key, test, probe index)."""
    path = run_dir / RESULTS
    if not path.is_file():
        raise InvalidRequestError(f"{run_dir} has no {RESULTS} (not an evaluation run directory?)")
    by_case = {cs.case_id: cs for cs in results}
    rows: list[dict[str, Any]] = []
    missing_cases = failed = unmatched = mismatched = 0
    modes = set()
    for rec in read_jsonl(path):
        cs = by_case.get(str(rec.get("case_id")))
        if cs is None:
            missing_cases += 1
            continue
        if rec.get("error"):
            failed += 1
            continue
        modes.add(rec.get("mode"))
        for test, block in (rec.get("tests") or {}).items():
            variant = VARIANT_OF_TEST.get(test)
            if variant is None:
                continue
            vk = cs.variants.get(variant)
            for probe in block.get("probes", []):
                meta = probe.get("meta") or {}
                idx = int(meta.get("index", 0))
                if vk is None or idx not in vk.index:
                    unmatched += 1
                    continue
                j = vk.index.index(idx)
                ours = vk.meta[j]
                if "subject" in meta and meta["subject"] != vk.labels[j]:
                    mismatched += 1
                    continue
                if variant == "long_context" and any(
                    k in meta and meta[k] != ours.get(k) for k in ("length", "unit")
                ):
                    mismatched += 1
                    continue
                rows.append(_row(cs, variant, j, bool(probe["exact"])))
    notes = []
    if missing_cases:
        notes.append(f"{missing_cases} run record(s) have no analysed case (different --n/data?)")
    if failed:
        notes.append(f"{failed} failed case(s) in the run skipped")
    if unmatched or mismatched:
        notes.append(
            f"{unmatched} probe(s) without an analysed key, {mismatched} with a different "
            "variant text (different seed, passage length or id split?)"
        )
    if modes - {"single"}:
        notes.append(f"run mode {sorted(m for m in modes if m)}: β̃ refers to single edits")
    return SuccessAnalysis(f"run:{run_dir}", rows, success_summary(rows), notes)


def _edit_and_score(
    results: Sequence[CaseSimilarity],
    lm: LoadedModel,
    cases: Sequence[EditCase],
    editor: Any,
    *,
    batch_size: int = 32,
    progress: Callable[[str, int], None] | None = None,
) -> SuccessAnalysis:
    """Rows from editing each case alone, scoring its variant texts, and reverting."""
    by_key = dict(zip(case_keys(cases), cases, strict=True))
    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    for cs in results:
        case = by_key.get(cs.case_id)
        if case is None:
            failures.append(f"{cs.case_id}: not among the given cases")
            continue
        req = case.request
        items = [(v, j) for v in VARIANTS for j in range(len(cs.variants.get(v, ())))]
        probes = [
            Probe(cs.variants[v].texts[j], req.target_new, req.target_true, v) for v, j in items
        ]
        try:
            result = editor.edit(lm, [case.edit_request])
        except (RepeditError, RuntimeError) as exc:
            failures.append(f"{cs.case_id}: {exc}")
            if progress is not None:
                progress("edits", 1)
            continue
        try:
            scores = score_probes(lm, probes, batch_size=batch_size)
        finally:
            result.revert(lm)
        for (v, j), score in zip(items, scores, strict=True):
            rows.append(_row(cs, v, j, score.exact, beats_alt=score.beats_alt))
        if progress is not None:
            progress("edits", 1)
    notes = [f"edit failed: {f}" for f in failures]
    source = f"edit:{getattr(editor, 'name', type(editor).__name__)}"
    return SuccessAnalysis(source, rows, success_summary(rows), notes)


def similarity_vs_success(
    results: Sequence[CaseSimilarity],
    *,
    run_dir: str | Path | None = None,
    lm: LoadedModel | None = None,
    cases: Sequence[EditCase] | None = None,
    editor: Any = None,
    method: str = "rome",
    batch_size: int = 32,
    progress: Callable[[str, int], None] | None = None,
) -> SuccessAnalysis:
    """Join every key's β̃ with whether the edited model passes the probe of the same text.

    (a) ``run_dir``: an evaluation run (``repedit eval``) of the same cases; success is the
    probe's ``exact`` (argmax matches every target token). (b) otherwise ``lm`` and ``cases``:
    each case is edited alone with ``editor`` (default ``make_editor(method)``), its variant
    texts -- including the unrelated subjects, where "success" means the edit bled into them --
    are scored with :func:`~repedit.evaluation.scoring.score_probes`, and the edit is reverted.
    """
    if run_dir is not None:
        return _join_run(results, Path(run_dir))
    if lm is None or cases is None:
        raise InvalidRequestError("similarity_vs_success needs run_dir, or lm and cases")
    if editor is None:
        editor = make_editor(method)
    return _edit_and_score(results, lm, cases, editor, batch_size=batch_size, progress=progress)


def point_biserial(x: Sequence[float], success: Sequence[bool]) -> float | None:
    """Pearson correlation of a continuous ``x`` with a 0/1 outcome (None when undefined)."""
    xs = np.asarray(x, dtype=float)
    ys = np.asarray(success, dtype=float)
    if len(xs) < 2 or xs.std() == 0 or ys.std() == 0:
        return None
    return float(np.corrcoef(xs, ys)[0, 1])


def binned_success(
    rows: Sequence[dict[str, Any]], edges: Sequence[float] = BETA_BINS
) -> list[dict[str, Any]]:
    """Mean success per β̃ bin ``[lo, hi)`` (bins without rows are kept, with ``None``)."""
    out = []
    for lo, hi in itertools.pairwise(edges):
        hits = [r["success"] for r in rows if lo <= r["beta_norm"] < hi]
        out.append(
            {
                "lo": None if math.isinf(lo) else lo,
                "hi": None if math.isinf(hi) else hi,
                "n": len(hits),
                "success": (sum(hits) / len(hits)) if hits else None,
            }
        )
    return out


def success_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Success per variant type and per β̃ bin, and point-biserial correlations.

    ``point_biserial`` pools the equivalent variants and the edit prompt (what an edit should
    reach); ``point_biserial_all`` adds the unrelated subjects.
    """
    by_variant = {}
    for v in VARIANTS:
        rs = [r for r in rows if r["variant"] == v]
        if not rs:
            continue
        by_variant[v] = {
            "n": len(rs),
            "success": sum(r["success"] for r in rs) / len(rs),
            "median_beta_norm": float(np.median([r["beta_norm"] for r in rs])),
            "point_biserial": point_biserial(
                [r["beta_norm"] for r in rs], [r["success"] for r in rs]
            ),
        }
    reach = [r for r in rows if r["variant"] != "unrelated"]
    return {
        "n": len(rows),
        "by_variant": by_variant,
        "bins": binned_success(reach),
        "bins_all": binned_success(rows),
        "point_biserial": point_biserial(
            [r["beta_norm"] for r in reach], [r["success"] for r in reach]
        ),
        "point_biserial_all": point_biserial(
            [r["beta_norm"] for r in rows], [r["success"] for r in rows]
        ),
    }

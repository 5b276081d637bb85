"""Where the time of a sequential evaluation goes, and what share checkpoints would take on a
longer run: reads a finished ``repedit eval --mode sequential`` run directory.

Measured: seconds in edits (``edit_seconds``), in scoring each case after its own edit
(``eval_seconds``: probes and fluency), in REP training (``rep_seconds``), in the reference
predictions, and in checkpoints (``sequential.jsonl`` ``seconds``); the rest of the sessions'
wall time is loading, key statistics and saving state. Projected: for ``--cases`` edits and
each ``--eval-every`` schedule, the checkpoint share with the measured per-edit, per-scoring
and per-checkpoint-case seconds held constant (the schedule is the library's
``checkpoint_points``). Why: a checkpoint re-scores a fixed sample whatever the run's length, so
a short run's share says little about a long one's.

    python benchmarks/seq_checkpoints.py RUN_DIR [--cases 1000] [--eval-every log,10] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench_common import cpu_flags

from repedit.errors import RepeditError
from repedit.evaluation.config import EvalEvery
from repedit.evaluation.modes import checkpoint_points, parse_eval_every
from repedit.evaluation.rundir import RunDir


def _scoring_seconds(rec: dict[str, Any]) -> float:
    """A case's scoring after its own edit: ``eval_seconds`` (probes and fluency), else the
    sum of its parts."""
    if rec.get("eval_seconds") is not None:
        return float(rec["eval_seconds"])
    return float(rec.get("score_seconds") or 0.0) + float(rec.get("fluency_seconds") or 0.0)


def measured(run: RunDir) -> dict[str, Any]:
    """The run's seconds by phase, its per-unit means and its checkpoint schedule."""
    records = [r for r in run.results() if not r.get("error")]
    checkpoints = run.sequential()
    if not records or not checkpoints:
        raise RepeditError(f"{run.path}: no successful sequential records or no checkpoints")
    edit = sum(float(r.get("edit_seconds") or 0.0) for r in records)
    score = sum(_scoring_seconds(r) for r in records)
    rep = sum(float(r.get("rep_seconds") or 0.0) for r in records)
    refs = sum(float(r.get("seconds") or 0.0) for r in run.references().values())
    ckpt = sum(float(c["seconds"]) for c in checkpoints)
    ckpt_cases = sum(int(c["n_eval"]) for c in checkpoints)
    wall = sum(float(s.get("wall_seconds") or 0.0) for s in run.sessions())
    phases = edit + score + rep + refs + ckpt
    cfg = run.config().get("run_config", {})
    return {
        "run": str(run.path),
        "method": cfg.get("method"),
        "eval_every": cfg.get("eval_every"),
        "eval_sample": int(cfg.get("eval_sample", 20)),
        "cases": len(records),
        "checkpoints": [
            {"n_edits": c["n_edits"], "n_eval": c["n_eval"], "seconds": c["seconds"]}
            for c in checkpoints
        ],
        "seconds": {
            "edit": edit,
            "score": score,
            "rep": rep,
            "reference": refs,
            "checkpoint": ckpt,
            "other": max(wall - phases, 0.0),
            "wall": wall,
        },
        "per_edit": edit / len(records),
        "per_score": (score + rep) / len(records),
        "per_checkpoint_case": ckpt / ckpt_cases if ckpt_cases else 0.0,
        "median_edit": statistics.median(float(r.get("edit_seconds") or 0.0) for r in records),
        "checkpoint_share_of_phases": ckpt / phases if phases else 0.0,
        "checkpoint_share_of_wall": ckpt / wall if wall else 0.0,
    }


def schedule(cases: int, every: EvalEvery, sample: int) -> list[tuple[int, int]]:
    """``(n_edits, cases re-scored)`` per checkpoint of a ``cases``-edit run, all edits
    succeeding (the points are the library's ``checkpoint_points``)."""
    return [(n, min(n, sample) if sample else n) for n in checkpoint_points(cases, every)]


def projection(m: dict[str, Any], cases: int, every: EvalEvery) -> dict[str, Any]:
    """Seconds and checkpoint share of a ``cases``-edit run at the measured unit costs."""
    plan = schedule(cases, every, m["eval_sample"])
    rescored = sum(k for _, k in plan)
    work = cases * (m["per_edit"] + m["per_score"])
    ckpt = rescored * m["per_checkpoint_case"]
    return {
        "cases": cases,
        "eval_every": every,
        "checkpoints": len(plan),
        "rescored_cases": rescored,
        "edit_and_score_seconds": work,
        "checkpoint_seconds": ckpt,
        "checkpoint_share": ckpt / (work + ckpt) if work + ckpt else 0.0,
    }


def table(m: dict[str, Any], proj: Sequence[dict[str, Any]]) -> str:
    s = m["seconds"]
    lines = [
        f"run {m['run']}: {m['method']}, {m['cases']} edits, eval_every={m['eval_every']}, "
        f"sample {m['eval_sample']}",
        "phase        seconds",
        *(f"{k:<12} {v:8.1f}" for k, v in s.items()),
        f"checkpoint share: {m['checkpoint_share_of_phases']:.1%} of timed phases, "
        f"{m['checkpoint_share_of_wall']:.1%} of wall",
        f"per edit {m['per_edit']:.2f} s, per scoring {m['per_score']:.3f} s, "
        f"per checkpoint case {m['per_checkpoint_case']:.3f} s",
        "",
        "projection (same unit costs)",
        "cases  every  checkpoints  rescored  edit+score s  checkpoint s  share",
    ]
    for p in proj:
        lines.append(
            f"{p['cases']:>5}  {p['eval_every']!s:>5}  {p['checkpoints']:>11}  "
            f"{p['rescored_cases']:>8}  {p['edit_and_score_seconds']:>12.0f}  "
            f"{p['checkpoint_seconds']:>12.0f}  {p['checkpoint_share']:>5.1%}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a sequential run directory")
    ap.add_argument("--cases", type=int, default=1000, help="edits of the projected run")
    ap.add_argument("--eval-every", default="log,10", help="schedules to project (log or N)")
    ap.add_argument("--json", action="store_true", help="print the JSON report only")
    args = ap.parse_args(argv)
    m = measured(RunDir(args.run))
    proj = [
        projection(m, args.cases, e)
        for e in (parse_eval_every(t) for t in args.eval_every.split(","))
    ]
    report = {"measured": m, "projection": proj, "cpu_flags": cpu_flags()}
    print(json.dumps(report, indent=2) if args.json else table(m, proj))
    return report


if __name__ == "__main__":
    try:
        main()
    except RepeditError as exc:
        sys.exit(f"error: {exc}")

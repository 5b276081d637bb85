"""REP speed: seconds of REP training per edit against the edit itself, and where they go.

The issue's cost target is "REP's extra time per edit ≤ 1× the plain editor's". ``repedit
eval`` records both times per case, but an evaluation usually shares the machine with others;
this script measures them alone, the way the evaluation harness runs them: for each method
(default ROME and MEMIT) and each of ``--cases`` REP-CounterFact cases (after one untimed
warm-up case that fills the key statistics, the Cholesky factors and the corpus), it times

* the edit (``editor.edit``), then
* REP's training on the edited model (``train_rep_after``, the harness's call: long-context
  passages from ``--corpus``, gate/alignment report on), split into phases: ``targets``
  (k*, the whitened directions), ``pool`` (building and tokenising the training variants),
  ``keys`` (forward passes that read keys), ``losses`` (the loss computation of every step),
  ``report`` (gate/alignment tallies before and after) and ``other`` (backward, Adam, the
  prompt keys, stacking).

The edit is reverted after each case. Without the data folder, built-in facts are used.
Prints one JSON object, then a table. Never asserts: the numbers are for reading.

    python benchmarks/rep_speed.py --cases 3 --threads 1
    python benchmarks/rep_speed.py --methods memit --rep-set steps=20 --cases 3
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from typing import Any

import torch
from bench_common import PhaseTimer, default_data_dir, patched

#: phase -> (module, object in it, attribute) patched for timing: a function is patched in the
#: module that calls it, a method on its class
PHASES: dict[str, list[tuple[str, str, str]]] = {
    "targets": [("repedit.rep.train", "", "edit_targets")],
    "pool": [("repedit.rep.train", "", "build_pool")],
    "keys": [
        ("repedit.rep.reader", "LayerwiseReader", "__init__"),
        ("repedit.rep.reader", "LayerwiseReader", "advance"),
        ("repedit.rep.reader", "", "read_keys"),
    ],
    "losses": [("repedit.rep.train", "", "step_losses")],
    "report": [("repedit.rep.train", "", "measure")],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", default="smollm2-135m", help="alias, .gguf, directory or hub id")
    p.add_argument("--methods", default="rome,memit", help="editors, comma-separated")
    p.add_argument("--cases", type=int, default=3, help="timed cases per method")
    p.add_argument(
        "--corpus",
        default=str(default_data_dir() / "wikitext" / "wiki.test.raw"),
        help="key statistics and REP's long-context passages",
    )
    p.add_argument("--data-dir", default=str(default_data_dir()), help="for rep-counterfact")
    p.add_argument("--stats-tokens", type=int, default=100_000)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--cache", default=None, help="repedit cache (default: $REPEDIT_CACHE)")
    p.add_argument(
        "--rep-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="RepConfig override, repeatable (e.g. steps=20)",
    )
    return p.parse_args(argv)


def phase_targets() -> dict[str, list[tuple[Any, str]]]:
    """``PHASES`` resolved to (owner, name) pairs; a missing name fails loudly (a rename in
    ``repedit.rep`` must not silently drop a phase)."""
    import importlib

    def owner(module: str, name: str) -> Any:
        mod = importlib.import_module(module)
        return getattr(mod, name) if name else mod

    return {
        phase: [(owner(module, name), attr) for module, name, attr in targets]
        for phase, targets in PHASES.items()
    }


def load_cases(lm: Any, editor: Any, n: int, data_dir: str) -> tuple[list[Any], str]:
    """``n`` cases the editor accepts: REP-CounterFact when available, else built-in facts."""
    from repedit.data import builtin_facts
    from repedit.data import load_cases as load
    from repedit.errors import RepeditError

    try:
        cases, source = load("rep-counterfact", data_dir=data_dir).cases, "rep-counterfact"
    except RepeditError:
        cases, source = builtin_facts(), "builtin"
    out = []
    for case in cases:
        try:
            editor.validate(lm, [case.request])
        except RepeditError:
            continue
        out.append(case)
        if len(out) == n:
            break
    return out, source


def timed_case(
    lm: Any, editor: Any, case: Any, cfg: Any, sampler: Any, timer: PhaseTimer
) -> dict[str, Any]:
    from repedit.rep.train import train_rep_after

    timer.sync()
    t0 = time.perf_counter()
    result = editor.edit(lm, [case.request])
    timer.sync()
    edit_s = time.perf_counter() - t0
    try:
        timer.reset()
        with patched(timer, phase_targets()):
            t0 = time.perf_counter()
            rep = train_rep_after(
                lm, editor, result, [case], cfg=cfg, keys=[case.request.case_id], sampler=sampler
            )
            timer.sync()
            rep_s = time.perf_counter() - t0
    finally:
        result.revert(lm)
    phases = {k: round(v, 4) for k, v in timer.seconds.items()}
    phases["other"] = round(max(0.0, rep_s - sum(timer.seconds.values())), 4)
    return {
        "case_id": case.request.case_id,
        "edit_s": round(edit_s, 4),
        "rep_s": round(rep_s, 4),
        "ratio": round(rep_s / edit_s, 4) if edit_s else None,
        "phases": phases,
        "layers": rep.layers,
        "pool": rep.info.get("pool"),
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    edit = sum(r["edit_s"] for r in runs)
    rep = sum(r["rep_s"] for r in runs)
    keys = [*PHASES, "other"]
    return {
        "cases": len(runs),
        "edit_s_mean": round(edit / len(runs), 3),
        "rep_s_mean": round(rep / len(runs), 3),
        "ratio": round(rep / edit, 3) if edit else None,
        "phases_s_mean": {k: round(sum(r["phases"][k] for r in runs) / len(runs), 3) for k in keys},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)

    import transformers

    from repedit.cli.common import parse_overrides
    from repedit.editors import StatsConfig, make_editor
    from repedit.models import load_model
    from repedit.rep.adapter import RepConfig
    from repedit.rep.variants import passage_sampler

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    overrides = parse_overrides(args.rep_set, "--rep-set", "steps=20")
    cfg = RepConfig().replace(long_context_corpus=args.corpus, **overrides)
    lm = load_model(args.model, device=args.device, dtype=args.dtype, cache=args.cache)
    stats = StatsConfig(
        corpus=args.corpus, n_tokens=args.stats_tokens, cache=args.cache, progress=False
    )
    sampler = passage_sampler(lm, cfg) if cfg.long_context else None
    timer = PhaseTimer(lm.device, PHASES)
    out: dict[str, Any] = {}
    for method in methods:
        editor = make_editor(method, stats=stats)
        cases, source = load_cases(lm, editor, args.cases + 1, args.data_dir)
        if len(cases) < 2:
            raise SystemExit(f"{method}: fewer than 2 usable cases in {source}")
        warm = timed_case(lm, editor, cases[0], cfg, sampler, timer)  # fills every cache
        print(f"{method} warm-up {warm['case_id']}: edit {warm['edit_s']:.1f}s", file=sys.stderr)
        runs = []
        for case in cases[1:]:
            run = timed_case(lm, editor, case, cfg, sampler, timer)
            runs.append(run)
            print(
                f"{method} {run['case_id']}: edit {run['edit_s']:.1f}s, REP {run['rep_s']:.1f}s",
                file=sys.stderr,
                flush=True,
            )
        out[method] = {"source": source, "summary": summarise(runs), "runs": runs}

    report = {
        "benchmark": "rep_speed",
        "model": args.model,
        "fingerprint": lm.fingerprint,
        "device": str(lm.device),
        "dtype": str(lm.dtype),
        "threads": torch.get_num_threads(),
        "rep_overrides": {k: v for k, v in overrides.items()},
        "rep_config": {k: cfg.to_dict()[k] for k in ("steps", "batch", "n_long", "layerwise")},
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "methods": out,
    }
    print(json.dumps(report, indent=2, default=str))
    print(table(report))
    return report


def table(report: dict[str, Any]) -> str:
    keys = [*PHASES, "other"]
    head = ["method", "cases", "edit s", "REP s", "REP/edit", *[f"{k} s" for k in keys]]
    rows = [head]
    for method, res in report["methods"].items():
        s = res["summary"]
        rows.append(
            [
                method,
                str(s["cases"]),
                f"{s['edit_s_mean']:.2f}",
                f"{s['rep_s_mean']:.2f}",
                f"{s['ratio']:.2f}×",
                *[f"{s['phases_s_mean'][k]:.2f}" for k in keys],
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    threads = report["threads"]
    lines.append(f"(means per case; {report['device']}, {threads} thread(s), {report['model']})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""``repedit report``: compare run directories in a table and one self-contained HTML file."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from repedit.cli import common
from repedit.errors import InvalidRequestError

DESCRIPTION = """\
Print a table of every robustness test for one or more run directories (written by
'repedit eval') and write a self-contained HTML report: results with 95 % CIs, bar charts,
per-case distributions and sequential-editing curves (inline images, no external assets).

Runs are labelled from their configuration (rome, rome+rep, rome+rep(no-gate), rome+rep τ=0.7;
the directory name is added where two runs share a label); REP runs add their mean edit / REP
seconds and gate open rates, and the HTML has a robustness / specificity trade-off plot (one
point per run). A τ-sweep directory (repedit eval --rep-tau 0.5,0.7,...) stands for its
sub-runs OUT/tau-*. Runs of different lengths (--n 100 vs --n 50) compare fairly with
--common: every run is then scored on the cases all of them evaluated.

examples:
  repedit report runs/rome-cf
  repedit report runs/rome-cf runs/memit-cf --out compare.html
  repedit report runs/rome-cf runs/rome-rep-cf runs/rome-rep-sweep/tau-* --out rep.html
  repedit report runs/rome-cf100 runs/rome-rep-cf50 --common
  repedit report runs/rome-cf runs/rome-rep-cf --markdown > table.md
  repedit report --diff runs/one-worker runs/two-workers

--markdown prints the table as Markdown (from each run's summary.json) and writes no HTML.
--diff A B compares two runs' records (timings dropped, sorted by case): identical errors,
success flags and fluency texts, probabilities within 1e-4 relative; exit 0 when they match,
1 with the list of differences otherwise.
"""


def register(subparsers: Any) -> None:
    p = common.add_command(
        subparsers,
        "report",
        help="summarise and compare evaluation runs (table + self-contained HTML)",
        description=DESCRIPTION,
    )
    p.add_argument("run_dirs", nargs="*", metavar="RUN_DIR", help="directories from repedit eval")
    p.add_argument(
        "--diff",
        nargs=2,
        metavar=("A", "B"),
        default=None,
        help="compare two runs' records; exit 1 and list the differences if they do not match",
    )
    p.add_argument(
        "--ignore-texts",
        action="store_true",
        help="with --diff: do not compare fluency texts (runs at different thread counts sample "
        "different texts from logits equal to float rounding)",
    )
    p.add_argument(
        "--markdown", action="store_true", help="print the table as Markdown; no HTML written"
    )
    p.add_argument(
        "--out",
        default=None,
        help="HTML file (default: RUN_DIR/report.html for one run, ./report.html for several)",
    )
    p.add_argument(
        "--common",
        action="store_true",
        help="score every run only on the cases all the runs evaluated without error",
    )
    common.add_json_option(p)


def run(args: argparse.Namespace) -> int:
    if args.diff:
        if args.run_dirs:
            raise InvalidRequestError("--diff takes exactly two run directories: --diff A B")
        return _diff(*args.diff, texts=not args.ignore_texts)
    if not args.run_dirs:
        raise InvalidRequestError("give at least one run directory (or --diff A B)")
    from repedit.evaluation.report import run_labels, run_names, write_report
    from repedit.evaluation.rundir import sweep_dirs
    from repedit.evaluation.summary import (
        TABLE_COLUMNS,
        build_summary,
        common_cases,
        comparison_rows,
        load_summary,
        runs_markdown,
        table_rows,
    )

    given = [Path(d) for d in args.run_dirs]
    dirs: list[Path] = []
    for d in given:
        if not (d / "config.json").exists() and not (d / "summary.json").exists():
            raise InvalidRequestError(f"{d} is not a run directory (no config.json)")
        subs = [s for s in sweep_dirs(d) if (s / "config.json").exists()]
        dirs += subs or [d]  # a τ sweep stands for its sub-runs
    cases = None
    if args.common:
        bare = [str(d) for d in dirs if not (d / "config.json").exists()]
        if bare:
            raise InvalidRequestError(
                f"--common needs each run's records; {', '.join(bare)} only has a summary.json"
            )
        cases = common_cases(dirs)
        if not cases:
            raise InvalidRequestError("--common: the runs have no evaluated case in common")
        common.log(f"comparing on the {len(cases)} cases all {len(dirs)} runs evaluated")
    summaries = [
        build_summary(d, cases) if (d / "config.json").exists() else load_summary(d) for d in dirs
    ]
    names = run_labels(dirs, summaries)
    if args.markdown:
        common.out.print(
            runs_markdown(names, summaries), end="", markup=False, highlight=False, soft_wrap=True
        )
        return 0
    out = (
        Path(args.out)
        if args.out
        else (given[0] / "report.html" if len(given) == 1 else Path("report.html"))
    )
    path = write_report(dirs, out, cases)
    if args.json:
        common.print_json(
            {
                "report": str(path),
                "runs": dict(zip(run_names(dirs), summaries, strict=True)),
                "labels": dict(zip(run_names(dirs), names, strict=True)),
                "common_cases": cases,
            }
        )
        return 0
    if len(dirs) == 1:
        common.print_table(table_rows(summaries[0]), TABLE_COLUMNS, title=f"{names[0]} · {dirs[0]}")
    else:
        columns = ["test (%; fluency in bits)", *names]
        common.print_table(comparison_rows(summaries), columns, title="runs compared")
    common.log(f"report: {path}")
    return 0


def _diff(a: str, b: str, *, texts: bool = True) -> int:
    from repedit.evaluation.diff import diff_runs

    for d in (a, b):
        if not (Path(d) / "config.json").exists():
            raise InvalidRequestError(f"{d} is not a run directory (no config.json)")
    found = diff_runs(a, b, texts=texts)
    if not found:
        common.out.print(f"{a} and {b} match", markup=False, highlight=False, soft_wrap=True)
        return 0
    common.out.print(
        f"{a} and {b} differ ({len(found)}):", markup=False, highlight=False, soft_wrap=True
    )
    for line in found:
        common.out.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)
    return 1

"""Wall time of ``repedit eval`` with worker processes against one process with the same cores.

Runs the same small evaluation twice, each as a fresh ``repedit eval`` process into a fresh run
directory, so model loading, worker start-up and writing all count:

* ``one``: one process with ``--threads T`` (T = ``--workers`` × ``--worker-threads``);
* ``workers``: ``--workers W`` processes with ``--threads`` ``--worker-threads`` each.

A warm-up run of one case (not timed) fills the model conversion and key-statistics caches
first, so neither timed run computes them. The two runs' records are then compared with
``repedit report --diff`` (``records_match``). Prints one JSON object, then a table, with the
CPU's SIMD flags and the core count. Never asserts: the numbers are for reading, and they
only mean something on an otherwise idle machine.

    python benchmarks/eval_workers.py --n 8
    python benchmarks/eval_workers.py --n 20 --workers 4 --worker-threads 1 \
        --eval-args "--long-context-words 300 --fluency-samples 1"
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_common import cpu_flags, default_data_dir

#: ``repedit`` in a fresh interpreter (this one's, so its environment and PYTHONPATH hold)
CLI = [
    sys.executable,
    "-c",
    "import sys; from repedit.cli import main; sys.exit(main(sys.argv[1:]))",
]


def repedit(argv: list[str]) -> float:
    """Run ``repedit ARGV`` in a fresh interpreter; its wall time in seconds."""
    t0 = time.perf_counter()
    subprocess.run([*CLI, *argv], check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="rep-counterfact")
    ap.add_argument("--n", type=int, default=8, help="cases (default 8)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--worker-threads", type=int, default=1)
    ap.add_argument("--tests", default="all")
    ap.add_argument("--keep", default=None, help="keep the run directories here")
    ap.add_argument(
        "--eval-args", default="", help="more options for every repedit eval (one string)"
    )
    args = ap.parse_args()

    root = Path(args.keep or tempfile.mkdtemp(prefix="eval-workers-"))
    root.mkdir(parents=True, exist_ok=True)
    total = args.workers * args.worker_threads
    common = [
        "eval", "--model", args.model, "--data", args.data, "--data-dir",
        str(default_data_dir()), "--tests", args.tests, "--no-progress",
        *shlex.split(args.eval_args),
    ]  # fmt: skip
    repedit([*common, "--n", "1", "--threads", str(total), "--out", str(root / "warm")])
    n = ["--n", str(args.n)]
    one = repedit([*common, *n, "--threads", str(total), "--out", str(root / "one")])
    workers = repedit(
        [
            *common, *n, "--workers", str(args.workers),
            "--threads", str(args.worker_threads), "--out", str(root / "workers"),
        ]
    )  # fmt: skip
    # fluency texts are compared only at equal thread counts (sampling follows the last bits)
    same_threads = args.worker_threads == total
    diff = subprocess.run(
        [*CLI, "report", "--diff", str(root / "one"), str(root / "workers"),
         *([] if same_threads else ["--ignore-texts"])],
        capture_output=True, text=True,
    )  # fmt: skip
    result: dict[str, Any] = {
        "model": args.model,
        "data": args.data,
        "n_cases": args.n,
        "tests": args.tests,
        "one_process": {"threads": total, "wall_seconds": round(one, 2)},
        "workers": {
            "workers": args.workers,
            "threads_each": args.worker_threads,
            "wall_seconds": round(workers, 2),
        },
        "speedup": round(one / workers, 3),
        "records_match": diff.returncode == 0,
        "fluency_texts_compared": same_threads,
        "differences": diff.stdout.splitlines()[1:21],
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
    }
    print(json.dumps(result, indent=1))
    print(f"\n{'run':<34}{'wall s':>10}{'s/case':>10}")
    for name, secs in (
        (f"1 process x {total} threads", one),
        (f"{args.workers} workers x {args.worker_threads} thread(s)", workers),
    ):
        print(f"{name:<34}{secs:>10.1f}{secs / args.n:>10.2f}")
    print(f"speedup {one / workers:.2f}x; records match: {result['records_match']}")
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Value optimisation under ``batching="fixed"`` and ``"stream"`` on the first N CounterFact facts.

For each ``--n``, the first N cases MEMIT accepts get their values optimised as MEMIT would
(its contexts, its last layer, the residual site, ``--steps`` steps), once per scheduler, and
the process CPU seconds (``time.process_time``; the fairer measure on a shared machine) and
wall seconds of each run are recorded, with the steps each request took and how far the
schedulers' deltas are apart (largest relative norm difference over the requests). The model
is loaded, MEMIT's contexts generated and one untimed warm-up run made (``warm_up``: two
requests, one step, under every scheduler) before anything is timed, so the first timed
scheduler does not pay the process's first-run costs (lazy initialisation, allocator growth).

Writes ``value_batching.json`` under ``--out``, prints the JSON and a table. Never asserts.

    python benchmarks/value_batching.py --n 16,32 --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
from bench_common import cpu_flags, default_data_dir

BATCHINGS = ("fixed", "stream")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--n", default="16,32", help="comma-separated numbers of requests")
    p.add_argument("--steps", type=int, default=25, help="value steps per request")
    p.add_argument("--batching", default="fixed,stream", help="schedulers to run, in order")
    p.add_argument("--group-tokens", type=int, default=None, help="stream budget (default: hp's)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", default="value-batching-out", help="folder for the JSON")
    p.add_argument("--model", default="smollm2-135m", help="alias, .gguf, directory or hub id")
    p.add_argument("--dataset", default="counterfact", help="a load_cases name or file")
    p.add_argument("--data-dir", default=str(default_data_dir()))
    p.add_argument("--cache", default=None, help="repedit cache (default: $REPEDIT_CACHE)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto")
    args = p.parse_args(argv)
    args.sizes = [int(x) for x in args.n.split(",")]
    args.batchings = args.batching.split(",")
    if any(n < 1 for n in args.sizes) or any(b not in BATCHINGS for b in args.batchings):
        p.error(f"--n must be positive; --batching a list of {', '.join(BATCHINGS)}")
    return args


def first_requests(lm: Any, editor: Any, args: argparse.Namespace, n: int) -> list[Any]:
    """The first ``n`` requests MEMIT accepts (tokenisation, subject found)."""
    from repedit.data import load_cases
    from repedit.errors import RepeditError

    out = []
    for case in load_cases(args.dataset, data_dir=args.data_dir).cases:
        try:
            editor.validate(lm, [case.request])
        except RepeditError:
            continue
        out.append(case.request)
        if len(out) == n:
            break
    return out


def timed_run(lm: Any, requests: list[Any], contexts: list[str], hp: Any, layer: int) -> dict:
    """One ``optimise_values`` run as MEMIT calls it; its CPU and wall seconds and results."""
    from repedit.editors.values import optimise_values

    cpu0, wall0 = time.process_time(), time.perf_counter()
    res = optimise_values(
        lm, requests, contexts, layer=layer, site="residual", hp=hp.value, position=hp.position
    )
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return {
        "cpu_seconds": round(cpu, 2),
        "wall_seconds": round(wall, 2),
        "cpu_seconds_per_request": round(cpu / len(requests), 3),
        "steps": res.steps,
        "mean_steps": round(sum(res.steps) / len(res.steps), 2),
        "prob": [round(p, 4) for p in res.prob],
        "_delta": res.delta,
    }


def warm_up(
    lm: Any, requests: list[Any], contexts: list[str], layer: int, batchings: list[str]
) -> None:
    """One untimed ``optimise_values`` run per scheduler on two requests for one step."""
    from repedit.editors import make_editor
    from repedit.editors.values import optimise_values

    for batching in batchings:
        hp = make_editor("memit", {"value": {"steps": 1, "batching": batching}}).resolved(lm)
        optimise_values(
            lm,
            requests[:2],
            contexts,
            layer=layer,
            site="residual",
            hp=hp.value,
            position=hp.position,
        )


def agreement(runs: dict[str, dict]) -> dict[str, Any]:
    """How the first scheduler's results compare with each other one's."""
    names = list(runs)
    base = runs[names[0]]
    out: dict[str, Any] = {}
    for name in names[1:]:
        other = runs[name]
        diff = (other["_delta"] - base["_delta"]).norm(dim=1)
        rel = diff / base["_delta"].norm(dim=1).clamp_min(1e-12)
        out[f"{name}_vs_{names[0]}"] = {
            "same_steps": other["steps"] == base["steps"],
            "delta_max_relative_difference": float(rel.max()),
            "cpu_ratio": round(other["cpu_seconds"] / base["cpu_seconds"], 3),
        }
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from repedit.editors import make_editor
    from repedit.models import load_model

    lm = load_model(args.model, device=args.device, dtype=args.dtype, cache=args.cache)
    editor = make_editor("memit", {"value": {"steps": args.steps}})
    hp = editor.resolved(lm)
    contexts = editor.contexts(lm, hp)
    layer = editor.layers(lm, hp)[-1]
    sizes = []
    warm_up(lm, first_requests(lm, editor, args, 2), contexts, layer, args.batchings)
    for n in args.sizes:
        requests = first_requests(lm, editor, args, n)
        runs = {}
        for batching in args.batchings:
            value = {"steps": args.steps, "batching": batching}
            if args.group_tokens is not None:
                value["group_tokens"] = args.group_tokens
            run_hp = make_editor("memit", {"value": value}).resolved(lm)
            runs[batching] = timed_run(lm, requests, contexts, run_hp, layer)
        sizes.append({"n": len(requests), "runs": runs, "agreement": agreement(runs)})
        for run in runs.values():
            run.pop("_delta")
    report = {
        "benchmark": "value_batching",
        "model": args.model,
        "fingerprint": lm.fingerprint,
        "dataset": args.dataset,
        "layer": layer,
        "contexts": len(contexts),
        "steps": args.steps,
        "group_tokens": args.group_tokens,
        "threads": torch.get_num_threads(),
        "cpu_flags": cpu_flags(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "sizes": sizes,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "value_batching.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(table(report))
    return report


def table(r: dict[str, Any]) -> str:
    lines = [
        f"value_batching: {r['model']}, layer {r['layer']}, {r['contexts']} contexts, "
        f"{r['steps']} steps, {r['threads']} threads",
        "| N | scheduler | CPU s | wall s | CPU s / request | mean steps |",
        "|---|---|---|---|---|---|",
    ]
    for size in r["sizes"]:
        for name, run in size["runs"].items():
            lines.append(
                f"| {size['n']} | {name} | {run['cpu_seconds']} | {run['wall_seconds']} | "
                f"{run['cpu_seconds_per_request']} | {run['mean_steps']} |"
            )
        for pair, agree in size["agreement"].items():
            lines.append(
                f"  N={size['n']} {pair}: same steps {agree['same_steps']}, delta max rel. "
                f"diff {agree['delta_max_relative_difference']:.2e}, CPU ratio {agree['cpu_ratio']}"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""REP inference cost against the number of edits: a RepStack of N adapters vs its MergedStack.

Fixed shapes: the edit prompts of the first ``--cases`` REP-CounterFact cases (built-in facts
when the data folder lacks the file), one padded batch. ``N`` synthetic adapters (random
projections, gates forced open, so every adapter acts on every token and its full cost is
visible) sit on each of ``--layers`` (default: MEMIT's last edited layer). For each N the
forward is timed plainly (the edited model without adapters), with the ``RepStack`` and with
the ``MergedStack``; the best of ``--repeats`` runs, wall and CPU seconds. The two stacked
outputs are compared (largest logit difference).

Prints one JSON object, then a table. Never asserts: the numbers are for reading.

    python benchmarks/rep_scale.py --sizes 1,10,100 --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from bench_common import cpu_flags, default_data_dir


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data-dir", default=str(default_data_dir()))
    p.add_argument("--cases", type=int, default=20, help="prompts in the fixed batch")
    p.add_argument("--sizes", default="1,10,100,1000", help="adapters per layer")
    p.add_argument("--layers", default=None, help="comma-separated (default: MEMIT's last)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-stack-above", type=int, default=1000, help="time RepStack up to N")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", default=None)
    return p.parse_args(argv)


def prompts(data_dir: str, n: int) -> tuple[list[str], str]:
    from repedit.data import builtin_facts, load_cases
    from repedit.errors import RepeditError

    try:
        cases = load_cases("rep-counterfact", data_dir=data_dir).cases[:n]
        return [c.request.text for c in cases], "rep-counterfact"
    except RepeditError:
        return [c.request.text for c in builtin_facts()][:n], "builtin"


def synthetic(d_mlp: int, n: int, seed: int) -> list[Any]:
    """``n`` adapters whose gate is open on every token (bias +20) with moved projections."""
    from repedit.rep import RepAdapter, RepConfig

    cfg = RepConfig(gate_bias_init=20.0, beta_guard=None, keep_prompt_key=False)
    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(n):
            adapter = RepAdapter(d_mlp, cfg)
            with torch.no_grad():
                adapter.B.weight.normal_(0, 0.01)
            out.append(adapter.eval())
    return out


def best(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[float, float, torch.Tensor]:
    """Fastest wall and CPU seconds of ``repeats`` runs, and the last output."""
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    assert out is not None
    return min(walls), min(cpus), out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from repedit.editors import make_editor
    from repedit.evaluation.scoring import encode_left_padded
    from repedit.models import load_model
    from repedit.rep import RepStack, rep_applied
    from repedit.rep.merged import MergedStack

    lm = load_model(args.model, cache=args.cache)
    if args.layers:
        layers = [int(x) for x in args.layers.split(",")]
    else:
        editor = make_editor("memit")
        layers = editor.layers(lm, editor.resolved(lm))[-1:]
    texts, source = prompts(args.data_dir, args.cases)
    enc = encode_left_padded(lm, texts)

    def forward() -> torch.Tensor:
        with torch.inference_mode():
            return lm.model(**enc, use_cache=False).logits

    plain_wall, plain_cpu, _ = best(forward, args.repeats)
    runs = []
    for n in [int(s) for s in args.sizes.split(",") if s.strip()]:
        members = {layer: synthetic(lm.arch.d_mlp, n, seed=layer) for layer in layers}
        stacks = {layer: RepStack(m).eval() for layer, m in members.items()}
        merged = {layer: MergedStack(s) for layer, s in stacks.items()}
        run: dict[str, Any] = {"n": n}
        with rep_applied(lm, merged, count=False):
            run["merged_wall"], run["merged_cpu"], got = best(forward, args.repeats)
        if n <= args.skip_stack_above:
            with rep_applied(lm, stacks, count=False):
                run["stack_wall"], run["stack_cpu"], want = best(forward, args.repeats)
            run["max_logit_diff"] = float((got - want).abs().max())
        run["merged_over_plain"] = round(run["merged_wall"] / plain_wall, 3)
        run["merged_over_plain_cpu"] = round(run["merged_cpu"] / plain_cpu, 3)
        runs.append(run)
        print(f"N={n}: {json.dumps(run)}", file=sys.stderr, flush=True)
    report = {
        "benchmark": "rep_scale",
        "model": args.model,
        "prompts": source,
        "shape": list(enc["input_ids"].shape),
        "layers": layers,
        "threads": torch.get_num_threads(),
        "cpu_flags": cpu_flags(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "plain_wall": plain_wall,
        "plain_cpu": plain_cpu,
        "runs": runs,
    }
    print(json.dumps(report, indent=2))
    print(f"rep_scale: {args.model}, batch {report['shape']}, layers {layers}")
    print(f"  plain forward {plain_wall:.3f}s wall, {plain_cpu:.3f}s CPU (wall/CPU below)")
    for r in runs:
        stack = f"{r['stack_wall']:.3f}s/{r['stack_cpu']:.3f}s" if "stack_wall" in r else "-"
        print(
            f"  N={r['n']:>5}  RepStack {stack:>16}  merged {r['merged_wall']:.3f}s/"
            f"{r['merged_cpu']:.3f}s ({r['merged_over_plain']}x plain wall, "
            f"{r['merged_over_plain_cpu']}x CPU)"
        )
    return report


if __name__ == "__main__":
    main()

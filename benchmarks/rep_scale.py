"""REP inference cost against the number of edits: a RepStack of N adapters vs its MergedStack.

Fixed shapes: the edit prompts of the first ``--cases`` REP-CounterFact cases (built-in facts
when the data folder lacks the file), one padded batch. ``N`` synthetic adapters (random
projections, gates forced open, so every adapter acts on every token and its full cost is
visible) sit on each of ``--layers`` (default: MEMIT's last edited layer). For each N the
forward is timed plainly (the edited model without adapters), with the ``RepStack`` and with
the ``MergedStack``; the best of ``--repeats`` runs, wall and CPU seconds. The two stacked
outputs are compared (largest logit difference).

``--candidates all,key`` also times the ``MergedStack`` with its candidate screen
(``candidates="key"``, ``--threshold``). For it every adapter needs an edit key: adapter ``i``
gets the β̃ direction ``C⁻¹k/(kᵀC⁻¹k)`` of the subject key ``k`` of CounterFact case ``i``
(the first ``--cases`` are the batch's own prompts, so each batch prompt's subject token
meets its own adapter; the rest are other cases' subjects), with ``C`` the editor's key
statistics. The run then reports how many (token, adapter) pairs the screen let through.

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
    p.add_argument("--candidates", default="all", help="'all' and/or 'key' (comma-separated)")
    p.add_argument("--threshold", type=float, default=None, help="screen's β̃ (default: module's)")
    return p.parse_args(argv)


def requests(data_dir: str, n: int) -> tuple[list[Any], str]:
    """The first ``n`` REP-CounterFact requests (then CounterFact's, then built-in facts)."""
    from repedit.data import builtin_facts, load_cases
    from repedit.errors import RepeditError

    out: list[Any] = []
    source = "builtin"
    for name in ("rep-counterfact", "counterfact"):
        try:
            cases = load_cases(name, data_dir=data_dir).cases
        except RepeditError:
            continue
        seen = {r.text for r in out}
        out += [c.request for c in cases if c.request.text not in seen][: n - len(out)]
        source = "rep-counterfact" if name == "rep-counterfact" else source + "+counterfact"
        if len(out) >= n:
            return out, source
    return out + [c.request for c in builtin_facts()][: n - len(out)], source


def edit_directions(lm: Any, layer: int, reqs: list[Any]) -> torch.Tensor:
    """``C⁻¹k/(kᵀC⁻¹k)`` per request, ``k`` its subject's last-token key at ``layer``."""
    from repedit.editors import make_editor
    from repedit.editors.keys import key_inputs, keys_at

    editor = make_editor("memit")
    seqs, positions = key_inputs(lm, reqs, ["{}"], "subject_last")
    k = keys_at(lm, [layer], seqs, positions)[layer].double()
    c = editor.second_moment(lm, [layer])[layer].matrix.double()
    ck = torch.linalg.solve(c, k.T).T  # C⁻¹k per row
    return (ck / (k * ck).sum(-1, keepdim=True)).float()


def synthetic(d_mlp: int, n: int, seed: int, keys: torch.Tensor | None = None) -> list[Any]:
    """``n`` adapters whose gate is open on every token (bias +20) with moved projections;
    ``keys``: each one's β̃ direction (its edit key, for the candidate screen)."""
    from repedit.rep import RepAdapter, RepConfig

    cfg = RepConfig(gate_bias_init=20.0, beta_guard=None, keep_prompt_key=False)
    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(n):
            adapter = RepAdapter(d_mlp, cfg)
            with torch.no_grad():
                adapter.B.weight.normal_(0, 0.01)
            if keys is not None:
                adapter.set_guard(keys[i])
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


def time_size(
    lm: Any, forward: Callable[[], torch.Tensor], n: int, args: argparse.Namespace, ctx: dict
) -> dict[str, Any]:
    """One N: the plain forward, the merged stack (and the RepStack, and the screened stack)
    timed; ratios are to this N's plain forward."""
    from repedit.rep import RepStack, rep_applied
    from repedit.rep.merged import CANDIDATE_THRESHOLD, MergedStack

    keys = ctx["keys"]
    members = {
        layer: synthetic(lm.arch.d_mlp, n, layer, None if keys is None else keys[layer][:n])
        for layer in ctx["layers"]
    }
    stacks = {layer: RepStack(m).eval() for layer, m in members.items()}
    # the plain forward again next to this N's runs (a shared machine's load drifts)
    plain_wall, plain_cpu, _ = best(forward, args.repeats)
    ctx["plain_wall"], ctx["plain_cpu"] = plain_wall, plain_cpu
    run: dict[str, Any] = {"n": n, "plain_wall": plain_wall, "plain_cpu": plain_cpu}
    if "all" in ctx["variants"]:
        merged = {layer: MergedStack(s) for layer, s in stacks.items()}
        with rep_applied(lm, merged, count=False):
            run["merged_wall"], run["merged_cpu"], got = best(forward, args.repeats)
        run["merged_over_plain"] = round(run["merged_wall"] / ctx["plain_wall"], 3)
        run["merged_over_plain_cpu"] = round(run["merged_cpu"] / ctx["plain_cpu"], 3)
        if n <= args.skip_stack_above:
            with rep_applied(lm, stacks, count=False):
                run["stack_wall"], run["stack_cpu"], want = best(forward, args.repeats)
            run["max_logit_diff"] = float((got - want).abs().max())
    if "key" in ctx["variants"]:
        threshold = CANDIDATE_THRESHOLD if args.threshold is None else args.threshold
        screened = {
            l: MergedStack(s, candidates="key", threshold=threshold) for l, s in stacks.items()
        }
        with rep_applied(lm, screened, count=False):
            run["key_wall"], run["key_cpu"], _ = best(forward, args.repeats)
        x = ctx["batch_keys"]
        run["key_pairs"] = {l: int(m.screen(x[l]).sum()) for l, m in screened.items()}
        run["key_threshold"] = threshold
        run["key_over_plain"] = round(run["key_wall"] / ctx["plain_wall"], 3)
        run["key_over_plain_cpu"] = round(run["key_cpu"] / ctx["plain_cpu"], 3)
    return run


def batch_keys(lm: Any, enc: dict, layers: list[int]) -> dict[int, torch.Tensor]:
    """The batch's keys at ``layers``, [tokens, d_mlp] (padding included, as the hook sees)."""
    got: dict[int, torch.Tensor] = {}
    hooks = [
        lm.arch.down_proj(layer).register_forward_pre_hook(
            lambda _m, a, layer=layer: got.__setitem__(layer, a[0].detach().float())
        )
        for layer in layers
    ]
    with torch.inference_mode():
        lm.model(**enc, use_cache=False)
    for h in hooks:
        h.remove()
    return {layer: k.reshape(-1, k.shape[-1]) for layer, k in got.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from repedit.editors import make_editor
    from repedit.evaluation.scoring import encode_left_padded
    from repedit.models import load_model

    lm = load_model(args.model, cache=args.cache)
    if args.layers:
        layers = [int(x) for x in args.layers.split(",")]
    else:
        editor = make_editor("memit")
        layers = editor.layers(lm, editor.resolved(lm))[-1:]
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    variants = {v.strip() for v in args.candidates.split(",")}
    reqs, source = requests(
        args.data_dir, max([args.cases, *sizes]) if "key" in variants else args.cases
    )
    enc = encode_left_padded(lm, [r.text for r in reqs[: args.cases]])

    def forward() -> torch.Tensor:
        with torch.inference_mode():
            return lm.model(**enc, use_cache=False).logits

    keys = {l: edit_directions(lm, l, reqs) for l in layers} if "key" in variants else None
    plain_wall, plain_cpu, _ = best(forward, args.repeats)
    ctx = {"layers": layers, "keys": keys, "variants": variants, "plain_wall": plain_wall,
           "plain_cpu": plain_cpu, "batch_keys": batch_keys(lm, enc, layers)}  # fmt: skip
    runs = []
    for n in sizes:
        runs.append(time_size(lm, forward, n, args, ctx))
        print(f"N={n}: {json.dumps(runs[-1])}", file=sys.stderr, flush=True)
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
    table(report)
    return report


def table(report: dict[str, Any]) -> None:
    print(f"rep_scale: {report['model']}, batch {report['shape']}, layers {report['layers']}")
    print(
        f"  plain forward {report['plain_wall']:.3f}s wall, {report['plain_cpu']:.3f}s CPU "
        "(wall/CPU below; ratios to the plain forward's CPU time)"
    )
    fmt = lambda r, p: f"{r[p + '_wall']:.3f}s/{r[p + '_cpu']:.3f}s" if p + "_wall" in r else "-"  # noqa: E731
    for r in report["runs"]:
        line = f"  N={r['n']:>5}  plain {fmt(r, 'plain')}  RepStack {fmt(r, 'stack'):>16}"
        line += f"  merged {fmt(r, 'merged'):>16}"
        if "merged_cpu" in r:
            line += f" ({r['merged_over_plain_cpu']}x)"
        if "key_wall" in r:
            line += (
                f"  screened {fmt(r, 'key')} ({r['key_over_plain_cpu']}x, pairs {r['key_pairs']})"
            )
        print(line)


if __name__ == "__main__":
    main()

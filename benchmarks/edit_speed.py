"""Edit speed: seconds per ROME edit and per MEMIT batch, and where the time goes.

After a warm-up that is not timed (model load, key statistics from the corpus or its cache,
context-prefix generation), it measures

* ROME: one edit per built-in fact, ``--repeats`` different facts, each reverted afterwards;
* MEMIT: one batch per size in ``--batches`` (requests from the REP CounterFact test file when
  the data folder has it, else the built-in facts repeated with different targets);

and splits each edit's wall time into value optimisation, key computation, the closed-form
solve, MEMIT's recomputation of the hidden state at the last edited layer ("residual") and
the rest (apply, bookkeeping). The split wraps the functions where the editor modules *use*
them (``repedit.editors.rome.optimise_values`` and so on). Efficacy of each timed edit (the
greedy continuation starts with the new target) is measured after the timer stops.

Prints one JSON object, then a table. Never asserts: the numbers are for reading.

    python benchmarks/edit_speed.py --batches 10 --repeats 2 --threads 1
    python benchmarks/edit_speed.py --batches "" --repeats 3 --value-path full,prefix
    python benchmarks/edit_speed.py --batches "" --repeats 3 \
        --set value.robust_forms=3 --set value.robust_prefix_lengths=50,300

``--set`` overrides an editor hyper-parameter of both editors, as ``repedit edit --set`` does
(above: the value-side robustness forms, whose long passage row sets the cost).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from bench_common import PhaseTimer, add_set_option, cpu_flags, default_data_dir, patched

#: timed phase -> (module, function name) pairs patched in the editor modules' namespaces
PHASES: dict[str, list[tuple[str, str]]] = {
    "values": [
        ("repedit.editors.rome", "optimise_values"),
        ("repedit.editors.memit", "optimise_values"),
    ],
    "keys": [
        ("repedit.editors.rome", "key_inputs"),
        ("repedit.editors.rome", "keys_at"),
        ("repedit.editors.memit", "compute_keys"),
    ],
    "solve": [
        ("repedit.editors.rome", "rank_one_update"),
        ("repedit.editors.memit", "least_squares_update"),
        ("repedit.editors.emmet", "equality_constrained_update"),
        ("repedit.editors.alphaedit", "null_space_projector"),
        ("repedit.editors.alphaedit", "null_space_update"),
    ],
    "residual": [("repedit.editors.memit", "current_values")],
}
TIMED = tuple(PHASES)
VALUE_PATHS = ("auto", "prefix", "full")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", default="smollm2-135m", help="alias, .gguf, directory or hub id")
    p.add_argument(
        "--corpus",
        default=str(default_data_dir() / "wikitext" / "wiki.test.raw"),
        help="text file/folder for the key statistics (or 'auto', 'model')",
    )
    p.add_argument("--data-dir", default=str(default_data_dir()), help="for rep-counterfact")
    p.add_argument("--stats-tokens", type=int, default=100_000)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--batches", default="10,100", help="MEMIT batch sizes, comma-separated")
    p.add_argument("--repeats", type=int, default=3, help="ROME edits (different facts)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--cache", default=None, help="repedit cache (default: $REPEDIT_CACHE)")
    p.add_argument(
        "--value-path",
        default="auto",
        help="value optimisation path(s), comma-separated: auto, prefix, full "
        "(several: each edit timed once per path, back to back)",
    )
    add_set_option(
        p,
        "editor hyper-parameter override for both editors (repeatable), "
        "e.g. --set value.robust_forms=3",
    )
    args = p.parse_args(argv)
    args.value_paths = [v.strip() for v in args.value_path.split(",") if v.strip()]
    bad = [v for v in args.value_paths if v not in VALUE_PATHS]
    if bad or not args.value_paths or len(set(args.value_paths)) != len(args.value_paths):
        p.error(f"--value-path: distinct values from {', '.join(VALUE_PATHS)}, not {bad}")
    return args


@contextlib.contextmanager
def value_path(path: str) -> Iterator[None]:
    """Force ``repedit.editors.values.VALUE_PATH`` for one timed edit."""
    import repedit.editors.values as values

    old = values.VALUE_PATH
    values.VALUE_PATH = path  # type: ignore[assignment]
    try:
        yield
    finally:
        values.VALUE_PATH = old


# --------------------------------------------------------------------------- timing


def phase_targets() -> dict[str, list[tuple[Any, str]]]:
    """``PHASES`` resolved to (module, name) pairs, leaving out names a module does not use."""
    import importlib

    out: dict[str, list[tuple[Any, str]]] = {}
    for phase, targets in PHASES.items():
        modules = [(importlib.import_module(name), attr) for name, attr in targets]
        out[phase] = [(module, attr) for module, attr in modules if hasattr(module, attr)]
    return out


# --------------------------------------------------------------------------- requests


def rome_requests(n: int) -> list[Any]:
    from repedit.data import builtin_facts

    return [c.request for c in builtin_facts()][:n]


def batch_requests(lm: Any, editor: Any, size: int, data_dir: str) -> tuple[list[Any], str]:
    """``size`` valid requests: REP CounterFact when available, else repeated built-in facts."""
    from repedit.data import builtin_facts, load_cases
    from repedit.data.case import EditRequest
    from repedit.errors import RepeditError

    out: list[Any] = []
    source = "rep-counterfact"
    try:
        cases = load_cases("rep-counterfact", data_dir=data_dir).cases
    except RepeditError:
        cases = []
    for case in cases:
        try:
            editor.validate(lm, [case.request])
        except RepeditError:
            continue
        out.append(case.request)
        if len(out) == size:
            return out, source
    # fallback: built-in facts, cycling through other facts' answers as new targets
    facts = [c.request for c in builtin_facts()]
    answers = sorted(
        {r.target_new for r in facts} | {r.target_true for r in facts if r.target_true}
    )
    source = "builtin (repeated, varied targets)" if not out else source + "+builtin"
    i = 0
    while len(out) < size:
        fact = facts[i % len(facts)]
        shift = i // len(facts)
        choices = [a for a in answers if a not in (fact.target_true, fact.target_new)]
        target = fact.target_new if shift == 0 else choices[(i + shift) % len(choices)]
        out.append(
            EditRequest(fact.prompt, fact.subject, target, fact.target_true, f"{fact.case_id}#{i}")
        )
        i += 1
    return out, source


def efficacy(lm: Any, requests: Sequence[Any]) -> list[bool]:
    """Does the greedy continuation of each edited prompt start with its new target?"""
    from repedit.evaluation.scoring import greedy_completion
    from repedit.models.tokens import continuation_ids

    longest = max(len(continuation_ids(lm.tokenizer, r.text, r.target_new)) for r in requests)
    outs = greedy_completion(lm, [r.text for r in requests], max_new_tokens=longest)
    return [o.strip().startswith(r.target_new.strip()) for o, r in zip(outs, requests, strict=True)]


# --------------------------------------------------------------------------- measuring


def timed_edit(lm: Any, editor: Any, requests: list[Any], timer: PhaseTimer) -> dict[str, Any]:
    timer.reset()
    with patched(timer, phase_targets()):
        timer.sync()
        t0 = time.perf_counter()
        result = editor.edit(lm, requests)
        timer.sync()
        total = time.perf_counter() - t0
    try:
        hits = efficacy(lm, requests)
    finally:
        result.revert(lm)
    phases = {k: round(v, 4) for k, v in timer.seconds.items()}
    other = max(0.0, total - sum(timer.seconds.values()))
    info = result.info
    probs = info.get("value_prob") or [r.get("value_prob") for r in info.get("requests", [])]
    return {
        "n_requests": len(requests),
        "case_ids": [r.case_id for r in requests] if len(requests) <= 10 else None,
        "seconds": round(total, 4),
        "phases": {**phases, "other": round(other, 4)},
        "calls": dict(timer.calls),
        "efficacy": round(sum(hits) / len(hits), 4),
        "hits": sum(hits),
        "value_prob_mean": round(sum(probs) / len(probs), 4) if probs else None,
    }


def shares(runs: list[dict[str, Any]]) -> dict[str, float]:
    total = sum(r["seconds"] for r in runs)
    keys = [*TIMED, "other"]
    return {k: round(sum(r["phases"][k] for r in runs) / total, 4) if total else 0.0 for k in keys}


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)

    import transformers

    from repedit.cli.common import parse_overrides
    from repedit.editors import StatsConfig, make_editor
    from repedit.models import load_model

    overrides = parse_overrides(args.overrides)
    sizes = [int(s) for s in args.batches.split(",") if s.strip()]
    warm: dict[str, float] = {}
    t0 = time.perf_counter()
    lm = load_model(args.model, device=args.device, dtype=args.dtype, cache=args.cache)
    warm["load_s"] = round(time.perf_counter() - t0, 2)
    stats = StatsConfig(
        corpus=args.corpus, n_tokens=args.stats_tokens, cache=args.cache, progress=False
    )

    editors = {m: make_editor(m, dict(overrides), stats) for m in ("rome", "memit")}
    for name, editor in editors.items():
        hp = editor.resolved(lm)
        t0 = time.perf_counter()
        editor.second_moment(lm, editor.layers(lm, hp))
        warm[f"{name}_stats_s"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        editor.contexts(lm, hp)
        warm[f"{name}_contexts_s"] = round(time.perf_counter() - t0, 2)

    timer = PhaseTimer(lm.device, TIMED)
    paths = args.value_paths
    rome_runs: dict[str, list[dict[str, Any]]] = {path: [] for path in paths}
    for i, req in enumerate(rome_requests(args.repeats)):
        for path in paths if i % 2 == 0 else paths[::-1]:
            with value_path(path):
                run = timed_edit(lm, editors["rome"], [req], timer)
            rome_runs[path].append(run)
            print(
                f"rome {req.case_id} [{path}]: {run['seconds']:.2f}s efficacy {run['efficacy']}",
                file=sys.stderr,
            )

    memit_runs: dict[str, dict[str, Any]] = {path: {} for path in paths}
    for i, size in enumerate(sizes):
        requests, source = batch_requests(lm, editors["memit"], size, args.data_dir)
        for path in paths if i % 2 == 0 else paths[::-1]:
            with value_path(path):
                run = timed_edit(lm, editors["memit"], requests, timer)
            run["source"] = source
            memit_runs[path][f"batch_{size}"] = run
            print(
                f"memit batch {size} [{path}]: {run['seconds']:.2f}s efficacy {run['efficacy']}",
                file=sys.stderr,
            )

    rome_layers = editors["rome"].layers(lm, editors["rome"].resolved(lm))
    memit_layers = editors["memit"].layers(lm, editors["memit"].resolved(lm))
    by_path = {
        path: {
            "rome": _rome_summary(rome_layers, rome_runs[path]),
            "memit": _memit_summary(memit_layers, memit_runs[path]),
        }
        for path in paths
    }
    result = {
        "benchmark": "edit_speed",
        "model": args.model,
        "fingerprint": lm.fingerprint,
        "n_layers": lm.n_layers,
        "d_mlp": lm.arch.d_mlp,
        "device": str(lm.device),
        "dtype": str(lm.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "cpu_flags": cpu_flags(),
        "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()},
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "corpus": args.corpus,
        "stats_tokens": args.stats_tokens,
        "warmup": warm,
        "value_paths": paths,
        # the first path's numbers where a single-path run always had them
        **by_path[paths[0]],
    }
    if len(paths) > 1:
        result["by_value_path"] = by_path
    if "full" in by_path and "prefix" in by_path:
        result["speedup_prefix_over_full"] = _speedup(by_path["full"], by_path["prefix"])
    print(json.dumps(result, indent=2))
    _table(result)
    return result


def _rome_summary(layers: list[int], runs: list[dict[str, Any]]) -> dict[str, Any]:
    mean = sum(r["seconds"] for r in runs) / len(runs) if runs else None
    return {
        "layers": layers,
        "seconds_per_edit": round(mean, 4) if mean is not None else None,
        "efficacy": round(sum(r["efficacy"] for r in runs) / len(runs), 4) if runs else None,
        "shares": shares(runs) if runs else None,
        "edits": runs,
    }


def _memit_summary(layers: list[int], runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "layers": layers,
        **{
            k: {**v, "seconds_per_request": round(v["seconds"] / v["n_requests"], 4)}
            for k, v in runs.items()
        },
        "shares": {k: shares([v]) for k, v in runs.items()},
    }


def _speedup(full: dict[str, Any], prefix: dict[str, Any]) -> dict[str, float | None]:
    """Full-path seconds over prefix-path seconds: per edit, and for the value phase alone."""

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a and b else None

    def values_s(runs: list[dict[str, Any]]) -> float:
        return sum(r["phases"]["values"] for r in runs)

    out: dict[str, float | None] = {}
    if full["rome"]["edits"]:
        out["rome_edit"] = ratio(
            full["rome"]["seconds_per_edit"], prefix["rome"]["seconds_per_edit"]
        )
        out["rome_values"] = ratio(
            values_s(full["rome"]["edits"]), values_s(prefix["rome"]["edits"])
        )
    for key, run in full["memit"].items():
        if key.startswith("batch_"):
            out[f"memit_{key}"] = ratio(run["seconds"], prefix["memit"][key]["seconds"])
    return out


def _table(r: dict[str, Any]) -> None:
    parts = (*TIMED, "other")
    rows: list[tuple[str, int, float, float, dict[str, float]]] = []
    sections = r.get("by_value_path") or {r["value_paths"][0]: r}
    for path, section in sections.items():
        tag = f" [{path}]" if len(sections) > 1 else ""
        rome = section["rome"]
        if rome["edits"]:
            name = f"ROME x{len(rome['edits'])} (mean){tag}"
            rows.append((name, 1, rome["seconds_per_edit"], rome["efficacy"], rome["shares"]))
        for key, run in section["memit"].items():
            if key.startswith("batch_"):
                name = f"MEMIT {key.replace('_', ' ')}{tag}"
                share = section["memit"]["shares"][key]
                rows.append((name, run["n_requests"], run["seconds"], run["efficacy"], share))
    print()
    print(
        f"edit speed, {r['model']} ({r['device']} {r['dtype']}, {r['threads']} threads, "
        f"torch {r['torch']}, value path {','.join(r['value_paths'])}"
        + "".join(f", {k}={v}" for k, v in r["overrides"].items())
        + "); "
        "phases as shares of each edit's wall time"
    )
    header = f"{'edit':<32}{'requests':>9}{'seconds':>10}{'efficacy':>9}"
    print(header + "".join(f"{p:>10}" for p in parts))
    for name, n, secs, eff, share in rows:
        line = f"{name:<32}{n:>9}{secs:>10.2f}{eff:>9.2f}"
        print(line + "".join(f"{share[p]:>10.1%}" for p in parts))
    speedup = r.get("speedup_prefix_over_full")
    if speedup:
        print("speed-up, full / prefix: " + ", ".join(f"{k} {v}x" for k, v in speedup.items()))


if __name__ == "__main__":
    main()

"""Scoring speed: the fast (packed) teacher-forced path against the reference (padded) path.

The measured workload is scoring the *unedited* model on a frozen probe set: the first
``--cases`` REP-CounterFact cases, every test of the suite, one fluency sample of 100 tokens.
No edit is made; an edit changes weights, not the work scoring does. Per case, untimed: the
probes are built and the neighbourhood's unedited predictions are taken once (a run caches
them too). Timed, in the same run:

* ``reference``: ``score_probes(impl="reference")`` as the harness calls it (the long-context
  probes in a call of their own, the rest together);
* ``fast``: one ``score_probes(impl="fast")`` call over every probe;
* ``plain``: the same model's plain forward (``logits_to_keep=1`` where the model takes it) of
  every unpadded ``prompt + answer`` sequence on its own: ``efficiency`` is the fast path's
  unpadded tokens/s over this one's (above 1: sharing prompts and packing beat running each
  sequence alone);
* ``packed plain``: the plain forward of the fast path's own packed rows:
  ``efficiency_vs_packed_forward`` is the share of the fast path's time that is forward;
* ``fluency``: the case's fluency sample (``generate_texts``), once, added to both paths'
  scoring seconds (both generate the same way); its tokens/s are reported apart.

``--dtype bfloat16`` runs everything under CPU bfloat16 autocast (refused where the CPU has
no bfloat16 instructions). Records of the two paths are compared: identical success flags and
predictions, and the largest log-prob difference. Prints one JSON object, then a table. Never
asserts: the numbers are for reading.

    python benchmarks/eval_speed.py --cases 5 --threads 1
    python benchmarks/eval_speed.py --cases 20 --threads 2 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from typing import Any

import torch
from bench_common import cpu_flags, default_data_dir

#: tests the harness scores in a call of their own in the reference path (padding)
APART = ("long_context",)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", default="smollm2-135m", help="alias, .gguf, directory or hub id")
    p.add_argument("--cases", type=int, default=20, help="first N REP-CounterFact cases")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--data-dir", default=str(default_data_dir()), help="for rep-counterfact")
    p.add_argument("--cache", default=None, help="repedit cache (default: $REPEDIT_CACHE)")
    return p.parse_args(argv)


def precision(dtype: str) -> contextlib.AbstractContextManager[Any]:
    from repedit.models.precision import fast_bfloat16

    if dtype == "float32":
        return contextlib.nullcontext()
    if not fast_bfloat16("cpu"):
        raise SystemExit("--dtype bfloat16: this CPU has no bfloat16 instructions")
    return torch.autocast("cpu", dtype=torch.bfloat16)


def sequences(lm: Any, probes: list[Any]) -> list[tuple[list[int], list[int]]]:
    """Every unpadded ``(prompt ids, answer ids)`` the probes score (target and alt)."""
    from repedit.evaluation.scoring import tokenize_probe

    out = []
    for p in probes:
        for answer in (p.target, p.alt):
            if answer is not None:
                out.append(tokenize_probe(lm.tokenizer, p.prompt, answer))
    return out


def padded_tokens(seqs: list[tuple[list[int], list[int]]], batch_size: int) -> int:
    """Tokens the reference path runs for ``seqs`` in one call (sorted, padded per batch)."""
    lengths = sorted(len(p) + len(t) for p, t in seqs)
    return sum(
        max(lengths[i : i + batch_size]) * len(lengths[i : i + batch_size])
        for i in range(0, len(lengths), batch_size)
    )


def floor_tokens(seqs: list[tuple[list[int], list[int]]]) -> int:
    """Tokens a scorer must run at least: every distinct prefix of every sequence once (the
    nodes of their prefix tree). A token's logits depend on its whole prefix, so no exact
    scorer can run fewer."""
    return len({tuple((p + t)[:i]) for p, t in seqs for i in range(1, len(p) + len(t) + 1)})


def plain_forward(lm: Any, seqs: list[tuple[list[int], list[int]]]) -> float:
    """Seconds of a plain forward of each sequence on its own (no padding, no scoring)."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        for p, t in seqs:
            ids = torch.tensor([p + t], device=lm.device)
            try:
                lm.model(input_ids=ids, use_cache=False, logits_to_keep=1)
            except TypeError:
                lm.model(input_ids=ids, use_cache=False)
    return time.perf_counter() - t0


def packed_forward(lm: Any, seqs: list[tuple[list[int], list[int]]]) -> float:
    """Seconds of a plain forward of the fast path's packed rows (same masks, no scoring):
    the floor for the fast path on this machine."""
    from repedit.evaluation.packing import build_rows

    t0 = time.perf_counter()
    with torch.inference_mode():
        for row in build_rows(seqs):
            inputs = {
                "input_ids": torch.tensor([row.ids], device=lm.device),
                "position_ids": torch.tensor([row.positions], device=lm.device),
                "attention_mask": row.attention(lm.dtype).to(lm.device),
                "use_cache": False,
            }
            try:
                lm.model(**inputs, logits_to_keep=1)
            except TypeError:
                lm.model(**inputs)
    return time.perf_counter() - t0


def _same(fast: list[Any], ref: list[Any]) -> tuple[bool, float]:
    flags = ("exact", "token_acc", "beats_alt", "agree", "pred_tokens")
    same = all(
        [getattr(f, k) for k in flags] == [getattr(r, k) for k in flags]
        for f, r in zip(fast, ref, strict=True)
    )
    diff = max(
        [abs(f.logprob - r.logprob) for f, r in zip(fast, ref, strict=True)]
        + [
            abs(f.alt_logprob - r.alt_logprob)
            for f, r in zip(fast, ref, strict=True)
            if r.alt_logprob is not None
        ]
    )
    return same, diff


def timed_case(lm: Any, case: Any, suite: Any, sampler: Any, batch_size: int) -> dict[str, Any]:
    from repedit.evaluation.fluency import generate_texts
    from repedit.evaluation.packing import build_rows
    from repedit.evaluation.probes import CaseProbes, build_probes, fluency_prompts, fluency_seed
    from repedit.evaluation.scoring import predictions, score_probes, tokenize_probe

    key = case.request.case_id
    cp = CaseProbes(key, build_probes(case, lm, suite, sampler=sampler, key=key))
    probes = [p for p in cp.flat if p.test not in APART] + [p for p in cp.flat if p.test in APART]
    nb = {id(p) for p in cp.families.get("neighbourhood", [])}
    # the neighbourhood's unedited predictions (a run caches them); other probes' own target
    # ids, as the harness passes them (their agreement is not recorded)
    it = iter(predictions(lm, [p for p in probes if id(p) in nb]))
    reference = [
        next(it) if id(p) in nb else tokenize_probe(lm.tokenizer, p.prompt, p.target)[1]
        for p in probes
    ]
    groups = [
        [i for i, p in enumerate(probes) if p.test not in APART],
        [i for i, p in enumerate(probes) if p.test in APART],
    ]

    t0 = time.perf_counter()
    ref: list[Any] = []
    for g in groups:
        if g:
            ref += score_probes(
                lm,
                [probes[i] for i in g],
                batch_size=batch_size,
                reference=[reference[i] for i in g],
                impl="reference",
            )
    ref_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    fast = score_probes(lm, probes, reference=reference, impl="fast")
    fast_s = time.perf_counter() - t0

    seqs = sequences(lm, probes)
    plain_s = plain_forward(lm, seqs)
    packed_s = packed_forward(lm, seqs)
    prompts = fluency_prompts(case, suite)
    t0 = time.perf_counter()
    texts = generate_texts(
        lm,
        prompts,
        max_new_tokens=suite.fluency_tokens,
        top_k=suite.fluency_top_k,
        seed=fluency_seed(suite, key),
        include_prompt=False,
    )
    flu_s = time.perf_counter() - t0
    gen_tokens = sum(len(lm.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    same, diff = _same(fast, ref)
    ref_tokens = sum(
        padded_tokens(sequences(lm, [probes[i] for i in g]), batch_size) for g in groups if g
    )
    return {
        "case_id": key,
        "probes": len(probes),
        "sequences": len(seqs),
        "unpadded_tokens": sum(len(p) + len(t) for p, t in seqs),
        "reference_tokens": ref_tokens,
        "fast_tokens": sum(len(r.ids) for r in build_rows(seqs)),
        "floor_tokens": floor_tokens(seqs),
        "reference_s": ref_s,
        "fast_s": fast_s,
        "plain_s": plain_s,
        "packed_plain_s": packed_s,
        "fluency_s": flu_s,
        "generated_tokens": gen_tokens,
        "records_match": same,
        "max_abs_logprob_diff": diff,
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def total(k: str) -> float:
        return sum(r[k] for r in runs)

    n, flu = len(runs), total("fluency_s")
    ref_s, fast_s = total("reference_s") + flu, total("fast_s") + flu
    probes, unpadded = total("probes"), total("unpadded_tokens")
    # the best an exact scorer could do: the reference's probe time scaled to the floor's
    # tokens (time follows tokens: compare probe_speedup with the tokens ratio), fluency as is
    floor_share = total("floor_tokens") / total("reference_tokens")
    best_s = total("reference_s") * floor_share + flu
    return {
        "cases": n,
        "reference_s_per_case": ref_s / n,
        "fast_s_per_case": fast_s / n,
        "speedup_vs_reference": ref_s / fast_s,
        "probe_speedup_vs_reference": total("reference_s") / total("fast_s"),
        "probes_s_per_case": {"reference": total("reference_s") / n, "fast": total("fast_s") / n},
        "fluency_s_per_case": flu / n,
        "probes_per_s": {
            "reference": probes / total("reference_s"),
            "fast": probes / total("fast_s"),
        },
        "unpadded_tokens_per_case": unpadded / n,
        "tokens_run_per_case": {
            "reference": total("reference_tokens") / n,
            "fast": total("fast_tokens") / n,
            "floor": total("floor_tokens") / n,
        },
        "max_probe_speedup": 1 / floor_share,
        "max_speedup_vs_reference": ref_s / best_s,
        "unpadded_tokens_per_s": {
            "reference": unpadded / total("reference_s"),
            "fast": unpadded / total("fast_s"),
            "plain_forward": unpadded / total("plain_s"),
        },
        "efficiency": total("plain_s") / total("fast_s"),
        "efficiency_vs_packed_forward": total("packed_plain_s") / total("fast_s"),
        "generation_tokens_per_s": total("generated_tokens") / flu if flu else None,
        "generated_tokens_per_case": total("generated_tokens") / n,
        "records_match": all(r["records_match"] for r in runs),
        "max_abs_logprob_diff": max(r["max_abs_logprob_diff"] for r in runs),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)

    import transformers

    from repedit.data import load_cases
    from repedit.evaluation.probes import SuiteConfig, passage_sampler
    from repedit.models import load_model

    lm = load_model(args.model, cache=args.cache)
    suite = SuiteConfig()  # every test, one fluency sample of 100 tokens
    sampler = passage_sampler(lm, suite)
    cases = load_cases("rep-counterfact", data_dir=args.data_dir).cases[: args.cases + 1]
    runs = []
    with precision(args.dtype):
        timed_case(lm, cases[0], suite, sampler, suite.batch_size)  # warm-up, untimed
        for case in cases[1:] if len(cases) > args.cases else cases:
            run = timed_case(lm, case, suite, sampler, suite.batch_size)
            runs.append(run)
            print(
                f"{run['case_id']}: reference {run['reference_s']:.2f}s, fast {run['fast_s']:.2f}s"
                f", plain {run['plain_s']:.2f}s, fluency {run['fluency_s']:.2f}s",
                file=sys.stderr,
                flush=True,
            )
    report = {
        "benchmark": "eval_speed",
        "workload": "unedited model on the frozen probe set (scoring does the same work edited)",
        "model": args.model,
        "fingerprint": lm.fingerprint,
        "device": str(lm.device),
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "cpu_flags": cpu_flags(),
        "weights_mb": sum(p.numel() * p.element_size() for p in lm.model.parameters()) / 2**20,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "summary": summarise(runs),
        "runs": runs,
    }
    print(json.dumps(report, indent=2, default=str))
    print(table(report))
    return report


def table(report: dict[str, Any]) -> str:
    s = report["summary"]
    rows = [
        ["", "reference", "fast"],
        ["scoring s/case", f"{s['reference_s_per_case']:.2f}", f"{s['fast_s_per_case']:.2f}"],
        [
            "probes s/case",
            f"{s['probes_s_per_case']['reference']:.2f}",
            f"{s['probes_s_per_case']['fast']:.2f}",
        ],
        ["probes/s", f"{s['probes_per_s']['reference']:.1f}", f"{s['probes_per_s']['fast']:.1f}"],
        [
            "tokens run/case",
            f"{s['tokens_run_per_case']['reference']:.0f}",
            f"{s['tokens_run_per_case']['fast']:.0f}",
        ],
        [
            "unpadded tok/s",
            f"{s['unpadded_tokens_per_s']['reference']:.0f}",
            f"{s['unpadded_tokens_per_s']['fast']:.0f}",
        ],
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += [
        f"speedup_vs_reference {s['speedup_vs_reference']:.2f}x "
        f"(probes alone {s['probe_speedup_vs_reference']:.2f}x); "
        f"efficiency {s['efficiency']:.2f} (plain forward "
        f"{s['unpadded_tokens_per_s']['plain_forward']:.0f} unpadded tok/s); "
        f"vs the packed rows' plain forward {s['efficiency_vs_packed_forward']:.2f}",
        f"bound for any exact scorer: {s['tokens_run_per_case']['floor']:.0f} tokens/case (each "
        f"distinct prefix once): probes {s['max_probe_speedup']:.2f}x, with fluency "
        f"{s['max_speedup_vs_reference']:.2f}x",
        f"fluency {s['fluency_s_per_case']:.2f} s/case, generation "
        f"{s['generation_tokens_per_s'] or 0:.1f} tok/s (each step reads "
        f"{report['weights_mb']:.0f} MiB of weights); records match: {s['records_match']} "
        f"(max |dlogprob| {s['max_abs_logprob_diff']:.2g})",
        f"({s['cases']} cases; {report['device']}, {report['dtype']}, {report['threads']} "
        f"thread(s), flags {' '.join(report['cpu_flags'])}, {report['model']})",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

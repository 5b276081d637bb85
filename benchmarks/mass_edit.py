"""Mass editing: N CounterFact facts with MEMIT, EMMET or AlphaEdit, in one batch or in sequence.

The first ``--n`` CounterFact cases the editor accepts are edited in batches of
``--batch-size`` (equal to ``--n``: one batch), each batch on the model the previous ones left.
Measured:

* ``edit_seconds``: the editor's wall time over all batches (scoring excluded), with the share
  spent in value optimisation, and the process's peak resident memory;
* ``efficacy``: on all N, teacher-forced exact match of the new target after the edit prompt;
* paraphrase efficacy, neighbourhood accuracy and fluency (ROME's n-gram entropy of sampled
  text), before and after, on a fixed seeded sample of up to ``--sample`` cases;
* the first batch's efficacy after each batch, as a curve (and a PNG plot);
* with ``--also-key-mode MODE`` (one batch only): the same batch solved again under the other
  MEMIT key mode, reusing the values already optimised (they do not depend on the key mode),
  so ``each`` and ``mean`` are compared at the cost of one value optimisation.

Writes ``mass_edit.json`` and ``mass_edit.png`` under ``--out``, prints the JSON and a table.
Never asserts: the numbers are for reading.

    python benchmarks/mass_edit.py --method memit --n 20 --batch-size 10 --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from bench_common import PhaseTimer, add_set_option, cpu_flags, default_data_dir, patched

METHODS = ("memit", "emmet", "alphaedit")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--method", default="memit", choices=METHODS)
    p.add_argument("--n", type=int, default=1000, help="CounterFact cases to edit")
    p.add_argument("--batch-size", type=int, default=None, help="per edit (default: --n)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", default="mass-edit-out", help="folder for the JSON and the plot")
    p.add_argument("--model", default="smollm2-135m", help="alias, .gguf, directory or hub id")
    p.add_argument("--dataset", default="counterfact", help="a load_cases name or file")
    p.add_argument("--data-dir", default=str(default_data_dir()))
    p.add_argument(
        "--corpus",
        default=str(default_data_dir() / "wikitext" / "wiki.test.raw"),
        help="text for the key statistics (or 'auto', 'model')",
    )
    p.add_argument("--stats-tokens", type=int, default=100_000)
    p.add_argument("--cache", default=None, help="repedit cache (default: $REPEDIT_CACHE)")
    p.add_argument("--sample", type=int, default=100, help="cases for paraphrase/neighbours")
    p.add_argument("--seed", type=int, default=0, help="for the sample and the fluency texts")
    p.add_argument("--fluency-tokens", type=int, default=100, help="sampled tokens per text")
    p.add_argument(
        "--key-mode", default=None, choices=("auto", "each", "mean"), help="default: editor's"
    )
    p.add_argument(
        "--also-key-mode",
        default=None,
        choices=("each", "mean"),
        help="one batch only: solve it again with this key mode, reusing the values",
    )
    p.add_argument("--value-steps", type=int, default=None, help="default: editor's")
    p.add_argument("--batching", default=None, choices=("stream", "fixed"))
    p.add_argument("--group-tokens", type=int, default=None, help="stream batching budget")
    add_set_option(
        p,
        "editor hyper-parameter override (repeatable), as `repedit edit --set`; e.g. "
        "value.robust_forms=0 and value.robust_prefix_lengths= for MEMIT's plain value step",
    )
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto")
    args = p.parse_args(argv)
    args.batch_size = args.batch_size or args.n
    if args.n < 1 or args.batch_size < 1 or args.sample < 0:
        p.error("--n and --batch-size must be positive, --sample non-negative")
    if args.also_key_mode and args.batch_size < args.n:
        p.error("--also-key-mode compares key modes on one batch (--batch-size = --n)")
    return args


def editor_hparams(args: argparse.Namespace) -> dict[str, Any]:
    """Only the settings the command line changes (the rest stay the editor's defaults)."""
    hp: dict[str, Any] = {}
    if args.key_mode:
        hp["key_mode"] = args.key_mode
    value = {
        k: v
        for k, v in (
            ("steps", args.value_steps),
            ("batching", args.batching),
            ("group_tokens", args.group_tokens),
        )
        if v is not None
    }
    if value:
        hp["value"] = value
    from repedit.cli.common import parse_overrides

    hp.update(parse_overrides(args.overrides))
    return hp


def accepted_cases(lm: Any, editor: Any, args: argparse.Namespace) -> list[Any]:
    """The first ``--n`` cases whose request the editor accepts (tokenisation, subject found)."""
    from repedit.data import load_cases
    from repedit.errors import RepeditError

    out = []
    for case in load_cases(args.dataset, data_dir=args.data_dir).cases:
        try:
            editor.validate(lm, [case.request])
        except RepeditError:
            continue
        out.append(case)
        if len(out) == args.n:
            break
    return out


# --------------------------------------------------------------------------- scoring


def exact(lm: Any, pairs: list[tuple[str, str]]) -> list[bool]:
    """Teacher-forced exact match: every target token is the argmax after its prefix."""
    from repedit.evaluation.scoring import Probe, score_probes

    if not pairs:
        return []
    return [s.exact for s in score_probes(lm, [Probe(p, t) for p, t in pairs])]


def rate(hits: list[bool]) -> float | None:
    return round(sum(hits) / len(hits), 4) if hits else None


def efficacy(lm: Any, cases: list[Any]) -> float | None:
    return rate(exact(lm, [(c.request.text, c.request.target_new) for c in cases]))


def neighbour_probes(cases: list[Any]) -> list[Any]:
    from repedit.evaluation.scoring import Probe

    return [Probe(n.prompt, n.target) for c in cases for n in c.neighbourhood]


def sample_scores(
    lm: Any, cases: list[Any], args: argparse.Namespace, reference: list[list[int]] | None = None
) -> dict[str, Any]:
    """Paraphrase efficacy, neighbourhood accuracy and fluency on the sampled cases.

    ``neighbourhood``: the neighbour's own answer is still the exact teacher-forced output;
    ``neighbourhood_agree`` (with ``reference``, the unedited model's argmax tokens): the
    share of answer positions whose argmax is unchanged, which a small model that gets few
    neighbours right to begin with still measures.
    """
    from repedit.evaluation.fluency import generate_texts, ngram_entropy
    from repedit.evaluation.scoring import score_probes

    para = [(p, c.request.target_new) for c in cases for p in c.prompt_paraphrases]
    probes = neighbour_probes(cases)
    scores = score_probes(lm, probes, reference=reference) if probes else []
    out: dict[str, Any] = {
        "paraphrase": rate(exact(lm, para)),
        "neighbourhood": rate([s.exact for s in scores]),
    }
    if reference is not None:
        agree = [s.agree for s in scores if s.agree is not None]
        out["neighbourhood_agree"] = round(sum(agree) / len(agree), 4) if agree else None
    if cases and args.fluency_tokens > 0:
        prompts = [(c.generation_prompts or [c.request.text])[0] for c in cases]
        texts = generate_texts(lm, prompts, max_new_tokens=args.fluency_tokens, seed=args.seed)
        out["fluency"] = round(ngram_entropy(texts), 4)
    else:
        out["fluency"] = None
    return out


# --------------------------------------------------------------------------- editing


def peak_rss_mb() -> float:
    """The process's peak resident memory so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def run_batches(
    lm: Any, editor: Any, cases: list[Any], batch_size: int, values: Any = None
) -> tuple[dict[str, Any], list[dict[str, Any]], list[Any]]:
    """Edit ``cases`` batch by batch (each applied); time the edits, not the curve's scoring.
    Returns the timing, the curve and the applied ``EditResult``s. ``values``: what stands in
    for ``optimise_values`` (``ReusedValues``), else the library's."""
    import repedit.editors.memit as memit

    timer = PhaseTimer(lm.device, ["values"])
    first = cases[:batch_size]
    curve, seconds, batches, results = [], 0.0, [], []
    for start in range(0, len(cases), batch_size):
        batch = [c.request for c in cases[start : start + batch_size]]
        with patched(timer, {"values": [(memit, "optimise_values")]}):
            if values is not None:  # inside the timer's wrapper, so reuse is timed as values
                memit.optimise_values = timer.wrap("values", values)
            timer.sync()
            t0 = time.perf_counter()
            result = editor.edit(lm, batch)
            timer.sync()
            took = time.perf_counter() - t0
        results.append(result)
        seconds += took
        steps = result.info.get("value_steps") or []
        batches.append(
            {
                "n": len(batch),
                "seconds": round(took, 3),
                "mean_value_steps": round(sum(steps) / len(steps), 2) if steps else None,
            }
        )
        curve.append({"edits": start + len(batch), "first_batch_efficacy": efficacy(lm, first)})
        print(
            f"batch {len(batches)}: {len(batch)} edits in {took:.1f}s, first batch efficacy "
            f"{curve[-1]['first_batch_efficacy']}",
            file=sys.stderr,
            flush=True,
        )
    timing = {
        "edit_seconds": round(seconds, 3),
        "value_seconds": round(timer.seconds["values"], 3),
        "value_share": round(timer.seconds["values"] / seconds, 4) if seconds else None,
        "seconds_per_edit": round(seconds / len(cases), 4) if cases else None,
        "batches": batches,
    }
    return timing, curve, results


class ReusedValues:
    """``optimise_values`` that records its first result and then returns it again for the
    same requests and layer: MEMIT's values come before its keys and do not depend on the
    key mode, so a second solve of the same batch need not optimise them again."""

    def __init__(self) -> None:
        from repedit.editors.memit import optimise_values

        self.optimise = optimise_values
        self.saved: tuple[Any, Any] | None = None
        self.reused = 0

    def __call__(self, lm: Any, requests: Any, *args: Any, **kwargs: Any) -> Any:
        key = ([r.case_id for r in requests], kwargs.get("layer"), kwargs.get("site"))
        if self.saved is not None and self.saved[0] == key:
            self.reused += 1
            return self.saved[1]
        result = self.optimise(lm, requests, *args, **kwargs)
        self.saved = (key, result)
        return result


def stats_config(args: argparse.Namespace) -> Any:
    """The editor's statistics settings; progress bars (statistics, values) in a terminal."""
    from repedit.editors import StatsConfig

    return StatsConfig(
        corpus=args.corpus,
        n_tokens=args.stats_tokens,
        cache=args.cache,
        progress=sys.stderr.isatty(),
    )


def other_key_mode(
    lm: Any, args: argparse.Namespace, cases: list[Any], sampled: list[Any], ctx: dict
) -> dict[str, Any]:
    """The one batch solved again under ``--also-key-mode`` with the values already found."""
    from repedit.editors import make_editor

    hp = editor_hparams(args)
    hp["key_mode"] = args.also_key_mode
    stats = stats_config(args)
    editor = make_editor(args.method, hp, stats)
    editor.adopt_state(ctx["editor"].derived_state())
    timing, _, results = run_batches(lm, editor, cases, args.batch_size, ctx["values"])
    after = {"efficacy": efficacy(lm, cases), **sample_scores(lm, sampled, args, ctx["ref"])}
    for result in reversed(results):
        result.revert(lm)
    return {
        "key_mode": args.also_key_mode,
        "values_reused": ctx["values"].reused > 0,
        "edit_seconds_without_values": round(timing["edit_seconds"] - timing["value_seconds"], 3),
        "efficacy": after["efficacy"],
        "after": after,
    }


def plot_curve(curve: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    xs = [p["edits"] for p in curve]
    ys = [p["first_batch_efficacy"] or 0.0 for p in curve]
    ax.plot(xs, ys, marker="o")
    ax.set_xlabel("edits applied")
    ax.set_ylabel("first batch's efficacy")
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def key_mode_used(lm: Any, editor: Any, batch: int) -> str | None:
    """The mode a MEMIT-family ``key_mode`` (e.g. "auto") resolves to for a full batch."""
    from repedit.editors.memit import resolve_key_mode

    hp = editor.resolved(lm)
    mode = getattr(hp, "key_mode", None)
    if mode is None:
        return None
    return resolve_key_mode(mode, batch, len(editor.contexts(lm, hp)), lm.arch.d_mlp)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from repedit.editors import make_editor
    from repedit.models import load_model

    lm = load_model(args.model, device=args.device, dtype=args.dtype, cache=args.cache)
    stats = stats_config(args)
    editor = make_editor(args.method, editor_hparams(args), stats)
    hp = editor.resolved(lm)
    t0 = time.perf_counter()
    editor.second_moment(lm, editor.layers(lm, hp))  # warm-up, not timed: C and the contexts
    editor.contexts(lm, hp)
    warmup = round(time.perf_counter() - t0, 2)
    cases = accepted_cases(lm, editor, args)
    sample = sorted(
        random.Random(args.seed).sample(range(len(cases)), min(args.sample, len(cases)))
    )
    sampled = [cases[i] for i in sample]
    from repedit.evaluation.scoring import predictions

    probes = neighbour_probes(sampled)
    reference = predictions(lm, probes) if probes else None
    before = {"efficacy": efficacy(lm, cases), **sample_scores(lm, sampled, args)}
    rss_before = peak_rss_mb()
    values = ReusedValues() if args.also_key_mode else None
    timing, curve, results = run_batches(lm, editor, cases, args.batch_size, values)
    rss_after = peak_rss_mb()
    after = {"efficacy": efficacy(lm, cases), **sample_scores(lm, sampled, args, reference)}
    other = None
    if args.also_key_mode:
        for result in reversed(results):
            result.revert(lm)
        ctx = {"editor": editor, "values": values, "ref": reference}
        other = other_key_mode(lm, args, cases, sampled, ctx)
    report = {
        "benchmark": "mass_edit",
        "method": args.method,
        "model": args.model,
        "fingerprint": lm.fingerprint,
        "dataset": args.dataset,
        "n": len(cases),
        "batch_size": args.batch_size,
        "sequential": args.batch_size < len(cases),
        "hparams": editor.hparams.to_dict(),
        "key_mode_used": key_mode_used(lm, editor, min(args.batch_size, len(cases))),
        "threads": torch.get_num_threads(),
        "cpu_flags": cpu_flags(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "warmup_seconds": warmup,
        **timing,
        "peak_rss_mb": rss_after,
        "peak_rss_mb_before_edits": rss_before,
        "efficacy": after["efficacy"],
        "sample_size": len(sampled),
        "before": before,
        "after": after,
        "first_batch_curve": curve,
        "other_key_mode": other,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mass_edit.json").write_text(json.dumps(report, indent=2))
    title = f"{args.method}, {len(cases)} edits in batches of {args.batch_size}"
    plot_curve(curve, out / "mass_edit.png", title)
    print(json.dumps(report, indent=2))
    print(table(report))
    return report


def table(r: dict[str, Any]) -> str:
    b, a = r["before"], r["after"]
    rows = [
        ("edits / batch size", f"{r['n']} / {r['batch_size']}"),
        ("edit seconds (values share)", f"{r['edit_seconds']:.1f} ({r['value_share']})"),
        ("peak RSS MB (before edits)", f"{r['peak_rss_mb']} ({r['peak_rss_mb_before_edits']})"),
        ("efficacy, all N", f"{b['efficacy']} -> {a['efficacy']}"),
        (f"paraphrase (sample {r['sample_size']})", f"{b['paraphrase']} -> {a['paraphrase']}"),
        ("neighbourhood", f"{b['neighbourhood']} -> {a['neighbourhood']}"),
        ("neighbourhood argmax unchanged", str(a.get("neighbourhood_agree"))),
        ("fluency (bits)", f"{b['fluency']} -> {a['fluency']}"),
        (
            "first batch efficacy",
            " ".join(str(p["first_batch_efficacy"]) for p in r["first_batch_curve"]),
        ),
    ]
    o = r.get("other_key_mode")
    if o:
        oa = o["after"]
        rows += [
            (f"[{o['key_mode']}] solve s (values reused)", f"{o['edit_seconds_without_values']}"),
            (f"[{o['key_mode']}] efficacy, all N", str(o["efficacy"])),
            (
                f"[{o['key_mode']}] paraphrase / neighbourhood",
                f"{oa['paraphrase']} / {oa['neighbourhood']}",
            ),
            (
                f"[{o['key_mode']}] neighbourhood argmax unchanged",
                str(oa.get("neighbourhood_agree")),
            ),
            (f"[{o['key_mode']}] fluency (bits)", str(oa["fluency"])),
        ]
    width = max(len(k) for k, _ in rows)
    head = f"mass_edit: {r['method']} on {r['model']} ({r['threads']} threads)"
    return "\n".join([head, *(f"  {k.ljust(width)}  {v}" for k, v in rows)])


if __name__ == "__main__":
    main()

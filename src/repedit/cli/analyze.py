"""``repedit analyze``: analyses of edit keys (``keys``: whitened similarity of variants)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from repedit.cli import common
from repedit.errors import InvalidRequestError

DESCRIPTION = """\
Analyses of the keys an edit is written at.

  keys   whitened similarity β̃ = kᵀC⁻¹k* / k*ᵀC⁻¹k* of every robustness variant's key (subject
         paraphrases, scrambled subjects, long context, prompt paraphrases, unrelated
         subjects) to the edit key k*, at the edit layer; tests the REP paper's two findings
         on the model; optionally joins β̃ with per-probe edit success.

run 'repedit analyze keys --help' for its options.
"""

KEYS_DESCRIPTION = """\
For each case: k* (averaged over the editor's context prefixes) and the bare-prompt key of
each variant the robustness suite probes, scored by β = kᵀC⁻¹k*, β̃ = β / k*ᵀC⁻¹k* (the
share of a ROME edit the key retrieves: 1 at k*) and cosine. Writes OUT/similarity.json
(per case, the findings, the specificity matrix, success rows), OUT/findings.md and PNGs
(beta_distribution.png, specificity.png, beta_vs_success.png when success data exists).

success data (optional):
  --run RUN_DIR     join with a 'repedit eval' run's per-probe results; the run's data, n,
                    seed, id split and long-context settings are used unless given here
  --with-success    edit each case alone with --method, score its variants, revert

examples:
  repedit analyze keys --data rep-counterfact --n 100 --out runs/keys
  repedit analyze keys --data demo --with-success --method rome --out runs/keys-demo
  repedit analyze keys --run runs/rome-cf --out runs/keys-rome-cf
"""


def register(subparsers: Any) -> None:
    p = common.add_command(
        subparsers,
        "analyze",
        help="analyse edit keys (whitened similarity of robustness variants to k*)",
        description=DESCRIPTION,
    )
    sub = p.add_subparsers(dest="analysis", metavar="ANALYSIS", title="analyses")
    sub.required = True
    k = sub.add_parser(
        "keys",
        help="whitened similarity of variant keys to the edit key; the REP paper's findings",
        description=KEYS_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    k.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="log details; show tracebacks on errors",
    )
    g = k.add_argument_group("cases")
    g.add_argument("--data", default=None, help="dataset name or JSON file (default: demo)")
    g.add_argument("--data-dir", default=None, help="where dataset names resolve ($REPEDIT_DATA)")
    g.add_argument("--n", type=common.positive_int, default=None, help="first N cases (all)")
    g.add_argument("--skip-invalid", action="store_true", help="skip malformed dataset records")
    g.add_argument(
        "--id-split", type=int, default=None, help="in-domain subject paraphrases (default 5)"
    )
    g.add_argument("--seed", type=int, default=None, help="seed for scrambles/passages (0)")
    a = k.add_argument_group("analysis")
    a.add_argument(
        "--layer", type=int, default=None, help="edit layer (default: ROME's layer for the model)"
    )
    a.add_argument(
        "--n-unrelated",
        type=int,
        default=20,
        help="other cases' subjects put in each case's template (default %(default)s)",
    )
    a.add_argument(
        "--specificity-n",
        type=common.positive_int,
        default=30,
        help="cases in the specificity matrix (default %(default)s)",
    )
    a.add_argument("--out", default=None, help="output folder (default: runs/keys-DATA)")
    a.add_argument(
        "--batch-size", type=common.positive_int, default=32, help="sequences per forward (32)"
    )
    a.add_argument("--no-progress", action="store_true", help="no progress bar")
    lc = k.add_argument_group("long context")
    length = lc.add_mutually_exclusive_group()
    length.add_argument(
        "--long-context-tokens", type=common.positive_int, metavar="N", help="default 512"
    )
    length.add_argument(
        "--long-context-words", type=common.positive_int, metavar="N", help="length in words"
    )
    lc.add_argument(
        "--long-context-corpus",
        default=None,
        metavar="FILE",
        help="text to cut passages from (default DATA_DIR/wikitext/wiki.test.raw)",
    )
    lc.add_argument(
        "--long-context-passages", type=int, default=None, help="passages per case (1; 0 = none)"
    )
    s = k.add_argument_group("edit success")
    s.add_argument("--run", default=None, metavar="RUN_DIR", help="a 'repedit eval' run directory")
    s.add_argument(
        "--with-success", action="store_true", help="edit each case, score its variants, revert"
    )
    s.add_argument("--method", default=None, help="editor for --with-success and contexts (rome)")
    s.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="editor hyper-parameter override (repeatable), e.g. --set value.steps=10",
    )
    common.add_model_options(k)
    common.add_stats_options(k)
    common.add_json_option(k)


# ----------------------------------------------------------------------------- options


def _run_config(run: str) -> dict[str, Any]:
    from repedit.evaluation.rundir import CONFIG

    path = Path(run).expanduser() / CONFIG
    if not path.is_file():
        raise InvalidRequestError(f"{run} is not an evaluation run directory (no {CONFIG})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise InvalidRequestError(f"{path}: not valid JSON ({exc})") from None


def resolve_options(args: argparse.Namespace) -> dict[str, Any]:
    """Case, variant and editor settings: explicit options, else the run's, else defaults."""
    if args.run and args.with_success:
        raise InvalidRequestError("use --run (join an evaluation) or --with-success, not both")
    run = _run_config(args.run) if args.run else {}

    def pick(name: str, run_key: str, default: Any) -> Any:
        value = getattr(args, name, None)
        if value is not None:
            return value
        return run.get(run_key, default) if run else default

    unit, length = run.get("long_context_unit", "tokens"), run.get("long_context_length", 512)
    if args.long_context_words:
        unit, length = "words", args.long_context_words
    elif args.long_context_tokens:
        unit, length = "tokens", args.long_context_tokens
    opts = {
        "data": pick("data", "data", "demo"),
        "data_dir": pick("data_dir", "data_dir", None),
        "n": pick("n", "n", None),
        "skip_invalid": bool(args.skip_invalid or run.get("skip_invalid", False)),
        "id_split": pick("id_split", "id_split", 5),
        "seed": pick("seed", "seed", 0),
        "method": pick("method", "method", "rome"),
        "hparams": dict(run.get("hparams") or {}),
        "long_context_unit": unit,
        "long_context_length": length,
        "long_context_corpus": args.long_context_corpus or run.get("long_context_corpus"),
        "long_context_passages": pick("long_context_passages", "long_context_passages", 1),
    }
    opts["hparams"].update(common.parse_overrides(args.overrides))
    if run and run.get("model") not in (None, args.model):
        common.console.print(
            f"[yellow]warning:[/] the run used model {run['model']!r}, analysing {args.model!r}"
        )
    return opts


def _sampler(lm: Any, opts: dict[str, Any]) -> Any:
    from repedit.data.loaders import passage_corpus
    from repedit.evaluation.probes import SuiteConfig, passage_sampler

    if opts["long_context_passages"] <= 0:
        return None
    corpus = opts["long_context_corpus"]
    if corpus is None:
        found, _ = passage_corpus(None, opts["data_dir"])
        corpus = str(found) if found is not None else None
    cfg = SuiteConfig(
        tests=("long_context",),
        seed=opts["seed"],
        long_context_corpus=corpus,
        long_context_length=opts["long_context_length"],
        long_context_unit=opts["long_context_unit"],
        long_context_passages=opts["long_context_passages"],
    )
    return passage_sampler(lm, cfg)


def _layer(args: argparse.Namespace, lm: Any, editor: Any) -> int:
    from repedit.editors import make_editor

    if args.layer is not None:
        lm.arch.check_layer(args.layer)
        return args.layer
    if editor.name not in ("rome", "r-rome"):
        editor = make_editor("rome")
    return editor.layers(lm, editor.resolved(lm))[0]


# ----------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> int:
    if args.analysis == "keys":
        return run_keys(args)
    raise InvalidRequestError(f"unknown analysis {args.analysis!r}")  # pragma: no cover


def _fmt(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def run_keys(args: argparse.Namespace) -> int:
    from repedit.analysis import (
        findings_markdown,
        key_similarity,
        plot_distributions,
        plot_similarity_vs_success,
        plot_specificity,
        similarity_vs_success,
        specificity_matrix,
        summarize_findings,
    )
    from repedit.data import load_cases
    from repedit.editors import make_editor
    from repedit.progress import progress_bar

    opts = resolve_options(args)
    editor = make_editor(opts["method"], opts["hparams"], common.stats_config(args))
    loaded = load_cases(
        opts["data"],
        data_dir=opts["data_dir"],
        n=opts["n"],
        skip_invalid=opts["skip_invalid"],
        id_split=opts["id_split"],
    )
    cases = loaded.cases
    if not cases:
        raise InvalidRequestError(f"no cases in {opts['data']}")
    for msg in loaded.skipped:
        common.log(f"skipped: {msg}")
    data_name = Path(opts["data"]).stem if str(opts["data"]).endswith(".json") else opts["data"]
    out = Path(args.out or Path("runs") / f"keys-{data_name}")
    out.mkdir(parents=True, exist_ok=True)

    lm = common.load(args)
    layer = _layer(args, lm, editor)
    t0 = time.perf_counter()
    common.status(f"key statistics at layer {layer} (computed once, then cached)…")
    stats = editor.second_moment(lm, [layer])[layer]
    contexts = editor.contexts(lm, editor.resolved(lm))
    sampler = _sampler(lm, opts)
    timings: dict[str, float] = {"stats_and_contexts": time.perf_counter() - t0}

    common.status(
        f"analysing {len(cases)} cases at layer {layer} ({len(contexts)} contexts for k*, "
        f"{args.n_unrelated} unrelated subjects, long context "
        f"{'off' if sampler is None else f'{sampler.length} {sampler.unit}'})…"
    )
    t0 = time.perf_counter()
    with progress_bar(not args.no_progress) as bar:
        tasks = {
            "k*": bar.add_task("k*", total=len(cases)),
            "variants": bar.add_task("variant keys", total=len(cases)),
        }
        results = key_similarity(
            lm,
            cases,
            layer=layer,
            stats=stats,
            contexts=contexts,
            seed=opts["seed"],
            long_context=sampler,
            n_long_context=opts["long_context_passages"],
            n_unrelated=args.n_unrelated,
            position=editor.hparams.position,
            batch_size=args.batch_size,
            progress=lambda stage, n: bar.advance(tasks[stage], n),
        )
    timings["keys"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    subjects, matrix = specificity_matrix(
        lm,
        cases,
        layer,
        stats,
        contexts,
        position=editor.hparams.position,
        max_cases=args.specificity_n,
    )
    timings["specificity"] = time.perf_counter() - t0
    findings = summarize_findings(results)

    success = None
    if args.run:
        common.status(f"joining with the evaluation run {args.run}…")
        success = similarity_vs_success(results, run_dir=args.run)
    elif args.with_success:
        common.status(f"editing each case with {editor.name}, scoring its variants…")
        t0 = time.perf_counter()
        with progress_bar(not args.no_progress) as bar:
            task = bar.add_task("edits", total=len(results))
            success = similarity_vs_success(
                results,
                lm=lm,
                cases=cases,
                editor=editor,
                batch_size=args.batch_size,
                progress=lambda _stage, n: bar.advance(task, n),
            )
        timings["success"] = time.perf_counter() - t0
    if success is not None:
        for note in success.notes:
            common.log(f"note: {note}")

    t0 = time.perf_counter()
    pngs = [
        plot_distributions(results, out / "beta_distribution.png"),
        plot_specificity(subjects, matrix, out / "specificity.png"),
    ]
    if success is not None and success.rows:
        pngs.append(plot_similarity_vs_success(success, out / "beta_vs_success.png"))
    timings["plots"] = time.perf_counter() - t0
    report = {
        "model": args.model,
        "fingerprint": lm.fingerprint,
        "layer": layer,
        "d_mlp": lm.arch.d_mlp,
        "data": opts["data"],
        "data_path": str(loaded.path) if loaded.path else None,
        "n_cases": len(results),
        "options": {
            **{k: v for k, v in opts.items() if k != "hparams"},
            "hparams": opts["hparams"],
            "n_unrelated": args.n_unrelated,
            "contexts": contexts,
            "stats": {"corpus": args.corpus, "n_tokens": stats.n_tokens},
            "run": args.run,
            "with_success": args.with_success,
        },
        "timings": timings,
        "findings": findings,
        "specificity": {"subjects": subjects, "matrix": matrix.tolist()},
        "success": success.to_dict() if success is not None else None,
        "cases": [cs.to_dict() for cs in results],
    }
    (out / "similarity.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    (out / "findings.md").write_text(findings_markdown(findings, success), encoding="utf-8")

    if args.json:
        common.print_json({k: v for k, v in report.items() if k != "cases"})
        return 0
    rows = []
    for v, s in findings["variants"].items():
        below = s["share_below_0.4"]
        row = [
            v,
            s["n"],
            _fmt(s["median"]),
            _fmt(s["mean"]),
            "—" if below is None else f"{100 * below:.0f}%",
            _fmt(s["median_cosine"]),
        ]
        if success is not None:
            sv = success.summary["by_variant"].get(v)
            row.append("—" if sv is None else f"{100 * sv['success']:.0f}%")
        rows.append(row)
    columns = ["variant", "keys", "median β̃", "mean β̃", "β̃ < 0.4", "median cos"]
    if success is not None:
        columns.append("success")
    ss = findings["self_similarity"]
    common.print_table(
        rows,
        columns,
        title=f"{args.model}, layer {layer}, {len(results)} cases: k*ᵀC⁻¹k* median "
        f"{ss['median']:.1f} ({ss['median_over_d_mlp']:.2f}× d_mlp {lm.arch.d_mlp})",
    )
    common.out.print(findings["finding_1"]["statement"], soft_wrap=True, markup=False)
    common.out.print(findings["finding_2"]["statement"], soft_wrap=True, markup=False)
    if success is not None:
        common.out.print(
            f"β̃ vs success ({success.source}): point-biserial r = "
            f"{_fmt(success.summary['point_biserial'])} over {success.summary['n']} probes",
            soft_wrap=True,
            markup=False,
        )
    for path in [out / "similarity.json", out / "findings.md", *pngs]:
        common.log(f"  {path}")
    return 0

"""``repedit analyze``: analyses of edit keys (``keys``: whitened similarity of variants)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from repedit.cli import common
from repedit.errors import InvalidRequestError

if TYPE_CHECKING:
    from repedit.analysis.pipeline import KeyAnalysis, KeyAnalysisConfig
    from repedit.evaluation.probes import SuiteConfig
    from repedit.models.loading import LoadedModel

DESCRIPTION = """\
Analyses of the keys an edit is written at.

  keys   whitened similarity β̃ = kᵀC⁻¹k* / k*ᵀC⁻¹k* of every robustness variant's key (subject
         paraphrases, scrambled subjects, long context, prompt paraphrases, unrelated
         subjects) to the edit key k*, at the edit layer; tests the REP paper's two findings
         on the model; optionally joins β̃ with per-probe edit success.

  ceiling  every probe of the suite scored plain, with REP (--rep), and with the edit key k*
           written at the probe's subject token(s): how far the key path can reach.

  readout  every success probe scored with the residual stream at its subject token(s) replaced,
           layer by layer, by the edit prompt's own: which layers and positions carry a failure.

run 'repedit analyze ANALYSIS --help' (keys, ceiling, readout) for the options.
"""

CEILING_DESCRIPTION = """\
For each case: edit it alone with --method, score every probe of the suite plain, with REP
(--rep), with oracle_key (the down-projection input at the probe's last subject token replaced
by the edit's k* at every edited layer) and oracle_key_all (every subject token), then revert.
Writes OUT/ceiling.json ({"tests": {TEST: {"plain", "rep", "oracle_key", "oracle_key_all",
"gap_closed", "n"}}}, rates as fractions; scramble halves as their own tests) and OUT/ceiling.md.

example:
  repedit analyze ceiling --method rome --rep --data rep-counterfact --n 50 --out runs/ceiling
"""

READOUT_DESCRIPTION = """\
For each case: edit it alone with --method, then score every success probe of the suite plain,
with oracle_key (k* written into the down-projection input at the probe's last subject token),
with hidden@L for each layer L of the sweep (the output of layer L at the probe's last subject
token replaced by the edited model's at the edit prompt's last subject token) and hidden_all@L
(every subject token, paired right to left), then revert. Writes OUT/readout.json
({"layers", "oracles", "tests": {TEST: {"n", ORACLE: rate}}}, rates as fractions),
OUT/readout.md and OUT/readout.png (success against the patched layer).

example:
  repedit analyze readout --method rome --data rep-counterfact-valid --n 12 \\
      --tests efficacy,subject_paraphrase,scrambled_subject,long_context --out runs/readout
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
        help="analyse edit keys (whitened similarity of variants to k*) and the key path's ceiling",
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
    _case_options(k)
    _analysis_options(k)
    _long_context_options(k)
    _success_options(k)
    common.add_model_options(k)
    common.add_stats_options(k)
    common.add_json_option(k)
    _register_ceiling(sub)
    _register_readout(sub)


def _register_ceiling(sub: Any) -> None:
    c = sub.add_parser(
        "ceiling",
        help="probes scored plain, with REP and with the edit key written in (the ceiling)",
        description=CEILING_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _edit_suite_options(c, "runs/ceiling")
    common.add_rep_options(c, sweep=False)
    common.add_model_options(c)
    common.add_stats_options(c)
    common.add_json_option(c)


def _register_readout(sub: Any) -> None:
    r = sub.add_parser(
        "readout",
        help="probes scored with the subject's residual stream patched in, layer by layer",
        description=READOUT_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _edit_suite_options(r, "runs/readout")
    g = r.add_argument_group("layers")
    g.add_argument(
        "--layers",
        default=None,
        metavar="LAYERS",
        help="layers whose output is patched: 4,5,6 or 4-8 (default: the layer below the edit, "
        "then every --layer-step up to the second-last)",
    )
    g.add_argument(
        "--layer-step", type=common.positive_int, default=2, help="sweep step (default 2)"
    )
    g.add_argument(
        "--last-token-only", action="store_true", help="skip hidden_all@l (every subject token)"
    )
    common.add_model_options(r)
    common.add_stats_options(r)
    common.add_json_option(r)


def _edit_suite_options(c: argparse.ArgumentParser, out: str) -> None:
    """Options of the analyses that edit each case and score its suite probes."""
    c.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log details"
    )
    c.add_argument("--method", default="rome", help="editor (default %(default)s)")
    c.add_argument("--data", default="demo", help="dataset name or JSON file (default: demo)")
    c.add_argument("--data-dir", default=None, help="where dataset names resolve ($REPEDIT_DATA)")
    c.add_argument("--n", type=common.positive_int, default=None, help="first N cases (all)")
    c.add_argument("--id-split", type=int, default=5, help="in-domain subject paraphrases (5)")
    c.add_argument("--tests", default="all", help="comma-separated suite tests (default: all)")
    c.add_argument("--out", default=out, help="output folder (default %(default)s)")
    c.add_argument(
        "--batch-size", type=common.positive_int, default=32, help="sequences per forward (32)"
    )
    c.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="editor hyper-parameter override (repeatable)",
    )
    _long_context_options(c)


def _case_options(k: argparse.ArgumentParser) -> None:
    g = k.add_argument_group("cases")
    g.add_argument("--data", default=None, help="dataset name or JSON file (default: demo)")
    g.add_argument("--data-dir", default=None, help="where dataset names resolve ($REPEDIT_DATA)")
    g.add_argument("--n", type=common.positive_int, default=None, help="first N cases (all)")
    g.add_argument("--skip-invalid", action="store_true", help="skip malformed dataset records")
    g.add_argument(
        "--id-split", type=int, default=None, help="in-domain subject paraphrases (default 5)"
    )
    g.add_argument("--seed", type=int, default=None, help="seed for scrambles/passages (0)")


def _analysis_options(k: argparse.ArgumentParser) -> None:
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


def _long_context_options(k: argparse.ArgumentParser) -> None:
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


def _success_options(k: argparse.ArgumentParser) -> None:
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


# ----------------------------------------------------------------------------- options


def resolve_options(args: argparse.Namespace) -> KeyAnalysisConfig:
    """The analysis settings: explicit options, else the evaluation run's, else defaults."""
    from repedit.analysis.pipeline import KeyAnalysisConfig, read_run_config

    if args.run and args.with_success:
        raise InvalidRequestError("use --run (join an evaluation) or --with-success, not both")
    run = read_run_config(args.run) if args.run else {}

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
    hparams = dict(run.get("hparams") or {})
    hparams.update(common.parse_overrides(args.overrides))
    if run and run.get("model") not in (None, args.model):
        common.console.print(
            f"[yellow]warning:[/] the run used model {run['model']!r}, analysing {args.model!r}"
        )
    return KeyAnalysisConfig(
        data=pick("data", "data", "demo"),
        data_dir=pick("data_dir", "data_dir", None),
        n=pick("n", "n", None),
        skip_invalid=bool(args.skip_invalid or run.get("skip_invalid", False)),
        id_split=pick("id_split", "id_split", 5),
        seed=pick("seed", "seed", 0),
        method=pick("method", "method", "rome"),
        hparams=hparams,
        layer=args.layer,
        n_unrelated=args.n_unrelated,
        specificity_n=args.specificity_n,
        batch_size=args.batch_size,
        long_context_corpus=args.long_context_corpus or run.get("long_context_corpus"),
        long_context_length=length,
        long_context_unit=unit,
        long_context_passages=pick("long_context_passages", "long_context_passages", 1),
        run=args.run,
        with_success=args.with_success,
        out=args.out,
        model=args.model,
    )


# ----------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> int:
    if args.analysis == "keys":
        return run_keys(args)
    if args.analysis == "ceiling":
        return run_ceiling(args)
    if args.analysis == "readout":
        return run_readout(args)
    raise InvalidRequestError(f"unknown analysis {args.analysis!r}")  # pragma: no cover


def _fmt(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def run_keys(args: argparse.Namespace) -> int:
    from repedit.analysis.pipeline import run_key_analysis
    from repedit.progress import progress_bar

    cfg = resolve_options(args)
    lm = common.load(args)
    with progress_bar(not args.no_progress) as bar:

        def progress(stage: str, total: int) -> Any:
            task = bar.add_task(_STAGES.get(stage, stage), total=total)
            return lambda n: bar.advance(task, n)

        result = run_key_analysis(
            cfg, lm, stats_config=common.stats_config(args), progress=progress, status=common.status
        )
    if result.success is not None:
        for note in result.success.notes:
            common.log(f"note: {note}")
    if args.json:
        common.print_json({k: v for k, v in result.report.items() if k != "cases"})
        return 0
    _print_summary(args, lm, result)
    for path in result.files:
        common.log(f"  {path}")
    return 0


_STAGES = {"variants": "variant keys"}


def _print_summary(args: argparse.Namespace, lm: LoadedModel, result: KeyAnalysis) -> None:
    """The β̃ table per variant type and the findings' statements."""
    findings, success = result.findings, result.success
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
        title=f"{args.model}, layer {result.report['layer']}, {len(result.results)} cases: "
        f"k*ᵀC⁻¹k* median {ss['median']:.1f} ({ss['median_over_d_mlp']:.2f}× d_mlp "
        f"{lm.arch.d_mlp})",
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


def run_ceiling(args: argparse.Namespace) -> int:
    from repedit.analysis.ceiling import CeilingConfig, ceiling_markdown
    from repedit.analysis.ceiling import run_ceiling as ceiling
    from repedit.evaluation.config import tied_forms_seed
    from repedit.rep import RepConfig

    rep = common.rep_overrides(args)
    suite = _suite(args)
    if rep is not None:  # REP's scramble split is the suite's
        rep = {**rep, "forms_seed": tied_forms_seed(rep, suite.seed)}
    cfg = CeilingConfig(
        data=args.data,
        data_dir=args.data_dir,
        n=args.n,
        id_split=args.id_split,
        method=args.method,
        hparams=common.parse_overrides(args.overrides),
        rep=None if rep is None else RepConfig().replace(**rep),
        suite=suite,
        out=args.out,
    )
    lm = common.load(args)
    common.status(f"scoring the ceiling of {cfg.method} on {cfg.data}…")
    doc = ceiling(cfg, lm, stats_config=common.stats_config(args), on_case=common.log)
    if args.json:
        common.print_json(doc)
    else:
        common.out.print(ceiling_markdown(doc), soft_wrap=True, markup=False)
    return 0


def _suite(args: argparse.Namespace) -> SuiteConfig:
    """The suite settings of the options of :func:`_edit_suite_options`."""
    from repedit.evaluation.probes import SuiteConfig

    return SuiteConfig(
        tests=args.tests,
        long_context_corpus=args.long_context_corpus,
        long_context_length=args.long_context_words or args.long_context_tokens or 512,
        long_context_unit="words" if args.long_context_words else "tokens",
        long_context_passages=1
        if args.long_context_passages is None
        else args.long_context_passages,
        batch_size=args.batch_size,
    )


def run_readout(args: argparse.Namespace) -> int:
    from repedit.analysis.readout import ReadoutConfig, readout_markdown
    from repedit.analysis.readout import run_readout as readout

    cfg = ReadoutConfig(
        data=args.data,
        data_dir=args.data_dir,
        n=args.n,
        id_split=args.id_split,
        method=args.method,
        hparams=common.parse_overrides(args.overrides),
        suite=_suite(args),
        layers=None if args.layers is None else tuple(common.parse_layers(args.layers)),
        step=args.layer_step,
        all_tokens=not args.last_token_only,
        out=args.out,
    )
    lm = common.load(args)
    common.status(f"patching the subject's residual stream under {cfg.method} on {cfg.data}…")
    doc = readout(cfg, lm, stats_config=common.stats_config(args), on_case=common.log)
    if args.json:
        common.print_json(doc)
    else:
        common.out.print(readout_markdown(doc), soft_wrap=True, markup=False)
    return 0

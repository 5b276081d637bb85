"""``repedit eval``: run the robustness suite over a dataset (resumable) and summarise it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from repedit.cli import common

if TYPE_CHECKING:
    from repedit.evaluation.config import EvalEvery, ParallelConfig, RunConfig

# the library is imported inside the functions, so that ``repedit --help`` stays instant

DESCRIPTION = """\
Edit every case of a dataset and score the edited model on the robustness suite: efficacy,
prompt paraphrases, in-domain and held-out subject paraphrases, scrambled subjects, long
context, neighbourhood, neighbourhood_plus (the neighbourhood after the edit's own statement)
and near_subject (look-alike subjects), all three by agreement with the unedited model, and
fluency. --scoring generate|both scores by greedy generation as well. Results go to
OUT/results.jsonl one line per case as soon as it is done; rerunning the same command resumes
(a different configuration into the same OUT is refused unless --overwrite). At the end
OUT/summary.json, OUT/summary.md and OUT/report.html are written.

modes:
  single      edit one case, evaluate, revert (the paper's protocol)
  batch       edit --batch-size cases at once, evaluate each, revert
  sequential  edits accumulate; at checkpoints (--eval-every) a sample of the edited-so-far
              cases is re-scored into OUT/sequential.jsonl (forgetting curves)

REP: --rep trains REP adapters after every edit (batch mode: one shared set per batch unless
--rep-set shared=false) and scores with them attached; records gain rep_seconds (apart from
edit_seconds), the training summary (gate open rates, losses) and the gate's open rate while
scoring. --rep-tau 0.5,0.7,0.9 trains once and scores once per τ, into OUT/tau-0.5/, ... (one
plain run directory each; OUT/report.html compares them). In sequential mode every edit
gets its own adapters and all of them stay on for later edits (OUT/sequential_rep/); a τ sweep
needs single or batch mode.

workers: --workers N runs the cases on N processes, each with its own model and --threads
(default 1), --ray [ADDRESS] on Ray actors (one GPU each with --device cuda); this process
still owns OUT and writes every record, a dead worker's case is retried once and then recorded
as failed, and the records match a one-process run's (single and batch modes only).

examples:
  repedit eval --method rome --data rep-counterfact --n 100 --out runs/rome-cf
  repedit eval --method rome --data rep-counterfact --n 100 --workers 4 --out runs/rome-cf
  repedit eval --method rome --data rep-counterfact --n 100 --rep --out runs/rome-rep-cf
  repedit eval --method rome --data rep-counterfact --n 100 --rep-ablation no-gate \\
      --rep-set steps=20 --rep-tau 0.5,0.7,0.9,0.95 --out runs/rome-rep-nogate
  repedit eval --method memit --data demo --mode sequential --eval-every 5 --out runs/seq
  repedit eval --data rep-counterfact --n 50 --tests efficacy,subject_paraphrase,neighbourhood \\
      --long-context-words 300 --set value.steps=10 --out runs/quick
"""

EPILOG = """\
tests: all, or a comma-separated list of efficacy, prompt_paraphrase, subject_paraphrase,
ood_subject_paraphrase, scrambled_subject, long_context, neighbourhood, neighbourhood_plus,
near_subject, fluency.
data: demo (built-in facts), a dataset name resolved under --data-dir / $REPEDIT_DATA
(rep-counterfact, rep-zsre, counterfact, zsre, ...) or a JSON file.
"""


def _eval_every(text: str) -> EvalEvery:
    """``type=`` for --eval-every: a positive integer or ``log``."""
    from repedit.errors import InvalidRequestError
    from repedit.evaluation.config import parse_eval_every

    try:
        return parse_eval_every(text)
    except InvalidRequestError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(subparsers: Any) -> None:
    p = common.add_command(
        subparsers,
        "eval",
        help="evaluate an editing method on the robustness suite (resumable run directory)",
        description=DESCRIPTION,
        epilog=EPILOG,
    )
    g = p.add_argument_group("run")
    g.add_argument("--method", default="rome", help=common.METHOD_HELP)
    g.add_argument("--data", default="demo", help="dataset name or JSON file (default: demo)")
    g.add_argument("--data-dir", default=None, help="where dataset names resolve ($REPEDIT_DATA)")
    g.add_argument("--n", type=common.positive_int, default=None, help="first N cases (all)")
    g.add_argument("--mode", default="single", choices=("single", "batch", "sequential"))
    g.add_argument("--batch-size", type=common.positive_int, default=10, help="batch mode")
    g.add_argument(
        "--eval-every",
        type=_eval_every,
        default="log",
        metavar="N|log",
        help="sequential checkpoints: every N edits, or 'log' (after 10, 20, 40, ... edits and "
        "after the last, so re-scoring stays a small share of a long run; default)",
    )
    g.add_argument(
        "--eval-sample",
        type=int,
        default=20,
        help="cases re-scored at a sequential checkpoint (0 = all edited so far; default 20)",
    )
    g.add_argument("--tests", default="all", help="all, or a comma-separated list (see below)")
    g.add_argument("--out", default=None, help="run directory (default: runs/METHOD-DATA-MODE)")
    g.add_argument("--seed", type=int, default=0, help="seed for variants and sampling")
    g.add_argument("--skip-invalid", action="store_true", help="skip malformed dataset records")
    g.add_argument(
        "--id-split", type=int, default=5, help="in-domain subject paraphrases (default 5)"
    )
    g.add_argument("--overwrite", action="store_true", help="discard an existing run in --out")
    g.add_argument(
        "--wait",
        action="store_true",
        help="if another repedit process owns --out, wait for it (then resume) instead of refusing",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_worker_options(p)
    lc = p.add_argument_group("long context and fluency")
    length = lc.add_mutually_exclusive_group()
    length.add_argument(
        "--long-context-tokens", type=common.positive_int, metavar="N", help="default 512"
    )
    length.add_argument(
        "--long-context-words",
        type=common.positive_int,
        metavar="N",
        help="passage length in words instead (300 = the released code)",
    )
    lc.add_argument(
        "--long-context-corpus",
        default=None,
        metavar="FILE",
        help="text file to cut passages from (default $REPEDIT_DATA/wikitext/wiki.test.raw)",
    )
    lc.add_argument(
        "--long-context-passages", type=int, default=1, help="test passages per case (1)"
    )
    lc.add_argument("--fluency-samples", type=int, default=1, help="texts per case (1)")
    lc.add_argument("--fluency-tokens", type=common.positive_int, default=100, help="(100)")
    lc.add_argument(
        "--score-batch-size", type=common.positive_int, default=32, help="sequences per forward"
    )
    _add_scoring_options(p)
    common.add_hparam_options(p, example="value.steps=10")
    common.add_rep_options(p, sweep=True)
    common.add_model_options(p)
    common.add_stats_options(p)
    common.add_json_option(p)


def _add_scoring_options(p: argparse.ArgumentParser) -> None:
    """--scoring and --scoring-impl (SuiteConfig.scoring, SuiteConfig.scoring_impl)."""
    sc = p.add_argument_group("scoring")
    sc.add_argument(
        "--scoring",
        default="teacher-forced",
        choices=("teacher-forced", "generate", "both"),
        help="teacher forcing (default), greedy generation of the target's length + 2 tokens, "
        "or both (summary.json's tests_generate holds the generate-scored rates)",
    )
    sc.add_argument(
        "--scoring-impl",
        default="fast",
        choices=("fast", "reference"),
        help="teacher-forced scorer: packed (fast, default) or one padded batch (reference); "
        "same results, may change between resumptions",
    )


def _add_worker_options(p: argparse.ArgumentParser) -> None:
    w = p.add_argument_group(
        "workers",
        "shard the cases over worker processes, each with its own model and --threads "
        "(default 1 each); this process owns OUT and writes every record (single and batch "
        "modes)",
    )
    w.add_argument(
        "--workers", type=common.positive_int, default=None, metavar="N", help="worker processes"
    )
    w.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run the workers as Ray actors on the cluster at ADDRESS (HOST:6379), or on a "
        "local Ray started for the run; with --device cuda each actor takes one GPU "
        "(pip install 'repedit[ray]')",
    )


def run_config(args: argparse.Namespace) -> RunConfig:
    """The RunConfig the options describe."""
    from repedit.editors.base import StatsConfig
    from repedit.evaluation.config import RunConfig
    from repedit.evaluation.probes import SuiteConfig, parse_tests
    from repedit.rep.ablations import parse_taus

    rep = common.rep_overrides(args)
    taus = parse_taus(args.rep_tau) if args.rep_tau is not None else ()
    out = args.out
    if out is None:
        data = Path(args.data).stem if args.data.endswith(".json") else args.data
        method = f"{args.method}-rep" if rep is not None else args.method
        out = str(Path("runs") / f"{method}-{data}-{args.mode}")
    unit: Literal["tokens", "words"] = "tokens"
    length = 512
    if args.long_context_words:
        unit, length = "words", args.long_context_words
    elif args.long_context_tokens:
        length = args.long_context_tokens
    suite = SuiteConfig(
        tests=parse_tests(args.tests),
        seed=args.seed,
        long_context_corpus=args.long_context_corpus,
        long_context_length=length,
        long_context_unit=unit,
        long_context_passages=args.long_context_passages,
        fluency_samples=args.fluency_samples,
        fluency_tokens=args.fluency_tokens,
        batch_size=args.score_batch_size,
        scoring=args.scoring,
        scoring_impl=args.scoring_impl,
        precision=args.precision,
    )
    return RunConfig(
        model=args.model,
        method=args.method,
        hparams=common.hparam_overrides(args),
        data=args.data,
        data_dir=args.data_dir,
        n=args.n,
        mode=args.mode,
        batch_size=args.batch_size,
        eval_every=args.eval_every,
        eval_sample=args.eval_sample,
        skip_invalid=args.skip_invalid,
        id_split=args.id_split,
        out=out,
        overwrite=args.overwrite,
        device=args.device,
        dtype=args.dtype,
        cache_dir=args.cache_dir,
        suite=suite,
        stats=StatsConfig(corpus=args.corpus, n_tokens=args.stats_tokens, precision=args.precision),
        rep=rep,
        rep_taus=taus,
    )


def parallel_config(args: argparse.Namespace) -> ParallelConfig:
    """How the options spread the cases over workers."""
    from repedit.evaluation.config import ParallelConfig

    sharded = args.ray is not None or (args.workers or 1) > 1
    return ParallelConfig(
        workers=args.workers,
        threads=args.threads if sharded else None,
        ray=args.ray is not None,
        ray_address=args.ray or None,
    )


def print_summary(summary: dict[str, Any], title: str | None = None) -> None:
    from repedit.evaluation.summary import TABLE_COLUMNS, table_rows

    common.print_table(table_rows(summary), TABLE_COLUMNS, title=title)


def run(args: argparse.Namespace) -> int:
    from repedit.evaluation.harness import run_eval
    from repedit.evaluation.rundir import sweep_dirs
    from repedit.evaluation.summary import load_summary, run_label

    cfg = run_config(args)
    parallel = parallel_config(args)
    parallel.check(cfg.mode)  # before the model loads
    lm = common.load(args)
    label = run_label(cfg.to_dict())
    common.status(f"evaluating {label} ({cfg.mode}) on {cfg.data} → {cfg.out}")
    run_dir = run_eval(cfg, lm=lm, progress=not args.no_progress, wait=args.wait, parallel=parallel)
    subs = sweep_dirs(run_dir)
    if subs:
        return _print_sweep(args, run_dir, subs)
    summary = load_summary(run_dir)
    if args.json:
        common.print_json(summary)
        return 0
    extra = summary.get("extra", {})
    spe = summary.get("seconds_per_edit")
    pps = extra.get("probes_per_s")
    rep_s = extra.get("rep_seconds_mean")
    title = (
        f"{label} on {cfg.model}, {cfg.data} ({cfg.mode}): {extra.get('n_cases')} cases, "
        f"{extra.get('n_failed')} failed; "
        f"{'—' if spe is None else f'{spe:.2f}'} s/edit"
        + ("" if rep_s is None else f" + {rep_s:.2f} s REP")
        + f"; {'—' if pps is None else f'{pps:.0f}'} probes/s"
    )
    print_summary(summary, title)
    for name in ("results.jsonl", "summary.json", "summary.md", "report.html"):
        common.log(f"  {run_dir / name}")
    return 0


def _print_sweep(args: argparse.Namespace, run_dir: Path, subs: list[Path]) -> int:
    """A τ sweep: one column per τ sub-run."""
    from repedit.evaluation.report import run_labels
    from repedit.evaluation.summary import comparison_rows, load_summary

    summaries = [load_summary(d) for d in subs]
    names = run_labels(subs, summaries)
    if args.json:
        common.print_json(
            {
                "sweep": str(run_dir),
                "runs": {str(d): s for d, s in zip(subs, summaries, strict=True)},
            }
        )
        return 0
    columns = ["test (%; fluency in bits)", *names]
    common.print_table(comparison_rows(summaries), columns, title=f"τ sweep: {run_dir}")
    for d in subs:
        common.log(f"  {d}")
    common.log(f"  {run_dir / 'report.html'}")
    return 0

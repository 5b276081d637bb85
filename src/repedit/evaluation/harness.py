"""The evaluation entry point: :func:`run_eval` runs (or resumes) one run directory.

It owns the run directory for the whole run (its lock; see
:mod:`~repedit.evaluation.rundir`), checks that the directory resumes the same run
(:mod:`~repedit.evaluation.config`), hands the cases to a mode
(:mod:`~repedit.evaluation.modes`), and writes the summary and the report at the end.
Rerunning the same command resumes: cases already in ``results.jsonl`` are skipped (a line cut
short by a kill is dropped and the case redone).

REP (``RunConfig.rep``: RepConfig overrides, ``{}`` for the defaults): after each edit REP
adapters are trained on the edited model (in batch mode once per batch, one shared adapter set
unless ``rep["shared"]`` is False) and the case is scored with them attached. Records gain
``rep_seconds`` (apart from ``edit_seconds``), ``rep`` (the training summary) and
``rep_eval_gate`` (open rates while scoring). In sequential mode each edit gets its own
adapters, trained with every earlier edit in place, and all adapters so far act together in
every later evaluation. A τ sweep (``rep_taus`` with several values) trains once per case and
scores once per τ; ``OUT`` then holds ``config.json``, ``reference.jsonl``, ``sessions.json``,
a ``report.html`` comparing the τ values, and one plain run directory per τ, ``OUT/tau-0.5/``,
... (its config has ``rep.tau`` set, its records ``rep_tau``); a case is done once every
sub-run holds it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import transformers

from repedit import __version__
from repedit.data.case import EditCase
from repedit.data.loaders import LoadResult, load_cases
from repedit.editors import Editor, make_editor
from repedit.errors import RepeditError
from repedit.evaluation.case import CaseContext, CaseItem, restore
from repedit.evaluation.config import ParallelConfig, RunConfig, check_resumable, prepare
from repedit.evaluation.modes import (
    Progress,
    Recorder,
    case_context,
    run_batch,
    run_sequential,
    run_single,
)
from repedit.evaluation.probes import case_keys
from repedit.evaluation.report import write_report
from repedit.evaluation.rundir import RESULTS, RunDir, RunLock, new_session, plain
from repedit.evaluation.summary import summarize
from repedit.evaluation.workers import run_parallel
from repedit.models import LoadedModel, load_model
from repedit.progress import progress_bar

log = logging.getLogger(__name__)


def run_eval(
    cfg: RunConfig,
    lm: LoadedModel | None = None,
    editor: Editor | None = None,
    progress: bool = True,
    *,
    report: bool = True,
    wait: bool = False,
    parallel: ParallelConfig | None = None,
) -> Path:
    """Run (or resume) an evaluation; returns the run directory.

    ``lm``: a loaded, *unedited* model (default: ``load_model(cfg.model, ...)``); it is left
    unedited on return. ``editor``: default ``make_editor(cfg.method, cfg.hparams, ...)``.
    The run directory is owned for the whole call: another process already owning it makes
    this raise :class:`~repedit.evaluation.rundir.RunBusyError`, or with ``wait`` wait for it.
    Writes results, ``summary.json``/``summary.md`` and ``report.html``. ``parallel``: run
    the cases on worker processes (see :mod:`~repedit.evaluation.workers`); this process
    still owns the directory and writes everything.
    """
    parallel = parallel or ParallelConfig()
    parallel.check(cfg.mode)
    started = time.time()
    with _owned(cfg, wait) as run:
        loaded = load_cases(
            cfg.data, data_dir=cfg.data_dir, n=cfg.n, skip_invalid=cfg.skip_invalid,
            id_split=cfg.id_split,
        )  # fmt: skip
        for msg in loaded.skipped:
            log.warning("skipped: %s", msg)
        if lm is None:
            lm = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, cache=cfg.cache_dir)
        if editor is None:
            editor = make_editor(cfg.method, dict(cfg.hparams), cfg.editor_stats(progress))
        meta = _meta(cfg, lm, editor, loaded)
        if cfg.rep_taus and (run / RESULTS).exists() and not cfg.overwrite:
            raise RepeditError(
                f"{run.path} holds a single run's {RESULTS}, not a τ sweep; choose another "
                "--out, or pass --overwrite"
            )
        prepare(run, cfg, meta)
        ctx = case_context(cfg, lm, editor, run.references(), _all_cases(cfg, loaded))
        _run_mode(cfg, ctx, _recorder(cfg, run, meta, started), loaded, progress, parallel)
        return _finish(cfg, run, report)


@contextlib.contextmanager
def _owned(cfg: RunConfig, wait: bool) -> Iterator[RunDir]:
    """Own ``cfg.out`` (and a sweep's sub-runs) and refuse early, before a model is loaded,
    if the directory holds a different run."""
    run = RunDir(cfg.out)
    locks: list[RunLock] = []
    try:
        locks.append(run.lock(wait=wait))
        check_resumable(run, cfg)
        for _, sub_cfg in cfg.sweep():
            sub = RunDir(sub_cfg.out)
            locks.append(sub.lock(wait=wait))
            check_resumable(sub, sub_cfg)
        yield run
    finally:
        for lock in reversed(locks):
            lock.release()


def _meta(cfg: RunConfig, lm: LoadedModel, editor: Editor, loaded: LoadResult) -> dict[str, Any]:
    """What config.json stores beside the RunConfig (a resumed run must match the first two)."""
    resolved = editor.resolved(lm)
    rep_cfg = cfg.rep_config()
    return {
        "model_name": lm.name,
        "model_fingerprint": lm.fingerprint,
        "data_path": str(loaded.path) if loaded.path else cfg.data,
        "data_sha256": loaded.sha256,
        "data_format": loaded.format,
        "hparams_resolved": plain(resolved.to_dict()),
        "rep_resolved": plain(rep_cfg.to_dict()) if rep_cfg is not None else None,
        "edit_layers": list(editor.layers(lm, resolved)),
        "suite": cfg.suite.to_dict(),
        "versions": {
            "repedit": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "n_skipped_invalid": len(loaded.skipped),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _all_cases(cfg: RunConfig, loaded: LoadResult) -> list[EditCase]:
    """Every case of the dataset (look-alikes come from all of them, whatever ``--n``)."""
    if cfg.n is None or len(loaded.cases) < cfg.n or "near_subject" not in cfg.suite.tests:
        return loaded.cases
    # a malformed record past the evaluated ones cannot be a look-alike, nor fail the run
    every = load_cases(cfg.data, data_dir=cfg.data_dir, skip_invalid=True, id_split=cfg.id_split)
    return every.cases


def _recorder(cfg: RunConfig, run: RunDir, meta: dict[str, Any], started: float) -> Recorder:
    """Where records go: ``run``, or a τ sweep's sub-runs (each prepared like a plain run)."""
    rec = Recorder(run, done=set(), session=new_session(started, 0))
    sweep = cfg.sweep()
    if not sweep:
        rec.done = {r["case_id"] for r in run.results(repair=True)}
        return rec
    for tau, sub_cfg in sweep:
        sub = RunDir(sub_cfg.out)
        prepare(sub, sub_cfg, meta)
        rec.subruns[tau] = sub
        rec.sub_done[tau] = {r["case_id"] for r in sub.results(repair=True)}
    rec.done = set.intersection(*rec.sub_done.values())
    return rec


def _run_mode(
    cfg: RunConfig,
    ctx: CaseContext,
    rec: Recorder,
    loaded: LoadResult,
    progress: bool,
    parallel: ParallelConfig,
) -> None:
    keys = case_keys(loaded.cases)
    pairs = zip(keys, loaded.cases, strict=True)
    items = [CaseItem(i, key, case) for i, (key, case) in enumerate(pairs)]
    wanted = rec.done & set(keys)
    rec.session["cases_before"] = len(wanted)
    first = next(iter(rec.subruns.values()), rec.run)
    done_records = [r for r in first.results() if r["case_id"] in wanted]
    try:
        with progress_bar(progress) as bar:
            rec.progress = Progress(bar, len(items), done_records)
            if parallel.sharded:
                run_parallel(cfg, ctx, items, rec, parallel)
            elif cfg.mode == "single":
                run_single(ctx, items, rec)
            elif cfg.mode == "batch":
                run_batch(ctx, items, rec, cfg.batch_size)
            else:
                run_sequential(
                    ctx, items, rec, eval_every=cfg.eval_every, eval_sample=cfg.eval_sample
                )
    finally:
        restored = restore(ctx.lm, ctx.snapshot)
        if restored and cfg.mode != "sequential":
            log.warning("weights %s differed from the start of the run; restored", restored)
        rec.session["wall_seconds"] = time.time() - rec.session["t0"]
        rec.session["cases_after"] = len(rec.done & set(keys))
        rec.run.record_session(rec.session)


def _finish(cfg: RunConfig, run: RunDir, report: bool) -> Path:
    """Summaries and reports, read back from the run's files."""
    subs = [Path(sub_cfg.out) for _, sub_cfg in cfg.sweep()]
    for path in subs or [run.path]:
        summarize(path)
        if report:
            write_report([path], path / "report.html")
    if subs and report:
        write_report(subs, run.path / "report.html")
    return run.path

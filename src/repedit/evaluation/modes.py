"""The three evaluation modes: they differ only in how cases are grouped and when edits revert.

``single``
    each case alone: reference, edit, score, revert (the papers' protocol).
``batch``
    ``batch_size`` consecutive cases (fixed chunks of the full case list, so a resumed chunk is
    edited with the same companions) are edited at once, each scored, then reverted.
``sequential``
    edits accumulate and are never reverted; each case is scored right after its own edit,
    and after every ``eval_every`` successful edits (``"log"``: after 10, 20, 40, ... and the
    last) up to ``eval_sample`` edited-so-far cases (a fixed seeded order of the data; 0 = all)
    are re-scored into ``sequential.jsonl`` to trace forgetting. The edited weights (and REP
    adapters) are saved after every case, so a resumed run continues from the same model.

Each mode hands its groups to :func:`~repedit.evaluation.case.run_cases` and gives what comes
back to a :class:`Recorder`, the only thing here that writes to the run directory.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from repedit.data.case import EditCase
from repedit.data.variants import stable_rng
from repedit.editors import Editor
from repedit.errors import RepeditError
from repedit.evaluation.case import (
    CASE_ERRORS,
    CaseContext,
    CaseItem,
    CaseRecord,
    attached,
    edited_param_names,
    evaluate,
    param,
    reference_record,
    run_cases,
    snapshot,
)
from repedit.evaluation.config import (
    EvalEvery,
    RunConfig,
    checkpoint_due,
)
from repedit.evaluation.config import checkpoint_points as checkpoint_points  # re-exported
from repedit.evaluation.config import parse_eval_every as parse_eval_every  # re-exported
from repedit.evaluation.probes import (
    LOCALITY_TESTS,
    PROBE_TESTS,
    SUCCESS_TESTS,
    near_index,
    passage_sampler,
)
from repedit.evaluation.rundir import (
    REFERENCE,
    RESULTS,
    SEQ_STATE,
    SEQUENTIAL,
    RunDir,
    append_jsonl,
    plain,
)
from repedit.io import read_safetensors, write_safetensors
from repedit.models import LoadedModel
from repedit.rep.adapter import Adapter, RepAdapter, RepConfig, load_adapters, stack_adapters
from repedit.rep.variants import passage_sampler as rep_passage_sampler

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the context


def case_context(
    cfg: RunConfig,
    lm: LoadedModel,
    editor: Editor,
    references: dict[str, dict[str, Any]],
    near_cases: Sequence[EditCase] = (),
) -> CaseContext:
    """What every case of ``cfg`` shares, on ``lm`` (unedited: its edited layers are
    snapshotted); built the same way by the coordinator and by every worker process.
    ``near_cases``: the dataset's cases that ``near_subject`` draws look-alikes from."""
    ctx = CaseContext(lm, editor, cfg.suite, passage_sampler(lm, cfg.suite))
    ctx.references = references
    ctx.near = near_index(lm, cfg.suite, near_cases) if near_cases else None
    ctx.rep_cfg = cfg.rep_config()
    if ctx.rep_cfg is not None:
        ctx.rep_sampler = _rep_sampler(lm, ctx.rep_cfg)
    ctx.taus = tuple(cfg.rep_taus)
    ctx.snapshot = snapshot(lm, edited_param_names(lm, editor))
    return ctx


def _rep_sampler(lm: LoadedModel, rep_cfg: RepConfig) -> Any:
    """REP's long-context passage sampler, built once per run (None: none needed/found)."""
    wants_text = rep_cfg.long_context or (rep_cfg.negatives and "text" in rep_cfg.negative_sources)
    return rep_passage_sampler(lm, rep_cfg) if wants_text else None


# --------------------------------------------------------------------------- the writer


class Progress:
    """A rich progress bar whose status shows running means over the run's records."""

    def __init__(self, bar: Any, total: int, done: Sequence[dict[str, Any]]):
        self.bar = bar
        self.sums: dict[str, list[float]] = {"eff": [0, 0], "para": [0, 0], "nbr": [0, 0]}
        self.failed = 0
        for rec in done:
            self.add(rec, advance=False)
        self.task = bar.add_task("eval", total=total, completed=len(done), status=self.status())

    def add(self, rec: dict[str, Any], advance: bool = True) -> None:
        if rec.get("error"):
            self.failed += 1
        tests = rec.get("tests") or {}
        for short, names, metric in (
            ("eff", ("efficacy",), "exact"),
            ("para", ("subject_paraphrase", "ood_subject_paraphrase"), "exact"),
            ("nbr", ("neighbourhood",), "agree"),
        ):
            for name in names:
                for p in (tests.get(name) or {}).get("probes", []):
                    if p.get(metric) is not None:
                        self.sums[short][0] += float(p[metric])
                        self.sums[short][1] += 1
        if advance:
            self.bar.update(self.task, advance=1, status=self.status())

    def status(self) -> str:
        parts = [f"{k} {s / n:.2f}" if n else f"{k} —" for k, (s, n) in self.sums.items()]
        if self.failed:
            parts.append(f"failed {self.failed}")
        return " ".join(parts)


@dataclass
class Recorder:
    """The coordinator's writes: records (split per τ for a sweep), references, the session.

    ``done``: case ids recorded (in every sub-run, for a sweep); ``sub_done``: per τ.
    """

    run: RunDir
    done: set[str]
    session: dict[str, Any]
    progress: Progress | None = None
    subruns: dict[float, RunDir] = field(default_factory=dict)
    sub_done: dict[float, set[str]] = field(default_factory=dict)

    def references(self, refs: Sequence[dict[str, Any]]) -> None:
        for ref in refs:
            append_jsonl(self.run / REFERENCE, ref)

    def record(self, rec: CaseRecord) -> None:
        flat: dict[str, Any] = dict(rec)
        per_tau = flat.pop("per_tau", None) or {}
        shown = flat
        if self.subruns:  # a τ sweep: one record per sub-run that lacks the case
            for tau, sub in self.subruns.items():
                shown = {**flat, **per_tau.get(tau, {}), "rep_tau": tau}
                if flat["case_id"] not in self.sub_done[tau]:
                    append_jsonl(sub / RESULTS, shown)
                    self.sub_done[tau].add(flat["case_id"])
        else:
            append_jsonl(self.run / RESULTS, flat)
        self.done.add(flat["case_id"])
        if self.progress is not None:
            self.progress.add(shown)
        # keep the session's wall time current, so a killed run still counts
        self.session["wall_seconds"] = time.time() - self.session["t0"]
        self.session["cases_done"] = self.session.get("cases_done", 0) + 1
        self.run.record_session(self.session)

    def outcome(self, records: Sequence[CaseRecord], refs: Sequence[dict[str, Any]]) -> None:
        self.references(refs)
        for rec in records:
            self.record(rec)


# --------------------------------------------------------------------------- single and batch


def run_single(ctx: CaseContext, items: Sequence[CaseItem], rec: Recorder) -> None:
    """Each case alone: edit, score, revert."""
    for item in items:
        if item.key not in rec.done:
            out = run_cases(ctx, [item], {item.key}, "single")
            rec.outcome(out.records, out.references)


def run_batch(ctx: CaseContext, items: Sequence[CaseItem], rec: Recorder, size: int) -> None:
    """Fixed chunks of ``size`` edited together, each case scored, then reverted."""
    for start in range(0, len(items), size):
        chunk = list(items[start : start + size])
        todo = {it.key for it in chunk if it.key not in rec.done}
        if not todo:
            continue
        out = run_cases(ctx, chunk, todo, "batch")
        for r in out.records:
            r["chunk"] = start // size
        rec.outcome(out.records, out.references)


# --------------------------------------------------------------------------- sequential


@dataclass
class SequentialState:
    """The edits kept so far (case ids, in order) and every edit's REP adapters per layer."""

    edited: list[str] = field(default_factory=list)
    adapters: dict[int, list[Adapter]] = field(default_factory=dict)

    def add(self, key: str, adapters: dict[int, Adapter] | None) -> None:
        self.edited.append(key)
        for layer, adapter in (adapters or {}).items():
            self.adapters.setdefault(layer, []).append(adapter)

    def stack(self) -> dict[int, Adapter] | None:
        if not self.adapters:
            return None
        return {
            layer: stack_adapters(cast(list[RepAdapter], ads))
            for layer, ads in self.adapters.items()
        }


def _save_state(ctx: CaseContext, run: RunDir, edited: list[str], pending: Any) -> None:
    tensors = {f"weight/{n}": param(ctx.lm, n).detach() for n in ctx.snapshot}
    meta = {"edited": edited, "pending": plain(pending), "fingerprint": ctx.lm.fingerprint}
    write_safetensors(run / SEQ_STATE, tensors, meta)


def _load_state(ctx: CaseContext, run: RunDir) -> tuple[SequentialState, dict[str, Any] | None]:
    """Put the saved edited weights (and REP adapters) back on the model."""
    path = run / SEQ_STATE
    if not path.exists():
        return SequentialState(), None
    tensors, meta = read_safetensors(path)
    if meta.get("fingerprint") != ctx.lm.fingerprint:
        raise RepeditError(f"{path} was written for another base model; pass --overwrite")
    with torch.no_grad():
        for key, tensor in tensors.items():
            name = key.removeprefix("weight/")
            if name not in ctx.snapshot:
                ctx.snapshot[name] = snapshot(ctx.lm, [name])[name]
            p = param(ctx.lm, name)
            p.copy_(tensor.to(p.device, p.dtype))
    state = SequentialState()
    for key in meta.get("edited", []):
        adapters = None
        if ctx.rep_cfg is not None:
            file = run.seq_rep_path(key)
            if not file.exists():
                raise RepeditError(
                    f"{path} lists case {key} as edited but its REP adapters ({file}) are "
                    "missing; pass --overwrite to start over"
                )
            adapters = load_adapters(file, ctx.lm)
        state.add(key, adapters)
    return state, meta.get("pending")


def _checkpoint(
    ctx: CaseContext, run: RunDir, state: SequentialState, picked: list[CaseItem]
) -> None:
    """Re-score ``picked`` edited cases with every edit so far; one line of sequential.jsonl."""
    t0 = time.perf_counter()
    sums: dict[str, list[float]] = {}
    failed = 0
    adapters = state.stack()
    for item in picked:
        try:
            with attached(ctx.lm, adapters):
                ev = evaluate(ctx, item, fluency=False)
        except CASE_ERRORS as exc:
            log.warning("sequential checkpoint: case %s failed: %s", item.key, exc)
            failed += 1
            continue
        for test, t in ev["tests"].items():
            for p in t["probes"]:
                for metric in ("exact", "beats_alt", "agree"):
                    if p.get(metric) is not None:
                        s = sums.setdefault(f"{test}.{metric}", [0.0, 0])
                        s[0] += float(p[metric])
                        s[1] += 1

    def rate(name: str) -> float | None:
        s = sums.get(name)
        return s[0] / s[1] if s and s[1] else None

    tests = [t for t in PROBE_TESTS if t in ctx.suite.tests]
    means = {t: rate(f"{t}.{'agree' if t in LOCALITY_TESTS else 'exact'}") for t in tests}
    beats = {t: rate(f"{t}.beats_alt") for t in tests if t in SUCCESS_TESTS}
    append_jsonl(
        run / SEQUENTIAL,
        {
            "n_edits": len(state.edited),
            "n_eval": len(picked) - failed,
            "cases": [it.key for it in picked],
            "means": means,
            "beats_alt": beats,
            "neighbourhood_truth": rate("neighbourhood.exact"),
            "seconds": time.perf_counter() - t0,
        },
    )


def warm_editor(ctx: CaseContext) -> None:
    """Let the editor derive what it takes from the model (context prefixes generated by the
    model, key statistics C) while the model is still unedited, so a resumed sequential run
    edits exactly as an uninterrupted one."""
    hp = ctx.editor.resolved(ctx.lm)
    ctx.editor.contexts(ctx.lm, hp)
    ctx.editor.second_moment(ctx.lm, ctx.editor.layers(ctx.lm, hp))


def _resume(
    ctx: CaseContext, items: Sequence[CaseItem], rec: Recorder
) -> tuple[SequentialState, list[CaseItem]]:
    """References first (while the model is unedited), then the saved edits back on."""
    if any(t in LOCALITY_TESTS for t in ctx.suite.tests):
        for item in items:
            if item.key not in rec.done:
                with contextlib.suppress(*CASE_ERRORS):
                    rec.references([r for r in [reference_record(ctx, item)] if r])
    warm_editor(ctx)
    state, pending = _load_state(ctx, rec.run)
    if pending and pending.get("case_id") not in rec.done:
        rec.record(cast(CaseRecord, pending))
    lost = [
        r["case_id"]
        for r in rec.run.results()
        if r.get("mode") == "sequential" and not r.get("error") and r["case_id"] not in state.edited
    ]
    if lost:
        log.warning(
            "%d edited case(s) recorded in %s are missing from %s (deleted?); the resumed "
            "model lacks their edits",
            len(lost),
            RESULTS,
            SEQ_STATE,
        )
    order = [it.key for it in items]
    stable_rng("sequential-sample", ctx.suite.seed).shuffle(order)
    by_key = {it.key: it for it in items}
    return state, [by_key[k] for k in order]


def run_sequential(
    ctx: CaseContext,
    items: Sequence[CaseItem],
    rec: Recorder,
    *,
    eval_every: EvalEvery,
    eval_sample: int,
) -> None:
    """Edits accumulate (never reverted); checkpoints where :func:`checkpoint_due` says."""
    state, order = _resume(ctx, items, rec)
    checkpoints = {r.get("n_edits") for r in rec.run.sequential()}

    def checkpoint() -> None:
        edited = set(state.edited)
        picked = [it for it in order if it.key in edited]
        _checkpoint(ctx, rec.run, state, picked[:eval_sample] if eval_sample else picked)
        checkpoints.add(len(state.edited))

    for item in items:
        if item.key in rec.done or item.key in state.edited:
            continue
        out = run_cases(ctx, [item], {item.key}, "sequential", keep=True, prior=state.adapters)
        if out.edit_failed or out.result is None:
            rec.outcome(out.records, ())
            if state.edited:  # the failure restored the snapshot: put the kept edits back
                state, _ = _load_state(ctx, rec.run)
            continue
        if out.rep is not None:  # on disk before the state lists the case
            out.rep.save(rec.run.seq_rep_path(item.key), ctx.lm.fingerprint)
        state.add(item.key, out.rep.adapters if out.rep is not None else None)
        record = out.records[0]
        record["n_edits"] = len(state.edited)
        n = len(state.edited)
        if checkpoint_due(n, eval_every) and n not in checkpoints:
            checkpoint()
        _save_state(ctx, rec.run, state.edited, record)
        rec.record(record)
    if eval_every == "log" and state.edited and len(state.edited) not in checkpoints:
        checkpoint()  # the end of the run

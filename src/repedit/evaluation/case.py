"""One case lifecycle: reference → edit → finiteness check → REP → score → revert → record.

:func:`run_cases` takes a group of cases (one in single mode, a chunk in batch mode, one
kept edit in sequential mode) and returns their records and any new reference predictions; it
writes nothing, so whoever owns the run directory (the coordinator) writes what it returns,
and a worker process could run the same function on its share of the cases.

A case whose edit or evaluation fails (:data:`CASE_ERRORS`) gets its error in its record and
the run goes on; the edited layers are compared with a snapshot taken at the start of the run
and restored if anything changed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict, cast

import torch

from repedit.data.case import EditCase
from repedit.data.variants import NearSubjects
from repedit.editors import Editor, EditResult
from repedit.errors import EditError, InvalidRequestError, RepeditError
from repedit.evaluation.locality import (
    add_generated,
    reference_preds,
    unscored_tests,
    update_reference,
)
from repedit.evaluation.probes import (
    LOCALITY_TESTS,
    CaseProbes,
    PassageSampler,
    SuiteConfig,
    build_probes,
    case_fluency,
    generated,
    teacher_forced,
)
from repedit.evaluation.rundir import plain
from repedit.evaluation.scoring import Probe, ProbeScore, score_probes, tokenize_probe
from repedit.models import LoadedModel
from repedit.models.registry import get_attr
from repedit.rep.ablations import set_tau
from repedit.rep.adapter import Adapter, RepAdapter, RepConfig, stack_adapters
from repedit.rep.inject import rep_applied
from repedit.rep.train import RepTrainResult, train_rep_after

log = logging.getLogger(__name__)

#: errors that fail one case instead of the run
CASE_ERRORS: tuple[type[BaseException], ...] = (RepeditError, RuntimeError)

#: families scored in a call of their own: ``score_probes`` pads a batch to its longest row,
#: so one 512-token passage in a batch of short prompts multiplies the cost of all of them
SEPARATE_FAMILIES: tuple[str, ...] = ("long_context",)


class ErrorInfo(TypedDict):
    type: str
    message: str


class CaseRecord(TypedDict, total=False):
    """One line of ``results.jsonl``. Always: the identity fields and ``error``; after a
    successful edit: timings, ``info`` and ``tests`` (``{name: {"n", "means", "probes"}}``)."""

    case_id: str
    index: int
    mode: str
    subject: str
    prompt: str
    target_new: str
    target_true: str | None
    error: ErrorInfo | None
    reference_seconds: float
    edit_seconds: float
    rep_seconds: float
    eval_seconds: float
    score_seconds: float
    fluency_seconds: float
    info: dict[str, Any]
    rep: dict[str, Any]
    rep_eval_gate: dict[str, dict[str, Any]]
    tests: dict[str, dict[str, Any]]
    n_probes: int
    scramble_n: int
    chunk: int
    chunk_size: int
    chunk_edit_seconds: float
    chunk_rep_seconds: float
    n_edits: int
    weights_restored: list[str]
    rep_tau: float
    #: a τ sweep's scores per τ, split into one record per sub-run by the writer
    per_tau: dict[float, dict[str, Any]]


@dataclass(frozen=True)
class CaseItem:
    """A case in its run: position in the data, key (its ``case_id``) and the case."""

    index: int
    key: str
    case: EditCase


@dataclass
class CaseContext:
    """What every case of a run shares (the model, the editor and the suite)."""

    lm: LoadedModel
    editor: Editor
    suite: SuiteConfig
    sampler: PassageSampler | None
    #: the unedited predictions per case id (``reference.jsonl``), added to as cases run
    references: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: the edited layers' weights at the start of the run
    snapshot: dict[str, torch.Tensor] = field(default_factory=dict)
    #: REP: the RepConfig (None: plain editor) and its long-context passage sampler
    rep_cfg: RepConfig | None = None
    rep_sampler: Any = None
    #: a τ sweep's values (empty: one evaluation per case)
    taus: tuple[float, ...] = ()
    #: the dataset's look-alike subjects for ``near_subject`` (None: that test is empty)
    near: NearSubjects | None = None


@dataclass
class Outcome:
    """What :func:`run_cases` returns: records to write, reference predictions to append, and
    for a kept edit (sequential mode) its result and REP training."""

    records: list[CaseRecord] = field(default_factory=list)
    references: list[dict[str, Any]] = field(default_factory=list)
    result: EditResult | None = None
    rep: RepTrainResult | None = None
    edit_failed: bool = False


# --------------------------------------------------------------------------- scoring


def case_probes(ctx: CaseContext, item: CaseItem, suite: SuiteConfig | None = None) -> CaseProbes:
    suite = suite or ctx.suite
    return CaseProbes(
        item.key,
        build_probes(item.case, ctx.lm, suite, sampler=ctx.sampler, key=item.key, near=ctx.near),
    )


def reference_record(
    ctx: CaseContext, item: CaseItem, suite: SuiteConfig | None = None
) -> dict[str, Any] | None:
    """The unedited model's answers on the case's locality probes
    (:func:`~repedit.evaluation.locality.update_reference`), if ``ctx.references`` lacks
    some (added there; the caller appends it to the file).

    Must be called while the model is unedited.
    """
    suite = suite or ctx.suite
    local = tuple(t for t in suite.tests if t in LOCALITY_TESTS)
    if not local:
        return None
    only = dataclasses.replace(suite, tests=local)
    rec = update_reference(
        ctx.lm,
        case_probes(ctx, item, only),
        ctx.references.get(item.key),
        gen=generated(ctx.suite.scoring),
        batch_size=ctx.suite.batch_size,
        impl=ctx.suite.scoring_impl,
        precision=ctx.suite.precision,
    )
    if rec is not None:
        ctx.references[item.key] = rec
    return rec


def _probe_record(test: str, probe: Probe, score: ProbeScore) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "exact": score.exact,
        "token_acc": round(score.token_acc, 6),
        "logprob": round(score.logprob, 6),
    }
    if test in LOCALITY_TESTS:
        rec["agree"] = score.agree
    else:
        rec["beats_alt"] = score.beats_alt
    if probe.meta:
        rec["meta"] = probe.meta
    return rec


def _mean(values: Iterable[Any]) -> float | None:
    xs = [float(v) for v in values if v is not None]
    return sum(xs) / len(xs) if xs else None


def test_means(test: str, probes: list[dict[str, Any]]) -> dict[str, float | None]:
    """A case's means over its probes of one test."""
    if test in LOCALITY_TESTS:
        return {
            "agree": _mean(p.get("agree") for p in probes),
            "exact": _mean(p["exact"] for p in probes),
        }
    return {
        "exact": _mean(p["exact"] for p in probes),
        "beats_alt": _mean(p.get("beats_alt") for p in probes),
    }


def score_case(
    lm: LoadedModel,
    cp: CaseProbes,
    reference: list[list[int]] | dict[str, list[list[int]]] | None,
    suite: SuiteConfig | None = None,
) -> tuple[dict[str, dict[str, Any]], int, float]:
    """Score every probe family of a case: one ``score_probes`` call for the short families
    and one for the long-context probes (see :data:`SEPARATE_FAMILIES`), with ``suite``'s
    batch size, implementation and precision.

    ``reference``: the unedited predictions per locality test (in probe order; a bare list is
    the neighbourhood's). Returns ``(tests, n_probes, seconds)``; ``tests[name] = {"n",
    "means", "probes"}``.
    """
    flat, spans, suite = cp.flat, cp.spans, suite or SuiteConfig()
    refs = {"neighbourhood": reference} if isinstance(reference, list) else (reference or {})
    ref_at: dict[int, list[int]] = {}
    for test, preds in refs.items():
        if test not in spans:
            continue
        lo, hi = spans[test]
        if len(preds) != hi - lo:
            raise InvalidRequestError(
                f"case {cp.key}: {len(preds)} reference predictions for {hi - lo} {test} probes"
            )
        ref_at.update({lo + j: list(r) for j, r in enumerate(preds)})
    groups = [
        [i for i, p in enumerate(flat) if p.test not in SEPARATE_FAMILIES],
        [i for i, p in enumerate(flat) if p.test in SEPARATE_FAMILIES],
    ]
    scores: dict[int, ProbeScore] = {}
    t0 = time.perf_counter()
    for group in groups:
        if not group:
            continue
        group_ref = None
        if any(i in ref_at for i in group):
            # score_probes takes one reference per probe; probes other than the neighbourhood
            # get their own target ids (their ``agree`` is ignored)
            tok = lm.tokenizer
            group_ref = [
                ref_at[i] if i in ref_at else tokenize_probe(tok, flat[i].prompt, flat[i].target)[1]
                for i in group
            ]
        got = score_probes(
            lm,
            [flat[i] for i in group],
            batch_size=suite.batch_size,
            reference=group_ref,
            impl=suite.scoring_impl,
            precision=suite.precision,
        )
        scores.update(zip(group, got, strict=True))
    seconds = time.perf_counter() - t0
    tests: dict[str, dict[str, Any]] = {}
    for test, (lo, hi) in spans.items():
        probes = [_probe_record(test, flat[i], scores[i]) for i in range(lo, hi)]
        if test in LOCALITY_TESTS and test not in refs:
            for p in probes:
                p["agree"] = None
        tests[test] = {"n": len(probes), "means": test_means(test, probes), "probes": probes}
    return tests, len(flat), seconds


def evaluate(ctx: CaseContext, item: CaseItem, *, fluency: bool = True) -> dict[str, Any]:
    """Scores of the (edited) model on one case: every selected test."""
    cp = case_probes(ctx, item)
    ref = ctx.references.get(item.key)
    suite = ctx.suite
    t0 = time.perf_counter()
    if teacher_forced(suite.scoring):
        tests, n_probes, _ = score_case(ctx.lm, cp, reference_preds(ref, cp), suite)
    else:
        tests, n_probes = unscored_tests(cp), len(cp.flat)
    if generated(suite.scoring):
        add_generated(
            ctx.lm, cp, tests, ref, batch_size=suite.batch_size, precision=suite.precision
        )
    score_seconds = time.perf_counter() - t0
    out: dict[str, Any] = {"tests": tests, "n_probes": n_probes, "score_seconds": score_seconds}
    if "scrambled_subject" in cp.families:
        out["scramble_n"] = len(cp.families["scrambled_subject"])
    if fluency and "fluency" in ctx.suite.tests:
        t0 = time.perf_counter()
        flu = case_fluency(ctx.lm, item.case, ctx.suite, key=item.key)
        tests["fluency"] = {
            "n": flu["n"],
            "means": {"entropy": flu["entropy"]},
            "scores": flu["scores"],
            "texts": flu["texts"],
        }
        out["fluency_seconds"] = time.perf_counter() - t0
    return out


def attached(
    lm: LoadedModel, adapters: dict[int, Adapter] | None
) -> contextlib.AbstractContextManager[Any]:
    """The adapters on the model for a ``with`` block (nothing to do without them)."""
    return contextlib.nullcontext() if adapters is None else rep_applied(lm, adapters)


def score_edited(
    ctx: CaseContext,
    item: CaseItem,
    adapters: dict[int, Adapter] | None = None,
    *,
    fluency: bool = True,
) -> dict[str, Any]:
    """:func:`evaluate` of the edited model (with ``eval_seconds``); with REP ``adapters`` the
    evaluation runs with them attached (``rep_eval_gate``: their open rates over every token
    it ran), once per τ of a sweep (``{"per_tau": {τ: ...}}``)."""
    if adapters is None:
        t0 = time.perf_counter()
        out = evaluate(ctx, item, fluency=fluency)
        out["eval_seconds"] = time.perf_counter() - t0
        return out
    taus: list[float | None] = list(ctx.taus) or [None]
    per: dict[float | None, dict[str, Any]] = {}
    for tau in taus:
        if tau is not None:
            set_tau(adapters, tau)
        t0 = time.perf_counter()
        with rep_applied(ctx.lm, adapters, count=True) as inj:
            out = evaluate(ctx, item, fluency=fluency)
        out["eval_seconds"] = time.perf_counter() - t0
        out["rep_eval_gate"] = {
            str(layer): {
                k: v for k, v in rates.items() if k in ("tokens", "open", "rate", "guarded")
            }
            for layer, rates in inj.gate_rates().items()
        }
        per[tau] = out
    return per[None] if taus == [None] else {"per_tau": per}


def rep_record(rep: RepTrainResult) -> dict[str, Any]:
    """What a case record keeps of REP training: ``RepTrainResult.summary()`` (per layer the
    open rates / soft gates / β̃ / cos on positives and negatives, before and after; losses
    first and last) plus the pool's composition."""
    out = dict(rep.summary())
    out["layers"] = rep.layers
    out["groups"] = rep.info.get("groups")
    out["pool"] = rep.info.get("pool")
    return dict(plain(out))


def base_record(item: CaseItem, mode: str) -> CaseRecord:
    req = item.case.request
    return {
        "case_id": item.key,
        "index": item.index,
        "mode": mode,
        "subject": req.subject,
        "prompt": req.text,
        "target_new": req.target_new,
        "target_true": req.target_true,
        "error": None,
    }


def error_info(exc: BaseException) -> ErrorInfo:
    return {"type": type(exc).__name__, "message": str(exc) or repr(exc)}


# --------------------------------------------------------------------------- weight safety


def edited_param_names(lm: LoadedModel, editor: Editor) -> list[str]:
    """Names of the weights the editor can change (its layers' down-projections)."""
    layers = editor.layers(lm, editor.resolved(lm))
    return [f"{lm.arch.down_proj_name(layer)}.weight" for layer in layers]


def param(lm: LoadedModel, name: str) -> torch.Tensor:
    """The model's weight ``name`` (a dotted path)."""
    return cast(torch.Tensor, get_attr(lm.model, name))


def snapshot(lm: LoadedModel, names: Sequence[str]) -> dict[str, torch.Tensor]:
    return {name: param(lm, name).detach().to("cpu", copy=True) for name in names}


def restore(lm: LoadedModel, saved: dict[str, torch.Tensor]) -> list[str]:
    """Copy snapshot weights back where they differ; returns the names that were restored."""
    changed = []
    with torch.no_grad():
        for name, tensor in saved.items():
            p = param(lm, name)
            if not torch.equal(p.detach().cpu(), tensor):
                p.copy_(tensor.to(p.device, p.dtype))
                changed.append(name)
    return changed


def check_finite(result: EditResult) -> None:
    for name, delta in result.deltas.items():
        if not torch.isfinite(delta).all():
            raise EditError(f"the edit's delta for {name} is not finite (NaN/inf)")


def failed(ctx: CaseContext, rec: CaseRecord, exc: BaseException) -> CaseRecord:
    """``rec`` marked failed by ``exc``, with the weights put back if the failure moved them."""
    rec["error"] = info = error_info(exc)
    restored = restore(ctx.lm, ctx.snapshot)
    if restored:
        log.warning("case %s: restored weights %s after the failure", rec["case_id"], restored)
        rec["weights_restored"] = restored
    log.warning("case %s failed: %s", rec["case_id"], info["message"])
    return rec


@contextlib.contextmanager
def timed() -> Iterator[list[float]]:
    """``with timed() as t:`` … ``t[0]`` holds the seconds spent inside (also on an error)."""
    box = [0.0]
    t0 = time.perf_counter()
    try:
        yield box
    finally:
        box[0] = time.perf_counter() - t0


# --------------------------------------------------------------------------- the lifecycle


def run_cases(
    ctx: CaseContext,
    group: Sequence[CaseItem],
    todo: set[str],
    mode: str,
    *,
    keep: bool = False,
    prior: dict[int, list[Adapter]] | None = None,
) -> Outcome:
    """Edit ``group`` together and score the cases of ``todo`` (keys; the other members are
    companions of a resumed batch, edited but not recorded).

    Without ``keep`` the edit is reverted at the end (single and batch modes). With ``keep``
    (sequential mode) the references must exist already, the edit stays applied and is
    returned, and the case is scored with REP's ``prior`` adapters (per layer, earlier edits')
    stacked with its own. Nothing is written.
    """
    out = Outcome()
    records = {it.key: base_record(it, mode) for it in group if it.key in todo}
    valid = _validated(ctx, group, records, out, keep=keep)
    if not records:
        return out
    step = _edit(ctx, valid, keep=keep)
    share = 1.0 / len(valid)
    if step.error is not None or step.result is None:
        out.edit_failed = True
        for rec in records.values():
            rec["edit_seconds"] = step.edit_seconds * share
            out.records.append(failed(ctx, rec, step.error or EditError("no edit")))
        return out
    result, rep = step.result, step.rep
    adapters = _scoring_adapters(rep, prior, stacked=keep)
    try:
        for it in valid:
            if it.key in records:
                rec = records[it.key]
                _add_edit_fields(rec, step, share, mode, len(valid))
                try:
                    rec.update(score_edited(ctx, it, adapters))  # type: ignore[typeddict-item]
                except CASE_ERRORS as exc:
                    rec["error"] = info = error_info(exc)
                    log.warning("case %s failed: %s", it.key, info["message"])
                out.records.append(rec)
    finally:
        if not keep and result.applied:
            result.revert(ctx.lm)
    out.result, out.rep = (result, rep) if keep else (None, None)
    return out


@dataclass
class _EditStep:
    result: EditResult | None = None
    rep: RepTrainResult | None = None
    edit_seconds: float = 0.0
    rep_seconds: float = 0.0
    error: BaseException | None = None


def _add_edit_fields(
    rec: CaseRecord, step: _EditStep, share: float, mode: str, group_size: int
) -> None:
    """A scored case's share of its group's edit and REP training."""
    assert step.result is not None
    rec["edit_seconds"] = step.edit_seconds * share
    rec["info"] = dict(plain(step.result.info or {}))
    if step.rep is not None:
        rec["rep_seconds"] = step.rep_seconds * share
        rec["rep"] = rep_record(step.rep)
    if mode == "batch":
        rec["chunk_size"] = group_size
        rec["chunk_edit_seconds"] = step.edit_seconds
        if step.rep is not None:
            rec["chunk_rep_seconds"] = step.rep_seconds


def _validated(
    ctx: CaseContext,
    group: Sequence[CaseItem],
    records: dict[str, CaseRecord],
    out: Outcome,
    *,
    keep: bool,
) -> list[CaseItem]:
    """The members whose request is valid and whose reference could be made; a failing
    member of ``records`` leaves them for ``out.records``, so one bad request does not sink
    its whole group."""
    valid = []
    for it in group:
        try:
            ctx.editor.validate(ctx.lm, [it.case.request])
            if it.key in records and not keep:
                with timed() as t_ref:
                    ref = reference_record(ctx, it)
                if ref is not None:
                    out.references.append(ref)
                records[it.key]["reference_seconds"] = t_ref[0]
            valid.append(it)
        except CASE_ERRORS as exc:
            if it.key in records:
                out.records.append(failed(ctx, records.pop(it.key), exc))
    return valid


def _edit(ctx: CaseContext, valid: Sequence[CaseItem], *, keep: bool) -> _EditStep:
    """Edit (applied unless ``keep``, which applies it after REP's training), check the
    deltas, train REP; on a failure nothing of the edit stays on the model."""
    step = _EditStep()
    t0 = time.perf_counter()
    try:
        step.result = ctx.editor.edit(
            ctx.lm, [it.case.edit_request for it in valid], apply=not keep
        )
        check_finite(step.result)
        step.edit_seconds = time.perf_counter() - t0
        if keep:
            for name in step.result.deltas:
                if name not in ctx.snapshot:
                    ctx.snapshot.update(snapshot(ctx.lm, [name]))
        if ctx.rep_cfg is not None:
            t0 = time.perf_counter()
            step.rep = train_rep_after(
                ctx.lm,
                ctx.editor,
                step.result,
                [it.case for it in valid],
                cfg=ctx.rep_cfg,
                keys=[it.key for it in valid],
                sampler=ctx.rep_sampler,
                exclude_subjects=ctx.near.subjects if ctx.near is not None else (),
            )
            step.rep_seconds = time.perf_counter() - t0
        if keep:
            step.result.apply(ctx.lm)
    except CASE_ERRORS as exc:
        if step.result is not None and step.result.applied:
            step.result.revert(ctx.lm)
        if not step.edit_seconds:
            step.edit_seconds = time.perf_counter() - t0
        step.error = exc
    return step


def _scoring_adapters(
    rep: RepTrainResult | None, prior: dict[int, list[Adapter]] | None, *, stacked: bool
) -> dict[int, Adapter] | None:
    """The adapters a case is scored with: its own, or (``stacked``) every edit's so far."""
    if not stacked:
        return rep.adapters if rep is not None else None
    merged = {layer: list(ads) for layer, ads in (prior or {}).items()}
    for layer, adapter in (rep.adapters if rep is not None else {}).items():
        merged.setdefault(layer, []).append(adapter)
    if not merged:
        return None
    return {layer: stack_adapters(cast(list[RepAdapter], ads)) for layer, ads in merged.items()}

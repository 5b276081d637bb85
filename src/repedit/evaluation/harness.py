"""The evaluation harness: edit, probe, record, in ``single``, ``batch`` or ``sequential`` mode.

A run lives in one directory (``RunConfig.out``)::

    config.json        the RunConfig, model fingerprint and data file hash (a rerun must match)
    results.jsonl      one line per case, appended (flush + fsync) as soon as the case is done
    reference.jsonl    the unedited model's predictions on each case's neighbourhood probes
    sequential.jsonl   sequential mode: means over edited-so-far cases every ``eval_every`` edits
    sequential_state.safetensors   sequential mode: the edited weights, for resuming
    sequential_rep/    sequential mode with REP: each edited case's adapters (one file per case)
    sessions.json      wall time of every session that worked on the run
    summary.json / summary.md / report.html   written at the end (see ``summary``, ``report``)

Rerunning the same command resumes: cases already in ``results.jsonl`` are skipped (a line cut
short by a kill is dropped and the case redone). Modes:

``single``
    per case: reference predictions (cached), edit, score every probe family (one
    ``score_probes`` call for the short families, one for the long-context passages), fluency,
    revert, record.
``batch``
    ``batch_size`` consecutive cases (fixed chunks of the full case list, so a resumed chunk is
    edited with the same companions) are edited at once, each evaluated, then reverted.
``sequential``
    edits accumulate; each case is evaluated right after its own edit, and every
    ``eval_every`` successful edits up to ``eval_sample`` edited-so-far cases (a fixed seeded
    order of the data; 0 = all) are re-scored into ``sequential.jsonl`` to trace forgetting.

A case whose edit or evaluation fails (``RepeditError``, ``RuntimeError``) is recorded with its
error and the run goes on; the edited layers are compared with a snapshot taken at the start
and restored if anything changed.

REP (``RunConfig.rep``: RepConfig overrides, ``{}`` for the defaults): after each edit REP
adapters are trained on the edited model (:func:`repedit.rep.train_rep`, in batch mode once per
batch, one shared adapter set unless ``rep["shared"]`` is False) and the case is evaluated with
them attached. Records gain ``rep_seconds`` (apart from ``edit_seconds``), ``rep`` (the training
summary: gate open rates, alignment, losses, pool) and ``rep_eval_gate`` (open rates while
evaluating). In sequential mode each edit gets its own adapters, trained on the model
with every earlier edit in place (earlier adapters detached), and all adapters so far act
together (a ``RepStack`` per layer; memory and gate compute grow with the number of edits) in
every later evaluation and checkpoint. A τ sweep
(``rep_taus`` with several values) trains once per case and evaluates once per τ; ``OUT`` then
holds ``config.json``, ``reference.jsonl``, ``sessions.json``, a ``report.html`` comparing the τ
values, and one plain run directory per τ, ``OUT/tau-0.5/``, ``OUT/tau-0.9/``, ... (its config
has ``rep.tau`` set, its records ``rep_tau``); a case is done once every sub-run holds it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from repedit import __version__
from repedit.data.case import EditCase
from repedit.errors import InvalidRequestError, RepeditError
from repedit.evaluation.probes import (
    PROBE_TESTS,
    SUCCESS_TESTS,
    TESTS,
    CaseProbes,
    SuiteConfig,
    build_probes,
    case_fluency,
    case_keys,
    parse_tests,
    passage_sampler,
)
from repedit.evaluation.scoring import Probe, predictions, score_probes, tokenize_probe
from repedit.io import atomic_path, read_safetensors, write_json, write_safetensors

log = logging.getLogger(__name__)

MODES = ("single", "batch", "sequential")

CONFIG = "config.json"
RESULTS = "results.jsonl"
REFERENCE = "reference.jsonl"
SEQUENTIAL = "sequential.jsonl"
SEQ_STATE = "sequential_state.safetensors"
SEQ_REP_DIR = "sequential_rep"
SESSIONS = "sessions.json"
RUN_FILES = (
    CONFIG,
    RESULTS,
    REFERENCE,
    SEQUENTIAL,
    SEQ_STATE,
    SESSIONS,
    "summary.json",
    "summary.md",
    "report.html",
)

#: RunConfig fields that may change between a run and its resumption
RESUMABLE_FIELDS = frozenset({"n", "out", "overwrite", "data_dir", "device", "cache_dir"})

#: errors that fail one case instead of the run
CASE_ERRORS: tuple[type[BaseException], ...] = (RepeditError, RuntimeError)


@dataclass
class RunConfig:
    """Everything that defines an evaluation run (stored in the run directory's config.json).

    ``hparams``: overrides for the method's hyper-parameters (dotted keys allowed, e.g.
    ``{"value.steps": 10}``). ``n``: the first ``n`` cases (None = all). ``tests``: names from
    :data:`~repedit.evaluation.probes.TESTS`. ``eval_sample``: cases re-scored at each
    sequential checkpoint (0 = all edited so far). Stats fields mirror
    :class:`~repedit.editors.StatsConfig`; ``cache_dir`` is the cache root. ``rep``:
    :class:`~repedit.rep.RepConfig` overrides (None: the plain editor; ``{}``: REP with its
    defaults); ``rep_taus``: a τ sweep (several values; one value just sets ``rep["tau"]``).
    """

    model: str = "smollm2-135m"
    method: str = "rome"
    hparams: dict[str, Any] = field(default_factory=dict)
    data: str = "demo"
    data_dir: str | None = None
    n: int | None = None
    mode: str = "single"
    batch_size: int = 10
    eval_every: int = 10
    eval_sample: int = 20
    tests: tuple[str, ...] = TESTS
    seed: int = 0
    skip_invalid: bool = False
    id_split: int = 5
    out: str = "runs/default"
    overwrite: bool = False
    device: str | None = None
    dtype: str = "auto"
    stats_corpus: str = "auto"
    stats_tokens: int = 100_000
    stats_seq_len: int = 256
    cache_dir: str | None = None
    long_context_corpus: str | None = None
    long_context_length: int = 512
    long_context_unit: str = "tokens"
    long_context_passages: int = 1
    fluency_samples: int = 1
    fluency_tokens: int = 100
    score_batch_size: int = 32
    rep: dict[str, Any] | None = None
    rep_taus: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        self.tests = parse_tests(self.tests)
        if self.mode not in MODES:
            raise InvalidRequestError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        self._check_rep()
        if self.batch_size < 1 or self.eval_every < 1:
            raise InvalidRequestError("batch_size and eval_every must be >= 1")
        if self.eval_sample < 0:
            raise InvalidRequestError(f"eval_sample must be >= 0, got {self.eval_sample}")
        if self.n is not None and self.n < 0:
            raise InvalidRequestError(f"n must be >= 0, got {self.n}")
        self.suite()  # validates the suite fields

    def _check_rep(self) -> None:
        """Validate and normalise ``rep`` (coerced to RepConfig's field types) and ``rep_taus``."""
        from repedit.rep.ablations import parse_taus

        if self.rep_taus:
            taus = parse_taus(self.rep_taus)
            rep = dict(self.rep or {})
            if len(taus) == 1:
                if "tau" in rep and float(rep["tau"]) != taus[0]:
                    raise InvalidRequestError(
                        f"τ given twice: rep tau={rep['tau']} and rep_taus={list(taus)}"
                    )
                rep["tau"] = taus[0]
                taus = ()
            elif "tau" in rep:
                raise InvalidRequestError(
                    f"τ given twice: rep tau={rep['tau']} and a τ sweep {list(taus)}; "
                    "give one or the other"
                )
            self.rep, self.rep_taus = rep, taus
        else:
            self.rep_taus = ()
        if self.rep is None:
            return
        if not isinstance(self.rep, dict):
            raise InvalidRequestError(
                f"rep must be a mapping of RepConfig fields, got {type(self.rep).__name__}"
            )
        from repedit.rep.adapter import RepConfig

        resolved = RepConfig().replace(**self.rep)  # unknown fields and bad values fail here
        self.rep = {k: getattr(resolved, k) for k in sorted(self.rep)}
        if self.mode == "sequential" and self.rep_taus:
            raise InvalidRequestError(
                "a τ sweep cannot run in sequential mode (each τ changes every later edit's "
                "evaluation); run one τ per run, e.g. --rep-set tau=0.7"
            )

    def rep_config(self) -> Any:
        """The :class:`~repedit.rep.RepConfig` of the run, or None without REP.

        Defaults on top of RepConfig's: REP's long-context passages come from the suite's
        ``long_context_corpus`` when one is set (REP draws its training passages under other
        keys than the test passages), and batch mode trains one shared adapter set per batch.
        Explicit ``rep`` fields win.
        """
        if self.rep is None:
            return None
        from repedit.rep.adapter import RepConfig

        base: dict[str, Any] = {}
        if self.long_context_corpus:
            base["long_context_corpus"] = self.long_context_corpus
        if self.mode == "batch":
            base["shared"] = True
        return RepConfig().replace(**{**base, **self.rep})

    def sweep(self) -> list[tuple[float, RunConfig]]:
        """A τ sweep's sub-runs ``[(τ, config)]`` (``OUT/tau-<τ>``); empty for a plain run."""
        return [
            (
                tau,
                dataclasses.replace(
                    self,
                    rep={**(self.rep or {}), "tau": tau},
                    rep_taus=(),
                    out=str(Path(self.out) / sweep_name(tau)),
                ),
            )
            for tau in self.rep_taus
        ]

    def suite(self) -> SuiteConfig:
        return SuiteConfig(
            tests=self.tests,
            seed=self.seed,
            long_context_corpus=self.long_context_corpus,
            long_context_length=self.long_context_length,
            long_context_unit=self.long_context_unit,  # type: ignore[arg-type]
            long_context_passages=self.long_context_passages,
            fluency_samples=self.fluency_samples,
            fluency_tokens=self.fluency_tokens,
            batch_size=self.score_batch_size,
        )

    def stats(self, progress: bool = True) -> Any:
        from repedit.editors import StatsConfig

        return StatsConfig(
            corpus=self.stats_corpus,
            n_tokens=self.stats_tokens,
            seq_len=self.stats_seq_len,
            cache=self.cache_dir,
            progress=progress,
        )

    def to_dict(self) -> dict[str, Any]:
        return _plain({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise InvalidRequestError(f"unknown RunConfig field(s) {sorted(unknown)}")
        return cls(**values)

    def comparable(self) -> dict[str, Any]:
        """The fields a resumed run must share with the original."""
        return {k: v for k, v in self.to_dict().items() if k not in RESUMABLE_FIELDS}


def sweep_name(tau: float) -> str:
    """The sub-run directory of one τ of a sweep: ``tau-0.7``."""
    return f"tau-{float(tau):g}"


def sweep_dirs(path: str | Path) -> list[Path]:
    """The sub-run directories of a τ-sweep run directory (empty if ``path`` is no sweep)."""
    path = Path(path)
    try:
        rc = json.loads((path / CONFIG).read_text()).get("run_config", {})
    except (OSError, ValueError):
        return []
    return [path / sweep_name(t) for t in rc.get("rep_taus") or []]


# --------------------------------------------------------------------------- JSON helpers


def _plain(obj: Any) -> Any:
    """JSON-ready copy: tuples to lists, tensors to numbers/lists (small) or a shape string."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        if obj.numel() == 1:
            return obj.item()
        if obj.numel() <= 64:
            return obj.tolist()
        return f"tensor{tuple(obj.shape)}"
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else str(obj)
    if isinstance(obj, str | int | float | bool) or obj is None:
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _plain(dataclasses.asdict(obj))
    return str(obj)


def read_jsonl(path: Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """The JSON records of a .jsonl file; unparsable lines (a write cut short) are skipped.

    With ``repair`` the file is rewritten without them (atomically), so appends continue from
    a clean line boundary; a complete last record missing only its newline is kept.
    """
    if not path.exists():
        return []
    raw = path.read_bytes()
    records: list[dict[str, Any]] = []
    bad = 0
    lines = raw.split(b"\n")
    for line in lines:
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(rec, dict):
            records.append(rec)
        else:
            bad += 1
    clean_end = raw.endswith(b"\n") or not raw
    if repair and (bad or not clean_end):
        if bad:
            log.warning("%s: dropped %d unreadable line(s) (an interrupted write)", path, bad)
        with atomic_path(path) as tmp:
            tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
            readable(tmp)
    return records


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one record as a line and make it durable (flush + fsync) before returning."""
    line = json.dumps(_plain(record), sort_keys=True) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def readable(path: Path) -> Path:
    """Make a file written through a temporary file (mode 0600) readable like any other."""
    with contextlib.suppress(OSError):
        path.chmod(0o644)
    return path


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- the run directory


class RunDir:
    """File access for one run directory (see the module docstring for the layout)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def prepare(self, cfg: RunConfig, meta: dict[str, Any]) -> None:
        """Create the directory, or check that an existing run has the same configuration."""
        self.path.mkdir(parents=True, exist_ok=True)
        cfg_path = self / CONFIG
        if cfg.overwrite:
            for name in RUN_FILES:
                with contextlib.suppress(FileNotFoundError):
                    (self / name).unlink()
            shutil.rmtree(self / SEQ_REP_DIR, ignore_errors=True)
        elif cfg_path.exists():
            try:
                old = json.loads(cfg_path.read_text())
            except ValueError:
                raise RepeditError(
                    f"{cfg_path} is unreadable; pass --overwrite to start the run afresh"
                ) from None
            self._check_same(old, cfg, meta)
            return
        elif (self / RESULTS).exists():
            raise RepeditError(
                f"{self.path} holds results but no {CONFIG}; refusing to mix runs "
                "(choose another --out, or pass --overwrite)"
            )
        write_json(cfg_path, {"run_config": cfg.to_dict(), **meta})
        readable(cfg_path)

    def check(self, cfg: RunConfig) -> None:
        """Refuse early (before loading a model) if the directory holds a different run."""
        cfg_path = self / CONFIG
        if cfg.overwrite or not cfg_path.exists():
            return
        try:
            old = json.loads(cfg_path.read_text())
        except ValueError:
            return  # prepare() reports it
        self._check_same(old, cfg, None)

    def _check_same(self, old: dict[str, Any], cfg: RunConfig, meta: dict[str, Any] | None) -> None:
        try:
            old_cfg = RunConfig.from_dict(old.get("run_config", {}))
        except (RepeditError, TypeError) as exc:
            raise RepeditError(
                f"{self / CONFIG} was written by another version ({exc}); pass --overwrite"
            ) from None
        diffs = []
        a, b = old_cfg.comparable(), cfg.comparable()
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                diffs.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
        for key in ("model_fingerprint", "data_sha256"):
            if meta is not None and old.get(key) != meta.get(key):
                diffs.append(f"{key}: {old.get(key)!r} -> {meta.get(key)!r}")
        # resolved settings: a default that changed between versions must not mix into a run
        for key in ("hparams_resolved", "rep_resolved"):
            if meta is not None and key in old and old.get(key) != meta.get(key):
                diffs.append(f"{key} (defaults changed since the run began)")
        if diffs:
            raise RepeditError(
                f"{self.path} already holds a run with a different configuration "
                f"({'; '.join(diffs)}); rerun with the same options to resume, choose "
                "another --out, or pass --overwrite to discard the old results"
            )

    def config(self) -> dict[str, Any]:
        path = self / CONFIG
        return json.loads(path.read_text()) if path.exists() else {}

    def results(self, *, repair: bool = False) -> list[dict[str, Any]]:
        """The case records, first record per case id kept."""
        seen: dict[str, dict[str, Any]] = {}
        for rec in read_jsonl(self / RESULTS, repair=repair):
            key = rec.get("case_id")
            if key is not None and key not in seen:
                seen[str(key)] = rec
        return list(seen.values())

    def sequential(self) -> list[dict[str, Any]]:
        return read_jsonl(self / SEQUENTIAL)

    def sessions(self) -> list[dict[str, Any]]:
        path = self / SESSIONS
        if not path.exists():
            return []
        try:
            data = json.loads(path.read_text())
        except ValueError:
            return []
        return data if isinstance(data, list) else []


# --------------------------------------------------------------------------- scoring a case


@dataclass
class _Ctx:
    """What a run's steps share."""

    lm: Any
    editor: Any
    cfg: RunConfig
    suite: SuiteConfig
    run: RunDir
    sampler: Any
    references: dict[str, dict[str, Any]] = field(default_factory=dict)
    snapshot: dict[str, torch.Tensor] = field(default_factory=dict)
    session: dict[str, Any] = field(default_factory=dict)
    #: REP: the RepConfig (None: plain editor) and its long-context passage sampler
    rep_cfg: Any = None
    rep_sampler: Any = None
    #: τ sweep: sub-run per τ, and the cases each already holds
    subruns: dict[float, RunDir] = field(default_factory=dict)
    sub_done: dict[float, set[str]] = field(default_factory=dict)
    #: sequential mode with REP: each layer's adapters, one per edited case, in edit order
    seq_adapters: dict[int, list[Any]] = field(default_factory=dict)


def _neighbour_sig(probes: Sequence[Probe]) -> str:
    return _sha([[p.prompt, p.target] for p in probes])


def _ensure_reference(ctx: _Ctx, key: str, cp: CaseProbes) -> None:
    """The unedited model's predictions on the case's neighbourhood probes (cached on disk).

    Must be called while the model is unedited.
    """
    probes = cp.families.get("neighbourhood", [])
    if not probes:
        return
    sig = _neighbour_sig(probes)
    have = ctx.references.get(key)
    if have is not None and have.get("sig") == sig:
        return
    t0 = time.perf_counter()
    pred = predictions(ctx.lm, probes, batch_size=ctx.suite.batch_size)
    rec = {"case_id": key, "sig": sig, "pred": pred, "seconds": time.perf_counter() - t0}
    ctx.references[key] = rec
    append_jsonl(ctx.run / REFERENCE, rec)


def _probe_record(test: str, probe: Probe, score: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "exact": score.exact,
        "token_acc": round(score.token_acc, 6),
        "logprob": round(score.logprob, 6),
    }
    if test == "neighbourhood":
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
    if test == "neighbourhood":
        return {
            "agree": _mean(p.get("agree") for p in probes),
            "exact": _mean(p["exact"] for p in probes),
        }
    return {
        "exact": _mean(p["exact"] for p in probes),
        "beats_alt": _mean(p.get("beats_alt") for p in probes),
    }


#: families scored in a call of their own: ``score_probes`` pads a batch to its longest row,
#: so one 512-token passage in a batch of short prompts multiplies the cost of all of them
SEPARATE_FAMILIES: tuple[str, ...] = ("long_context",)


def score_case(
    lm: Any,
    cp: CaseProbes,
    reference: list[list[int]] | None,
    *,
    batch_size: int = 32,
) -> tuple[dict[str, dict[str, Any]], int, float]:
    """Score every probe family of a case: one ``score_probes`` call for the short families
    and one for the long-context probes (see :data:`SEPARATE_FAMILIES`).

    ``reference``: the unedited predictions for the neighbourhood probes (in order).
    Returns ``(tests, n_probes, seconds)``; ``tests[name] = {"n", "means", "probes"}``.
    """
    flat = cp.flat
    spans = cp.spans
    ref_at: dict[int, list[int]] = {}
    if reference is not None and "neighbourhood" in spans:
        lo, hi = spans["neighbourhood"]
        if len(reference) != hi - lo:
            raise InvalidRequestError(
                f"case {cp.key}: {len(reference)} reference predictions for {hi - lo} "
                "neighbourhood probes"
            )
        ref_at = {lo + j: list(r) for j, r in enumerate(reference)}
    groups = [
        [i for i, p in enumerate(flat) if p.test not in SEPARATE_FAMILIES],
        [i for i, p in enumerate(flat) if p.test in SEPARATE_FAMILIES],
    ]
    scores: dict[int, Any] = {}
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
        got = score_probes(lm, [flat[i] for i in group], batch_size=batch_size, reference=group_ref)
        scores.update(zip(group, got, strict=True))
    seconds = time.perf_counter() - t0
    tests: dict[str, dict[str, Any]] = {}
    for test, (lo, hi) in spans.items():
        probes = [_probe_record(test, flat[i], scores[i]) for i in range(lo, hi)]
        if test == "neighbourhood" and not ref_at:
            for p in probes:
                p["agree"] = None
        tests[test] = {"n": len(probes), "means": test_means(test, probes), "probes": probes}
    return tests, len(flat), seconds


def _case_probes(
    ctx: _Ctx, case: EditCase, key: str, suite: SuiteConfig | None = None
) -> CaseProbes:
    suite = suite or ctx.suite
    return CaseProbes(key, build_probes(case, ctx.lm, suite, sampler=ctx.sampler, key=key))


def _evaluate(ctx: _Ctx, case: EditCase, key: str, *, fluency: bool = True) -> dict[str, Any]:
    """Scores of the (edited) model on one case: every selected test."""
    cp = _case_probes(ctx, case, key)
    ref = ctx.references.get(key)
    reference = ref["pred"] if ref is not None else None
    tests, n_probes, score_seconds = score_case(
        ctx.lm, cp, reference, batch_size=ctx.suite.batch_size
    )
    out: dict[str, Any] = {"tests": tests, "n_probes": n_probes, "score_seconds": score_seconds}
    if "scrambled_subject" in cp.families:
        out["scramble_n"] = len(cp.families["scrambled_subject"])
    if fluency and "fluency" in ctx.suite.tests:
        t0 = time.perf_counter()
        flu = case_fluency(ctx.lm, case, ctx.suite, key=key)
        tests["fluency"] = {
            "n": flu["n"],
            "means": {"entropy": flu["entropy"]},
            "scores": flu["scores"],
            "texts": flu["texts"],
        }
        out["fluency_seconds"] = time.perf_counter() - t0
    return out


def _score_edited(
    ctx: _Ctx, case: EditCase, key: str, adapters: Any = None, *, fluency: bool = True
) -> dict[str, Any]:
    """``_evaluate`` of the edited model (with ``eval_seconds``); with REP ``adapters`` the
    evaluation runs with them attached (``rep_eval_gate``: their open rates over every token
    it ran), once per τ of a sweep (``{"per_tau": {τ: ...}}``, split by ``_write``)."""
    if adapters is None:
        t0 = time.perf_counter()
        out = _evaluate(ctx, case, key, fluency=fluency)
        out["eval_seconds"] = time.perf_counter() - t0
        return out
    from repedit.rep.ablations import set_tau
    from repedit.rep.inject import rep_applied

    taus: list[float | None] = list(ctx.subruns) or [None]
    per: dict[float | None, dict[str, Any]] = {}
    for tau in taus:
        if tau is not None:
            set_tau(adapters, tau)
        t0 = time.perf_counter()
        with rep_applied(ctx.lm, adapters, count=True) as inj:
            out = _evaluate(ctx, case, key, fluency=fluency)
        out["eval_seconds"] = time.perf_counter() - t0
        out["rep_eval_gate"] = {
            str(layer): {
                k: v for k, v in rates.items() if k in ("tokens", "open", "rate", "guarded")
            }
            for layer, rates in inj.gate_rates().items()
        }
        per[tau] = out
    return per[None] if taus == [None] else {"per_tau": per}


def _train_rep(ctx: _Ctx, result: Any, cases: list[EditCase], keys: list[str]) -> Any:
    """Train REP adapters for the edit ``result`` of ``cases`` (an unapplied edit is applied
    for the training and reverted exactly)."""
    from repedit.rep.train import train_rep_after

    return train_rep_after(
        ctx.lm, ctx.editor, result, cases, cfg=ctx.rep_cfg, keys=keys, sampler=ctx.rep_sampler
    )


def _rep_record(rep: Any) -> dict[str, Any]:
    """What a case record keeps of REP training: ``RepTrainResult.summary()`` (per layer the
    open rates / soft gates / β̃ / cos on positives and negatives, before and after; losses
    first and last) plus the pool's composition."""
    out = dict(rep.summary())
    out["layers"] = rep.layers
    out["groups"] = rep.info.get("groups")
    out["pool"] = rep.info.get("pool")
    return _plain(out)


def _base_record(case: EditCase, key: str, index: int, mode: str) -> dict[str, Any]:
    req = case.request
    return {
        "case_id": key,
        "index": index,
        "mode": mode,
        "subject": req.subject,
        "prompt": req.text,
        "target_new": req.target_new,
        "target_true": req.target_true,
        "error": None,
    }


def _error(exc: BaseException) -> dict[str, str]:
    return {"type": type(exc).__name__, "message": str(exc) or repr(exc)}


# --------------------------------------------------------------------------- weight safety


def _edited_param_names(lm: Any, editor: Any) -> list[str]:
    """Names of the weights the editor can change (its layers' down-projections)."""
    try:
        hp = editor.resolved(lm)
        layers = editor.layers(lm, hp)
        return [f"{lm.arch.down_proj_name(layer)}.weight" for layer in layers]
    except Exception as exc:  # an editor without the locate-and-edit interface
        log.warning("cannot tell which weights %r edits (%s); no weight snapshot", editor, exc)
        return []


def _param(lm: Any, name: str) -> torch.Tensor:
    from repedit.models.registry import get_attr

    return get_attr(lm.model, name)


def _snapshot(lm: Any, names: Sequence[str]) -> dict[str, torch.Tensor]:
    return {name: _param(lm, name).detach().to("cpu", copy=True) for name in names}


def _restore(lm: Any, snapshot: dict[str, torch.Tensor]) -> list[str]:
    """Copy snapshot weights back where they differ; returns the names that were restored."""
    changed = []
    with torch.no_grad():
        for name, saved in snapshot.items():
            param = _param(lm, name)
            if not torch.equal(param.detach().cpu(), saved):
                param.copy_(saved.to(param.device, param.dtype))
                changed.append(name)
    return changed


def _check_finite(result: Any) -> None:
    from repedit.errors import EditError

    for name, delta in result.deltas.items():
        if not torch.isfinite(delta).all():
            raise EditError(f"the edit's delta for {name} is not finite (NaN/inf)")


# --------------------------------------------------------------------------- modes


class _Progress:
    """A rich progress bar whose status shows running means over the run's records."""

    def __init__(self, bar: Any, total: int, done: list[dict[str, Any]]):
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


def _write(ctx: _Ctx, rec: dict[str, Any], progress: _Progress, done: set[str]) -> None:
    per_tau = rec.pop("per_tau", None) or {}
    shown = rec
    if ctx.subruns:  # a τ sweep: one record per sub-run that lacks the case
        for tau, sub in ctx.subruns.items():
            shown = {**rec, **per_tau.get(tau, {}), "rep_tau": tau}
            if rec["case_id"] not in ctx.sub_done[tau]:
                append_jsonl(sub / RESULTS, shown)
                ctx.sub_done[tau].add(rec["case_id"])
    else:
        append_jsonl(ctx.run / RESULTS, rec)
    done.add(rec["case_id"])
    progress.add(shown)
    if ctx.session:  # keep the session's wall time current, so a killed run still counts
        ctx.session["wall_seconds"] = time.time() - ctx.session["t0"]
        ctx.session["cases_done"] = ctx.session.get("cases_done", 0) + 1
        _record_session(ctx.run, ctx.session)


def _failed_case(
    ctx: _Ctx, rec: dict[str, Any], exc: BaseException, edit_seconds: float | None = None
) -> dict[str, Any]:
    rec["error"] = _error(exc)
    if edit_seconds is not None:
        rec["edit_seconds"] = edit_seconds
    restored = _restore(ctx.lm, ctx.snapshot)
    if restored:
        log.warning("case %s: restored weights %s after the failure", rec["case_id"], restored)
        rec["weights_restored"] = restored
    log.warning("case %s failed: %s", rec["case_id"], rec["error"]["message"])
    return rec


def _info(result: Any) -> dict[str, Any]:
    return _plain(getattr(result, "info", {}) or {})


def _run_single(
    ctx: _Ctx, items: list[tuple[int, str, EditCase]], done: set[str], progress: _Progress
) -> None:
    for index, key, case in items:
        if key in done:
            continue
        rec = _base_record(case, key, index, "single")
        t0 = time.perf_counter()
        try:
            _ensure_reference(ctx, key, _case_probes(ctx, case, key))
        except CASE_ERRORS as exc:
            _write(ctx, _failed_case(ctx, rec, exc), progress, done)
            continue
        rec["reference_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        try:
            result = ctx.editor.edit(ctx.lm, [case.request])
        except CASE_ERRORS as exc:
            _write(ctx, _failed_case(ctx, rec, exc, time.perf_counter() - t0), progress, done)
            continue
        rec["edit_seconds"] = time.perf_counter() - t0
        rec["info"] = _info(result)
        try:
            _check_finite(result)
            adapters = None
            if ctx.rep_cfg is not None:
                t0 = time.perf_counter()
                rep = _train_rep(ctx, result, [case], [key])
                rec["rep_seconds"] = time.perf_counter() - t0
                rec["rep"] = _rep_record(rep)
                adapters = rep.adapters
            rec.update(_score_edited(ctx, case, key, adapters))
        except CASE_ERRORS as exc:
            _failed_case(ctx, rec, exc)
        finally:
            if result.applied:
                result.revert(ctx.lm)
        _write(ctx, rec, progress, done)


def _run_batch(
    ctx: _Ctx, items: list[tuple[int, str, EditCase]], done: set[str], progress: _Progress
) -> None:
    size = ctx.cfg.batch_size
    for start in range(0, len(items), size):
        chunk = items[start : start + size]
        todo = [it for it in chunk if it[1] not in done]
        if not todo:
            continue
        chunk_id = start // size
        records = {key: _base_record(case, key, i, "batch") for i, key, case in todo}
        for rec in records.values():
            rec["chunk"] = chunk_id
        # validate each request alone, so one bad request does not sink its whole chunk
        valid = []
        for i, key, case in chunk:
            try:
                validate = getattr(ctx.editor, "validate", None)
                if callable(validate):
                    validate(ctx.lm, [case.request])
                if key in records:
                    _ensure_reference(ctx, key, _case_probes(ctx, case, key))
                valid.append((i, key, case))
            except CASE_ERRORS as exc:
                if key in records:
                    _write(ctx, _failed_case(ctx, records.pop(key), exc), progress, done)
        if not records:
            continue
        t0 = time.perf_counter()
        result = None
        try:
            result = ctx.editor.edit(ctx.lm, [case.request for _, _, case in valid])
            _check_finite(result)
        except CASE_ERRORS as exc:
            seconds = time.perf_counter() - t0
            if result is not None and result.applied:
                result.revert(ctx.lm)
            for key in list(records):
                _write(ctx, _failed_case(ctx, records.pop(key), exc, seconds), progress, done)
            continue
        seconds = time.perf_counter() - t0
        info = _info(result)
        rep, rep_seconds = None, 0.0
        if ctx.rep_cfg is not None:  # one REP training for the whole batch (shared by default)
            t0 = time.perf_counter()
            try:
                rep = _train_rep(ctx, result, [c for _, _, c in valid], [k for _, k, _ in valid])
            except CASE_ERRORS as exc:
                rep_seconds = time.perf_counter() - t0
                if result.applied:
                    result.revert(ctx.lm)
                for key in list(records):
                    rec = _failed_case(ctx, records.pop(key), exc, seconds / len(valid))
                    rec["rep_seconds"] = rep_seconds / len(valid)
                    _write(ctx, rec, progress, done)
                continue
            rep_seconds = time.perf_counter() - t0
        try:
            for _, key, case in valid:
                if key not in records:
                    continue
                rec = records.pop(key)
                rec.update(
                    edit_seconds=seconds / len(valid),
                    chunk_edit_seconds=seconds,
                    chunk_size=len(valid),
                    info=info,
                )
                if rep is not None:
                    rec.update(
                        rep_seconds=rep_seconds / len(valid),
                        chunk_rep_seconds=rep_seconds,
                        rep=_rep_record(rep),
                    )
                try:
                    rec.update(_score_edited(ctx, case, key, rep.adapters if rep else None))
                except CASE_ERRORS as exc:
                    rec["error"] = _error(exc)
                _write(ctx, rec, progress, done)
        finally:
            if result.applied:
                result.revert(ctx.lm)


def _seq_rep_path(ctx: _Ctx, key: str) -> Path:
    name = hashlib.sha256(key.encode()).hexdigest()[:20]
    return ctx.run / SEQ_REP_DIR / f"{name}.safetensors"


def _seq_stack(ctx: _Ctx) -> dict[int, Any] | None:
    """Every sequential edit's adapters so far, one module per layer (None without REP)."""
    if ctx.rep_cfg is None or not ctx.seq_adapters:
        return None
    from repedit.rep.adapter import stack_adapters

    return {layer: stack_adapters(ads) for layer, ads in ctx.seq_adapters.items()}


def _attached(ctx: _Ctx, adapters: dict[int, Any] | None) -> contextlib.AbstractContextManager:
    """The adapters on the model for a ``with`` block (nothing to do without them)."""
    if adapters is None:
        return contextlib.nullcontext()
    from repedit.rep.inject import rep_applied

    return rep_applied(ctx.lm, adapters)


def _add_seq_adapters(ctx: _Ctx, adapters: dict[int, Any]) -> None:
    for layer, adapter in adapters.items():
        ctx.seq_adapters.setdefault(layer, []).append(adapter)


def _apply_delta(lm: Any, result: Any) -> None:
    result.check_model(lm)
    with torch.no_grad():
        for name, delta in result.deltas.items():
            param = _param(lm, name)
            param.add_(delta.to(param.device, param.dtype))


def _save_seq_state(ctx: _Ctx, edited: list[str], pending: dict[str, Any] | None) -> None:
    tensors = {f"weight/{n}": _param(ctx.lm, n).detach() for n in ctx.snapshot}
    meta = {"edited": edited, "pending": _plain(pending), "fingerprint": ctx.lm.fingerprint}
    write_safetensors(ctx.run / SEQ_STATE, tensors, meta)


def _load_seq_state(ctx: _Ctx) -> tuple[list[str], dict[str, Any] | None]:
    path = ctx.run / SEQ_STATE
    if not path.exists():
        return [], None
    tensors, meta = read_safetensors(path)
    if meta.get("fingerprint") != ctx.lm.fingerprint:
        raise RepeditError(f"{path} was written for another base model; pass --overwrite")
    with torch.no_grad():
        for key, tensor in tensors.items():
            name = key.removeprefix("weight/")
            if name not in ctx.snapshot:
                ctx.snapshot[name] = _snapshot(ctx.lm, [name])[name]
            param = _param(ctx.lm, name)
            param.copy_(tensor.to(param.device, param.dtype))
    edited = list(meta.get("edited", []))
    if ctx.rep_cfg is not None:
        from repedit.rep.adapter import load_adapters

        ctx.seq_adapters = {}
        for key in edited:
            file = _seq_rep_path(ctx, key)
            if not file.exists():
                raise RepeditError(
                    f"{path} lists case {key} as edited but its REP adapters ({file}) are "
                    "missing; pass --overwrite to start over"
                )
            _add_seq_adapters(ctx, load_adapters(file, ctx.lm))
    return edited, meta.get("pending")


def _checkpoint_order(keys: Sequence[str], seed: int) -> list[str]:
    from repedit.data.variants import stable_rng

    order = list(keys)
    stable_rng("sequential-sample", seed).shuffle(order)
    return order


def _sequential_checkpoint(
    ctx: _Ctx, n_edits: int, edited: list[str], by_key: dict[str, EditCase], order: list[str]
) -> None:
    edited_set = set(edited)
    picked = [k for k in order if k in edited_set]
    if ctx.cfg.eval_sample:
        picked = picked[: ctx.cfg.eval_sample]
    t0 = time.perf_counter()
    sums: dict[str, list[float]] = {}
    failed = 0
    adapters = _seq_stack(ctx)
    for key in picked:
        try:
            with _attached(ctx, adapters):
                ev = _evaluate(ctx, by_key[key], key, fluency=False)
        except CASE_ERRORS as exc:
            log.warning("sequential checkpoint: case %s failed: %s", key, exc)
            failed += 1
            continue
        for test, t in ev["tests"].items():
            for p in t["probes"]:
                for metric in ("exact", "beats_alt", "agree"):
                    if p.get(metric) is not None:
                        s = sums.setdefault(f"{test}.{metric}", [0.0, 0])
                        s[0] += float(p[metric])
                        s[1] += 1
    means: dict[str, float | None] = {}
    beats: dict[str, float | None] = {}
    for test in PROBE_TESTS:
        if test not in ctx.suite.tests:
            continue
        metric = "agree" if test == "neighbourhood" else "exact"
        s = sums.get(f"{test}.{metric}")
        means[test] = s[0] / s[1] if s and s[1] else None
        if test in SUCCESS_TESTS:
            b = sums.get(f"{test}.beats_alt")
            beats[test] = b[0] / b[1] if b and b[1] else None
    nt = sums.get("neighbourhood.exact")
    append_jsonl(
        ctx.run / SEQUENTIAL,
        {
            "n_edits": n_edits,
            "n_eval": len(picked) - failed,
            "cases": picked,
            "means": means,
            "beats_alt": beats,
            "neighbourhood_truth": nt[0] / nt[1] if nt and nt[1] else None,
            "seconds": time.perf_counter() - t0,
        },
    )


def _warm_editor(ctx: _Ctx) -> None:
    """Let the editor derive what it takes from the model (context prefixes generated by the
    model, key statistics C) while the model is still unedited, so a resumed sequential run
    edits exactly as an uninterrupted one."""
    editor, lm = ctx.editor, ctx.lm
    try:
        hp = editor.resolved(lm)
        layers = editor.layers(lm, hp)
    except AttributeError:
        return
    if callable(getattr(editor, "contexts", None)):
        editor.contexts(lm, hp)
    if callable(getattr(editor, "second_moment", None)):
        editor.second_moment(lm, layers)


def _run_sequential(
    ctx: _Ctx, items: list[tuple[int, str, EditCase]], done: set[str], progress: _Progress
) -> None:
    # references first, while the model is still the unedited one
    if "neighbourhood" in ctx.suite.tests:
        only = dataclasses.replace(ctx.suite, tests=("neighbourhood",))
        for _, key, case in items:
            if key not in done:
                with contextlib.suppress(*CASE_ERRORS):
                    _ensure_reference(ctx, key, _case_probes(ctx, case, key, only))
    _warm_editor(ctx)
    edited, pending = _load_seq_state(ctx)
    if pending and pending.get("case_id") not in done:
        _write(ctx, pending, progress, done)
    lost = [
        r["case_id"]
        for r in ctx.run.results()
        if r.get("mode") == "sequential" and not r.get("error") and r["case_id"] not in edited
    ]
    if lost:
        log.warning(
            "%d edited case(s) recorded in %s are missing from %s (deleted?); the resumed "
            "model lacks their edits",
            len(lost),
            RESULTS,
            SEQ_STATE,
        )
    by_key = {key: case for _, key, case in items}
    order = _checkpoint_order([k for _, k, _ in items], ctx.cfg.seed)
    checkpoints = {rec.get("n_edits") for rec in ctx.run.sequential()}
    for index, key, case in items:
        if key in done or key in edited:
            continue
        rec = _base_record(case, key, index, "sequential")
        t0 = time.perf_counter()
        edit_seconds = None
        try:
            result = ctx.editor.edit(ctx.lm, [case.request], apply=False)
            _check_finite(result)
            edit_seconds = time.perf_counter() - t0
            for name in result.deltas:
                if name not in ctx.snapshot:
                    ctx.snapshot.update(_snapshot(ctx.lm, [name]))
            if ctx.rep_cfg is not None:
                # train_rep applies the (unapplied) edit on top of the earlier ones and
                # reverts it exactly; the adapters are on disk before the state lists the case
                t1 = time.perf_counter()
                rep = _train_rep(ctx, result, [case], [key])
                rep.save(_seq_rep_path(ctx, key), ctx.lm.fingerprint)
                rec["rep_seconds"] = time.perf_counter() - t1
                rec["rep"] = _rep_record(rep)
            _apply_delta(ctx.lm, result)
        except CASE_ERRORS as exc:
            spent = edit_seconds if edit_seconds is not None else time.perf_counter() - t0
            _write(ctx, _failed_case(ctx, rec, exc, spent), progress, done)
            if edited:  # the failure restored the snapshot: put the accumulated edits back
                _load_seq_state(ctx)
            continue
        if ctx.rep_cfg is not None:
            _add_seq_adapters(ctx, rep.adapters)
        rec["edit_seconds"] = edit_seconds
        rec["info"] = _info(result)
        edited.append(key)
        rec["n_edits"] = len(edited)
        try:
            rec.update(_score_edited(ctx, case, key, _seq_stack(ctx)))
        except CASE_ERRORS as exc:
            rec["error"] = _error(exc)
        if len(edited) % ctx.cfg.eval_every == 0 and len(edited) not in checkpoints:
            _sequential_checkpoint(ctx, len(edited), edited, by_key, order)
            checkpoints.add(len(edited))
        _save_seq_state(ctx, edited, rec)
        _write(ctx, rec, progress, done)


# --------------------------------------------------------------------------- entry point


def _versions() -> dict[str, str]:
    import transformers

    return {
        "repedit": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def _record_session(run: RunDir, session: dict[str, Any]) -> None:
    sessions = [s for s in run.sessions() if s.get("id") != session["id"]]
    write_json(run / SESSIONS, [*sessions, session])
    readable(run / SESSIONS)


def run_eval(
    cfg: RunConfig,
    lm: Any = None,
    editor: Any = None,
    progress: bool = True,
    *,
    report: bool = True,
) -> Path:
    """Run (or resume) an evaluation; returns the run directory.

    ``lm``: a loaded, *unedited* model (default: ``load_model(cfg.model, ...)``); it is left
    unedited on return. ``editor``: default ``make_editor(cfg.method, cfg.hparams,
    cfg.stats())``. Writes results, ``summary.json``/``summary.md`` and ``report.html``.
    """
    from repedit.data.loaders import load_cases
    from repedit.editors import make_editor
    from repedit.evaluation.summary import summarize

    started = time.time()
    sweep = cfg.sweep()
    RunDir(cfg.out).check(cfg)
    for _, sub_cfg in sweep:
        RunDir(sub_cfg.out).check(sub_cfg)
    loaded = load_cases(
        cfg.data,
        data_dir=cfg.data_dir,
        n=cfg.n,
        skip_invalid=cfg.skip_invalid,
        id_split=cfg.id_split,
    )
    for msg in loaded.skipped:
        log.warning("skipped: %s", msg)
    if lm is None:
        from repedit.models import load_model

        lm = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, cache=cfg.cache_dir)
    if editor is None:
        editor = make_editor(cfg.method, dict(cfg.hparams), cfg.stats(progress))
    try:
        resolved = editor.resolved(lm)
        hparams_resolved = _plain(resolved.to_dict())
        edit_layers = list(editor.layers(lm, resolved))
    except Exception:
        hparams_resolved, edit_layers = _plain(cfg.hparams), None
    meta = {
        "model_name": getattr(lm, "name", cfg.model),
        "model_fingerprint": lm.fingerprint,
        "data_path": str(loaded.path) if loaded.path else cfg.data,
        "data_sha256": loaded.sha256,
        "data_format": loaded.format,
        "hparams_resolved": hparams_resolved,
        "rep_resolved": _plain(cfg.rep_config().to_dict()) if cfg.rep is not None else None,
        "edit_layers": edit_layers,
        "suite": cfg.suite().to_dict(),
        "versions": _versions(),
        "n_skipped_invalid": len(loaded.skipped),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    run = RunDir(cfg.out)
    if sweep and (run / RESULTS).exists() and not cfg.overwrite:
        raise RepeditError(
            f"{run.path} holds a single run's {RESULTS}, not a τ sweep; choose another --out, "
            "or pass --overwrite"
        )
    run.prepare(cfg, meta)
    suite = cfg.suite()
    ctx = _Ctx(lm, editor, cfg, suite, run, passage_sampler(lm, suite))
    ctx.references = {r["case_id"]: r for r in read_jsonl(run / REFERENCE, repair=True)}
    ctx.rep_cfg = cfg.rep_config()
    if ctx.rep_cfg is not None:
        ctx.rep_sampler = _rep_sampler(lm, ctx.rep_cfg)
    if sweep:
        # a τ sweep: results go to one sub-run per τ (each a plain run directory); the
        # references and sessions stay in OUT; a case is done once every sub-run holds it
        per_sub = {}
        for tau, sub_cfg in sweep:
            sub = RunDir(sub_cfg.out)
            sub.prepare(sub_cfg, meta)
            ctx.subruns[tau] = sub
            per_sub[tau] = sub.results(repair=True)
            ctx.sub_done[tau] = {r["case_id"] for r in per_sub[tau]}
        done = set.intersection(*ctx.sub_done.values())
        records = [r for r in per_sub[sweep[0][0]] if r["case_id"] in done]
    else:
        records = run.results(repair=True)
        done = {r["case_id"] for r in records}
    keys = case_keys(loaded.cases)
    items = list(zip(range(len(keys)), keys, loaded.cases, strict=True))
    ctx.snapshot = _snapshot(lm, _edited_param_names(lm, editor))
    session = {
        "id": f"{started:.6f}",
        "t0": started,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "cases_before": len(done & set(keys)),
    }
    ctx.session = session
    from repedit.progress import progress_bar

    try:
        with progress_bar(progress) as bar:
            prog = _Progress(bar, len(items), [r for r in records if r["case_id"] in set(keys)])
            runner = {"single": _run_single, "batch": _run_batch, "sequential": _run_sequential}
            runner[cfg.mode](ctx, items, done, prog)
    finally:
        restored = _restore(lm, ctx.snapshot)
        if restored and cfg.mode != "sequential":
            log.warning("weights %s differed from the start of the run; restored", restored)
        session["wall_seconds"] = time.time() - started
        session["cases_after"] = len(done & set(keys))
        _record_session(run, session)
    from repedit.evaluation.report import write_report

    if sweep:
        subs = [sub.path for sub in ctx.subruns.values()]
        for sub in subs:
            summarize(sub)
            if report:
                write_report([sub], sub / "report.html")
        if report:
            write_report(subs, run.path / "report.html")
        return run.path
    summarize(run.path)
    if report:
        write_report([run.path], run.path / "report.html")
    return run.path


def _rep_sampler(lm: Any, rep_cfg: Any) -> Any:
    """REP's long-context passage sampler, built once per run (None: none needed/found)."""
    from repedit.rep.variants import passage_sampler as rep_passage_sampler

    wants_text = rep_cfg.long_context or (rep_cfg.negatives and "text" in rep_cfg.negative_sources)
    return rep_passage_sampler(lm, rep_cfg) if wants_text else None

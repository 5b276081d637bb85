"""What defines an evaluation run: :class:`RunConfig`, and whether a directory may resume it.

``RunConfig`` nests the suite (:class:`~repedit.evaluation.probes.SuiteConfig`), the key
statistics (:class:`~repedit.editors.StatsConfig`) and the REP overrides, so each part goes
to its consumer whole. ``config.json`` stores it nested; a flat configuration written by an
earlier version is read through :meth:`RunConfig.from_dict`, so old run directories resume.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from repedit.editors import StatsConfig
from repedit.errors import InvalidRequestError, RepeditError
from repedit.evaluation.probes import SuiteConfig
from repedit.evaluation.rundir import CONFIG, RESULTS, RunDir, plain, sweep_name
from repedit.rep.ablations import parse_taus
from repedit.rep.adapter import RepConfig

Mode = Literal["single", "batch", "sequential"]
MODES: tuple[str, ...] = get_args(Mode)

#: RunConfig fields that may change between a run and its resumption (dotted: nested)
RESUMABLE_FIELDS = frozenset(
    {
        "n",
        "out",
        "overwrite",
        "data_dir",
        "device",
        "cache_dir",
        "stats.cache",
        "stats.progress",
        "suite.scoring_impl",  # same results either way; recorded, not part of the identity
    }
)

#: a flat (earlier) configuration's field → where it lives now
_FLAT_SUITE = {
    "tests": "tests",
    "seed": "seed",
    "long_context_corpus": "long_context_corpus",
    "long_context_length": "long_context_length",
    "long_context_unit": "long_context_unit",
    "long_context_passages": "long_context_passages",
    "fluency_samples": "fluency_samples",
    "fluency_tokens": "fluency_tokens",
    "score_batch_size": "batch_size",
    "near_subject_max": "near_subject_max",
    "scoring": "scoring",
    "scoring_impl": "scoring_impl",
}
_FLAT_STATS = {"stats_corpus": "corpus", "stats_tokens": "n_tokens", "stats_seq_len": "seq_len"}


EvalEvery = int | Literal["log"]


def parse_eval_every(text: str | int) -> EvalEvery:
    """``"log"`` (any case) or a positive integer; anything else is an InvalidRequestError."""
    if isinstance(text, str) and text.strip().lower() == "log":
        return "log"
    try:
        value = int(text)
    except (TypeError, ValueError):
        value = 0
    if isinstance(text, bool) or value < 1 or str(value) != str(text).strip():
        raise InvalidRequestError(f"eval_every must be an integer >= 1 or 'log', got {text!r}")
    return value


def checkpoint_due(n_edits: int, every: EvalEvery) -> bool:
    """Whether a sequential checkpoint follows the ``n_edits``-th edit: every ``every`` edits,
    or for ``"log"`` after 10, 20, 40, 80, ... edits (the run's end gets one too). Why "log":
    a checkpoint re-scores a fixed sample, so at a fixed cadence its share of a run stays
    constant; doubling intervals make it shrink as the run grows."""
    if every != "log":
        return n_edits % every == 0
    return n_edits >= 10 and n_edits % 10 == 0 and (n_edits // 10).bit_count() == 1


def checkpoint_points(total: int, every: EvalEvery) -> list[int]:
    """The edit counts after which a run of ``total`` successful edits checkpoints."""
    points = [n for n in range(1, total + 1) if checkpoint_due(n, every)]
    if every == "log" and total and (not points or points[-1] != total):
        points.append(total)
    return points


@dataclass
class RunConfig:
    """Everything that defines an evaluation run (stored in the run directory's config.json).

    ``hparams``: overrides for the method's hyper-parameters (dotted keys allowed, e.g.
    ``{"value.steps": 10}``). ``n``: the first ``n`` cases (None = all). ``eval_every``:
    sequential checkpoints every that many edits, or ``"log"`` (after 10, 20, 40, ... edits and
    after the last, so checkpoints stay a small share of a long run). ``eval_sample``:
    cases re-scored at each sequential checkpoint (0 = all edited so far). ``suite``: what is
    probed; ``stats``: where ``C`` comes from (its ``cache`` follows ``cache_dir``). ``rep``:
    :class:`~repedit.rep.RepConfig` overrides (None: the plain editor; ``{}``: REP with its
    defaults); ``rep_taus``: a τ sweep (several values; one value just sets ``rep["tau"]``).
    """

    model: str = "smollm2-135m"
    method: str = "rome"
    hparams: dict[str, Any] = field(default_factory=dict)
    data: str = "demo"
    data_dir: str | None = None
    n: int | None = None
    mode: Mode = "single"
    batch_size: int = 10
    eval_every: EvalEvery = "log"
    eval_sample: int = 20
    skip_invalid: bool = False
    id_split: int = 5
    out: str = "runs/default"
    overwrite: bool = False
    device: str | None = None
    dtype: str = "auto"
    cache_dir: str | None = None
    suite: SuiteConfig = field(default_factory=SuiteConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)
    rep: dict[str, Any] | None = None
    rep_taus: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.suite, dict):
            self.suite = SuiteConfig(**self.suite)
        if isinstance(self.stats, dict):
            self.stats = StatsConfig(**self.stats)
        self.stats.cache = self.cache_dir
        if self.mode not in MODES:
            raise InvalidRequestError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        self._check_rep()
        if self.batch_size < 1:
            raise InvalidRequestError(f"batch_size must be >= 1, got {self.batch_size}")
        if isinstance(self.eval_every, float | bool):
            raise InvalidRequestError(
                f"eval_every must be an integer >= 1 or 'log', got {self.eval_every!r}"
            )
        self.eval_every = parse_eval_every(self.eval_every)
        if self.eval_sample < 0:
            raise InvalidRequestError(f"eval_sample must be >= 0, got {self.eval_sample}")
        if self.n is not None and self.n < 0:
            raise InvalidRequestError(f"n must be >= 0, got {self.n}")

    def _check_rep(self) -> None:
        """Validate and normalise ``rep`` (coerced to RepConfig's field types) and ``rep_taus``."""
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
        resolved = RepConfig().replace(**self.rep)  # unknown fields and bad values fail here
        self.rep = {k: getattr(resolved, k) for k in sorted(self.rep)}
        if self.mode == "sequential" and self.rep_taus:
            raise InvalidRequestError(
                "a τ sweep cannot run in sequential mode (each τ changes every later edit's "
                "evaluation); run one τ per run, e.g. --rep-set tau=0.7"
            )

    def rep_config(self) -> RepConfig | None:
        """The :class:`~repedit.rep.RepConfig` of the run, or None without REP.

        Defaults on top of RepConfig's: REP's scrambles are seeded by the suite's ``seed``
        (``forms_seed``; another value is refused), REP's long-context passages come from the
        suite's ``long_context_corpus`` when one is set (REP draws its training passages under other
        keys than the test passages), and batch mode trains one shared adapter set per batch.
        Explicit ``rep`` fields win.
        """
        if self.rep is None:
            return None
        if self.rep.get("forms_seed", self.suite.seed) != self.suite.seed:
            raise InvalidRequestError(
                f"rep forms_seed {self.rep['forms_seed']} differs from the suite's seed "
                f"{self.suite.seed}: REP would train on the suite's held-out scrambles"
            )
        base: dict[str, Any] = {"forms_seed": self.suite.seed}
        if self.suite.long_context_corpus:
            base["long_context_corpus"] = self.suite.long_context_corpus
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

    def editor_stats(self, progress: bool = True) -> StatsConfig:
        """The key-statistics settings an editor is built with."""
        return dataclasses.replace(self.stats, cache=self.cache_dir, progress=progress)

    def to_dict(self) -> dict[str, Any]:
        out = plain({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        out["stats"].pop("progress", None)
        out["stats"].pop("cache", None)  # cache_dir holds it
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        """A RunConfig from ``to_dict`` output, or from an earlier version's flat fields."""
        if "suite" not in values and any(k in values for k in (*_FLAT_SUITE, *_FLAT_STATS)):
            values = _nest_flat(values)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise InvalidRequestError(f"unknown RunConfig field(s) {sorted(unknown)}")
        return cls(**values)

    def comparable(self) -> dict[str, Any]:
        """The fields a resumed run must share with the original (dotted names for nested)."""
        flat: dict[str, Any] = {}
        for key, value in self.to_dict().items():
            if key in ("suite", "stats"):
                flat.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                flat[key] = value
        return {k: v for k, v in flat.items() if k not in RESUMABLE_FIELDS}


@dataclass(frozen=True)
class ParallelConfig:
    """How a run's cases are spread over worker processes. Not part of the run's identity
    (config.json does not store it): any setting gives the same records, so a run may be
    resumed with another one.

    ``workers``: worker processes (None: 1 locally; with Ray, one per GPU with a CUDA
    ``device``, else the cluster's CPUs over ``threads``). ``threads``: torch threads per
    worker (None: 1 when there are workers). ``ray``: run the workers as Ray actors, on the
    cluster at ``ray_address`` or on a local Ray started for the run.
    """

    workers: int | None = None
    threads: int | None = None
    ray: bool = False
    ray_address: str | None = None

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise InvalidRequestError(f"workers must be >= 1, got {self.workers}")
        if self.threads is not None and self.threads < 1:
            raise InvalidRequestError(f"threads must be >= 1, got {self.threads}")

    @property
    def sharded(self) -> bool:
        """Whether cases go to worker processes (else the coordinator runs them itself)."""
        return self.ray or (self.workers or 1) > 1

    @property
    def worker_threads(self) -> int:
        return self.threads if self.threads is not None else 1

    def check(self, mode: str) -> None:
        """Refuse a mode that cannot be sharded: sequential edits one model, case after case."""
        if self.sharded and mode == "sequential":
            raise InvalidRequestError(
                "--workers/--ray cannot run --mode sequential: its edits accumulate on one "
                "model, case after case, so its cases cannot be split between processes; "
                "drop --workers/--ray, or use --mode single or batch"
            )


def _nest_flat(values: dict[str, Any]) -> dict[str, Any]:
    """An earlier version's flat RunConfig fields in today's nested shape."""
    rest = dict(values)
    suite = {new: rest.pop(old) for old, new in _FLAT_SUITE.items() if old in rest}
    stats = {new: rest.pop(old) for old, new in _FLAT_STATS.items() if old in rest}
    return {**rest, "suite": suite, "stats": stats}


def flat_fields(run_config: dict[str, Any]) -> dict[str, Any]:
    """A stored ``run_config`` (nested or flat) as the flat names readers know
    (``tests``, ``seed``, ``stats_corpus``, ``long_context_length``, ...)."""
    if "suite" not in run_config:
        return dict(run_config)
    out = {k: v for k, v in run_config.items() if k not in ("suite", "stats")}
    suite, stats = run_config.get("suite") or {}, run_config.get("stats") or {}
    out.update({old: suite[new] for old, new in _FLAT_SUITE.items() if new in suite})
    out.update({old: stats[new] for old, new in _FLAT_STATS.items() if new in stats})
    return out


# --------------------------------------------------------------------------- resuming


def check_resumable(run: RunDir, cfg: RunConfig, meta: dict[str, Any] | None = None) -> None:
    """Refuse if ``run`` holds a different run than ``cfg`` (``meta``: the model fingerprint,
    data hash and resolved settings, compared when given)."""
    if cfg.overwrite:
        return
    old = run.stored_config()
    if old is None:
        if meta is not None and (run / RESULTS).exists():
            raise RepeditError(
                f"{run.path} holds results but no {CONFIG}; refusing to mix runs "
                "(choose another --out, or pass --overwrite)"
            )
        return
    try:
        old_cfg = RunConfig.from_dict(old.get("run_config", {}))
    except (RepeditError, TypeError) as exc:
        raise RepeditError(
            f"{run / CONFIG} was written by another version ({exc}); pass --overwrite"
        ) from None
    a, b = old_cfg.comparable(), cfg.comparable()
    keys = sorted(set(a) | set(b))
    diffs = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]
    for key in ("model_fingerprint", "data_sha256"):
        if meta is not None and old.get(key) != meta.get(key):
            diffs.append(f"{key}: {old.get(key)!r} -> {meta.get(key)!r}")
    # resolved settings: a default that changed between versions must not mix into a run
    for key in ("hparams_resolved", "rep_resolved"):
        if meta is not None and key in old and old.get(key) != meta.get(key):
            diffs.append(f"{key} (defaults changed since the run began)")
    if diffs:
        raise RepeditError(
            f"{run.path} already holds a run with a different configuration "
            f"({'; '.join(diffs)}); rerun with the same options to resume, choose "
            "another --out, or pass --overwrite to discard the old results"
        )


def prepare(run: RunDir, cfg: RunConfig, meta: dict[str, Any]) -> None:
    """Start ``run`` for ``cfg`` (clearing it with ``overwrite``), or check that it resumes
    the same run. The caller owns the directory's lock."""
    if cfg.overwrite:
        run.clear()
    check_resumable(run, cfg, meta)
    if run.stored_config() is None:
        run.write_config({"run_config": cfg.to_dict(), **meta})

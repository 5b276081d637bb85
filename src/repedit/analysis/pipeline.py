"""``run_key_analysis``: the whole key analysis of a dataset, from cases to ``similarity.json``,
``findings.md`` and plots, so the command line only parses options and prints."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from repedit.analysis.findings import findings_markdown, summarize_findings
from repedit.analysis.keys import key_similarity, specificity_matrix
from repedit.analysis.plots import (
    plot_distributions,
    plot_similarity_vs_success,
    plot_specificity,
)
from repedit.analysis.records import CaseSimilarity
from repedit.analysis.success import SuccessAnalysis, similarity_vs_success
from repedit.data.loaders import LoadResult, load_cases, passage_corpus
from repedit.data.variants import PassageSampler
from repedit.editors import make_editor
from repedit.errors import InvalidRequestError
from repedit.evaluation.config import flat_fields
from repedit.evaluation.probes import SuiteConfig, passage_sampler
from repedit.evaluation.rundir import CONFIG
from repedit.models.loading import LoadedModel

#: ``progress(stage, total)`` opens a counter and returns its ``advance(n)``
Progress = Callable[[str, int], Callable[[int], None]]


@dataclass
class KeyAnalysisConfig:
    """What to analyse: cases, the variants' seeds and passages (as the evaluation suite's, so
    results join with a run), the editor that defines ``k*`` and the layer, and success data
    (``run``: an evaluation run directory, or ``with_success``: edit each case alone)."""

    data: str = "demo"
    data_dir: str | None = None
    n: int | None = None
    skip_invalid: bool = False
    id_split: int = 5
    seed: int = 0
    method: str = "rome"
    hparams: dict[str, Any] = field(default_factory=dict)
    layer: int | None = None
    n_unrelated: int = 20
    specificity_n: int = 30
    batch_size: int = 32
    long_context_corpus: str | None = None
    long_context_length: int = 512
    long_context_unit: Literal["tokens", "words"] = "tokens"
    long_context_passages: int = 1
    run: str | None = None
    with_success: bool = False
    out: str | None = None
    model: str = ""

    def __post_init__(self) -> None:
        if self.run and self.with_success:
            raise InvalidRequestError("use --run (join an evaluation) or --with-success, not both")

    def out_dir(self) -> Path:
        name = Path(self.data).stem if str(self.data).endswith(".json") else self.data
        return Path(self.out or Path("runs") / f"keys-{name}")


def read_run_config(run: str) -> dict[str, Any]:
    """An evaluation run directory's settings under the flat names (``data``, ``seed``, ...),
    whether its ``config.json`` was written nested or flat."""
    path = Path(run).expanduser() / CONFIG
    if not path.is_file():
        raise InvalidRequestError(f"{run} is not an evaluation run directory (no {CONFIG})")
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise InvalidRequestError(f"{path}: not valid JSON ({exc})") from None
    run_config = stored.get("run_config") if isinstance(stored, dict) else None
    if not isinstance(run_config, dict):
        raise InvalidRequestError(f"{path}: no run_config object (not an evaluation run?)")
    return flat_fields(run_config)


@dataclass
class KeyAnalysis:
    """The analysis's results and the files written."""

    report: dict[str, Any]
    results: list[CaseSimilarity]
    findings: dict[str, Any]
    success: SuccessAnalysis | None
    files: list[Path]


def _sampler(lm: LoadedModel, cfg: KeyAnalysisConfig) -> PassageSampler | None:
    """The evaluation suite's passage sampler for these settings (None: no passages)."""
    if cfg.long_context_passages <= 0:
        return None
    corpus = cfg.long_context_corpus
    if corpus is None:
        found, _ = passage_corpus(None, cfg.data_dir)
        corpus = str(found) if found is not None else None
    suite = SuiteConfig(
        tests=("long_context",),
        seed=cfg.seed,
        long_context_corpus=corpus,
        long_context_length=cfg.long_context_length,
        long_context_unit=cfg.long_context_unit,
        long_context_passages=cfg.long_context_passages,
    )
    return passage_sampler(lm, suite)


def _layer(cfg: KeyAnalysisConfig, lm: LoadedModel, editor: Any) -> int:
    """The given layer, else ROME's for the model (a rank-one editor's single layer)."""
    if cfg.layer is not None:
        lm.arch.check_layer(cfg.layer)
        return cfg.layer
    if editor.name not in ("rome", "r-rome"):
        editor = make_editor("rome")
    return editor.layers(lm, editor.resolved(lm))[0]


def _load(cfg: KeyAnalysisConfig) -> LoadResult:
    loaded = load_cases(
        cfg.data,
        data_dir=cfg.data_dir,
        n=cfg.n,
        skip_invalid=cfg.skip_invalid,
        id_split=cfg.id_split,
    )
    if not loaded.cases:
        raise InvalidRequestError(f"no cases in {cfg.data}")
    return loaded


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - t0


def _no_progress(_stage: str, _total: int) -> Callable[[int], None]:
    return lambda _n: None


def run_key_analysis(
    cfg: KeyAnalysisConfig,
    lm: LoadedModel,
    editor: Any = None,
    *,
    stats_config: Any = None,
    progress: Progress = _no_progress,
    status: Callable[[str], None] = lambda _msg: None,
) -> KeyAnalysis:
    """Analyse the keys of ``cfg``'s cases on ``lm`` and write ``cfg.out_dir()``.

    ``editor``: default ``make_editor(cfg.method, cfg.hparams, stats_config)``. ``status`` gets
    a line before each long step; ``progress`` counts cases through the stages.
    """
    editor = editor or make_editor(cfg.method, cfg.hparams, stats_config)
    loaded = _load(cfg)
    cases = loaded.cases
    out = cfg.out_dir()
    out.mkdir(parents=True, exist_ok=True)
    layer = _layer(cfg, lm, editor)
    timings: dict[str, float] = {}
    with _timed(timings, "stats_and_contexts"):
        status(f"key statistics at layer {layer} (computed once, then cached)…")
        stats = editor.second_moment(lm, [layer])[layer]
        contexts = editor.contexts(lm, editor.resolved(lm))
        sampler = _sampler(lm, cfg)
    status(
        f"analysing {len(cases)} cases at layer {layer} ({len(contexts)} contexts for k*, "
        f"{cfg.n_unrelated} unrelated subjects, long context "
        f"{'off' if sampler is None else f'{sampler.length} {sampler.unit}'})…"
    )
    position = editor.hparams.position
    with _timed(timings, "keys"):
        ticks = {s: progress(s, len(cases)) for s in ("k*", "variants")}
        results = key_similarity(
            lm, cases, layer=layer, stats=stats, contexts=contexts, seed=cfg.seed,
            long_context=sampler, n_long_context=cfg.long_context_passages,
            n_unrelated=cfg.n_unrelated, position=position, batch_size=cfg.batch_size,
            progress=lambda stage, n: ticks[stage](n),
        )  # fmt: skip
    with _timed(timings, "specificity"):
        subjects, matrix = specificity_matrix(
            lm, cases, layer, stats, contexts, position=position, max_cases=cfg.specificity_n
        )
    findings = summarize_findings(results)
    success = _success(cfg, lm, cases, editor, results, timings, progress, status)
    with _timed(timings, "plots"):
        files = _plots(out, results, subjects, matrix, success)
    report = {
        "model": cfg.model,
        "fingerprint": lm.fingerprint,
        "layer": layer,
        "d_mlp": lm.arch.d_mlp,
        "data": cfg.data,
        "data_path": str(loaded.path) if loaded.path else None,
        "n_cases": len(results),
        "options": _options(cfg, contexts, stats, stats_config),
        "timings": timings,
        **_results(results, findings, subjects, matrix, success),
    }
    files = [*_write(out, report, findings, success), *files]
    return KeyAnalysis(report, results, findings, success, files)


def _results(
    results: list[CaseSimilarity],
    findings: dict[str, Any],
    subjects: list[str],
    matrix: Any,
    success: SuccessAnalysis | None,
) -> dict[str, Any]:
    """``similarity.json``'s result sections."""
    return {
        "findings": findings,
        "specificity": {"subjects": subjects, "matrix": matrix.tolist()},
        "success": success.to_dict() if success is not None else None,
        "cases": [cs.to_dict() for cs in results],
    }


def _success(
    cfg: KeyAnalysisConfig,
    lm: LoadedModel,
    cases: list,
    editor: Any,
    results: list[CaseSimilarity],
    timings: dict[str, float],
    progress: Progress,
    status: Callable[[str], None],
) -> SuccessAnalysis | None:
    """β̃ joined with success, from ``cfg.run`` or by editing each case (None: neither)."""
    if cfg.run:
        status(f"joining with the evaluation run {cfg.run}…")
        return similarity_vs_success(results, run_dir=cfg.run)
    if not cfg.with_success:
        return None
    status(f"editing each case with {editor.name}, scoring its variants…")
    with _timed(timings, "success"):
        tick = progress("edits", len(results))
        return similarity_vs_success(
            results,
            lm=lm,
            cases=cases,
            editor=editor,
            batch_size=cfg.batch_size,
            progress=lambda _stage, n: tick(n),
        )


def _plots(
    out: Path, results: list[CaseSimilarity], subjects: list[str], matrix: Any, success: Any
) -> list[Path]:
    files = [
        plot_distributions(results, out / "beta_distribution.png"),
        plot_specificity(subjects, matrix, out / "specificity.png"),
    ]
    if success is not None and success.rows:
        files.append(plot_similarity_vs_success(success, out / "beta_vs_success.png"))
    return files


def _options(cfg: KeyAnalysisConfig, contexts: list[str], stats: Any, stats_config: Any) -> dict:
    """The settings ``similarity.json`` records (the config, the contexts, the statistics)."""
    skip = {"layer", "specificity_n", "batch_size", "out", "model", "hparams", "n_unrelated"}
    opts = {k: v for k, v in asdict(cfg).items() if k not in skip}
    opts.pop("run")
    opts.pop("with_success")
    return {
        **opts,
        "hparams": dict(cfg.hparams),
        "n_unrelated": cfg.n_unrelated,
        "contexts": list(contexts),
        "stats": {
            "corpus": getattr(stats_config, "corpus", None),
            "n_tokens": stats.n_tokens,
        },
        "run": cfg.run,
        "with_success": cfg.with_success,
    }


def _write(out: Path, report: dict[str, Any], findings: dict[str, Any], success: Any) -> list[Path]:
    """``similarity.json`` and ``findings.md``, each written whole (temp file, then rename)."""
    files = []
    for name, text in (
        ("similarity.json", json.dumps(report, indent=1) + "\n"),
        ("findings.md", findings_markdown(findings, success)),
    ):
        path = out / name
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
        files.append(path)
    return files

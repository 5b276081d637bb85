"""Evaluation: probe scoring, the robustness suite, the harness, summaries and reports.

``scoring``   teacher-forced probe scores (exact match, P(new) > P(true), locality agreement)
``fluency``   ROME's n-gram entropy of sampled text
``probes``    the robustness suite as probe families (:func:`build_probes`)
``rundir``    the run directory: file names, JSONL records, sessions, the owner's lock
``config``    ``RunConfig`` (suite, stats, REP) and whether a directory resumes it
``case``      one case lifecycle: reference → edit → check → REP → score → revert → record
``modes``     single / batch / sequential: how cases are grouped and when edits revert
``harness``   ``run_eval``: owns the run directory, runs a mode, summarises
``summary``   ``summary.json`` (the contract) and ``summary.md``
``report``    a self-contained HTML report over one or more runs

Submodules import torch; this package's namespace loads them lazily.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Probe": "scoring",
    "ProbeScore": "scoring",
    "score_probes": "scoring",
    "predictions": "scoring",
    "greedy_completion": "scoring",
    "generate_texts": "fluency",
    "ngram_entropy": "fluency",
    "TESTS": "probes",
    "SUCCESS_TESTS": "probes",
    "SuiteConfig": "probes",
    "build_probes": "probes",
    "parse_tests": "probes",
    "passage_sampler": "probes",
    "RunConfig": "config",
    "RunDir": "rundir",
    "RunBusyError": "rundir",
    "run_cases": "case",
    "run_eval": "harness",
    "summarize": "summary",
    "write_report": "report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f"repedit.evaluation.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'repedit.evaluation' has no attribute {name!r}")

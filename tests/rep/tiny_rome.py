"""A ROME edit of one case on a tiny model, with what ``train_rep`` needs for it (shared by the
REP tests that train adapters on a real edit)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from repedit.data.case import EditCase
from repedit.editors import StatsConfig, make_editor
from repedit.models.loading import LoadedModel
from repedit.models.tiny import tiny_loaded
from repedit.stats import second_moments
from tiny_text import tiny_corpus_text


@dataclass
class TinyRome:
    lm: LoadedModel
    editor: Any
    result: Any  # the EditResult, not applied
    layer: int
    kw: dict[str, Any]  # layers, stats, contexts: train_rep's keyword arguments
    corpus: Path


def tiny_rome(root: Path, case: EditCase, lm: LoadedModel | None = None) -> TinyRome:
    """Edit ``case`` with ROME on tiny llama (or ``lm``), key statistics from a corpus in
    ``root``."""
    corpus = root / "corpus.txt"
    corpus.write_text(tiny_corpus_text())
    lm = lm or tiny_loaded("llama")
    stats_cfg = StatsConfig(corpus=str(corpus), n_tokens=3000, cache=str(root), progress=False)
    editor = make_editor("rome", {"contexts": ((3, 2),), "value": {"steps": 8}}, stats_cfg)
    result = editor.edit(lm, [case.request], apply=False)
    hp = editor.resolved(lm)
    (layer,) = editor.layers(lm, hp)
    stats = second_moments(lm, [layer], str(corpus), 2000, cache=root, progress=False)
    kw = {"layers": [layer], "stats": stats, "contexts": editor.contexts(lm, hp)}
    return TinyRome(lm, editor, result, layer, kw, corpus)

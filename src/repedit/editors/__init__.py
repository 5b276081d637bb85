"""Locate-and-edit methods over one shared core (keys → values → solve → EditResult)."""

from __future__ import annotations

from typing import Any

from repedit.editors.alphaedit import AlphaEdit, AlphaEditHparams
from repedit.editors.base import Editor, LocateEditHparams, StatsConfig
from repedit.editors.context_robust import Core, CoreHparams
from repedit.editors.emmet import Emmet, EmmetHparams
from repedit.editors.memit import Memit, MemitHparams
from repedit.editors.r_rome import RRome, RRomeHparams
from repedit.editors.result import EditResult, merge_results
from repedit.editors.rome import Rome, RomeHparams
from repedit.editors.values import ValueHparams
from repedit.errors import InvalidRequestError
from repedit.methods import METHOD_NAMES

#: the editor registry: method name (:data:`~repedit.methods.METHOD_NAMES`) → class
EDITORS: dict[str, type[Editor]] = dict(
    zip(METHOD_NAMES, (Rome, RRome, Memit, Emmet, AlphaEdit, Core), strict=True)
)


def make_editor(
    method: str, hparams: dict[str, Any] | None = None, stats: StatsConfig | None = None
) -> Editor:
    """An editor by name (``rome``, ``r-rome``, ``memit``, ``emmet``, ``alphaedit``, ``core``)."""
    key = method.lower().replace("_", "-")
    if key == "rrome":
        key = "r-rome"
    if key not in EDITORS:
        raise InvalidRequestError(f"unknown method {method!r}; choose from {', '.join(EDITORS)}")
    return EDITORS[key](hparams, stats)


__all__ = [
    "EDITORS",
    "METHOD_NAMES",
    "AlphaEdit",
    "AlphaEditHparams",
    "Core",
    "CoreHparams",
    "EditResult",
    "Editor",
    "Emmet",
    "EmmetHparams",
    "LocateEditHparams",
    "Memit",
    "MemitHparams",
    "RRome",
    "RRomeHparams",
    "Rome",
    "RomeHparams",
    "StatsConfig",
    "ValueHparams",
    "make_editor",
    "merge_results",
]

"""The playground's state: one model, one current edit, and the operations on them.

Single-user by design: every client sees the same current edit. One lock guards the model,
so an edit runs alone (others wait their turn) and no probe ever reads a half-edited model;
progress is kept apart, under its own small lock, so a page can read it while an edit runs.
"""

from __future__ import annotations

import gc
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from repedit.errors import InvalidRequestError
from repedit.serve.limits import EditParams, ProbeParams

if TYPE_CHECKING:
    from repedit.data import EditCase, EditRequest
    from repedit.demo import TextSources
    from repedit.editors import Editor, EditResult
    from repedit.models import LoadedModel


@dataclass
class Current:
    """The edit on the model now, and what the page shows about it."""

    params: EditParams
    request: EditRequest
    editor: Editor
    result: EditResult
    report: dict[str, Any]
    adapters: dict[int, Any] | None = None
    rep_config: Any = None
    gates: list[dict[str, Any]] = field(default_factory=list)
    beta: list[dict[str, Any]] = field(default_factory=list)


class Progress:
    """Stage messages of the running (or last) edit, readable while it runs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.busy = False
        self.log: list[dict[str, Any]] = []
        self.started = 0.0

    def start(self) -> None:
        with self._lock:
            self.busy, self.log, self.started = True, [], time.perf_counter()

    def say(self, stage: str, message: str) -> None:
        with self._lock:
            t = round(time.perf_counter() - self.started, 2)
            self.log.append({"stage": stage, "message": message, "t": t})

    def stop(self) -> None:
        with self._lock:
            self.busy = False

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"busy": self.busy, "log": list(self.log)}


class Playground:
    """Everything the server does, with no web code (see :mod:`repedit.serve.app`)."""

    def __init__(
        self,
        lm: LoadedModel,
        model_name: str,
        sources: TextSources,
        cases: list[EditCase],
    ):
        from repedit.demo import passages

        self.lm = lm
        self.model_name = model_name
        self.sources = sources
        self.cases = {str(c.case_id): c for c in cases}
        self.sampler = passages(lm, sources)
        self.lock = threading.Lock()
        self.progress = Progress()
        self.current: Current | None = None
        self._editors: dict[tuple[str, int | None], Editor] = {}

    # -- read-only views ------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        from repedit.serve import limits

        return {
            "model": self.model_name,
            "fingerprint": self.lm.fingerprint,
            "n_layers": self.lm.n_layers,
            "methods": list(limits.METHODS),
            "default_layers": {
                m: self.editor(m, None).layers(self.lm, self._hp(m)) for m in limits.METHODS
            },
            "limits": {
                "max_text": limits.MAX_TEXT,
                "max_probes": limits.MAX_PROBES,
                "max_new_tokens": limits.MAX_NEW_TOKENS,
            },
            "note": self.sources.note,
        }

    def case_list(self) -> list[dict[str, Any]]:
        return [
            {"id": cid, "source": c.source or "built-in", **c.request.to_dict()}
            for cid, c in self.cases.items()
        ]

    def state(self) -> dict[str, Any]:
        """What every tab shows: progress, and the current edit with its gate and β̃ views."""
        from repedit.serve.views import beta_svg

        cur = self.current
        out: dict[str, Any] = {"progress": self.progress.snapshot(), "edit": None}
        if cur is not None:
            out["edit"] = {
                "params": cur.params.__dict__,
                "report": cur.report,
                "gates": cur.gates,
                "beta": cur.beta,
                "beta_svg": beta_svg(cur.beta),
            }
        return out

    # -- editors --------------------------------------------------------------------------
    def editor(self, method: str, layer: int | None) -> Editor:
        """One editor per (method, layer), kept so its statistics and contexts are reused."""
        from repedit.editors import EDITORS, make_editor

        key = (method, layer)
        if key not in self._editors:
            hp: dict[str, Any] = {}
            if layer is not None:
                fields = EDITORS[method].hparams_class.__dataclass_fields__
                hp = {"layer": layer} if "layer" in fields else {"layers": (layer,)}
            self._editors[key] = make_editor(method, hp, self.sources.stats)
        return self._editors[key]

    def _hp(self, method: str) -> Any:
        return self.editor(method, None).resolved(self.lm)

    # -- operations -----------------------------------------------------------------------
    def edit(self, params: EditParams) -> dict[str, Any]:
        """Undo the current edit, make this one, and return ``repedit edit --json``'s object."""
        from repedit.serve.editing import run_edit

        with self.lock:
            self.progress.start()
            try:
                self._drop()
                self.current = run_edit(self, params)
                return self.current.report
            finally:
                self.progress.stop()

    def probe(self, params: ProbeParams) -> dict[str, Any]:
        """Score prompts on the model as it is now (with REP's adapters when it has them)."""
        from repedit.edit_report import ProbeSpec, measure
        from repedit.rep import rep_applied
        from repedit.serve.views import gate_strip

        with self.lock:
            cur = self.current
            target = params.target or (cur.request.target_new if cur else None)
            true = params.target_true or (cur.request.target_true if cur else None)
            if target is None:
                raise InvalidRequestError("no current edit: give 'target' to score against")
            specs = [ProbeSpec("probe", p, target, true) for p in params.prompts]
            rows = measure(self.lm, specs, params.new_tokens)
            out: list[dict[str, Any]] = [
                {"prompt": s.prompt, "edit": r} for s, r in zip(specs, rows, strict=True)
            ]
            if cur is not None and cur.adapters:
                with rep_applied(self.lm, cur.adapters):
                    rep_rows = measure(self.lm, specs, params.new_tokens)
                for o, s, r in zip(out, specs, rep_rows, strict=True):
                    o["edit_rep"] = r
                    o["gate"] = gate_strip(self.lm, cur.adapters, s.prompt)
            return {"edited": cur is not None, "target": target, "target_true": true, "probes": out}

    def revert(self) -> dict[str, Any]:
        """Restore the unedited model and free the edit's tensors."""
        with self.lock:
            had = self.current is not None
            self._drop()
            return {"reverted": had}

    def _drop(self) -> None:
        if self.current is not None:
            self.current.result.revert(self.lm)
            self.current = None
            gc.collect()

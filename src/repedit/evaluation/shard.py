"""Cases sharded over worker processes: the tasks, the worker's side, and the coordinator loop.

The coordinator (the process that owns the run directory) splits the cases still to do into
tasks (one case in single mode, one fixed chunk in batch mode) and hands them to workers
through a :class:`Backend` (local processes or Ray actors). A worker loads its own model,
runs :func:`~repedit.evaluation.case.run_cases` on each task and sends back plain records and
new reference predictions; it never touches the run directory. The coordinator writes what
comes back through its :class:`~repedit.evaluation.modes.Recorder`, so every case is written
once, by one process, and a killed run resumes like a one-process run.

A worker that dies (or raises) while running a task is replaced by a fresh one, which runs
the task again; if that one dies too, the task's cases are recorded with a ``WorkerCrashed``
error, so no case is lost and none is run a third time. Keeping this logic apart from the
backends means local processes and Ray actors retry by the same rule.
"""

from __future__ import annotations

import logging
import os
import signal
import traceback
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from repedit.data.case import EditCase
from repedit.editors import make_editor
from repedit.errors import RepeditError
from repedit.evaluation.case import CaseItem, CaseRecord, base_record, run_cases
from repedit.evaluation.config import RunConfig
from repedit.evaluation.modes import Recorder, case_context, warm_editor
from repedit.models import load_model

log = logging.getLogger(__name__)

#: times a task runs at most: once, and once more on a fresh worker if its worker died
ATTEMPTS = 2
#: a test hook, ``KEY:N:DIR``: a worker that starts a task holding case KEY kills itself
#: (SIGKILL), the first N times over all workers (counted by marker files in DIR)
CRASH_ENV = "REPEDIT_TEST_WORKER_CRASH"


@dataclass
class Task:
    """One unit of work: ``items`` edited together, the ``todo`` ones scored and recorded."""

    id: int
    mode: str
    items: list[CaseItem]
    todo: list[str]
    chunk: int | None = None
    #: the unedited predictions already in the run directory for these cases
    references: dict[str, dict[str, Any]] = field(default_factory=dict)
    attempts: int = 0


@dataclass
class WorkerInit:
    """What a worker starts from: the run's config, its thread count, the coordinator's
    derived editor state (context prefixes, key statistics) and model fingerprint."""

    cfg: RunConfig
    threads: int
    editor_state: dict[str, Any]
    fingerprint: str
    crash: str | None = None
    #: the dataset's cases ``near_subject`` draws look-alikes from (sent: a remote node may
    #: not have the dataset file)
    near_cases: tuple[EditCase, ...] = ()


def plan_tasks(items: Sequence[CaseItem], done: set[str], mode: str, size: int) -> list[Task]:
    """The tasks still to do: one per case (single), or one per fixed chunk of ``size`` cases
    (batch; a resumed chunk keeps its companions, as in one process)."""
    groups: list[tuple[list[CaseItem], int | None]]
    if mode == "single":
        groups = [([it], None) for it in items]
    else:
        groups = [(list(items[s : s + size]), s // size) for s in range(0, len(items), size)]
    tasks: list[Task] = []
    for group, chunk in groups:
        todo = [it.key for it in group if it.key not in done]
        if todo:
            tasks.append(Task(len(tasks), mode, group, todo, chunk))
    return tasks


# --------------------------------------------------------------------------- the worker


class Worker:
    """A worker's model, editor and case context, built once from a :class:`WorkerInit`."""

    def __init__(self, init: WorkerInit):
        torch.set_num_threads(init.threads)
        cfg = init.cfg
        lm = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, cache=cfg.cache_dir)
        if lm.fingerprint != init.fingerprint:
            raise RepeditError(
                f"worker on {os.uname().nodename} loaded {cfg.model} with fingerprint "
                f"{lm.fingerprint}, the coordinator's has {init.fingerprint}: the model "
                "files differ between machines"
            )
        editor = make_editor(cfg.method, dict(cfg.hparams), cfg.editor_stats(False))
        editor.adopt_state(init.editor_state)
        self.ctx = case_context(cfg, lm, editor, {}, init.near_cases)
        warm_editor(self.ctx)  # the adopted state: nothing left to derive
        self.crash = init.crash

    def run(self, task: Task) -> dict[str, Any]:
        """``{"kind": "done", "records", "references"}`` for ``task``; any exception out of
        the lifecycle becomes ``{"kind": "failed", "reason"}`` (the worker is then replaced)."""
        try:
            _crash_hook(self.crash, task)
            self.ctx.references = dict(task.references)
            out = run_cases(self.ctx, task.items, set(task.todo), task.mode)
        except Exception:
            return {"kind": "failed", "reason": traceback.format_exc(limit=3)}
        for rec in out.records:
            if task.chunk is not None:
                rec["chunk"] = task.chunk
        return {"kind": "done", "records": out.records, "references": out.references}


def _crash_hook(spec: str | None, task: Task) -> None:
    """The :data:`CRASH_ENV` test hook (``spec``): kill this process at a chosen case."""
    if not spec:
        return
    key, times, folder = spec.split(":", 2)
    if key not in task.todo:
        return
    marks = Path(folder)
    marks.mkdir(parents=True, exist_ok=True)
    n = len(list(marks.iterdir()))
    if n < int(times):
        (marks / f"crash-{n}-{os.getpid()}").touch()
        os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------- the coordinator


class Backend(Protocol):
    """Where workers run. A worker is a numbered slot; each message a slot sends is a dict
    whose ``kind`` is ``ready``, ``init_error`` (with ``reason``), ``done`` (a
    :meth:`Worker.run` result), ``failed`` or ``dead`` (with ``reason``)."""

    size: int

    def start(self, slot: int) -> None:
        """Start a fresh worker in ``slot`` (ending the one there, if any)."""

    def submit(self, slot: int, task: Task) -> None:
        """Give ``task`` to the (ready, idle) worker in ``slot``."""

    def poll(self, timeout: float) -> list[tuple[int, dict[str, Any]]]:
        """Messages that arrived within ``timeout`` seconds, as ``(slot, message)``."""

    def close(self) -> None:
        """End every worker (and whatever the backend started)."""


def crashed_records(task: Task, reason: str) -> list[CaseRecord]:
    """The records of a task whose workers died on every attempt."""
    out = []
    for item in task.items:
        if item.key in task.todo:
            rec = base_record(item, task.mode)
            rec["error"] = {
                "type": "WorkerCrashed",
                "message": f"the worker died on each of {task.attempts} attempts at case "
                f"{item.key} ({reason})",
            }
            if task.chunk is not None:
                rec["chunk"] = task.chunk
            out.append(rec)
    return out


@dataclass
class _Slots:
    """The coordinator's view of its workers: which are ready, what each is running."""

    ready: set[int] = field(default_factory=set)
    running: dict[int, Task] = field(default_factory=dict)
    #: a retried task waits for the fresh worker that replaced the one that died
    pinned: dict[int, Task] = field(default_factory=dict)
    start_failures: int = 0


def run_sharded(
    backend: Backend,
    tasks: Sequence[Task],
    rec: Recorder,
    references: dict[str, dict[str, Any]],
    *,
    poll_seconds: float = 0.5,
) -> None:
    """Run ``tasks`` on ``backend``'s workers; write every outcome through ``rec``.

    ``references``: the run's unedited predictions so far (sent with each task and added to
    as workers return new ones).
    """
    pending = deque(tasks)
    slots = _Slots()
    for slot in range(min(backend.size, len(tasks))):
        backend.start(slot)
    while pending or slots.running or slots.pinned:
        for slot in sorted(slots.ready - set(slots.running)):
            task = slots.pinned.pop(slot, None)
            if task is None and pending:
                task = pending.popleft()
            if task is None:
                continue
            task.attempts += 1
            task.references = {k: references[k] for k in task.todo if k in references}
            slots.running[slot] = task
            backend.submit(slot, task)
        for slot, msg in backend.poll(poll_seconds):
            _handle(backend, slots, slot, msg, rec, references, bool(pending))


def _handle(
    backend: Backend,
    slots: _Slots,
    slot: int,
    msg: dict[str, Any],
    rec: Recorder,
    references: dict[str, dict[str, Any]],
    more: bool,
) -> None:
    """One message from a worker."""
    kind = msg["kind"]
    if kind == "ready":
        slots.ready.add(slot)
    elif kind == "init_error":
        raise RepeditError(f"worker {slot} could not start: {msg['reason']}")
    elif kind == "done":
        slots.running.pop(slot)
        for ref in msg["references"]:
            references[ref["case_id"]] = ref
        rec.outcome(msg["records"], msg["references"])
    else:  # failed or dead: replace the worker; retry its task once
        slots.ready.discard(slot)
        task: Task | None = slots.running.pop(slot, None)
        reason = str(msg.get("reason", kind)).strip().splitlines()[-1]
        if task is None:
            slots.start_failures += 1
            if slots.start_failures > 2 * backend.size:
                raise RepeditError(f"workers keep dying before taking a task ({reason})")
            backend.start(slot)
            return
        keys = ", ".join(task.todo)
        if task.attempts < ATTEMPTS:
            log.warning("worker %d died at case(s) %s (%s); retrying on a fresh one", slot, keys,
                        reason)  # fmt: skip
            slots.pinned[slot] = task
            backend.start(slot)
        else:
            log.warning("worker %d died again at case(s) %s (%s); recorded as failed", slot,
                        keys, reason)  # fmt: skip
            rec.outcome(crashed_records(task, reason), ())
            if more or slots.pinned:
                backend.start(slot)

"""Where sharded workers run: local processes (``--workers N``) or Ray actors (``--ray``).

Both backends implement :class:`~repedit.evaluation.shard.Backend`; the sharding, retry and
writing are :func:`~repedit.evaluation.shard.run_sharded`'s, the same for both. A worker
builds one :class:`~repedit.evaluation.shard.Worker` (its own model, with its own thread
count) and then runs the tasks it is given until told to stop.

Local workers are ``spawn``-ed processes, each talking to the coordinator over a pipe of its
own, so one killed mid-message cannot garble another's. Ray workers are actors, one model
each; with a CUDA ``device`` every actor asks Ray for one GPU.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
from collections.abc import Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

from repedit.errors import RepeditError
from repedit.evaluation.case import CaseContext, CaseItem
from repedit.evaluation.config import ParallelConfig, RunConfig
from repedit.evaluation.modes import Recorder, warm_editor
from repedit.evaluation.shard import CRASH_ENV, Task, Worker, WorkerInit, plan_tasks, run_sharded

log = logging.getLogger(__name__)

#: seconds a stopping worker gets to exit before it is killed
STOP_SECONDS = 10.0


def run_parallel(
    cfg: RunConfig,
    ctx: CaseContext,
    items: Sequence[CaseItem],
    rec: Recorder,
    parallel: ParallelConfig,
) -> None:
    """Run the cases of ``items`` not yet in ``rec`` on workers; ``rec`` writes everything.

    The key statistics and context prefixes are derived here, once, on the coordinator's
    unedited model ``ctx.lm``, and handed to every worker.
    """
    parallel.check(cfg.mode)
    warm_editor(ctx)
    tasks = plan_tasks(items, rec.done, cfg.mode, cfg.batch_size)
    if not tasks:
        return
    init = WorkerInit(
        cfg,
        parallel.worker_threads,
        ctx.editor.derived_state(),
        ctx.lm.fingerprint,
        os.environ.get(CRASH_ENV),
        ctx.near.cases if ctx.near is not None else (),
    )
    backend: LocalBackend | RayBackend
    if parallel.ray:
        backend = RayBackend(init, parallel)
    else:
        backend = LocalBackend(init, parallel.workers or 1)
    try:
        run_sharded(backend, tasks, rec, ctx.references)
    finally:
        backend.close()


# --------------------------------------------------------------------------- local processes


def _local_main(conn: Connection, init: WorkerInit) -> None:
    """A local worker process: build the worker, then run tasks until ``None`` arrives."""
    try:
        worker = Worker(init)
    except Exception as exc:
        conn.send({"kind": "init_error", "reason": f"{type(exc).__name__}: {exc}"})
        return
    conn.send({"kind": "ready", "pid": os.getpid()})
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        msg = worker.run(task)
        conn.send(msg)
        if msg["kind"] != "done":
            return


class LocalBackend:
    """Workers as ``spawn``-ed processes on this machine, one pipe each."""

    def __init__(self, init: WorkerInit, size: int):
        self.init = init
        self.size = size
        self.mp = multiprocessing.get_context("spawn")
        self.procs: dict[int, Any] = {}
        self.conns: dict[int, Connection] = {}
        self.lost: list[tuple[int, dict[str, Any]]] = []

    def start(self, slot: int) -> None:
        self._stop(slot)
        parent, child = self.mp.Pipe()
        proc = self.mp.Process(
            target=_local_main, args=(child, self.init), name=f"repedit-worker-{slot}", daemon=True
        )
        proc.start()
        child.close()
        self.procs[slot], self.conns[slot] = proc, parent

    def submit(self, slot: int, task: Task) -> None:
        try:
            self.conns[slot].send(task)
        except OSError:  # it died since its last message; poll reports it
            self.lost.append((slot, self._dead(slot)))

    def poll(self, timeout: float) -> list[tuple[int, dict[str, Any]]]:
        out, self.lost = self.lost, []
        if out:
            return out
        by_conn = {id(conn): slot for slot, conn in self.conns.items()}
        for got in wait(list(self.conns.values()), timeout):
            slot = by_conn[id(got)]
            conn = self.conns[slot]
            try:
                out.append((slot, conn.recv()))
            except (EOFError, OSError):
                out.append((slot, self._dead(slot)))
        return out

    def _dead(self, slot: int) -> dict[str, Any]:
        """The message for a worker found dead (its pipe is dropped from the watch list)."""
        proc = self.procs[slot]
        proc.join(STOP_SECONDS)
        self.conns.pop(slot).close()
        return {"kind": "dead", "reason": f"process {proc.pid} exited with {proc.exitcode}"}

    def _stop(self, slot: int) -> None:
        proc, conn = self.procs.pop(slot, None), self.conns.pop(slot, None)
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.send(None)
            conn.close()
        if proc is not None:
            proc.join(STOP_SECONDS)
            if proc.is_alive():
                proc.kill()
                proc.join()

    def close(self) -> None:
        for slot in list(self.procs):
            self._stop(slot)


# --------------------------------------------------------------------------- Ray actors


class RayWorker:
    """A Ray actor holding one :class:`~repedit.evaluation.shard.Worker`."""

    def __init__(self, init: WorkerInit):
        self.worker: Worker | None = None
        self.error: str | None = None
        try:
            self.worker = Worker(init)
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    def ready(self) -> dict[str, Any]:
        if self.error is not None:
            return {"kind": "init_error", "reason": self.error}
        return {"kind": "ready", "pid": os.getpid()}

    def run(self, task: Task) -> dict[str, Any]:
        assert self.worker is not None
        return self.worker.run(task)


#: Ray's switch for multi-node clusters; "0" keeps a local node on 127.0.0.1
LOOPBACK_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


class RayBackend:
    """Workers as Ray actors on the cluster at ``parallel.ray_address``, or on a local Ray
    started for the run (127.0.0.1, no dashboard) and shut down at the end. A Ray already
    initialised in this process is used as it is."""

    def __init__(self, init: WorkerInit, parallel: ParallelConfig):
        if not parallel.ray_address:
            # a local Ray otherwise advertises the machine's network address instead of the
            # loopback one it was given; read when ray is first imported
            os.environ.setdefault(LOOPBACK_ONLY_ENV, "0")
        try:
            import ray
        except ImportError:
            raise RepeditError("--ray needs Ray: pip install 'repedit[ray]'") from None
        self.ray = ray
        self.owned = False
        threads = parallel.worker_threads
        if not ray.is_initialized():
            if parallel.ray_address:
                ray.init(address=parallel.ray_address, logging_level=logging.WARNING)
            else:
                cpus = (parallel.workers or os.cpu_count() or 1) * threads
                ray.init(
                    num_cpus=cpus,
                    include_dashboard=False,
                    _node_ip_address="127.0.0.1",
                    logging_level=logging.WARNING,
                )
                self.owned = True
        gpus = 1 if str(init.cfg.device or "").startswith("cuda") else 0
        self.size = parallel.workers or self._default_size(threads, gpus)
        self.actor = ray.remote(RayWorker).options(
            num_cpus=threads, num_gpus=gpus, max_restarts=0, max_task_retries=0
        )
        self.init = ray.put(init)
        self.actors: dict[int, Any] = {}
        self.refs: dict[Any, int] = {}

    def _default_size(self, threads: int, gpus: int) -> int:
        """One actor per GPU (with ``gpus``), else the cluster's CPUs over ``threads``."""
        res = self.ray.cluster_resources()
        if gpus:
            n = int(res.get("GPU", 0))
            if n < 1:
                raise RepeditError("--ray with a CUDA --device: the Ray cluster has no GPU")
            return n
        return max(1, int(res.get("CPU", 1)) // threads)

    def start(self, slot: int) -> None:
        old = self.actors.pop(slot, None)
        if old is not None:
            self.refs = {ref: s for ref, s in self.refs.items() if s != slot}
            self.ray.kill(old, no_restart=True)
        actor: Any = self.actor.remote(self.init)
        self.actors[slot] = actor
        self.refs[actor.ready.remote()] = slot

    def submit(self, slot: int, task: Task) -> None:
        self.refs[self.actors[slot].run.remote(task)] = slot

    def poll(self, timeout: float) -> list[tuple[int, dict[str, Any]]]:
        if not self.refs:
            return []
        ready, rest = self.ray.wait(list(self.refs), num_returns=1, timeout=timeout)
        if ready and rest:
            more, _ = self.ray.wait(rest, num_returns=len(rest), timeout=0)
            ready += more
        out = []
        for ref in ready:
            slot = self.refs.pop(ref)
            try:
                out.append((slot, self.ray.get(ref)))
            except self.ray.exceptions.RayError as exc:
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                out.append((slot, {"kind": "dead", "reason": f"Ray actor died: {reason}"}))
        return out

    def close(self) -> None:
        for actor in self.actors.values():
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception:  # already gone
                log.debug("ray.kill failed", exc_info=True)
        self.actors.clear()
        self.refs.clear()
        if self.owned:
            self.ray.shutdown()

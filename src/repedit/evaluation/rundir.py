"""The run directory: its file names, JSONL records, sessions and the lock of its one owner.

A run lives in one directory::

    config.json        the RunConfig, model fingerprint and data file hash (a rerun must match)
    results.jsonl      one line per case, appended (flush + fsync) as soon as the case is done
    reference.jsonl    the unedited model's predictions on each case's neighbourhood probes
    sequential.jsonl   sequential mode: means over edited-so-far cases every ``eval_every`` edits
    sequential_state.safetensors   sequential mode: the edited weights, for resuming
    sequential_rep/    sequential mode with REP: each edited case's adapters (one file per case)
    sessions.json      wall time of every session that worked on the run
    run.lock           held (``fcntl.flock``) by the process that owns the run; holds its pid
    summary.json / summary.md / report.html   written at the end

One process owns a run directory at a time and does all of its writing: the lock is an OS
lock, so the kernel drops it when its owner dies and a crashed run never leaves it stale.
Everything here reads or writes files; nothing runs a model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from repedit.errors import RepeditError
from repedit.io import atomic_path, write_json

log = logging.getLogger(__name__)

CONFIG = "config.json"
RESULTS = "results.jsonl"
REFERENCE = "reference.jsonl"
SEQUENTIAL = "sequential.jsonl"
SEQ_STATE = "sequential_state.safetensors"
SEQ_REP_DIR = "sequential_rep"
SESSIONS = "sessions.json"
LOCK = "run.lock"
SUMMARY = "summary.json"
SUMMARY_MD = "summary.md"
REPORT = "report.html"
#: the files ``--overwrite`` removes (the lock stays: its owner is the one overwriting)
RUN_FILES = (
    CONFIG,
    RESULTS,
    REFERENCE,
    SEQUENTIAL,
    SEQ_STATE,
    SESSIONS,
    SUMMARY,
    SUMMARY_MD,
    REPORT,
)


class RunBusyError(RepeditError):
    """The run directory is owned by another live process."""


# --------------------------------------------------------------------------- JSON helpers


def plain(obj: Any) -> Any:
    """JSON-ready copy: tuples to lists, tensors to numbers/lists (small) or a shape string."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v) for v in obj]
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
        return plain(dataclasses.asdict(obj))
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
    for line in raw.split(b"\n"):
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
    line = json.dumps(plain(record), sort_keys=True) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def readable(path: Path) -> Path:
    """Make a file written through a temporary file (mode 0600) readable like any other."""
    with contextlib.suppress(OSError):
        path.chmod(0o644)
    return path


def short_sha(obj: Any) -> str:
    """First 16 hex digits of the sha256 of ``obj`` as sorted JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def sweep_name(tau: float) -> str:
    """The sub-run directory of one τ of a sweep: ``tau-0.7``."""
    return f"tau-{float(tau):g}"


def sweep_dirs(path: str | Path) -> list[Path]:
    """The sub-run directories of a τ-sweep run directory (empty if ``path`` is no sweep)."""
    path = Path(path)
    try:
        rc = json.loads((path / CONFIG).read_text()).get("run_config", {})
    except (OSError, ValueError, AttributeError):
        return []
    return [path / sweep_name(t) for t in rc.get("rep_taus") or []]


# --------------------------------------------------------------------------- the lock


class RunLock:
    """Exclusive ownership of a run directory: ``fcntl.flock`` on ``run.lock``, which holds
    the owner's pid. Released by :meth:`release`, or by the kernel when the owner dies."""

    def __init__(self, directory: str | Path):
        self.path = Path(directory) / LOCK
        self._fd: int | None = None

    def owner(self) -> str:
        """The pid written by the current owner ('unknown' while it is being written)."""
        try:
            return self.path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def acquire(self, *, wait: bool = False) -> RunLock:
        """Take the lock; if another process holds it, raise :class:`RunBusyError` naming
        its pid, or with ``wait`` block until it is free."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                if not wait:
                    raise RunBusyError(
                        f"{self.path.parent} is in use by another repedit process (pid "
                        f"{self.owner()}, holding {self.path}); wait for it to finish, pass "
                        "--wait to queue behind it, or choose another --out"
                    ) from None
                log.warning("%s is in use by pid %s; waiting", self.path.parent, self.owner())
                fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# --------------------------------------------------------------------------- the run directory


class RunDir:
    """File access for one run directory (see the module docstring for the layout)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def lock(self, *, wait: bool = False) -> RunLock:
        """Own the directory (see :class:`RunLock`); creates it."""
        return RunLock(self.path).acquire(wait=wait)

    def clear(self) -> None:
        """Remove every run file (``--overwrite``)."""
        for name in RUN_FILES:
            with contextlib.suppress(FileNotFoundError):
                (self / name).unlink()
        shutil.rmtree(self / SEQ_REP_DIR, ignore_errors=True)

    def stored_config(self) -> dict[str, Any] | None:
        """``config.json`` as stored (None if absent); an unreadable one is refused."""
        path = self / CONFIG
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
        except ValueError:
            raise RepeditError(
                f"{path} is unreadable; pass --overwrite to start the run afresh"
            ) from None
        if not isinstance(data, dict):
            raise RepeditError(f"{path} is not a run configuration; pass --overwrite")
        return data

    def write_config(self, data: dict[str, Any]) -> None:
        write_json(self / CONFIG, data)
        readable(self / CONFIG)

    def config(self) -> dict[str, Any]:
        """``config.json`` (empty if absent), for readers such as the summary."""
        path = self / CONFIG
        return json.loads(path.read_text()) if path.exists() else {}

    def results(self, *, repair: bool = False) -> list[dict[str, Any]]:
        """The case records, first record per case id kept."""
        seen: dict[str, dict[str, Any]] = {}
        for rec in read_jsonl(self / RESULTS, repair=repair):
            key = rec.get("case_id")
            if key is not None and str(key) not in seen:
                seen[str(key)] = rec
        return list(seen.values())

    def references(self) -> dict[str, dict[str, Any]]:
        """The unedited predictions per case id (the file repaired after a cut write)."""
        return {r["case_id"]: r for r in read_jsonl(self / REFERENCE, repair=True)}

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

    def record_session(self, session: dict[str, Any]) -> None:
        """Store (or update, by ``id``) one session's timing in ``sessions.json``."""
        sessions = [s for s in self.sessions() if s.get("id") != session["id"]]
        write_json(self / SESSIONS, [*sessions, session])
        readable(self / SESSIONS)

    def seq_rep_path(self, key: str) -> Path:
        """Where sequential mode keeps one edited case's REP adapters."""
        name = hashlib.sha256(key.encode()).hexdigest()[:20]
        return self / SEQ_REP_DIR / f"{name}.safetensors"


def new_session(started: float, cases_before: int) -> dict[str, Any]:
    """A session record (wall time is filled in as cases finish)."""
    return {
        "id": f"{started:.6f}",
        "t0": started,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "cases_before": cases_before,
    }

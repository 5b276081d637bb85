"""Real child processes for the reliability tests, forked from the test process.

The test process has already imported torch and transformers, so a forked child costs a model
load instead of a ~10 s interpreter start. It is a real process all the same: its own pid, its
own file locks and resource limits, killed with SIGKILL, talking to the parent only through
files. A child runs either the ``repedit`` command line (``main(argv)``) or a Python callable,
with extra environment variables (e.g. ``REPEDIT_TEST_KILL_AT``, see ``repedit.faults``), an
optional file-size limit, and an optional ``setup`` run first in the child (to arm a test-only
fault). Its stdout and stderr go to a log file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: how long any child may run before the test gives up on it
CHILD_TIMEOUT_S = 180.0


@dataclass
class Child:
    """A forked child process; ``log`` holds its stdout and stderr."""

    pid: int
    log: Path

    def wait(self, timeout: float = CHILD_TIMEOUT_S) -> int:
        """Exit code, or ``-signal`` when killed by a signal."""
        deadline = time.monotonic() + timeout
        while True:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                raise AssertionError(f"child {self.pid} ran past {timeout} s; log:\n{self.text}")
            time.sleep(0.02)

    @property
    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def _child_main(
    target: Sequence[str] | Callable[[], Any],
    log: Path,
    env: dict[str, str],
    fsize: int | None,
    setup: Callable[[], Any] | None,
) -> None:
    code = 99
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = sys.stderr = open(log, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        _plain_logging()
        os.environ.update(env)
        if fsize is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG)
            _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, hard))
        if setup is not None:
            setup()
        if callable(target):
            target()
            code = 0
        else:
            from repedit.cli import main

            code = main(list(target))
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        os._exit(code)


def _plain_logging() -> None:
    """Drop the handlers inherited from pytest; warnings and errors go to the log file."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    root.addHandler(handler)


_children: list[Child] = []


def kill_leftover_children() -> None:
    """SIGKILL every child still running (a failed test must not leave them behind)."""
    while _children:
        child = _children.pop()
        with contextlib.suppress(ChildProcessError, ProcessLookupError):
            if os.waitpid(child.pid, os.WNOHANG) == (0, 0):
                os.kill(child.pid, signal.SIGKILL)
                os.waitpid(child.pid, 0)


def spawn_child(
    target: Sequence[str] | Callable[[], Any],
    log: Path,
    *,
    env: dict[str, str] | None = None,
    fsize: int | None = None,
    setup: Callable[[], Any] | None = None,
) -> Child:
    """Fork a child that runs ``target`` (argv for ``repedit``, or a callable)."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns
        _child_main(target, log, env or {}, fsize, setup)
    child = Child(pid, log)
    _children.append(child)
    return child


def run_child(target: Sequence[str] | Callable[[], Any], log: Path, **kw: Any) -> tuple[int, str]:
    """Fork, wait; ``(exit code or -signal, log text)``."""
    child = spawn_child(target, log, **kw)
    code = child.wait()
    return code, child.text


def files_under(root: Path) -> dict[str, bytes]:
    """Every file below ``root`` with its content (to show nothing changed)."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def leftovers(root: Path) -> list[str]:
    """Temporary files or directories an atomic write left below ``root``."""
    return sorted(str(p) for p in root.rglob(".*") if p.name.endswith((".tmp", ".old")))

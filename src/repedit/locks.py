"""An exclusive lock held on a file with ``flock``: released by the kernel when its owner dies.

Used where two processes could otherwise do the same work or write the same file at once (key
statistics); a crashed owner never leaves a stale lock behind, because the lock belongs to the
open file description, not to the lock file's existence.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from repedit.errors import WriteError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows has no flock; work then simply is not shared
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def file_lock(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if absent) for the ``with`` block.

    If another process holds it, ``on_wait`` is called once and this waits until it is free.
    The lock file is never deleted: removing it would let two processes lock two different
    files of the same name.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise WriteError(f"cannot create the lock file {path}: {exc.strerror or exc}") from None
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None:
                    on_wait()
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock

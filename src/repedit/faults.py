"""A test hook that kills the process at a named point, so crash safety can be tested for real.

``REPEDIT_TEST_KILL_AT=POINT:N`` makes the Nth pass through :func:`kill_point` ``POINT`` (1 =
the first) send SIGKILL to this process: no cleanup handler, ``finally`` or atexit runs, as
when a machine loses power or the OOM killer strikes. Unset (always, outside tests) it costs
one dictionary lookup. Points:

``io.write``
    every atomic file write (:func:`repedit.io.atomic_path`), once its temporary file is
    written; the temporary file is cut to half its size first, as a write caught midway.
``stats.batch``
    after each forward batch of a key-statistics computation.
``values.step``
    after each step of an edit's value optimisation (either batching).
``export.weights``
    an export, after the weights are in the temporary directory and before the tokenizer.
``export.rename``
    an export, when the temporary directory is complete, just before it is renamed into place.
``export.swap``
    an export over an existing directory, after that one is moved aside and before the new
    one takes its place.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

ENV = "REPEDIT_TEST_KILL_AT"

_passes: dict[str, int] = {}


def kill_point(point: str, partial: Path | None = None) -> None:
    """Die here if ``$REPEDIT_TEST_KILL_AT`` names this pass of ``point``.

    ``partial``: a file being written, truncated to half its size before dying.
    """
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, _, nth = spec.rpartition(":")
    if name != point:
        return
    _passes[point] = _passes.get(point, 0) + 1
    if str(_passes[point]) != nth.strip():
        return
    if partial is not None and partial.is_file():
        os.truncate(partial, partial.stat().st_size // 2)
    os.kill(os.getpid(), signal.SIGKILL)

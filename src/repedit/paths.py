"""Where repedit keeps its caches and looks for data; nothing here is created at import time."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """``override``, else ``$REPEDIT_CACHE``, else ``~/.cache/repedit``."""
    root = override or os.environ.get("REPEDIT_CACHE") or Path.home() / ".cache" / "repedit"
    return Path(root).expanduser()


def data_dir(override: str | os.PathLike | None = None) -> Path | None:
    """``override``, else ``$REPEDIT_DATA``, else None (callers name the variable in errors)."""
    root = override or os.environ.get("REPEDIT_DATA")
    return Path(root).expanduser() if root else None

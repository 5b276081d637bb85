"""Progress bars (rich) that vanish cleanly when disabled or when output is not a terminal."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class _NullProgress:
    def add_task(self, *args: Any, **kwargs: Any) -> int:
        return 0

    def update(self, *args: Any, **kwargs: Any) -> None:
        pass

    def advance(self, *args: Any, **kwargs: Any) -> None:
        pass


class _Progress(Progress):
    """A rich ``Progress`` whose tasks always have a ``status`` field (the status column)."""

    def add_task(self, description: str, *args: Any, **fields: Any) -> TaskID:
        fields.setdefault("status", "")
        return super().add_task(description, *args, **fields)


@contextlib.contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Any]:
    """A rich ``Progress`` with count, elapsed and ETA columns; a no-op object if disabled."""
    if not enabled:
        yield _NullProgress()
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    # stderr, so a command's --json output on stdout stays clean even when piped
    with _Progress(*columns, transient=False, console=Console(stderr=True)) as bar:
        yield bar

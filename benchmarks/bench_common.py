"""What the benchmark scripts share: where the data lives, and timing named phases of the
library by wrapping its functions where the caller looks them up.

The scripts run as ``python benchmarks/<name>.py``, which puts this folder on ``sys.path``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]


def add_set_option(parser: argparse.ArgumentParser, help: str) -> None:
    """``--set KEY=VALUE`` (repeatable) into ``args.overrides``, as ``repedit edit --set``
    (parse it with ``repedit.cli.common.parse_overrides``)."""
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help
    )


def default_data_dir() -> Path:
    """``$REPEDIT_DATA``, else ``../shared/data`` beside the repository (what CI passes)."""
    data = os.environ.get("REPEDIT_DATA")
    return Path(data).expanduser() if data else REPO.parent / "shared" / "data"


class PhaseTimer:
    """Wall time and calls per phase; a call inside another timed call counts only in the
    outermost one. On CUDA the device is synchronised around each timed call."""

    def __init__(self, device: torch.device, phases: Sequence[str]):
        self.device = device
        self.phases = tuple(phases)
        self.reset()
        self._depth = 0

    def reset(self) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(self.phases, 0.0)
        self.calls: dict[str, int] = dict.fromkeys(self.phases, 0)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def wrap(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self._depth:
                return fn(*args, **kwargs)
            self._depth += 1
            self.sync()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self.seconds[phase] += time.perf_counter() - t0
                self.calls[phase] += 1
                self._depth -= 1

        timed.__wrapped__ = fn  # type: ignore[attr-defined]
        return timed


@contextlib.contextmanager
def patched(timer: PhaseTimer, targets: Mapping[str, Sequence[tuple[Any, str]]]) -> Iterator[None]:
    """Replace each ``owner.attr`` (a module or class attribute) in ``targets`` ({phase:
    [(owner, attr)]}) by its timed wrapper while the block runs; restore all on exit."""
    saved: list[tuple[Any, str, Any]] = []
    try:
        for phase, pairs in targets.items():
            for owner, attr in pairs:
                original = getattr(owner, attr)
                saved.append((owner, attr, original))
                setattr(owner, attr, timer.wrap(phase, original))
        yield
    finally:
        for owner, attr, original in reversed(saved):
            setattr(owner, attr, original)


#: instruction-set flags that change which float kernels run (and so rounding and speed)
CPU_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


def cpu_flags() -> list[str]:
    """The ``CPU_FLAGS`` this machine's CPU reports (Linux ``/proc/cpuinfo``; [] elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    have = set(line.partition(":")[2].split())
    return [f for f in CPU_FLAGS if f in have]

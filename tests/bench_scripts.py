"""Load a ``benchmarks/`` script as a module, as ``python benchmarks/NAME.py`` runs it: with its
folder on ``sys.path`` (for ``bench_common``) while the module is in use."""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@contextlib.contextmanager
def benchmark_module(name: str) -> Iterator[ModuleType]:
    """``benchmarks/<name>.py`` imported fresh; ``sys.path`` is restored on exit."""
    script = BENCHMARKS / f"{name}.py"
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCHMARKS))
        spec = importlib.util.spec_from_file_location(name, script)
        assert spec is not None and spec.loader is not None, script
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module

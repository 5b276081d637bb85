"""The value optimisation's progress bar counts every request once, under both batchings."""

from __future__ import annotations

import contextlib

import pytest

import repedit.editors.values as values_module
from repedit.data.case import EditRequest
from repedit.editors import ValueHparams
from repedit.editors.values import optimise_values
from repedit.models.tiny import tiny_loaded

REQUESTS = tuple(
    EditRequest(f"{{}} number {i} was founded in", "Toyota", "Europe", case_id=str(i))
    for i in range(5)
)


class _Bar:
    def __init__(self) -> None:
        self.total: int | None = None
        self.advanced: list[int] = []

    def add_task(self, description: str, total: int) -> int:
        self.total = total
        return 0

    def advance(self, task: int, k: int) -> None:
        self.advanced.append(k)


@pytest.mark.parametrize("batching", ["stream", "fixed"])
def test_progress_counts_each_request_once(batching: str, monkeypatch: pytest.MonkeyPatch) -> None:
    bar = _Bar()
    shown: list[bool] = []

    @contextlib.contextmanager
    def fake(enabled: bool = True):
        shown.append(enabled)
        yield bar

    monkeypatch.setattr(values_module, "progress_bar", fake)
    # requests stop at different steps, so the stream reports them as they finish
    hp = ValueHparams(steps=6, lr=1.0, batching=batching, request_batch=2, group_tokens=40)
    optimise_values(
        tiny_loaded("llama"),
        REQUESTS,
        ("{}", "Rome. {}"),
        layer=0,
        site="mlp",
        hp=hp,
        progress=True,
    )
    assert shown == [True]
    assert bar.total == len(REQUESTS) and sum(bar.advanced) == len(REQUESTS)
    assert len([k for k in bar.advanced if k]) >= 2  # told as requests finish, not once at the end

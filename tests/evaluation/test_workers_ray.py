"""``repedit eval --ray``: the same sharding as Ray actors, on one local Ray (two CPUs) that
every test of this module shares, since starting Ray takes seconds."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from worker_runs import Inputs, case_ids, records, same_results

from repedit.evaluation.shard import CRASH_ENV

# before Ray is imported: keep the local node on the loopback address (see workers.py)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray")

ALL = ["1", "2", "3", "4"]


@pytest.fixture(scope="module")
def local_ray() -> Iterator[Any]:
    """A local Ray with two CPUs for the module (``--ray`` without an address uses it)."""
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        logging_level="warning",
    )
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    return Inputs(tmp_path_factory.mktemp("ray"))


@pytest.fixture(scope="module")
def single(inputs: Inputs) -> Path:
    out = inputs.root / "single"
    assert inputs.eval(out) == 0
    return out


def test_ray_actors_give_the_records_of_one_process(
    local_ray: Any, inputs: Inputs, single: Path
) -> None:
    out = inputs.root / "ray2"
    assert inputs.eval(out, "--ray", "--workers", "2") == 0
    assert case_ids(out) == ALL
    assert case_ids(out, "reference.jsonl") == case_ids(single, "reference.jsonl")
    assert same_results(single, out)


def test_killed_actor_case_is_retried_or_recorded(
    local_ray: Any, inputs: Inputs, single: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    once, always = inputs.root / "crash-once", inputs.root / "crash-always"
    monkeypatch.setenv(CRASH_ENV, f"2:1:{once}")
    retried = inputs.root / "ray-retried"
    assert inputs.eval(retried, "--ray", "--workers", "2") == 0
    assert len(list(once.iterdir())) == 1
    assert same_results(single, retried)

    monkeypatch.setenv(CRASH_ENV, f"2:99:{always}")
    failed = inputs.root / "ray-failed"
    assert inputs.eval(failed, "--ray", "--workers", "2") == 0
    assert len(list(always.iterdir())) == 2
    got = {str(r["case_id"]): r for r in records(failed)}
    assert sorted(got) == ALL and len(records(failed)) == 4
    assert got["2"]["error"]["type"] == "WorkerCrashed"
    assert all(got[k]["error"] is None for k in ("1", "3", "4"))

"""Key statistics shared between real processes: two that race compute once and both finish;
a run SIGKILLed at any of several points leaves only valid files, and the next run resumes.

Every child is a forked process (``childproc``) that loads the tiny model from disk and calls
``second_moments``; it reports through a JSON file.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from childproc import leftovers, spawn_child

import repedit.stats.second_moment as sm
from repedit.models import load_model
from repedit.stats import LocalTextCorpus, StatsKey, second_moments

pytestmark = pytest.mark.slow

SEQ_LEN = 32
N_TOKENS = 30 * SEQ_LEN
BATCH_TOKENS = 2 * SEQ_LEN  # two windows per forward: 15 batches
CHECKPOINT_TOKENS = 2 * BATCH_TOKENS  # a checkpoint every second batch: 7 of them
LAYERS = [1, 2]


def _job(model: Path, corpus: Path, cache: Path, layers: list[int], out: Path) -> None:
    """Child body: compute (or find) the statistics, write what happened to ``out``."""
    lm = load_model(str(model), device="cpu", dtype="float32", cache=cache)
    report: dict[str, Any] = {}
    got = second_moments(
        lm,
        layers,
        LocalTextCorpus(corpus),
        N_TOKENS,
        seq_len=SEQ_LEN,
        batch_tokens=BATCH_TOKENS,
        cache=cache,
        checkpoint_tokens=CHECKPOINT_TOKENS,
        progress=False,
        report=report,
    )
    sums = {str(k): float(v.matrix.sum()) for k, v in got.items()}
    out.write_text(json.dumps({"report": report, "sums": sums}, default=str))


def _keys(model: Path, corpus: Path, cache: Path) -> dict[int, StatsKey]:
    lm = load_model(str(model), device="cpu", dtype="float32", cache=cache)
    ident = LocalTextCorpus(corpus).identity
    return {layer: StatsKey(lm.fingerprint, layer, ident, N_TOKENS, SEQ_LEN) for layer in (1, 2, 3)}


def _assert_cache_valid(cache: Path, keys: dict[int, StatsKey]) -> list[Path]:
    """Every statistics file under a real (non-temporary) name passes the full check."""
    checked = []
    for key in keys.values():
        for path in (key.path(cache), key.partial_path(cache)):
            if path.exists():
                sm._read_checked(path, key)  # raises StatsCacheError if not valid
                checked.append(path)
            sidecar = path.with_suffix(".json")
            if sidecar.exists():
                assert json.loads(sidecar.read_text())["key"] == key.as_dict()
    stray = [
        p for p in cache.rglob("*.safetensors") if not p.name.startswith(".") and p not in checked
    ]
    assert not stray, f"unexpected statistics files: {stray}"
    return checked


def _wait_for(predicate: Any, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _paused_compute(marker: Path, go: Path) -> None:
    """Child setup: the first computation announces itself, then waits for ``go``."""
    original = sm._compute

    def paused(*args: Any, **kwargs: Any) -> Any:
        marker.touch()
        while not go.exists():
            time.sleep(0.02)
        return original(*args, **kwargs)

    sm._compute = paused  # type: ignore[assignment]


def test_two_processes_same_statistics_compute_once(
    tmp_path: Path, tiny_dir: Path, corpus_file: Path
) -> None:
    """A holds the lock mid-computation while B asks for the same keys: B waits, then reads
    A's finished file (it never sees a partial one), and both exit 0 with equal matrices."""
    cache = tmp_path / "cache"
    marker, go = tmp_path / "a-computing", tmp_path / "go"
    a_out, b_out = tmp_path / "a.json", tmp_path / "b.json"
    a = spawn_child(
        lambda: _job(tiny_dir, corpus_file, cache, LAYERS, a_out),
        tmp_path / "a.log",
        setup=lambda: _paused_compute(marker, go),
    )
    _wait_for(marker.exists, "A to start computing")
    b = spawn_child(lambda: _job(tiny_dir, corpus_file, cache, LAYERS, b_out), tmp_path / "b.log")
    _wait_for(lambda: "waiting" in b.text, "B to wait for A's lock")
    go.touch()
    assert a.wait() == 0, a.text
    assert b.wait() == 0, b.text
    ra, rb = json.loads(a_out.read_text()), json.loads(b_out.read_text())
    assert ra["report"]["computed_layers"] == LAYERS
    assert rb["report"]["computed_layers"] == []
    assert rb["report"]["cached_layers"] == LAYERS
    assert ra["sums"] == rb["sums"]
    keys = _keys(tiny_dir, corpus_file, cache)
    assert sorted(_assert_cache_valid(cache, keys)) == sorted(keys[x].path(cache) for x in LAYERS)
    assert leftovers(cache) == []


def test_overlapping_layer_sets_share_the_common_layer(
    tmp_path: Path, tiny_dir: Path, corpus_file: Path
) -> None:
    """Two processes started together for layers [1, 2] and [2, 3]: layer 2 is computed by
    exactly one of them, whichever locks it first; every file is valid afterwards."""
    cache = tmp_path / "cache"
    outs = [tmp_path / "a.json", tmp_path / "b.json"]
    children = [
        spawn_child(lambda: _job(tiny_dir, corpus_file, cache, [1, 2], outs[0]), tmp_path / "a"),
        spawn_child(lambda: _job(tiny_dir, corpus_file, cache, [2, 3], outs[1]), tmp_path / "b"),
    ]
    for child in children:
        assert child.wait() == 0, child.text
    reports = [json.loads(o.read_text()) for o in outs]
    computed = [layer for r in reports for layer in r["report"]["computed_layers"]]
    assert sorted(computed) == [1, 2, 3]
    assert reports[0]["sums"]["2"] == reports[1]["sums"]["2"]
    _assert_cache_valid(cache, _keys(tiny_dir, corpus_file, cache))


# checkpoints write 4 files (layer 1 .safetensors, .json, layer 2 .safetensors, .json), 7 times;
# the final files are writes 29-32
KILL_POINTS = [
    "stats.batch:1",  # after the first forward, before any checkpoint
    "stats.batch:7",  # mid-way: three checkpoints written, one batch past the last
    "io.write:1",  # the first checkpoint, cut halfway through its first file
    "io.write:3",  # the first checkpoint, layer 1 done, layer 2 cut
    "io.write:29",  # the final file of layer 1 cut
    "io.write:31",  # layer 1 final, layer 2's final file cut
]


@pytest.fixture(scope="module")
def reference(tiny_dir: Path, corpus_file: Path, tmp_path_factory: pytest.TempPathFactory):
    """The statistics computed in one go, without any cache."""
    cache = tmp_path_factory.mktemp("ref-cache")
    lm = load_model(str(tiny_dir), device="cpu", dtype="float32", cache=cache)
    got = second_moments(
        lm,
        LAYERS,
        LocalTextCorpus(corpus_file),
        N_TOKENS,
        seq_len=SEQ_LEN,
        batch_tokens=BATCH_TOKENS,
        use_cache=False,
        progress=False,
    )
    return lm, got


@pytest.mark.parametrize("point", KILL_POINTS)
def test_killed_stats_run_leaves_valid_files_and_resumes(
    point: str, tmp_path: Path, tiny_dir: Path, corpus_file: Path, reference: Any
) -> None:
    cache = tmp_path / "cache"
    out = tmp_path / "out.json"
    child = spawn_child(
        lambda: _job(tiny_dir, corpus_file, cache, LAYERS, out),
        tmp_path / "child.log",
        env={"REPEDIT_TEST_KILL_AT": point},
    )
    assert child.wait() == -9, f"the kill point {point} was never reached:\n{child.text}"
    assert not out.exists()
    keys = _keys(tiny_dir, corpus_file, cache)
    _assert_cache_valid(cache, keys)  # whatever is there under a real name is whole

    lm, expected = reference
    report: dict[str, Any] = {}
    got = second_moments(
        lm,
        LAYERS,
        LocalTextCorpus(corpus_file),
        N_TOKENS,
        seq_len=SEQ_LEN,
        batch_tokens=BATCH_TOKENS,
        cache=cache,
        checkpoint_tokens=CHECKPOINT_TOKENS,
        progress=False,
        report=report,
    )
    if point.startswith("io.write") and int(point.split(":")[1]) > 4:
        assert report["resumed_tokens"] > 0 or report["cached_layers"], report
    for layer in LAYERS:
        assert got[layer].n_tokens == N_TOKENS
        # resumed sums add the same batches in the same order as one uninterrupted run
        torch.testing.assert_close(got[layer].matrix, expected[layer].matrix, rtol=1e-12, atol=0)
    final = _assert_cache_valid(cache, keys)
    assert sorted(final) == sorted(keys[x].path(cache) for x in LAYERS)  # no partials remain

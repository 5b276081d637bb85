"""A disk that fills up, for real: the child runs under ``RLIMIT_FSIZE`` with ``SIGXFSZ``
ignored, so the kernel fails any write past the limit with ``EFBIG`` (in Python, in torch and
in safetensors' Rust code alike). ``repedit stats``, ``repedit edit --save`` and ``repedit edit
--export`` then exit 2 with one clear error line and no traceback, the files that were there
before are unchanged byte for byte, and no temporary file or directory is left behind.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from childproc import files_under, leftovers, run_child

pytestmark = pytest.mark.slow

KIB = 1024


def _model(model: Path, cache: Path) -> list[str]:
    return [
        *("--model", str(model), "--device", "cpu", "--dtype", "float32"),
        "--cache-dir",
        str(cache),
    ]


def _edit(model: Path, corpus: Path, cache: Path, *extra: str) -> list[str]:
    return [
        "edit",
        *_model(model, cache),
        *("--subject", "Slovenia", "--prompt", "{} is located in the continent of"),
        *("--target", "Antarctica", "--set", "value.steps=2", "--new-tokens", "2"),
        *("--corpus", str(corpus), "--stats-tokens", "960"),
        *extra,
    ]


def _assert_clear_failure(code: int, text: str, path: Path) -> None:
    assert code == 2, text
    assert "Traceback" not in text, text
    assert re.search(rf"error:.*cannot write {re.escape(str(path))}", " ".join(text.split())), text


@pytest.fixture(scope="module")
def earlier(tiny_dir: Path, corpus_file: Path, tmp_path_factory: pytest.TempPathFactory):
    """Files from an earlier, successful run: its cache, an edit file and an export."""
    root = tmp_path_factory.mktemp("earlier")
    cache, save, export = root / "cache", root / "edit.safetensors", root / "export"
    argv = _edit(tiny_dir, corpus_file, cache, "--save", str(save), "--export", str(export))
    code, text = run_child(argv, root / "log")
    assert code == 0, text
    return root, cache, save, export


def test_stats_on_a_full_disk(
    tmp_path: Path, tiny_dir: Path, corpus_file: Path, earlier: Any
) -> None:
    """Each layer's file is 128 KiB (d_mlp 128, float64); the limit is 64 KiB."""
    _, cache, _, _ = earlier
    before = files_under(cache)
    argv = [
        "stats",
        *_model(tiny_dir, cache),
        *("--layers", "2,3", "--corpus", str(corpus_file), "--tokens", "960", "--seq-len", "32"),
    ]
    code, text = run_child(argv, tmp_path / "log", fsize=64 * KIB)
    _assert_clear_failure(code, text, cache / "stats")
    after = files_under(cache)
    assert {k: v for k, v in after.items() if k in before} == before  # earlier files intact
    added = set(after) - set(before)
    assert all(name.endswith(".lock") for name in added), added  # no cache file, no temp
    assert leftovers(cache) == []


def test_edit_save_on_a_full_disk(
    tmp_path: Path, tiny_dir: Path, corpus_file: Path, earlier: Any
) -> None:
    """An edit file is over 32 KiB (one 128x64 float32 delta); the limit is 16 KiB."""
    root, cache, save, _ = earlier
    old = save.read_bytes()
    code, text = run_child(
        _edit(tiny_dir, corpus_file, cache, "--save", str(save)), tmp_path / "log", fsize=16 * KIB
    )
    _assert_clear_failure(code, text, save)
    assert save.read_bytes() == old
    assert leftovers(root) == []


def test_export_on_a_full_disk(
    tmp_path: Path, tiny_dir: Path, corpus_file: Path, earlier: Any
) -> None:
    """The tiny model's weights are ~850 KiB; the limit is 256 KiB."""
    root, cache, _, export = earlier
    old = files_under(export)
    code, text = run_child(
        _edit(tiny_dir, corpus_file, cache, "--export", str(export)),
        tmp_path / "log",
        fsize=256 * KIB,
    )
    _assert_clear_failure(code, text, export)
    assert files_under(export) == old
    assert leftovers(root) == []

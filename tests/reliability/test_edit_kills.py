"""``repedit edit`` with ``--save``, REP's ``--rep-save`` and ``--export`` SIGKILLed at several
points: each target is afterwards the file or directory that was there before (byte for
byte), or absent, or the new one complete; never a half-written file under the real name.

Every run is the command line in a forked child on the tiny model, with its key statistics
already cached, so the only writes are the ones under test.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
from childproc import files_under, run_child

from repedit.editors import EditResult
from repedit.rep import load_adapters

pytestmark = pytest.mark.slow

VALUE_STEPS, REP_STEPS = 4, 8


def _argv(model: Path, corpus: Path, cache: Path, *extra: str) -> list[str]:
    return [
        "edit",
        *("--model", str(model), "--device", "cpu", "--dtype", "float32"),
        *("--subject", "Slovenia", "--prompt", "{} is located in the continent of"),
        *("--target", "Antarctica", "--target-true", "Europe"),
        *("--set", f"value.steps={VALUE_STEPS}", "--new-tokens", "2"),
        *("--corpus", str(corpus), "--stats-tokens", "960", "--cache-dir", str(cache)),
        *extra,
    ]


def _rep(save: Path, rep_save: Path) -> list[str]:
    return [
        *("--rep", "--rep-set", f"steps={REP_STEPS}"),
        *("--save", str(save), "--rep-save", str(rep_save)),
    ]


ENV = {"REPEDIT_DATA": ""}  # long-context passages come from --corpus: no outside file is read


def _kill_at_optimizer_step(n: int) -> None:
    """Child setup: SIGKILL after the ``n``-th step of any torch optimiser. The edit's value
    optimisation steps its own row-wise Adam (no torch optimiser), so these are REP's steps."""
    count = [0]

    def hook(*_: Any) -> None:
        count[0] += 1
        if count[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)

    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(hook)


@pytest.fixture(scope="module")
def reference(tiny_dir: Path, corpus_file: Path, tmp_path_factory: pytest.TempPathFactory):
    """One uninterrupted edit + REP run that saves both files and exports over a directory
    holding a stale file: ``(root, cache, edit file, adapter file, export dir)``."""
    root = tmp_path_factory.mktemp("edit-ref")
    cache, save, rep_save, export = (root / n for n in ("cache", "e", "e.rep", "export"))
    export.mkdir()
    (export / "stale.bin").write_bytes(b"from an older export")
    argv = _argv(tiny_dir, corpus_file, cache, *_rep(save, rep_save), "--export", str(export))
    code, text = run_child(argv, root / "log", env=ENV)
    assert code == 0, text
    assert not (export / "stale.bin").exists(), "an export replaces the whole directory"
    return root, cache, save, rep_save, export


def _valid_edit(path: Path) -> None:
    EditResult.load(path)


def _valid_adapters(path: Path) -> None:
    assert load_adapters(path)


# name: (argv extra given (save, rep_save, export), env, setup, what each target holds after)
#   "old": byte-identical to before; "new": a complete new file; "absent"
POINTS: dict[str, tuple[Any, dict[str, str], Any, dict[str, str]]] = {
    "REP: mid value optimisation": (
        lambda s, r, e: _rep(s, r),
        {"REPEDIT_TEST_KILL_AT": "values.step:2"},
        None,
        {"save": "old", "rep": "old"},
    ),
    "REP: mid training": (
        lambda s, r, e: _rep(s, r),
        {},
        lambda: _kill_at_optimizer_step(REP_STEPS // 2),
        {"save": "new", "rep": "old"},
    ),
    "REP: mid-write of --save": (
        lambda s, r, e: _rep(s, r),
        {"REPEDIT_TEST_KILL_AT": "io.write:1"},
        None,
        {"save": "old", "rep": "old"},
    ),
    "REP: mid-write of --rep-save": (
        lambda s, r, e: _rep(s, r),
        {"REPEDIT_TEST_KILL_AT": "io.write:2"},
        None,
        {"save": "new", "rep": "old"},
    ),
    "export: weights written, tokenizer not": (
        lambda s, r, e: ["--export", str(e)],
        {"REPEDIT_TEST_KILL_AT": "export.weights:1"},
        None,
        {"export": "old"},
    ),
    "export: complete, before the rename": (
        lambda s, r, e: ["--export", str(e)],
        {"REPEDIT_TEST_KILL_AT": "export.rename:1"},
        None,
        {"export": "old"},
    ),
    "export: old moved aside, new not yet in place": (
        lambda s, r, e: ["--export", str(e)],
        {"REPEDIT_TEST_KILL_AT": "export.swap:1"},
        None,
        {"export": "absent"},
    ),
    "REP export: mid-write of its adapter file": (
        lambda s, r, e: ["--rep", "--rep-set", f"steps={REP_STEPS}", "--export", str(e)],
        {"REPEDIT_TEST_KILL_AT": "io.write:1"},
        None,
        {"export": "old"},
    ),
}


@pytest.mark.parametrize("point", list(POINTS))
def test_killed_edit_leaves_old_absent_or_complete(
    point: str, tmp_path: Path, tiny_dir: Path, corpus_file: Path, reference: Any
) -> None:
    _, ref_cache, ref_save, ref_rep, ref_export = reference
    extra, env, setup, expect = POINTS[point]
    cache = tmp_path / "cache"
    shutil.copytree(ref_cache, cache)
    save, rep_save, export = tmp_path / "e", tmp_path / "e.rep", tmp_path / "export"
    shutil.copyfile(ref_save, save)  # an earlier edit at the same paths
    shutil.copyfile(ref_rep, rep_save)
    shutil.copytree(ref_export, export)
    before = {"save": save.read_bytes(), "rep": rep_save.read_bytes()}
    old_export = files_under(export)

    argv = _argv(tiny_dir, corpus_file, cache, *extra(save, rep_save, export))
    code, text = run_child(argv, tmp_path / "log", env={**ENV, **env}, setup=setup)
    assert code == -signal.SIGKILL, f"{point} was never reached:\n{text}"

    for name, path, check in (("save", save, _valid_edit), ("rep", rep_save, _valid_adapters)):
        if name not in expect:
            continue
        if expect[name] == "old":
            assert path.read_bytes() == before[name], f"{path} changed"
        else:
            assert path.read_bytes() != before[name]
            check(path)  # the new file is whole
    if "export" in expect:
        if expect["export"] == "old":
            assert files_under(export) == old_export
        else:
            assert not export.exists()
    # no name a user or loader would open holds a partial file
    visible = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert sorted(p.name for p in visible) == sorted(
        {"cache", "log", "e", "e.rep"} | ({"export"} if export.exists() else set())
    )

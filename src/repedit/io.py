"""Atomic file writes and safetensors helpers: caches and saved edits are never half-written.

A write goes to a temporary file beside the target, is flushed to disk (fsync), and only then
renamed over the target, so a reader sees the old file or the new one, never a mixture, even
after a crash or a full disk. A failed write raises :class:`~repedit.errors.WriteError` and
leaves no temporary file behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from repedit.errors import WriteError
from repedit.faults import kill_point


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's (or a directory's) data to disk; a no-op where the OS cannot."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if Path(path).is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):  # some filesystems refuse fsync on directories
            os.fsync(fd)
    finally:
        os.close(fd)


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or exc.__class__.__name__


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    An ``OSError`` while writing (a full disk, a file-size limit) becomes a ``WriteError``
    naming ``path``; the temporary file is removed and ``path`` keeps its old content.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise WriteError(f"cannot write {target}: {_reason(exc)}") from None
    os.close(fd)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results and caches are meant to be shared
        yield Path(tmp)
        kill_point("io.write", Path(tmp))
        fsync_path(tmp)
        os.replace(tmp, target)
        fsync_path(target.parent)
    except OSError as exc:
        raise WriteError(f"cannot write {target}: {_reason(exc)}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


#: what writing a model directory may raise when the disk fills (torch, safetensors, the OS)
WRITE_FAILURES = (OSError, RuntimeError, SafetensorError)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``path``; on success it takes ``path``'s place.

    Everything in it is flushed to disk before the rename. An existing ``path`` is moved aside
    and deleted only once the new directory is in place: a crash leaves the old directory, the
    new one, or (between the two renames) none, never a mixture. A failure while writing
    raises ``WriteError`` and removes the temporary directory.
    """
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise WriteError(f"cannot write the directory {target}: a file of that name exists")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as exc:
        raise WriteError(f"cannot write {target}: {_reason(exc)}") from None
    try:
        os.chmod(tmp, 0o755)
        yield tmp
        for file in sorted(tmp.rglob("*")):
            fsync_path(file)
        fsync_path(tmp)
        kill_point("export.rename")
        _swap_in(tmp, target)
    except WRITE_FAILURES as exc:
        raise WriteError(f"cannot write {target}: {_reason(exc)}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``, replacing an existing directory there."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        os.replace(target, old)  # onto the empty placeholder
        kill_point("export.swap")
    os.replace(new, target)
    fsync_path(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_safetensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]
) -> None:
    """Save tensors with JSON-encoded metadata (under the single key ``repedit``), atomically."""
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        try:
            save_file(flat, str(tmp), metadata={"repedit": json.dumps(metadata, sort_keys=True)})
        except SafetensorError as exc:  # I/O failures in safetensors' Rust code
            raise WriteError(f"cannot write {path}: {_reason(exc)}") from None


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load tensors and the ``repedit`` metadata written by ``write_safetensors``."""
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("repedit", "{}"))
        if not isinstance(meta, dict):
            raise ValueError(f"{path}: its repedit metadata is not a JSON object")
        for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            tensors[key] = f.get_tensor(key)
    return tensors, meta

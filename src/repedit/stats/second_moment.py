"""The key second moment ``C = E[k kᵀ]`` per layer: computed once, cached, solved against.

Keys are the inputs of each layer's MLP down-projection at every non-pad token. The forward
pass stops at the deepest requested down-projection's input (that projection never runs),
outer products are summed per batch with a float32 GEMM and accumulated across batches in
float64, and partial sums are checkpointed so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from repedit.errors import StatsCacheError
from repedit.faults import kill_point
from repedit.io import read_safetensors, write_json, write_safetensors
from repedit.locks import file_lock
from repedit.models.hooks import Hooks
from repedit.models.loading import LoadedModel
from repedit.models.precision import Precision, compute_dtype, precision_context
from repedit.paths import cache_dir
from repedit.progress import progress_bar
from repedit.stats.corpus import Corpus, resolve_corpus, token_windows

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclass
class SecondMoment:
    """``C`` for one layer (float64, [d_mlp, d_mlp]) and how it was obtained."""

    layer: int
    matrix: torch.Tensor
    n_tokens: int
    meta: dict[str, Any] = field(default_factory=dict)
    _chol: dict[tuple[str, float, float], torch.Tensor] = field(default_factory=dict, repr=False)

    def cholesky(
        self, *, device: torch.device | str = "cpu", scale: float = 1.0, ridge: float = 0.0
    ) -> torch.Tensor:
        """Lower Cholesky factor of ``scale·C + ridge·I`` (float64, cached per device/scale)."""
        key = (str(device), float(scale), float(ridge))
        if key not in self._chol:
            a = self.matrix.to(device) * scale
            if ridge:
                a = a + ridge * torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
            factor, info = torch.linalg.cholesky_ex(a)
            if info.item() != 0:
                jitter = 1e-6 * a.diagonal().mean().item()
                warnings.warn(
                    f"C at layer {self.layer} is not positive definite (rank-deficient: "
                    f"{self.n_tokens} tokens for d={a.shape[0]}); adding {jitter:.3g}·I",
                    stacklevel=2,
                )
                factor = torch.linalg.cholesky(
                    a + jitter * torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
                )
            self._chol[key] = factor
        return self._chol[key]

    def solve(self, rhs: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        """``(scale·C)⁻¹ rhs`` in float64 via Cholesky; rhs is [d] or [d, n]."""
        factor = self.cholesky(device=rhs.device, scale=scale)
        vec = rhs.dim() == 1
        x = torch.cholesky_solve(rhs.to(torch.float64).reshape(rhs.shape[0], -1), factor)
        return x.reshape(-1) if vec else x

    def condition_number(self) -> float:
        ev = torch.linalg.eigvalsh(self.matrix)
        return float(ev[-1] / ev[0].clamp_min(1e-300))


@dataclass(frozen=True)
class StatsKey:
    """Everything a cached ``C`` depends on."""

    fingerprint: str
    layer: int
    corpus: str
    n_tokens: int
    seq_len: int
    #: what the forwards computed in (:func:`~repedit.models.precision.compute_dtype`); the
    #: fingerprint cannot tell, since it hashes weights rounded to bfloat16
    dtype: str = "float32"

    @classmethod
    def of(
        cls,
        lm: LoadedModel,
        layer: int,
        corpus: str,
        n_tokens: int,
        seq_len: int,
        precision: Precision = "model",
    ) -> StatsKey:
        """The key of ``C`` for ``lm``'s layer from ``corpus`` (its identity) at ``precision``."""
        dtype = compute_dtype(lm.dtype, precision)
        return cls(lm.fingerprint, layer, corpus, n_tokens, seq_len, dtype)

    def as_dict(self) -> dict[str, Any]:
        out = {
            "fingerprint": self.fingerprint,
            "layer": self.layer,
            "corpus": self.corpus,
            "n_tokens": self.n_tokens,
            "seq_len": self.seq_len,
            "format": FORMAT_VERSION,
        }
        if self.dtype != "float32":  # float32 files written before the field keep their key
            out["dtype"] = self.dtype
        return out

    def path(self, root: Path) -> Path:
        slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.corpus)[:80]
        return (
            root
            / "stats"
            / self.fingerprint
            / slug
            / f"layer{self.layer}-tokens{self.n_tokens}-seq{self.seq_len}{self._dtype_tag}"
            ".safetensors"
        )

    @property
    def _dtype_tag(self) -> str:
        return "" if self.dtype == "float32" else "-" + self.dtype.replace("+", "-")

    def partial_path(self, root: Path) -> Path:
        return self.path(root).with_suffix(".partial.safetensors")


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def _read_checked(path: Path, key: StatsKey) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a cache file and verify key, shapes and checksum; raise StatsCacheError if bad."""
    try:
        tensors, meta = read_safetensors(path)
    except Exception as exc:  # safetensors raises several types on truncated/garbled files
        raise StatsCacheError(f"{path} is unreadable ({exc.__class__.__name__}: {exc})") from exc
    if meta.get("key") != key.as_dict():
        raise StatsCacheError(f"{path} was written for {meta.get('key')}, not {key.as_dict()}")
    acc = tensors.get("sum")
    if acc is None or acc.dim() != 2 or acc.shape[0] != acc.shape[1]:
        raise StatsCacheError(f"{path} has no square 'sum' tensor")
    if meta.get("sha256") != _digest(acc):
        raise StatsCacheError(f"{path} fails its checksum (corrupt data)")
    if not torch.isfinite(acc).all():
        raise StatsCacheError(f"{path} contains non-finite values")
    return tensors, meta


def _write(
    path: Path, key: StatsKey, acc: torch.Tensor, count: int, windows: int, extra: dict[str, Any]
) -> None:
    meta = {
        "key": key.as_dict(),
        "count": count,
        "windows": windows,
        "sha256": _digest(acc),
        **extra,
    }
    write_safetensors(path, {"sum": acc}, meta)
    write_json(path.with_suffix(".json"), meta)


def _batched(it: Iterable[list[int]], size: int) -> Iterable[list[list[int]]]:
    it = iter(it)
    while batch := list(itertools.islice(it, size)):
        yield batch


def second_moments(
    lm: LoadedModel,
    layers: Sequence[int],
    corpus: Corpus | str,
    n_tokens: int,
    *,
    seq_len: int = 256,
    batch_tokens: int = 4096,
    cache: str | Path | None = None,
    use_cache: bool = True,
    checkpoint_tokens: int = 100_000,
    progress: bool = True,
    report: dict[str, Any] | None = None,
    precision: Precision = "model",
) -> dict[int, SecondMoment]:
    """``C`` for each layer in ``layers``, from the first ``n_tokens`` tokens of ``corpus``.

    Cached files are verified (key, shape, checksum) before use; a bad one is recomputed with a
    warning. Missing layers are computed under a per-key file lock, so two processes asking for
    the same statistics compute them once: the second waits, then reads the first one's file.
    ``report`` (if given) receives tokens, seconds and tokens/s of the computation.
    ``precision="bfloat16"`` runs the forwards under bfloat16 autocast (keys are accumulated
    in float64 either way); it is part of the cache key.
    """
    if isinstance(corpus, str):
        corpus = resolve_corpus(corpus, lm)
    if n_tokens <= 0:
        raise ValueError("n_tokens must be positive")
    root = cache_dir(cache)
    for layer in layers:
        lm.arch.check_layer(layer)
    keys = {
        layer: StatsKey.of(lm, layer, corpus.identity, n_tokens, seq_len, precision)
        for layer in sorted(set(layers))
    }
    result, seen = _read_cached(keys, root, {}) if use_cache else ({}, {})
    todo = {layer: key for layer, key in keys.items() if layer not in result}
    if todo and use_cache:
        with _locked(todo, root):
            # another process may have written some of them while this one waited
            found, _ = _read_cached(todo, root, seen)
            result.update(found)
            todo = {layer: key for layer, key in todo.items() if layer not in found}
            if report is not None:
                report.update(cached_layers=sorted(result), computed_layers=sorted(todo))
            if todo:
                job = _Job(lm, corpus, n_tokens, seq_len, batch_tokens, root, True, precision)
                result.update(_compute(job, todo, checkpoint_tokens, progress, report))
    elif todo:
        if report is not None:
            report.update(cached_layers=[], computed_layers=sorted(todo))
        job = _Job(lm, corpus, n_tokens, seq_len, batch_tokens, root, False, precision)
        result.update(_compute(job, todo, checkpoint_tokens, progress, report))
    elif report is not None:
        report.update(cached_layers=sorted(result), computed_layers=[])
    return {layer: result[layer] for layer in sorted(set(layers))}


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def _read_cached(
    keys: dict[int, StatsKey], root: Path, skip: dict[int, tuple[int, int] | None]
) -> tuple[dict[int, SecondMoment], dict[int, tuple[int, int] | None]]:
    """Valid cache files among ``keys``, and the (mtime, size) of each miss.

    A file whose (mtime, size) equals ``skip``'s (already found bad) is not read again; any
    other bad file is ignored with a warning, never loaded.
    """
    found: dict[int, SecondMoment] = {}
    missed: dict[int, tuple[int, int] | None] = {}
    for layer, key in keys.items():
        path = key.path(root)
        stat = _stat(path)
        missed[layer] = stat
        if stat is None or (layer in skip and skip[layer] == stat):
            continue
        try:
            tensors, meta = _read_checked(path, key)
        except StatsCacheError as exc:
            warnings.warn(f"ignoring bad statistics cache, recomputing: {exc}", stacklevel=3)
            continue
        found[layer] = SecondMoment(
            layer,
            tensors["sum"] / meta["count"],
            meta["count"],
            {**meta, "cached": True, "path": str(path)},
        )
        del missed[layer]
    return found, missed


@contextlib.contextmanager
def _locked(keys: dict[int, StatsKey], root: Path) -> Iterator[None]:
    """Hold every key's lock file (in layer order, so two processes never deadlock)."""
    with contextlib.ExitStack() as stack:
        for layer, key in sorted(keys.items()):
            path = key.path(root).with_suffix(".lock")

            def waiting(layer: int = layer) -> None:
                log.warning(
                    "layer %d: another process is computing these key statistics; waiting", layer
                )

            stack.enter_context(file_lock(path, on_wait=waiting))
        yield


@dataclass(frozen=True)
class _Job:
    """What one computation reads from and writes to."""

    lm: LoadedModel
    corpus: Corpus
    n_tokens: int
    seq_len: int
    batch_tokens: int
    root: Path
    use_cache: bool
    precision: Precision = "model"


@dataclass
class _Sums:
    """Running sums per layer: ``acc`` (float64 Σ kkᵀ), tokens ``count``ed, windows ``done``."""

    acc: dict[int, torch.Tensor]
    count: dict[int, int]
    done: dict[int, int]

    @classmethod
    def start(cls, job: _Job, keys: dict[int, StatsKey]) -> _Sums:
        """Zeros, or each layer's checkpoint where a valid one exists."""
        d = job.lm.arch.d_mlp
        sums = cls(
            {layer: torch.zeros(d, d, dtype=torch.float64) for layer in keys},
            dict.fromkeys(keys, 0),
            dict.fromkeys(keys, 0),
        )
        if not job.use_cache:
            return sums
        for layer, key in keys.items():
            part = key.partial_path(job.root)
            if not part.exists():
                continue
            try:
                tensors, meta = _read_checked(part, key)
            except StatsCacheError as exc:
                warnings.warn(f"ignoring bad partial statistics: {exc}", stacklevel=4)
                continue
            sums.acc[layer], sums.count[layer] = tensors["sum"], meta["count"]
            sums.done[layer] = meta["windows"]
            log.info("layer %d: resuming after %d tokens", layer, sums.count[layer])
        return sums

    @property
    def seen(self) -> int:
        """Tokens counted by the slowest layer."""
        return min(self.count.values())

    def checkpoint(self, job: _Job, keys: dict[int, StatsKey]) -> None:
        for layer, key in keys.items():
            path = key.partial_path(job.root)
            _write(path, key, self.acc[layer], self.count[layer], self.done[layer], {})


def _padded(batch: list[list[int]], budget: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` for the windows of ``batch`` cut to ``budget`` tokens in all."""
    kept = []
    for w in batch:
        take = min(len(w), budget)
        if take <= 0:
            break
        kept.append(w[:take])
        budget -= take
    width = max(len(w) for w in kept)
    ids = torch.full((len(kept), width), pad, dtype=torch.long)
    mask = torch.zeros((len(kept), width), dtype=torch.long)
    for i, w in enumerate(kept):
        ids[i, : len(w)] = torch.tensor(w)
        mask[i, : len(w)] = 1
    return ids, mask


def _accumulate(
    lm: LoadedModel,
    keys: dict[int, StatsKey],
    ids: torch.Tensor,
    mask: torch.Tensor,
    first: int,
    sums: _Sums,
) -> None:
    """One forward pass over windows ``first, first+1, …``; add their keys to ``sums``.

    A layer that resumed from a later checkpoint than the others skips the rows it has.
    """
    modules = {layer: lm.arch.down_proj(layer) for layer in keys}
    rows, width = ids.shape
    d = lm.arch.d_mlp
    with torch.inference_mode(), Hooks() as hooks:
        for layer, module in modules.items():
            hooks.capture(str(layer), module)
        hooks.stop_before(modules[max(keys)])  # its input is all we need
        hooks.run(
            lm.model,
            input_ids=ids.to(lm.device),
            attention_mask=mask.to(lm.device),
            use_cache=False,
        )
        for layer in keys:
            skip = max(0, sums.done[layer] - first)
            if skip >= rows:
                continue
            k = hooks[str(layer)].float().reshape(rows, width, d)[skip:].reshape(-1, d)
            k = k[mask.bool()[skip:].reshape(-1).to(k.device)]
            sums.acc[layer] += (k.T @ k).to("cpu", torch.float64)
            sums.count[layer] += k.shape[0]
            sums.done[layer] = first + rows


def _compute(
    job: _Job,
    keys: dict[int, StatsKey],
    checkpoint_tokens: int,
    progress: bool,
    report: dict[str, Any] | None,
) -> dict[int, SecondMoment]:
    """Accumulate ``C`` for ``keys`` (resuming from checkpoints), then write and return it."""
    lm, n_tokens = job.lm, job.n_tokens
    sums = _Sums.start(job, keys)
    resumed = sums.seen
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    window_index = min(sums.done.values())
    windows = token_windows(job.corpus, lm.tokenizer, job.seq_len)
    last_checkpoint = resumed
    t0, computed = time.perf_counter(), 0
    with progress_bar(progress) as bar:
        task = bar.add_task("key statistics", total=n_tokens, completed=resumed)
        per_batch = max(1, job.batch_tokens // job.seq_len)
        for batch in _batched(itertools.islice(windows, window_index, None), per_batch):
            if sums.seen >= n_tokens:
                break
            ids, mask = _padded(batch, n_tokens - sums.seen, pad)
            with precision_context(lm.device, job.precision):
                _accumulate(lm, keys, ids, mask, window_index, sums)
            window_index += ids.shape[0]
            computed += int(mask.sum())
            bar.update(task, completed=sums.seen)
            kill_point("stats.batch")
            due = sums.seen - last_checkpoint >= checkpoint_tokens
            if job.use_cache and due and sums.seen < n_tokens:
                sums.checkpoint(job, keys)
                last_checkpoint = sums.seen
    seconds = time.perf_counter() - t0
    if sums.seen < n_tokens:
        warnings.warn(
            f"corpus {job.corpus.identity} ran out after {sums.seen} of {n_tokens} tokens; "
            "the statistics use what there was",
            stacklevel=4,
        )
    rate = computed / seconds if seconds > 0 else float("inf")
    if report is not None:
        report.update(tokens=computed, resumed_tokens=resumed, seconds=seconds, tokens_per_s=rate)
    return _finish(job, keys, sums, rate)


def _finish(
    job: _Job, keys: dict[int, StatsKey], sums: _Sums, rate: float
) -> dict[int, SecondMoment]:
    """Write each finished layer's cache file (dropping its checkpoint) and build the results."""
    out: dict[int, SecondMoment] = {}
    short = sums.seen < job.n_tokens  # a corpus shorter than n_tokens: the file records the count
    for layer, key in keys.items():
        extra = {"tokens_per_s": rate, "computed_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        acc, count = sums.acc[layer], sums.count[layer]
        if job.use_cache and (count == job.n_tokens or short):
            _write(key.path(job.root), key, acc, count, sums.done[layer], extra)
            key.partial_path(job.root).unlink(missing_ok=True)
            key.partial_path(job.root).with_suffix(".json").unlink(missing_ok=True)
        meta = {"key": key.as_dict(), "cached": False, **extra}
        out[layer] = SecondMoment(layer, acc / max(count, 1), count, meta)
    return out

"""The key second moment ``C = E[k kᵀ]`` per layer: computed once, cached, solved against.

Keys are the inputs of each layer's MLP down-projection at every non-pad token. The forward
pass stops at the deepest requested down-projection's input (that projection never runs),
outer products are summed per batch with a float32 GEMM and accumulated across batches in
float64, and partial sums are checkpointed so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from repedit.errors import StatsCacheError
from repedit.io import read_safetensors, write_json, write_safetensors
from repedit.models.hooks import Hooks
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

    def as_dict(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "layer": self.layer,
            "corpus": self.corpus,
            "n_tokens": self.n_tokens,
            "seq_len": self.seq_len,
            "format": FORMAT_VERSION,
        }

    def path(self, root: Path) -> Path:
        slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.corpus)[:80]
        return (
            root
            / "stats"
            / self.fingerprint
            / slug
            / f"layer{self.layer}-tokens{self.n_tokens}-seq{self.seq_len}.safetensors"
        )

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
    lm: Any,
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
) -> dict[int, SecondMoment]:
    """``C`` for each layer in ``layers``, from the first ``n_tokens`` tokens of ``corpus``.

    Cached files are verified (key, shape, checksum) before use; a bad one is recomputed with a
    warning. ``report`` (if given) receives tokens, seconds and tokens/s of the computation.
    """
    if isinstance(corpus, str):
        corpus = resolve_corpus(corpus, lm)
    if n_tokens <= 0:
        raise ValueError("n_tokens must be positive")
    root = cache_dir(cache)
    for layer in layers:
        lm.arch.check_layer(layer)
    keys = {
        layer: StatsKey(lm.fingerprint, layer, corpus.identity, n_tokens, seq_len)
        for layer in sorted(set(layers))
    }
    result: dict[int, SecondMoment] = {}
    todo: dict[int, StatsKey] = {}
    for layer, key in keys.items():
        path = key.path(root)
        if use_cache and path.exists():
            try:
                tensors, meta = _read_checked(path, key)
                result[layer] = SecondMoment(
                    layer,
                    tensors["sum"] / meta["count"],
                    meta["count"],
                    {**meta, "cached": True, "path": str(path)},
                )
                continue
            except StatsCacheError as exc:
                warnings.warn(f"ignoring bad statistics cache, recomputing: {exc}", stacklevel=2)
        todo[layer] = key
    if report is not None:
        report.update(cached_layers=sorted(result), computed_layers=sorted(todo))
    if todo:
        result.update(
            _compute(
                lm,
                todo,
                corpus,
                n_tokens,
                seq_len,
                batch_tokens,
                root,
                use_cache,
                checkpoint_tokens,
                progress,
                report,
            )
        )
    return {layer: result[layer] for layer in sorted(set(layers))}


def _compute(
    lm: Any,
    keys: dict[int, StatsKey],
    corpus: Corpus,
    n_tokens: int,
    seq_len: int,
    batch_tokens: int,
    root: Path,
    use_cache: bool,
    checkpoint_tokens: int,
    progress: bool,
    report: dict[str, Any] | None,
) -> dict[int, SecondMoment]:
    d = lm.arch.d_mlp
    acc = {layer: torch.zeros(d, d, dtype=torch.float64) for layer in keys}
    count = dict.fromkeys(keys, 0)
    done = dict.fromkeys(keys, 0)  # windows already in acc
    if use_cache:
        for layer, key in keys.items():
            part = key.partial_path(root)
            if part.exists():
                try:
                    tensors, meta = _read_checked(part, key)
                    acc[layer], count[layer], done[layer] = (
                        tensors["sum"],
                        meta["count"],
                        meta["windows"],
                    )
                    log.info("layer %d: resuming after %d tokens", layer, count[layer])
                except StatsCacheError as exc:
                    warnings.warn(f"ignoring bad partial statistics: {exc}", stacklevel=2)
    resumed = min(count.values())
    modules = {layer: lm.arch.down_proj(layer) for layer in keys}
    deepest = modules[max(keys)]
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    per_batch = max(1, batch_tokens // seq_len)
    device = lm.device
    start_window = min(done.values())
    windows = itertools.islice(token_windows(corpus, lm.tokenizer, seq_len), start_window, None)
    window_index = start_window
    seen = resumed  # tokens counted by the slowest layer
    last_checkpoint = seen
    t0, computed = time.perf_counter(), 0
    with progress_bar(progress) as bar:
        task = bar.add_task("key statistics", total=n_tokens, completed=seen)
        for batch in _batched(windows, per_batch):
            if seen >= n_tokens:
                break
            budget = n_tokens - seen
            lengths, kept = [], []
            for w in batch:
                take = min(len(w), budget)
                if take <= 0:
                    break
                kept.append(w[:take])
                lengths.append(take)
                budget -= take
            width = max(lengths)
            ids = torch.full((len(kept), width), pad, dtype=torch.long)
            mask = torch.zeros((len(kept), width), dtype=torch.long)
            for i, w in enumerate(kept):
                ids[i, : len(w)] = torch.tensor(w)
                mask[i, : len(w)] = 1
            with torch.inference_mode(), Hooks() as hooks:
                for layer, module in modules.items():
                    hooks.capture(str(layer), module)
                hooks.stop_before(deepest)  # its input is all we need
                hooks.run(
                    lm.model,
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    use_cache=False,
                )
                flat_mask = mask.bool().reshape(-1)
                for layer in keys:
                    # rows of this batch this layer has not yet counted (after a resume)
                    skip_rows = max(0, done[layer] - window_index)
                    if skip_rows >= len(kept):
                        continue
                    k = hooks[str(layer)].float().reshape(len(kept), width, d)[skip_rows:]
                    k = k.reshape(-1, d)[
                        flat_mask.reshape(len(kept), width)[skip_rows:].reshape(-1).to(k.device)
                    ]
                    acc[layer] += (k.T @ k).to("cpu", torch.float64)
                    count[layer] += k.shape[0]
                    done[layer] = window_index + len(kept)
            window_index += len(kept)
            n_new = sum(lengths)
            computed += n_new
            seen = min(count.values())
            bar.update(task, completed=seen)
            if use_cache and seen - last_checkpoint >= checkpoint_tokens and seen < n_tokens:
                for layer, key in keys.items():
                    _write(key.partial_path(root), key, acc[layer], count[layer], done[layer], {})
                last_checkpoint = seen
    seconds = time.perf_counter() - t0
    if seen < n_tokens:
        warnings.warn(
            f"corpus {corpus.identity} ran out after {seen} of {n_tokens} tokens; "
            "the statistics use what there was",
            stacklevel=3,
        )
    rate = computed / seconds if seconds > 0 else float("inf")
    if report is not None:
        report.update(tokens=computed, resumed_tokens=resumed, seconds=seconds, tokens_per_s=rate)
    out: dict[int, SecondMoment] = {}
    for layer, key in keys.items():
        extra = {"tokens_per_s": rate, "computed_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        # a corpus shorter than n_tokens is final too: the file records the real count
        if use_cache and (count[layer] == n_tokens or seen < n_tokens):
            _write(key.path(root), key, acc[layer], count[layer], done[layer], extra)
            key.partial_path(root).unlink(missing_ok=True)
            key.partial_path(root).with_suffix(".json").unlink(missing_ok=True)
        out[layer] = SecondMoment(
            layer,
            acc[layer] / max(count[layer], 1),
            count[layer],
            {"key": key.as_dict(), "cached": False, **extra},
        )
    return out

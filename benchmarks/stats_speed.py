"""Key-statistics throughput: ``second_moments`` against a bare truncated forward and the full
model forward that the paper's released code runs.

Three rates, measured on the same token windows:

(a) ``second_moments(..., use_cache=False)``: truncated forward + float32 GEMM of the keys +
    float64 accumulation; its own ``report`` (includes tokenisation, which it does lazily);
(b) a plain truncated forward (``Hooks.stop_after`` the layer's down-projection), no keys kept,
    same batch size: the floor for (a);
(c) the full forward (all layers + LM head over every position) on a smaller subset, as the
    released code computes statistics.

Prints one JSON object, then a table. Never asserts: the numbers are for reading.

    python benchmarks/stats_speed.py --tokens 20000 --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from typing import Any

import torch
from bench_common import default_data_dir


def default_corpus() -> str:
    return str(default_data_dir() / "wikitext" / "wiki.test.raw")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", default="smollm2-135m", help="alias, .gguf, directory or hub id")
    p.add_argument("--layer", type=int, default=5, help="layer whose keys are counted")
    p.add_argument("--corpus", default=default_corpus(), help="text file/folder (or 'model')")
    p.add_argument("--tokens", type=int, default=50_000, help="tokens for (a) and (b)")
    p.add_argument("--full-tokens", type=int, default=8192, help="tokens for (c), the full model")
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="auto")
    return p.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _windows(corpus: Any, tokenizer: Any, seq_len: int, n_tokens: int) -> list[list[int]]:
    """The first ``n_tokens`` tokens in ``second_moments``' windows (last one truncated)."""
    from repedit.stats.corpus import token_windows

    out, total = [], 0
    for window in token_windows(corpus, tokenizer, seq_len):
        window = window[: n_tokens - total]
        out.append(window)
        total += len(window)
        if total >= n_tokens:
            break
    return out


def _batches(windows: list[list[int]], per_batch: int, pad: int):
    """Right-padded ``input_ids``, ``attention_mask`` batches as ``second_moments`` builds."""
    for start in range(0, len(windows), per_batch):
        chunk = windows[start : start + per_batch]
        width = max(len(w) for w in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, w in enumerate(chunk):
            ids[i, : len(w)] = torch.tensor(w)
            mask[i, : len(w)] = 1
        yield ids, mask, sum(len(w) for w in chunk)


def _timed_forwards(
    lm: Any, windows: list[list[int]], per_batch: int, stop_at: torch.nn.Module | None
) -> tuple[int, float]:
    from repedit.models import Hooks

    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    device = lm.device
    tokens, seconds = 0, 0.0
    for ids, mask, n in _batches(windows, per_batch, pad):
        ids, mask = ids.to(device), mask.to(device)
        _sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode(), Hooks() as hooks:
            if stop_at is not None:
                hooks.stop_after(stop_at)
            out = hooks.run(lm.model, input_ids=ids, attention_mask=mask, use_cache=False)
            if out is not None:
                out.logits.sum().item()  # make sure the LM head really ran
        _sync(device)
        seconds += time.perf_counter() - t0
        tokens += n
    return tokens, seconds


def _rate(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else float("inf")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from repedit.models import load_model
    from repedit.stats import resolve_corpus, second_moments

    t_load = time.perf_counter()
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    load_s = time.perf_counter() - t_load
    lm.arch.check_layer(args.layer)
    corpus = resolve_corpus(args.corpus, lm)
    per_batch = max(1, args.batch_tokens // args.seq_len)
    down = lm.arch.down_proj(args.layer)

    t0 = time.perf_counter()
    windows = _windows(corpus, lm.tokenizer, args.seq_len, args.tokens)
    tokenize_s = time.perf_counter() - t0
    n_tokens = sum(len(w) for w in windows)
    full_windows = _windows(corpus, lm.tokenizer, args.seq_len, min(args.full_tokens, n_tokens))

    # warm-up (allocator, kernels, lazy init) on one window, untimed
    _timed_forwards(lm, windows[:1], 1, None)

    report: dict[str, Any] = {}
    second_moments(
        lm,
        [args.layer],
        corpus,
        n_tokens,
        seq_len=args.seq_len,
        batch_tokens=args.batch_tokens,
        use_cache=False,
        progress=False,
        report=report,
    )
    stats_rate = float(report["tokens_per_s"])
    trunc_tokens, trunc_s = _timed_forwards(lm, windows, per_batch, down)
    full_tokens, full_s = _timed_forwards(lm, full_windows, per_batch, None)
    trunc_rate, full_rate = _rate(trunc_tokens, trunc_s), _rate(full_tokens, full_s)

    result = {
        "benchmark": "stats_speed",
        "model": args.model,
        "fingerprint": lm.fingerprint,
        "layer": args.layer,
        "n_layers": lm.n_layers,
        "d_mlp": lm.arch.d_mlp,
        "corpus": corpus.identity,
        "tokens": n_tokens,
        "full_forward_tokens": full_tokens,
        "seq_len": args.seq_len,
        "batch_tokens": args.batch_tokens,
        "threads": torch.get_num_threads(),
        "device": str(lm.device),
        "dtype": str(lm.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_s": round(load_s, 2),
        "tokenize_tokens_per_s": round(_rate(n_tokens, tokenize_s), 1),
        "second_moments_tokens_per_s": round(stats_rate, 1),
        "truncated_forward_tokens_per_s": round(trunc_rate, 1),
        "full_forward_tokens_per_s": round(full_rate, 1),
        "speedup_second_moments_over_full": round(stats_rate / full_rate, 2),
        "speedup_truncated_over_full": round(trunc_rate / full_rate, 2),
        "second_moments_vs_truncated": round(stats_rate / trunc_rate, 3),
    }
    print(json.dumps(result, indent=2))
    _table(result)
    return result


def _table(r: dict[str, Any]) -> None:
    rows = [
        (
            "(a) second_moments (truncated + accumulate)",
            r["tokens"],
            r["second_moments_tokens_per_s"],
            r["speedup_second_moments_over_full"],
        ),
        (
            f"(b) truncated forward to layer {r['layer']}",
            r["tokens"],
            r["truncated_forward_tokens_per_s"],
            r["speedup_truncated_over_full"],
        ),
        (
            "(c) full forward + LM head",
            r["full_forward_tokens"],
            r["full_forward_tokens_per_s"],
            1.0,
        ),
    ]
    title = (
        f"key statistics, {r['model']} layer {r['layer']}/{r['n_layers']}, "
        f"{r['device']} {r['dtype']}, {r['threads']} threads"
    )
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        for name, tokens, rate, speedup in rows:
            print(f"{name:<46} {tokens:>8} tok {rate:>10.1f} tok/s  x{speedup:.2f}")
        return
    table = Table(title=title)
    table.add_column("pass")
    table.add_column("tokens", justify="right")
    table.add_column("tokens/s", justify="right")
    table.add_column("vs full", justify="right")
    for name, tokens, rate, speedup in rows:
        table.add_row(name, f"{tokens:,}", f"{rate:,.0f}", f"x{speedup:.2f}")
    Console(file=sys.stdout).print(table)


if __name__ == "__main__":
    main()

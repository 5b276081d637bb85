"""What bfloat16 autocast does to the key statistics ``C``: relative error and conditioning.

On the first ``--tokens`` tokens of the corpus, for one layer, three versions of
``C = Σ k kᵀ / n`` (``k``: the keys, the down-projection's input):

* ``float32``: the float32 forward, keys accumulated in float64 (what statistics are today);
* ``bf16_forward``: the forward under CPU bfloat16 autocast, keys accumulated in float64 (what
  an opt-in bfloat16 statistics forward would give);
* ``bf16_call``: ``second_moments`` itself under autocast (its ``kᵀk`` GEMM runs in bfloat16
  too): what wrapping the library call naively would give.

Reports ``‖C_x − C_f32‖_F / ‖C_f32‖_F``, each version's condition number, and the forward
tokens/s. The library's statistics code is used as it is (nothing cached: ``use_cache=False``).
Prints one JSON object, then a table. Never asserts: the numbers are for reading.

    python benchmarks/stats_bf16.py --tokens 20000 --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any

import torch
from bench_common import default_data_dir
from eval_speed import cpu_flags


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", default="smollm2-135m", help="alias, .gguf, directory or hub id")
    p.add_argument("--layer", type=int, default=5, help="layer whose keys are counted")
    p.add_argument(
        "--corpus", default=str(default_data_dir() / "wikitext" / "wiki.test.raw"), help="text"
    )
    p.add_argument("--tokens", type=int, default=20_000)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    return p.parse_args(argv)


def keys_moment(lm: Any, layer: int, windows: list[list[int]], per_batch: int, bf16: bool):
    """``(C in float64, seconds of the forwards)``: keys captured at ``layer``'s
    down-projection input, the forward optionally under bfloat16 autocast, the sum in float64."""
    from repedit.models import Hooks

    down = lm.arch.down_proj(layer)
    acc = torch.zeros(lm.arch.d_mlp, lm.arch.d_mlp, dtype=torch.float64)
    count, seconds = 0, 0.0
    for start in range(0, len(windows), per_batch):
        chunk = windows[start : start + per_batch]
        width = max(map(len, chunk))
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, w in enumerate(chunk):
            ids[i, : len(w)] = torch.tensor(w)
            mask[i, : len(w)] = 1
        t0 = time.perf_counter()
        with (
            torch.inference_mode(),
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16),
            Hooks() as hooks,
        ):
            hooks.capture("k", down)
            hooks.stop_before(down)
            hooks.run(lm.model, input_ids=ids, attention_mask=mask, use_cache=False)
            k = hooks["k"]
        seconds += time.perf_counter() - t0
        k = k.reshape(-1, k.shape[-1])[mask.bool().reshape(-1)].double()
        acc += k.T @ k
        count += k.shape[0]
    return acc / count, seconds


def condition(c: torch.Tensor) -> float:
    ev = torch.linalg.eigvalsh(c)
    return float(ev[-1] / ev[0].clamp_min(1e-300))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from repedit.models import load_model
    from repedit.stats import resolve_corpus, second_moments
    from repedit.stats.corpus import token_windows

    lm = load_model(args.model)
    corpus = resolve_corpus(args.corpus, lm)
    windows, total = [], 0
    for w in token_windows(corpus, lm.tokenizer, args.seq_len):
        windows.append(w[: args.tokens - total])
        total += len(windows[-1])
        if total >= args.tokens:
            break
    per_batch = max(1, args.batch_tokens // args.seq_len)
    c32, s32 = keys_moment(lm, args.layer, windows, per_batch, bf16=False)
    cbf, sbf = keys_moment(lm, args.layer, windows, per_batch, bf16=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        call = second_moments(
            lm, [args.layer], corpus, total, seq_len=args.seq_len, use_cache=False, progress=False
        )[args.layer].matrix

    def rel(c: torch.Tensor) -> float:
        return float(torch.linalg.norm(c - c32) / torch.linalg.norm(c32))

    report = {
        "benchmark": "stats_bf16",
        "model": args.model,
        "layer": args.layer,
        "tokens": total,
        "threads": torch.get_num_threads(),
        "cpu_flags": cpu_flags(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "float32": {"cond": condition(c32), "forward_tokens_per_s": total / s32},
        "bf16_forward": {
            "rel_error": rel(cbf),
            "cond": condition(cbf),
            "forward_tokens_per_s": total / sbf,
        },
        "bf16_call": {"rel_error": rel(call), "cond": condition(call)},
    }
    print(json.dumps(report, indent=2))
    rows = [("float32", 0.0, report["float32"]["cond"], total / s32)]
    rows.append(("bf16_forward", rel(cbf), condition(cbf), total / sbf))
    rows.append(("bf16_call", rel(call), condition(call), float("nan")))
    print(f"{'C':>13}  {'rel err':>9}  {'cond':>10}  {'fwd tok/s':>9}")
    for name, err, cond, rate in rows:
        print(f"{name:>13}  {err:9.2e}  {cond:10.3e}  {rate:9.0f}")
    print(f"(layer {args.layer}, {total} tokens, {args.threads} thread(s), {args.model})")
    return report


if __name__ == "__main__":
    main()

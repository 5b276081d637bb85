"""CUDA end to end, and how long it takes: edit, REP and eval on the GPU, float32 and bfloat16.

A short check (a few minutes, no downloads) for a machine with a GPU. For each weights dtype
(``--dtypes``, default float32 and bfloat16):

* **tiny models** (every registered family): a ROME edit on the GPU against the same edit on
  the CPU in float64-free float32, compared as the relative difference of the weight change;
  REP trained after it; the edit reverted bit for bit;
* **the embedded model** (SmolLM2-135M): key statistics (bfloat16 autocast too), a ROME edit
  whose new target must win on its prompt, REP trained after it, and ``repedit eval`` on two
  REP-CounterFact cases (or the demo cases) with REP, in a temporary run directory.

Every step is timed (the device synchronised around it). Prints one JSON object, then a table;
exits 1 if a check failed. ``--device cpu`` runs the same script on the CPU (to check the
script itself; the numbers then say nothing about CUDA).

    python benchmarks/cuda_smoke.py
    python benchmarks/cuda_smoke.py --device cpu --tiny-only
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from bench_common import default_data_dir

REQUEST = {
    "prompt": "{} is located in the continent of",
    "subject": "Slovenia",
    "target_new": "Antarctica",
    "target_true": "Europe",
}
FAST = {"value": {"steps": 10}}  # a smoke test: the edit must work, not be optimal


class Checks:
    """Named steps with their seconds and pass/fail, for the JSON and the table."""

    def __init__(self, device: torch.device):
        self.device = device
        self.rows: list[dict[str, Any]] = []

    @contextmanager
    def step(self, name: str, **info: Any) -> Iterator[dict[str, Any]]:
        row: dict[str, Any] = {"step": name, "ok": True, **info}
        self._sync()
        t0 = time.perf_counter()
        try:
            yield row
        except Exception as exc:  # a failed step is a result, reported with the others
            row.update(ok=False, error=f"{type(exc).__name__}: {exc}")
        self._sync()
        row["seconds"] = round(time.perf_counter() - t0, 3)
        self.rows.append(row)
        mark = "ok" if row["ok"] else "FAILED " + row.get("error", "")
        print(f"{name}: {row['seconds']:.2f}s {mark}", file=sys.stderr, flush=True)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def tiny_family(checks: Checks, family: str, dtype: torch.dtype, tmp: Path) -> None:
    """ROME on the GPU against the CPU on one tiny model; REP after it; revert bit for bit."""
    from repedit.data import EditRequest
    from repedit.editors import StatsConfig, make_editor
    from repedit.models.loading import LoadedModel
    from repedit.models.tiny import tiny_model, tiny_tokenizer
    from repedit.rep import RepConfig, train_rep_after

    words = "the king of river city music school war team station island church"
    corpus = tmp / "tiny-corpus.txt"
    corpus.write_text(("\n\n".join(words for _ in range(60)) + "\n") * 4)
    request = EditRequest(prompt="{} is in", subject="river city", target_new="war")
    deltas = {}
    for where in dict.fromkeys(("cpu", str(checks.device))):
        model = tiny_model(family, dtype=dtype if where != "cpu" else torch.float32).to(where)
        lm = LoadedModel(model, tiny_tokenizer(), name=f"tiny-{family}")
        stats = StatsConfig(
            corpus=str(corpus), n_tokens=1500, seq_len=32, cache=str(tmp), progress=False
        )
        editor = make_editor("rome", {"value": {"steps": 5}, "contexts": [[3, 2]]}, stats)
        name = f"tiny-{family} {where} {str(dtype).removeprefix('torch.')}"
        with checks.step(f"{name}: edit + REP + revert") as row:
            before = {k: v.clone() for k, v in model.state_dict().items()}
            result = editor.edit(lm, [request])
            deltas[where] = next(iter(result.deltas.values())).to("cpu", torch.float32)
            rep_cfg = RepConfig(steps=3, long_context=False)  # tiny models: short positions
            train_rep_after(lm, editor, result, [request], cfg=rep_cfg, report=False)
            result.revert(lm)
            same = all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
            row["reverted_bit_for_bit"] = same
            assert same, "revert did not restore the weights"
    if checks.device.type != "cpu":
        rel = relative(deltas[str(checks.device)], deltas["cpu"])
        # float32 kernels differ in summation order only; bfloat16 weights round every product
        bound = 1e-2 if dtype == torch.float32 else 0.25
        with checks.step(f"tiny-{family}: GPU delta vs CPU delta", rel_diff=rel, bound=bound):
            assert rel <= bound, f"relative difference {rel:.3g} > {bound}"


def embedded(checks: Checks, args: argparse.Namespace, dtype: str, tmp: Path) -> None:
    """Statistics, ROME, REP and a two-case eval of the embedded model on the device."""
    from repedit.data import EditRequest
    from repedit.editors import StatsConfig, make_editor
    from repedit.evaluation.scoring import next_token_probs
    from repedit.models import load_model
    from repedit.rep import RepConfig, train_rep_after

    with checks.step(f"smollm2 {dtype}: load") as row:
        lm = load_model(args.model, device=str(checks.device), dtype=dtype)
        row["weights_dtype"] = str(lm.dtype).removeprefix("torch.")
    corpus = args.corpus
    stats = StatsConfig(corpus=corpus, n_tokens=args.stats_tokens, cache=str(tmp), progress=False)
    for precision in ("model", "bfloat16"):
        with checks.step(f"smollm2 {dtype}: key statistics ({precision})") as row:
            s = StatsConfig(**{**stats.__dict__, "precision": precision})
            moment = make_editor("rome", stats=s).second_moment(lm, [args.layer])[args.layer]
            row["condition_number"] = round(moment.condition_number(), 1)
            assert torch.isfinite(moment.matrix).all()
    editor = make_editor("rome", FAST, stats)
    request = EditRequest(**REQUEST)
    with checks.step(f"smollm2 {dtype}: ROME edit") as row:
        result = editor.edit(lm, [request])
        (p_new,) = next_token_probs(lm, [request.prompt.format(request.subject)], [" Antarctica"])
        row["p_new_first_token"] = round(p_new, 3)
        assert p_new > 0.5, f"the edit did not take: p = {p_new:.3f}"
    with checks.step(f"smollm2 {dtype}: REP training") as row:
        rep = train_rep_after(lm, editor, result, [request], cfg=RepConfig(), report=False)
        row["adapters"] = len(rep.adapters)
    result.revert(lm)
    with checks.step(f"smollm2 {dtype}: repedit eval, 2 cases, REP") as row:
        row.update(run_two_cases(lm, args, dtype, tmp, corpus))


def run_two_cases(lm: Any, args: argparse.Namespace, dtype: str, tmp: Path, corpus: str) -> dict:
    """``run_eval`` on two cases with REP on ``lm``'s device; the summary's headline rates."""
    from repedit.evaluation.config import RunConfig
    from repedit.evaluation.harness import run_eval

    data_dir = Path(args.data_dir)
    data = "rep-counterfact" if (data_dir / "rep").is_dir() else "demo"
    cfg = RunConfig.from_dict(
        {
            "model": args.model,
            "method": "rome",
            "hparams": {"value.steps": 10},
            "data": data,
            "data_dir": str(data_dir),
            "n": 2,
            "out": str(tmp / f"run-{dtype}"),
            "device": str(lm.device),
            "dtype": dtype,
            "cache_dir": str(tmp),
            "rep": {},
            "tests": "efficacy,subject_paraphrase,neighbourhood,fluency",
            "fluency_tokens": 30,
            "stats_corpus": corpus,
            "stats_tokens": args.stats_tokens,
        }
    )
    out = run_eval(cfg, lm=lm, progress=False, report=False)
    summary = json.loads((out / "summary.json").read_text())
    rates = {t: v.get("mean") for t, v in summary.get("tests", {}).items()}
    assert not summary["extra"].get("n_failed"), "cases failed"
    return {"data": data, "rates": rates}


def table(report: dict[str, Any]) -> str:
    lines = [f"cuda smoke · {report['device_name']} · torch {report['torch']}", ""]
    lines.append(f"{'step':<58} {'seconds':>8}  result")
    for row in report["steps"]:
        lines.append(
            f"{row['step']:<58} {row['seconds']:>8.2f}  "
            f"{'ok' if row['ok'] else 'FAILED: ' + row.get('error', '')}"
        )
    lines.append(f"\n{report['passed']}/{len(report['steps'])} steps passed")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda, cuda:1, ... or cpu (script check)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="weights dtypes to run")
    p.add_argument("--model", default="smollm2-135m", help="the real model (embedded default)")
    p.add_argument("--layer", type=int, default=5, help="ROME's layer on the real model")
    p.add_argument("--stats-tokens", type=int, default=20_000, help="tokens for C (a smoke test)")
    p.add_argument(
        "--corpus",
        default="auto",
        help="text for C (default auto: $REPEDIT_DATA/wikitext, else model-sampled text)",
    )
    p.add_argument("--data-dir", default=str(default_data_dir()), help="for rep-counterfact")
    p.add_argument("--tiny-only", action="store_true", help="skip the embedded model")
    p.add_argument("--families", default="llama,gpt2,gpt_neox", help="tiny families")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; --device cpu runs the script on the CPU instead")
    checks = Checks(device)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    with tempfile.TemporaryDirectory(prefix="cuda-smoke-") as tmp_name:
        tmp = Path(tmp_name)
        for dtype in dtypes:
            for family in args.families.split(","):
                tiny_family(checks, family.strip(), getattr(torch, dtype), tmp)
            if not args.tiny_only:
                embedded(checks, args, dtype, tmp)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    report = {
        "benchmark": "cuda_smoke",
        "device": str(device),
        "device_name": name or platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "steps": checks.rows,
        "passed": sum(r["ok"] for r in checks.rows),
    }
    print(json.dumps(report, indent=2, default=str))
    print(table(report))
    return 0 if report["passed"] == len(checks.rows) else 1


if __name__ == "__main__":
    sys.exit(main())

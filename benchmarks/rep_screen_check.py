"""What the merged stack's candidate screen changes on real REP adapters.

Trains ROME + REP on each of the first ``--cases`` REP-CounterFact cases on its own (the edit
reverted afterwards, so the keys at ROME's layer are the base model's), stacks the adapters,
and reads every case's own probes (prompt paraphrases, subject paraphrases in the edit prompt,
the edit prompt) through the stack. Per threshold: the (token, member) pairs that open without
the screen (the probe's own member and the other cases' members) and how many of them the
screen lets through, the pairs screened in, and the probe tokens whose adapted key changes.
Also the β̃ of the opened pairs to their member's edit. Prints one JSON object.

    python benchmarks/rep_screen_check.py --cases 20 --thresholds 0.1,0,-0.05
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
from bench_common import cpu_flags, default_data_dir


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data-dir", default=str(default_data_dir()))
    p.add_argument("--cases", type=int, default=20)
    p.add_argument("--thresholds", default="0.1,0,-0.05")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def train(lm: Any, cases: list[Any]) -> list[Any]:
    """One ROME + REP adapter per case (single layer), each edit reverted after training."""
    from repedit.editors import make_editor
    from repedit.rep import RepConfig, train_rep_for_editor

    editor, out = make_editor("rome"), []
    for case in cases:
        result, rep = train_rep_for_editor(lm, editor, [case], RepConfig())
        if result.applied:
            result.revert(lm)
        ((layer, adapter),) = rep.adapters.items()
        out.append((layer, adapter.eval()))
    return out


def probe_keys(lm: Any, layer: int, cases: list[Any]) -> list[tuple[int, torch.Tensor]]:
    """(case index, keys [tokens, d_mlp]) for every probe text of every case."""
    keys: list[torch.Tensor] = []
    hook = lm.arch.down_proj(layer).register_forward_pre_hook(
        lambda _m, a: keys.append(a[0].detach()[0].float())
    )
    owners = []
    with torch.no_grad():
        for i, c in enumerate(cases):
            subj = [c.request.prompt.replace("{}", s) for s in c.subject_paraphrases]
            for text in [*c.prompt_paraphrases, *subj, c.request.text]:
                ids = lm.tokenizer(text, return_tensors="pt")["input_ids"].to(lm.device)
                lm.model(input_ids=ids)
                owners.append(i)
    hook.remove()
    return list(zip(owners, keys, strict=True))


def opened(members: list[Any], k: torch.Tensor) -> torch.Tensor:
    """[T, N]: a member's hard gate open and neither of its rules keeping the token."""
    cols = []
    for m in members:
        kept = m.guarded(k)
        cols.append((m.gate(k) > m.tau) & (True if kept is None else ~kept))
    return torch.stack(cols, 1)


def compare(members: list[Any], probes: list[tuple[int, torch.Tensor]], thr: float) -> dict:
    from repedit.rep import RepStack
    from repedit.rep.merged import MergedStack

    stack = RepStack(members).eval()
    full, screened = MergedStack(stack), MergedStack(stack, candidates="key", threshold=thr)
    n = {"own_open": 0, "own_in": 0, "other_open": 0, "other_in": 0, "pairs_in": 0}
    n |= {"pairs": 0, "adapted_tokens": 0, "changed_tokens": 0}
    with torch.no_grad():
        for owner, k in probes:
            o, cand = opened(members, k), screened.screen(k)
            own = torch.zeros_like(o)
            own[:, owner] = True
            n["own_open"] += int((o & own).sum())
            n["own_in"] += int((o & own & cand).sum())
            n["other_open"] += int((o & ~own).sum())
            n["other_in"] += int((o & ~own & cand).sum())
            n["pairs_in"] += int(cand.sum())
            n["pairs"] += cand.numel()
            a, b = full(k), screened(k)
            n["adapted_tokens"] += int(((a - k).abs().amax(-1) > 0).sum())
            n["changed_tokens"] += int(((a - b).abs().amax(-1) > 1e-3 * k.abs().amax(-1)).sum())
    return n


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from repedit.data import load_cases
    from repedit.models import load_model

    lm = load_model(args.model)
    cases = load_cases("rep-counterfact", data_dir=args.data_dir).cases[: args.cases]
    trained = train(lm, cases)
    layer, members = trained[0][0], [a for _, a in trained]
    probes = probe_keys(lm, layer, cases)
    w = torch.cat([m.guard_w for m in members])  # [N, d] each member's β̃ row
    beta = torch.cat([(k @ w.T)[opened(members, k)[:, o], o] for o, k in probes])
    report: dict[str, Any] = {
        "benchmark": "rep_screen_check",
        "model": args.model,
        "layer": layer,
        "cases": len(cases),
        "probe_texts": len(probes),
        "tokens": sum(k.shape[0] for _, k in probes),
        "own_open_beta_quantiles_0_05_50": [float(beta.quantile(q)) for q in (0, 0.05, 0.5)],
        "threads": torch.get_num_threads(),
        "cpu_flags": cpu_flags(),
        "thresholds": {
            t: compare(members, probes, float(t)) for t in args.thresholds.split(",") if t.strip()
        },
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()

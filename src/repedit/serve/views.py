"""What the page draws besides the probe table: REP's gate per token, and β̃ as an SVG plot."""

from __future__ import annotations

from collections.abc import Mapping
from html import escape
from typing import Any

import torch

from repedit.models.loading import LoadedModel


def gate_strip(lm: LoadedModel, adapters: Mapping[int, Any], prompt: str) -> dict[str, Any]:
    """The soft gate at every token of ``prompt`` (the largest over the adapted layers),
    with each token's text and the threshold τ above which the gate opens."""
    from repedit.rep import RepInjection

    tok = lm.tokenizer
    ids = tok(prompt, return_tensors="pt")["input_ids"].to(lm.device)
    with RepInjection(lm, adapters, record=True) as inj, torch.inference_mode():
        lm.model(input_ids=ids)
        gates = [g[0] for g in inj.last_gate.values()]
    gate = torch.stack(gates).amax(0) if gates else torch.zeros(ids.shape[1])
    tau = min(float(a.tau) for a in adapters.values())
    tokens = [tok.decode([i]) for i in ids[0].tolist()]
    return {
        "prompt": prompt,
        "tokens": tokens,
        "gate": [round(float(g), 4) for g in gate],
        "tau": tau,
    }


def beta_series(alignment_before: Mapping, alignment_after: Mapping) -> list[dict[str, Any]]:
    """β̃ (mean per variant kind and layer) of the subject keys before and after REP."""
    rows = []
    for layer in sorted(alignment_after):
        after = alignment_after[layer]
        before = alignment_before.get(layer, {})
        for cat in sorted(after):
            if not cat.startswith("pos:") or after[cat].get("beta") is None:
                continue
            rows.append(
                {
                    "layer": int(layer),
                    "kind": cat.removeprefix("pos:"),
                    "before": before.get(cat, {}).get("beta"),
                    "after": after[cat]["beta"],
                    "n": after[cat].get("n"),
                }
            )
    return rows


def beta_svg(rows: list[dict[str, Any]], width: int = 460) -> str:
    """A horizontal bar pair per variant kind (grey: before REP, blue: after); the dashed line
    is β̃ = 1, the edit's own key."""
    if not rows:
        return ""
    top = max([1.2, *[abs(r["before"] or 0) for r in rows], *[abs(r["after"]) for r in rows]])
    left, bar, gap = 150, 10, 10
    height = len(rows) * (2 * bar + gap) + 30
    scale = (width - left - 40) / top

    def x(v: float) -> float:
        return left + max(0.0, v) * scale

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img" aria-label="beta before and after REP" font-size="11">'
    ]
    for i, r in enumerate(rows):
        y = 10 + i * (2 * bar + gap)
        label = escape(f"{r['kind']} (layer {r['layer']})")
        parts.append(f'<text x="{left - 6}" y="{y + bar + 3}" text-anchor="end">{label}</text>')
        for j, (key, color) in enumerate((("before", "#aaa"), ("after", "#2b6cb0"))):
            v = r[key]
            if v is None:
                continue
            yy = y + j * bar
            parts.append(
                f'<rect x="{left}" y="{yy}" width="{x(v) - left:.1f}" height="{bar - 1}" '
                f'fill="{color}"><title>{key}: {v:.3f}</title></rect>'
            )
            parts.append(f'<text x="{x(v) + 3:.1f}" y="{yy + bar - 2}">{v:.2f}</text>')
    one = x(1.0)
    parts.append(
        f'<line x1="{one:.1f}" x2="{one:.1f}" y1="4" y2="{height - 18}" stroke="#c53030" '
        'stroke-dasharray="3,3"/>'
    )
    parts.append(f'<text x="{one:.1f}" y="{height - 5}" text-anchor="middle">β̃ = 1</text>')
    parts.append("</svg>")
    return "".join(parts)

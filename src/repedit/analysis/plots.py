"""Figures of the key-similarity and readout analyses (matplotlib, Agg backend: no display
needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from repedit.analysis.records import PAPER_LEVEL, VARIANTS, CaseSimilarity
from repedit.analysis.success import SuccessAnalysis, binned_success

#: short axis labels per variant type
LABELS = {
    "original": "edit\nprompt",
    "subject_paraphrase": "subject\npara (ID)",
    "ood_subject_paraphrase": "subject\npara (OOD)",
    "scrambled_subject": "scrambled\nsubject",
    "long_context": "long\ncontext",
    "prompt_paraphrase": "prompt\npara",
    "unrelated": "unrelated\nsubject",
}

COLORS = {
    "original": "#1b9e77",
    "subject_paraphrase": "#7570b3",
    "ood_subject_paraphrase": "#a6a1d8",
    "scrambled_subject": "#d95f02",
    "long_context": "#e7298a",
    "prompt_paraphrase": "#66a61e",
    "unrelated": "#666666",
}

#: colours of the suite's tests (readout plot), matched to their variant types
TEST_COLORS = {
    "efficacy": COLORS["original"],
    "subject_paraphrase": COLORS["subject_paraphrase"],
    "ood_subject_paraphrase": COLORS["ood_subject_paraphrase"],
    "scrambled_subject_id": COLORS["scrambled_subject"],
    "scrambled_subject_ood": "#f4a261",
    "long_context": COLORS["long_context"],
    "prompt_paraphrase": COLORS["prompt_paraphrase"],
}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def plot_distributions(
    results: Sequence[CaseSimilarity], path: str | Path, *, title: str | None = None
) -> Path:
    """Violin + box plot of β̃ per variant type, with every key as a jittered dot.

    Horizontal lines mark 1.0 (k* itself) and 0.4 (the paper's level for paraphrased and
    scrambled subjects). Variant types without keys are left out.
    """
    plt = _pyplot()
    data = [(v, [x for cs in results for x in cs.beta_norm(v)]) for v in VARIANTS]
    data = [(v, xs) for v, xs in data if xs]
    fig, ax = plt.subplots(figsize=(1.25 * max(len(data), 3) + 1.5, 4.6))
    rng = np.random.default_rng(0)
    for i, (v, xs) in enumerate(data):
        pos = i + 1
        if len(xs) > 1 and np.ptp(xs) > 0:
            parts = ax.violinplot([xs], positions=[pos], widths=0.8, showextrema=False)
            for body in parts["bodies"]:
                body.set_facecolor(COLORS[v])
                body.set_alpha(0.35)
        ax.boxplot(
            [xs],
            positions=[pos],
            widths=0.18,
            showfliers=False,
            medianprops={"color": "black", "linewidth": 1.5},
        )
        jitter = rng.uniform(-0.22, 0.22, len(xs))
        ax.scatter(pos + jitter, xs, s=6, color=COLORS[v], alpha=0.6, linewidths=0, zorder=3)
    ax.axhline(1.0, color="#1b9e77", linestyle="--", linewidth=1, label="β̃ = 1 (k*)")
    ax.axhline(PAPER_LEVEL, color="#d62728", linestyle=":", linewidth=1.2, label="β̃ = 0.4 (paper)")
    ax.axhline(0.0, color="#999999", linewidth=0.6)
    ax.set_xticks(range(1, len(data) + 1))
    ax.set_xticklabels([f"{LABELS[v]}\n(n={len(xs)})" for v, xs in data], fontsize=8)
    ax.set_ylabel("normalised whitened similarity β̃ = kᵀC⁻¹k* / k*ᵀC⁻¹k*")
    n = len(results)
    layer = results[0].layer if results else "?"
    ax.set_title(title or f"Key similarity to k* per variant type ({n} cases, layer {layer})")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_specificity(
    subjects: Sequence[str], matrix: np.ndarray, path: str | Path, *, title: str | None = None
) -> Path:
    """Heatmap of β̃(case j's bare-prompt key, case i's k*): rows edited, columns probed.

    Diverging colours, symmetric around 0 over [-m, m] with m = max(1, max |β̃|), so white is
    "retrieves nothing" and equal shades mean equal magnitudes.
    """
    plt = _pyplot()
    m = np.asarray(matrix, dtype=float)
    n = len(subjects)
    size = min(14.0, 2.5 + 0.32 * n)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    vmax = max(1.0, float(np.nanmax(np.abs(m))) if m.size else 1.0)
    im = ax.imshow(m, cmap="RdBu_r", vmin=-vmax, vmax=vmax)
    labels = [s if len(s) <= 22 else s[:21] + "…" for s in subjects]
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xticklabels(labels, rotation=90, fontsize=7)
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_xlabel("probed case j (bare-prompt key)")
    ax.set_ylabel("edited case i (k*)")
    if n <= 12:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="β̃")
    ax.set_title(title or "Specificity: β̃ of other cases' keys against each edit's k*")
    return _save(fig, path)


def plot_similarity_vs_success(
    rows: Sequence[dict[str, Any]] | SuccessAnalysis,
    path: str | Path,
    *,
    title: str | None = None,
) -> Path:
    """Success (0/1, jittered) against β̃ per probe, coloured by variant type, with the success
    rate per β̃ bin (edit prompt + equivalent variants) as a line."""
    plt = _pyplot()
    if isinstance(rows, SuccessAnalysis):
        rows = rows.rows
    rows = list(rows)
    fig, ax = plt.subplots(figsize=(8.0, 4.6))
    rng = np.random.default_rng(0)
    for v in VARIANTS:
        rs = [r for r in rows if r["variant"] == v]
        if not rs:
            continue
        x = np.asarray([r["beta_norm"] for r in rs], dtype=float)
        y = np.asarray([float(r["success"]) for r in rs]) + rng.uniform(-0.06, 0.06, len(rs))
        ax.scatter(x, y, s=10, alpha=0.55, color=COLORS[v], linewidths=0,
                   label=f"{LABELS[v].replace(chr(10), ' ')} ({len(rs)})")  # fmt: skip
    reach = [r for r in rows if r["variant"] != "unrelated"]
    bins = [b for b in binned_success(reach) if b["n"]]
    if bins:
        xs_all = [r["beta_norm"] for r in reach]
        lo_all, hi_all = min(xs_all), max(xs_all)
        centres = []
        for b in bins:
            lo = b["lo"] if b["lo"] is not None else lo_all
            hi = b["hi"] if b["hi"] is not None else hi_all
            centres.append(0.5 * (lo + hi))
        ax.plot(centres, [b["success"] for b in bins], "-o", color="black", linewidth=1.5,
                markersize=4, label="success per β̃ bin\n(without unrelated)", zorder=4)  # fmt: skip
        for c, b in zip(centres, bins, strict=True):
            ax.annotate(f"n={b['n']}", (c, b["success"]), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=6)  # fmt: skip
    ax.axvline(1.0, color="#1b9e77", linestyle="--", linewidth=1)
    ax.axvline(PAPER_LEVEL, color="#d62728", linestyle=":", linewidth=1.2)
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1])
    ax.set_ylim(-0.15, 1.15)
    ax.set_xlabel("β̃ = kᵀC⁻¹k* / k*ᵀC⁻¹k*")
    ax.set_ylabel("edit success (exact match of target_new)")
    ax.set_title(title or "Edit success against whitened similarity of the probe's key")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_readout(doc: dict[str, Any], path: str | Path, *, title: str | None = None) -> Path:
    """Success rate against the patched layer, one colour per test: ``hidden@l`` solid,
    ``hidden_all@l`` dotted, with the test's ``plain`` (dashed) and ``oracle_key`` (dash-dot)
    rates as horizontal references and the edited layers shaded."""
    plt = _pyplot()
    layers = doc["layers"]
    fig, ax = plt.subplots(figsize=(8.0, 4.6))
    for name, t in doc["tests"].items():
        color = TEST_COLORS.get(name, "#333333")
        ax.plot(layers, [t[f"hidden@{x}"] for x in layers], "-o", color=color, markersize=3,
                linewidth=1.5, label=f"{name} (n={t['n']})")  # fmt: skip
        if f"hidden_all@{layers[0]}" in t:
            ax.plot(layers, [t[f"hidden_all@{x}"] for x in layers], ":", color=color, linewidth=1.2)
        ax.axhline(t["plain"], color=color, linestyle="--", linewidth=0.8, alpha=0.8)
        ax.axhline(t["oracle_key"], color=color, linestyle="-.", linewidth=0.8, alpha=0.8)
    for layer in doc.get("edited_layers", []):
        ax.axvspan(layer - 0.5, layer + 0.5, color="#cccccc", alpha=0.4, linewidth=0)
    styles = [("-", "hidden@l (last subject token)"), (":", "hidden_all@l (every subject token)"),
              ("--", "plain edit"), ("-.", "oracle key k*")]  # fmt: skip
    for style, label in styles:
        ax.plot([], [], style, color="#555555", label=label)
    ax.set_xticks(layers)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("layer whose output is patched at the subject (grey: edited)")
    ax.set_ylabel("edit success (exact match of target_new)")
    ax.set_title(title or f"Where the subject is read: {doc['method']}, {doc['n_cases']} cases")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)

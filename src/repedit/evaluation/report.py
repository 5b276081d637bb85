"""A self-contained HTML report over one or more run directories.

One ``report.html`` file: inline CSS, figures as inline base64 PNGs (matplotlib's Agg canvas,
no global backend switch), no external assets, so it can be mailed or archived as is.
Contents: a table of every test per run (mean, 95 % CI, n; REP runs add their edit / REP
seconds and gate open rates), a grouped bar chart of the means with CI error bars, a
robustness / specificity trade-off scatter (one point per run), per-case distributions (box
plots of per-case means per test and run), sequential-editing curves when a run has
``sequential.jsonl``, and each run's configuration. Runs are labelled from their configuration
(``rome``, ``rome+rep``, ``rome+rep(no-gate)``, ``rome+rep τ=0.7``; the directory name is added
where labels collide).
"""

from __future__ import annotations

import base64
import html
import io
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from repedit.errors import RepeditError
from repedit.evaluation.probes import LOCALITY_TESTS, PROBE_TESTS, SUCCESS_TESTS, TESTS
from repedit.evaluation.rundir import RunDir, readable
from repedit.evaluation.summary import (
    EMPTY_STAT,
    REP_ROWS,
    build_summary,
    case_means,
    has_rep,
    load_summary,
    read_records,
    run_label,
)
from repedit.io import atomic_path

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1200px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f3f3f3; } td.name, th.name { text-align: left; }
td.sub { text-align: left; padding-left: 1.5em; color: #555; }
.ci { color: #777; font-size: 0.85em; } .muted { color: #777; font-size: 0.85em; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
code { background: #f6f6f6; padding: 0 3px; }
"""

RATE_TESTS = (*SUCCESS_TESTS, *LOCALITY_TESTS)
#: the robustness tests averaged on the trade-off plot's y axis
ROBUSTNESS_TESTS = (
    "subject_paraphrase",
    "ood_subject_paraphrase",
    "scrambled_subject",
    "long_context",
)


def run_names(run_dirs: Sequence[Path]) -> list[str]:
    """Short distinct labels: the directory name, with its parent when names collide."""
    names = [p.resolve().name or str(p) for p in run_dirs]
    if len(set(names)) == len(names):
        return names
    out = []
    for p in run_dirs:
        r = p.resolve()
        out.append(f"{r.parent.name}/{r.name}")
    if len(set(out)) != len(out):
        out = [f"{n} ({i + 1})" for i, n in enumerate(out)]
    return out


def summary_label(summary: dict[str, Any]) -> str | None:
    """The configuration label of a summary (older summaries: derived from their config)."""
    cfg = summary.get("config", {})
    if cfg.get("label"):
        return str(cfg["label"])
    if cfg.get("method"):
        return run_label(cfg)
    return None


def run_labels(run_dirs: Sequence[Path], summaries: Sequence[dict[str, Any]]) -> list[str]:
    """Display names: each run's configuration label, with its directory name added where two
    runs share a label (e.g. ``rome (rome-cf)``, ``rome (rome-zsre)``)."""
    dirs = run_names(run_dirs)
    labels = [summary_label(s) or d for s, d in zip(summaries, dirs, strict=True)]
    out = [
        lab if labels.count(lab) == 1 or lab == d else f"{lab} ({d})"
        for lab, d in zip(labels, dirs, strict=True)
    ]
    if len(set(out)) != len(out):
        out = [f"{n} [{i + 1}]" for i, n in enumerate(out)]
    return out


def robustness_mean(summary: dict[str, Any]) -> float | None:
    """The mean of the robustness tests' means (:data:`ROBUSTNESS_TESTS` the run scored)."""
    means = [summary["tests"].get(t, {}).get("mean") for t in ROBUSTNESS_TESTS]
    means = [m for m in means if m is not None]
    return sum(means) / len(means) if means else None


def tradeoff_chart(names: Sequence[str], summaries: Sequence[dict[str, Any]]) -> str:
    """One point per run: x = neighbourhood (locality) success, y = mean robustness."""
    fig = _figure(7, 5)
    ax = fig.subplots()
    colors = _colors(len(names))
    plotted = 0
    for name, summ, color in zip(names, summaries, colors, strict=True):
        x = summ["tests"].get("neighbourhood", {}).get("mean")
        y = robustness_mean(summ)
        if x is None or y is None:
            continue
        ax.scatter([100 * x], [100 * y], s=60, color=color, zorder=3)
        ax.annotate(name, (100 * x, 100 * y), xytext=(5, 5), textcoords="offset points", fontsize=8)
        plotted += 1
    if not plotted:
        ax.text(
            0.5,
            0.5,
            "no run scored neighbourhood and a robustness test",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
    ax.set_xlim(-5, 105)
    ax.set_ylim(-5, 105)
    ax.set_xlabel("specificity: neighbourhood agreement (%)")
    ax.set_ylabel("robustness: mean of subject paraphrase (ID, OOD),\nscrambled, long context (%)")
    ax.set_title("robustness / specificity trade-off (top right is best)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def _png(fig: Any) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="figure" src="data:image/png;base64,{data}">'


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def bar_chart(names: Sequence[str], summaries: Sequence[dict[str, Any]]) -> str:
    """Grouped bars of per-test means (%) per run, with 95 % CI error bars; fluency beside."""
    import numpy as np

    fig = _figure(12, 4.2)
    ax, ax_f = fig.subplots(1, 2, gridspec_kw={"width_ratios": [6, 1]})
    x = np.arange(len(RATE_TESTS))
    width = 0.8 / max(1, len(names))
    colors = _colors(len(names))
    for r, (name, summ) in enumerate(zip(names, summaries, strict=True)):
        means, lo, hi = [], [], []
        for test in RATE_TESTS:
            s = summ["tests"].get(test) or EMPTY_STAT
            m = s["mean"]
            means.append(np.nan if m is None else 100 * m)
            ci = s.get("ci")
            lo.append(0 if not ci or m is None else max(0.0, 100 * (m - ci[0])))
            hi.append(0 if not ci or m is None else max(0.0, 100 * (ci[1] - m)))
        offset = (r - (len(names) - 1) / 2) * width
        ax.bar(x + offset, means, width, yerr=[lo, hi], capsize=2, label=name, color=colors[r])
        f = summ["tests"].get("fluency") or EMPTY_STAT
        if f["mean"] is not None:
            ci = f.get("ci") or [f["mean"], f["mean"]]
            ax_f.bar(
                r,
                f["mean"],
                0.8,
                yerr=[[max(0.0, f["mean"] - ci[0])], [max(0.0, ci[1] - f["mean"])]],
                capsize=2,
                color=colors[r],
            )
    ax.set_xticks(x)
    ax.set_xticklabels([t.replace("_", "\n") for t in RATE_TESTS], fontsize=8)
    ax.set_ylabel("% (locality tests: agreement)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    ax_f.set_xticks(range(len(names)))
    ax_f.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
    ax_f.set_title("fluency (bits)", fontsize=9)
    ax_f.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def distributions(names: Sequence[str], records: Sequence[Sequence[dict[str, Any]]]) -> str:
    """Box plots of per-case means, one panel per test, one box per run."""
    cols = 4
    rows = (len(TESTS) + cols - 1) // cols
    fig = _figure(12, 2.8 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    colors = _colors(len(names))
    for ax, test in zip(axes, TESTS, strict=False):
        data = [case_means(recs, test) for recs in records]
        scale = 1.0 if test == "fluency" else 100.0
        data = [[scale * v for v in d] for d in data]
        positions = [i for i, d in enumerate(data) if d]
        if positions:
            box = ax.boxplot(
                [data[i] for i in positions],
                positions=positions,
                widths=0.6,
                patch_artist=True,
                showmeans=True,
            )
            for patch, i in zip(box["boxes"], positions, strict=True):
                patch.set_facecolor(colors[i])
                patch.set_alpha(0.6)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(test + (" (bits)" if test == "fluency" else " (%)"), fontsize=9)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=7)
        if test != "fluency":
            ax.set_ylim(-5, 105)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[len(TESTS) :]:
        ax.set_visible(False)
    fig.suptitle("per-case means", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def sequential_chart(name: str, points: Sequence[dict[str, Any]]) -> str:
    """Means over the edited-so-far cases against the number of edits."""
    fig = _figure(8, 4)
    ax = fig.subplots()
    pts = sorted(points, key=lambda p: p.get("n_edits", 0))
    xs = [p["n_edits"] for p in pts]
    for test, color in zip(RATE_TESTS, _colors(len(RATE_TESTS)), strict=True):
        ys = [(p.get("means") or {}).get(test) for p in pts]
        if any(y is not None for y in ys):
            ax.plot(
                xs,
                [float("nan") if y is None else 100 * y for y in ys],
                marker="o",
                label=test,
                color=color,
            )
    ax.set_xlabel("edits so far")
    ax.set_ylabel("% over edited-so-far cases")
    ax.set_ylim(-5, 105)
    ax.set_title(f"sequential editing: {name}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def _cell(test: str, stat: dict[str, Any] | None) -> str:
    if not stat or stat.get("mean") is None:
        return '<td>—<span class="ci"> (n = 0)</span></td>'
    m, ci, n = stat["mean"], stat.get("ci"), stat["n"]
    if test == "fluency":
        txt = f"{m:.3f}"
        ci_txt = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
    else:
        txt = f"{100 * m:.1f}"
        ci_txt = f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else ""
    return f'<td>{txt}<span class="ci">{ci_txt} n={n}</span></td>'


def results_table(names: Sequence[str], summaries: Sequence[dict[str, Any]]) -> str:
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    rows = [f'<tr><th class="name">test</th>{head}</tr>']

    def row(label: str, css: str, test: str, getter: Any) -> None:
        cells = "".join(_cell(test, getter(s)) for s in summaries)
        rows.append(f'<tr><td class="{css}">{html.escape(label)}</td>{cells}</tr>')

    any_gen = any(s.get("tests_generate") is not None for s in summaries)
    for test in TESTS:
        row(test, "name", test, lambda s, t=test: s["tests"].get(t))
        if any_gen and test in PROBE_TESTS:
            row("generated", "sub", test, lambda s, t=test: (s.get("tests_generate") or {}).get(t))
        if test == "scrambled_subject":
            for half in ("id", "ood"):
                key = f"scrambled_subject_{half}"
                row(f"{half} half", "sub", test, lambda s, k=key: s.get("extra", {}).get(k))
        if test == "neighbourhood":
            row(
                "vs. dataset answer",
                "sub",
                test,
                lambda s: s.get("extra", {}).get("neighbourhood_truth"),
            )
    for test in SUCCESS_TESTS:
        key = f"{test}_beats_alt"
        row(f"{test}: P(new) > P(true)", "name", test, lambda s, k=key: s.get("extra", {}).get(k))
    if any(has_rep(s) for s in summaries):
        for label, key, fmt in REP_ROWS:
            cells = "".join(
                f"<td>{html.escape(fmt(s.get('extra', {}).get(key)))}</td>" for s in summaries
            )
            rows.append(f'<tr><td class="name">{html.escape(label)}</td>{cells}</tr>')
    return "<table>" + "".join(rows) + "</table>"


def config_table(names: Sequence[str], summaries: Sequence[dict[str, Any]]) -> str:
    fields = (
        ("run directory", lambda c, e: c.get("run_dir")),
        ("method", lambda c, e: c.get("method")),
        ("REP overrides", lambda c, e: "—" if c.get("rep") is None else c.get("rep") or "defaults"),
        ("model", lambda c, e: f"{c.get('model')} ({c.get('model_fingerprint')})"),
        ("data", lambda c, e: c.get("data_path")),
        ("mode", lambda c, e: c.get("mode")),
        ("cases (failed)", lambda c, e: f"{e.get('n_cases')} ({e.get('n_failed')})"),
        ("seed", lambda c, e: c.get("seed")),
        ("seconds per edit", lambda c, e: _num(c.get("seconds_per_edit"), 2)),
        ("probes/s", lambda c, e: _num(e.get("probes_per_s"), 1)),
        ("wall time (s)", lambda c, e: _num(e.get("wall_seconds"), 0)),
        ("hparam overrides", lambda c, e: c.get("hparams_overrides") or "—"),
        ("versions", lambda c, e: _versions(c)),
    )
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    rows = [f'<tr><th class="name">run</th>{head}</tr>']
    for label, get in fields:
        values = [get(s.get("config", {}), s.get("extra", {})) for s in summaries]
        cells = "".join(f'<td class="name">{html.escape(str(v))}</td>' for v in values)
        rows.append(f'<tr><td class="name">{html.escape(label)}</td>{cells}</tr>')
    return "<table>" + "".join(rows) + "</table>"


def _versions(cfg: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in (cfg.get("versions") or {}).items())


def _num(x: Any, digits: int) -> str:
    return "—" if x is None else f"{float(x):.{digits}f}"


def write_report(
    run_dirs: Sequence[str | Path], out: str | Path, cases: Collection[str] | None = None
) -> Path:
    """Write one self-contained ``report.html`` comparing ``run_dirs``; returns its path.

    Summaries are recomputed from each run's records (nothing is written into the runs);
    ``cases``: only these case ids (see :func:`~repedit.evaluation.summary.common_cases`).
    """
    dirs = [Path(d) for d in run_dirs]
    if not dirs:
        raise ValueError("write_report needs at least one run directory")
    for d in dirs:
        if not (d / "config.json").exists() and not (d / "summary.json").exists():
            raise RepeditError(f"{d} is not a run directory (no config.json or summary.json)")
    summaries = []
    for d in dirs:
        summaries.append(
            build_summary(d, cases) if (d / "config.json").exists() else load_summary(d)
        )
    names = run_labels(dirs, summaries)
    records = [read_records(d, cases) for d in dirs]
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>repedit report: {html.escape(', '.join(names))}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>repedit robustness report: {html.escape(', '.join(names))}</h1>",
        f'<p class="muted">generated {time.strftime("%Y-%m-%d %H:%M:%S")}. Success rates in %: '
        "teacher-forced exact match of every target token, micro-averaged over (case, variant) "
        "pairs; neighbourhood, neighbourhood_plus (the neighbourhood after the edit's own "
        "statement) and near_subject (look-alike subjects): agreement with the unedited "
        "model's predictions; generated: scored by greedy generation (the continuation begins "
        "with the target, or equals the unedited model's); fluency: ROME n-gram entropy in "
        "bits. Brackets: 95 % bootstrap CI over cases.</p>",
        "<h2>Results</h2>",
        results_table(names, summaries),
        "<h2>Means per test</h2>",
        bar_chart(names, summaries),
        "<h2>Robustness vs. specificity</h2>",
        '<p class="muted">One point per run: x = neighbourhood agreement with the unedited '
        "model, y = mean of the robustness tests (subject paraphrases in-domain and held-out, "
        "scrambled subjects, long context) the run scored.</p>",
        tradeoff_chart(names, summaries),
        "<h2>Per-case distributions</h2>",
        distributions(names, records),
    ]
    seq = [(n, RunDir(d).sequential()) for n, d in zip(names, dirs, strict=True)]
    seq = [(n, pts) for n, pts in seq if pts]
    if seq:
        parts.append("<h2>Sequential editing</h2>")
        for name, pts in seq:
            parts.append(sequential_chart(name, pts))
    parts += ["<h2>Runs</h2>", config_table(names, summaries), "</body></html>"]
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.write_text("\n".join(parts), encoding="utf-8")
        readable(tmp)
    return out

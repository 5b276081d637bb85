"""Summaries of a run directory: ``summary.json`` (a stable contract) and ``summary.md``.

``summary.json``::

    {"tests": {NAME: {"mean": float | null, "ci": [lo, hi] | null, "n": int}},
     "tests_generate": {NAME: {"mean", "ci", "n"}},      # only when generation scored
     "config": {...}, "seconds_per_edit": float | null, "extra": {...}}

NAME is every test of :data:`~repedit.evaluation.probes.TESTS`. Success rates are fractions in
[0, 1], micro-averaged over (case, variant) pairs, with the paper's exact-match metric (teacher
forcing); the locality tests (``neighbourhood``, ``neighbourhood_plus``, ``near_subject``) are
the agreement with the unedited model's predictions; ``fluency`` is ROME's n-gram entropy
(bits). A summary of a run scored by greedy generation (``--scoring generate|both``) adds
``tests_generate``: the same statistics over each probe test's ``gen_exact`` (the continuation
begins with the target) or, for the locality tests, ``gen_agree`` (it equals the unedited
model's); ``tests`` keeps the teacher-forced rates (all ``n = 0`` for a generate-only run).
``n`` counts (case, variant) pairs (texts for fluency); a test the data
could not feed has ``n = 0`` and ``mean``/``ci`` null. The 95 % interval is a percentile
bootstrap over *cases* (1000 resamples, seeded): a case's variants stay together.

``extra`` holds ``neighbourhood_truth`` (exact match to the dataset answer), the
``<test>_beats_alt`` variant (ROME's P(new) > P(true)) of every success test, the scrambled
in-domain / held-out halves, counts, throughput and timing; for a REP run also
``edit_seconds_mean``, ``rep_seconds_mean`` and the gate open rates ``rep_open_pos`` /
``rep_open_neg`` (training pool, after training), ``rep_eval_open_rate`` (every evaluated
token) and ``rep_eval_guarded`` (the share of open evaluated tokens that the β̃ guard or the
prompt-key rule kept).
``config.label`` names the run (``rome``, ``rome+rep(no-gate) τ=0.7``, see :func:`run_label`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from repedit.evaluation.config import flat_fields
from repedit.evaluation.probes import LOCALITY_TESTS, PROBE_TESTS, SUCCESS_TESTS, TESTS, generated
from repedit.evaluation.rundir import SUMMARY, SUMMARY_MD, RunDir, readable
from repedit.io import atomic_path, write_json
from repedit.rep.ablations import rep_label

N_BOOT = 1000
BOOT_SEED = 0

#: (key, test, metric, meta filter): every statistic reported, besides the contract's tests
EXTRA_STATS: tuple[tuple[str, str, str, dict[str, Any] | None], ...] = (
    ("neighbourhood_truth", "neighbourhood", "exact", None),
    *((f"{t}_beats_alt", t, "beats_alt", None) for t in SUCCESS_TESTS),
    ("scrambled_subject_id", "scrambled_subject", "exact", {"half": "id"}),
    ("scrambled_subject_ood", "scrambled_subject", "exact", {"half": "ood"}),
    ("scrambled_subject_id_beats_alt", "scrambled_subject", "beats_alt", {"half": "id"}),
    ("scrambled_subject_ood_beats_alt", "scrambled_subject", "beats_alt", {"half": "ood"}),
)


def metric_of(test: str) -> str:
    """The headline per-probe field of a test (teacher-forced)."""
    if test in LOCALITY_TESTS:
        return "agree"
    return {"fluency": "entropy"}.get(test, "exact")


def gen_metric_of(test: str) -> str:
    """The per-probe field of a test scored by generation."""
    return "gen_agree" if test in LOCALITY_TESTS else "gen_exact"


def read_records(run_dir: str | Path, cases: Collection[str] | None = None) -> list[dict[str, Any]]:
    """The case records of a run (first record per case id; unreadable lines skipped), only
    those of ``cases`` (case ids) when given."""
    records = RunDir(run_dir).results()
    if cases is None:
        return records
    wanted = set(cases)
    return [r for r in records if str(r.get("case_id")) in wanted]


def common_cases(run_dirs: Sequence[str | Path]) -> list[str]:
    """The case ids every run evaluated without error, in the first run's order (to compare
    runs of different lengths on the same cases)."""
    per_run = [[str(r["case_id"]) for r in read_records(d) if not r.get("error")] for d in run_dirs]
    if not per_run:
        return []
    shared = set(per_run[0]).intersection(*per_run[1:])
    return [c for c in per_run[0] if c in shared]


def case_sums(
    records: Sequence[dict[str, Any]],
    test: str,
    metric: str | None = None,
    where: dict[str, Any] | None = None,
) -> list[tuple[float, int]]:
    """Per case ``(sum of the metric over its variants, number of variants)``.

    Cases without any scored variant (failed, or nothing to feed the test) are left out.
    ``where`` keeps only probes whose ``meta`` has those values (e.g. ``{"half": "id"}``).
    """
    metric = metric or metric_of(test)
    out = []
    for rec in records:
        if rec.get("error"):
            continue
        t = (rec.get("tests") or {}).get(test)
        if not t:
            continue
        if test == "fluency":
            values = [s for s in t.get("scores", []) if s is not None]
        else:
            values = [
                p.get(metric)
                for p in t.get("probes", [])
                if not where or all((p.get("meta") or {}).get(k) == v for k, v in where.items())
            ]
            values = [v for v in values if v is not None]
        if values:
            out.append((float(sum(float(v) for v in values)), len(values)))
    return out


def micro_stat(
    sums: Sequence[tuple[float, int]], *, n_boot: int = N_BOOT, seed: int = BOOT_SEED
) -> dict[str, Any]:
    """``{"mean", "ci", "n"}``: the micro-average and its case-bootstrap 95 % interval."""
    total = sum(n for _, n in sums)
    if total == 0:
        return {"mean": None, "ci": None, "n": 0}
    s = np.array([x for x, _ in sums], dtype=np.float64)
    c = np.array([n for _, n in sums], dtype=np.float64)
    mean = float(s.sum() / c.sum())
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(sums), size=(n_boot, len(sums)))
    boot = s[idx].sum(1) / c[idx].sum(1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"mean": mean, "ci": [float(lo), float(hi)], "n": int(total)}


def case_means(records: Sequence[dict[str, Any]], test: str, metric: str | None = None) -> list:
    """Each evaluated case's mean of ``metric`` on ``test`` (for distributions)."""
    return [x / n for x, n in case_sums(records, test, metric)]


def _seconds_per_edit(records: Sequence[dict[str, Any]], key: str = "edit_seconds") -> float | None:
    xs = [r[key] for r in records if not r.get("error") and r.get(key) is not None]
    return float(sum(xs) / len(xs)) if xs else None


def run_label(run_config: dict[str, Any]) -> str:
    """A run's label from its configuration: ``rome``, ``rome+rep``, ``rome+rep(no-gate)``,
    ``rome+rep τ=0.7`` (see :func:`repedit.rep.ablations.rep_label`)."""
    return rep_label(
        str(run_config.get("method") or "?"), run_config.get("rep"), run_config.get("rep_taus")
    )


def _rep_gate_means(records: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """Means over cases (and adapted layers) of REP's hard-gate open rates: on the training
    positives / negatives after training, and over every token of the evaluation."""
    pos: list[float] = []
    neg: list[float] = []
    ev: list[float] = []
    opened = guarded = 0
    counted = False
    for r in records:
        if r.get("error"):
            continue
        rep = r.get("rep") or {}
        for layer in rep.get("layers") or []:
            stats = rep.get(str(layer)) or {}
            for out, name in ((pos, "open_pos"), (neg, "open_neg")):
                v = stats.get(name)
                if isinstance(v, list) and v and v[-1] is not None:
                    out.append(float(v[-1]))
        for stats in (r.get("rep_eval_gate") or {}).values():
            if stats.get("rate") is not None:
                ev.append(float(stats["rate"]))
            if "guarded" in stats:  # records written before the count existed do not add
                opened += int(stats.get("open") or 0)
                guarded += int(stats["guarded"] or 0)
                counted = True
    return {
        "rep_open_pos": sum(pos) / len(pos) if pos else None,
        "rep_open_neg": sum(neg) / len(neg) if neg else None,
        "rep_eval_open_rate": sum(ev) / len(ev) if ev else None,
        "rep_eval_guarded": guarded / opened if counted and opened else None,
    }


def _wall(run_dir: Path, records: Sequence[dict[str, Any]], subset: bool = False) -> float:
    sessions = [] if subset else RunDir(run_dir).sessions()
    wall = sum(float(s.get("wall_seconds") or 0.0) for s in sessions)
    if wall == 0.0:  # a subset, or no session finished cleanly: the per-case times
        keys = ("reference_seconds", "edit_seconds", "rep_seconds", "eval_seconds")
        wall = sum(float(r.get(k) or 0.0) for r in records for k in keys)
    return wall


def _test_stats(records: Sequence[dict[str, Any]], selected: set[str]) -> dict[str, Any]:
    empty = {"mean": None, "ci": None, "n": 0}
    return {t: micro_stat(case_sums(records, t)) if t in selected else empty for t in TESTS}


def _generate_stats(records: Sequence[dict[str, Any]], selected: set[str]) -> dict[str, Any]:
    empty = {"mean": None, "ci": None, "n": 0}
    return {
        t: micro_stat(case_sums(records, t, gen_metric_of(t))) if t in selected else empty
        for t in PROBE_TESTS
    }


def _extra_stats(records: Sequence[dict[str, Any]], selected: set[str]) -> dict[str, Any]:
    empty = {"mean": None, "ci": None, "n": 0}
    return {
        key: micro_stat(case_sums(records, test, metric, where)) if test in selected else empty
        for key, test, metric, where in EXTRA_STATS
    }


def _counts(records: Sequence[dict[str, Any]], wall: float, sessions: int) -> dict[str, Any]:
    """Counts, throughput and timing of a run's records."""
    ok = [r for r in records if not r.get("error")]
    n_probes = sum(int(r.get("n_probes") or 0) for r in ok)
    score_s = sum(float(r.get("score_seconds") or 0.0) for r in ok)
    scramble = [r["scramble_n"] for r in ok if "scramble_n" in r]
    return {
        "n_cases": len(records),
        "n_evaluated": len(ok),
        "n_failed": len(records) - len(ok),
        "failed_cases": [r["case_id"] for r in records if r.get("error")][:100],
        "n_probes": n_probes,
        "probes_per_s": n_probes / score_s if score_s > 0 else None,
        "score_seconds": score_s,
        "fluency_seconds": sum(float(r.get("fluency_seconds") or 0.0) for r in ok),
        "eval_seconds_per_case": (
            sum(float(r.get("eval_seconds") or 0.0) for r in ok) / len(ok) if ok else None
        ),
        "wall_seconds": wall,
        "scramble_n_zero": sum(1 for n in scramble if n == 0),
        "sessions": sessions,
        "edit_seconds_mean": _seconds_per_edit(records),
        "rep_seconds_mean": _seconds_per_edit(records, "rep_seconds"),
        **_rep_gate_means(records),
    }


def _config(
    rc: dict[str, Any], stored: dict[str, Any], run_dir: Path, wall: float, spe: float | None
) -> dict[str, Any]:
    """The summary's ``config`` block from the stored (flattened) RunConfig and metadata."""
    return {
        "model": rc.get("model"),
        "model_name": stored.get("model_name"),
        "model_fingerprint": stored.get("model_fingerprint"),
        "method": rc.get("method"),
        "label": run_label(rc),
        "rep": rc.get("rep"),
        "rep_taus": rc.get("rep_taus") or None,
        "hparams": stored.get("hparams_resolved"),
        "hparams_overrides": rc.get("hparams"),
        "edit_layers": stored.get("edit_layers"),
        "mode": rc.get("mode"),
        "batch_size": rc.get("batch_size"),
        "eval_every": rc.get("eval_every"),
        "data": rc.get("data"),
        "data_path": stored.get("data_path"),
        "data_sha256": stored.get("data_sha256"),
        "n": rc.get("n"),
        "seed": rc.get("seed"),
        "tests": rc.get("tests"),
        "scoring": rc.get("scoring") or "teacher-forced",
        "suite": stored.get("suite"),
        "stats": {
            "corpus": rc.get("stats_corpus"),
            "n_tokens": rc.get("stats_tokens"),
            "seq_len": rc.get("stats_seq_len"),
        },
        "versions": stored.get("versions"),
        "wall_seconds": wall,
        "seconds_per_edit": spe,
        "run_dir": str(run_dir),
    }


def build_summary(run_dir: str | Path, cases: Collection[str] | None = None) -> dict[str, Any]:
    """The summary dict of a run directory (nothing written); over ``cases`` (case ids) only
    when given (``extra.n_cases`` then counts those, and the wall time is the per-case sum)."""
    run_dir = Path(run_dir)
    run = RunDir(run_dir)
    stored = run.config()
    records = read_records(run_dir, cases)
    rc = flat_fields(stored.get("run_config", {}))
    selected = set(rc.get("tests") or TESTS)
    wall = _wall(run_dir, records, subset=cases is not None)
    spe = _seconds_per_edit(records)
    extra = _extra_stats(records, selected)
    extra.update(_counts(records, wall, len(run.sessions())))
    seq = run.sequential()
    if seq:
        extra["sequential_checkpoints"] = len(seq)
    out = {
        "tests": _test_stats(records, selected),
        "config": _config(rc, stored, run_dir, wall, spe),
        "seconds_per_edit": spe,
        "extra": extra,
    }
    if generated(rc.get("scoring") or "teacher-forced"):
        out["tests_generate"] = _generate_stats(records, selected)
    return out


#: a test a summary has no statistics for
EMPTY_STAT: dict[str, Any] = {"mean": None, "ci": None, "n": 0}
#: comparison_rows' marker for a generate-scored row
GENERATED = "tests_generate"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _fmt(test: str, stat: dict[str, Any]) -> tuple[str, str]:
    mean, ci = stat.get("mean"), stat.get("ci")
    if test == "fluency":
        m = "—" if mean is None else f"{mean:.3f}"
        c = "—" if not ci else f"[{ci[0]:.3f}, {ci[1]:.3f}]"
    else:
        m = _pct(mean)
        c = "—" if not ci else f"[{_pct(ci[0])}, {_pct(ci[1])}]"
    return m, c


def _secs(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


#: timing / REP rows of the tables: (label, extra key, formatter); shown when a run used REP
REP_ROWS: tuple[tuple[str, str, Any], ...] = (
    ("edit_seconds (mean, s)", "edit_seconds_mean", _secs),
    ("rep_seconds (mean, s)", "rep_seconds_mean", _secs),
    ("REP gate open: train positives", "rep_open_pos", _pct),
    ("REP gate open: train negatives", "rep_open_neg", _pct),
    ("REP gate open: eval tokens", "rep_eval_open_rate", _pct),
    ("REP open tokens kept (β̃ guard, prompt key)", "rep_eval_guarded", _pct),
)


def has_rep(summary: dict[str, Any]) -> bool:
    return summary.get("extra", {}).get("rep_seconds_mean") is not None


def table_rows(summary: dict[str, Any]) -> list[list[str]]:
    """Rows ``test, mean, 95% CI, n, P(new)>P(true)`` (rates in %, fluency in bits); a run
    scored by generation adds a ``generated`` row under each probe test; a REP run adds its
    mean edit / REP seconds and gate open rates (no CI). A test a summary lacks (written
    before the test existed) shows as not scored."""
    rows = []
    extra = summary.get("extra", {})
    gen = summary.get("tests_generate")
    for test in TESTS:
        stat = summary["tests"].get(test) or EMPTY_STAT
        m, c = _fmt(test, stat)
        alt = extra.get(f"{test}_beats_alt")
        rows.append([test, m, c, str(stat["n"]), _pct(alt["mean"]) if alt else ""])
        if gen is not None and test in gen:
            m, c = _fmt(test, gen[test])
            rows.append(["  generated", m, c, str(gen[test]["n"]), ""])
        if test == "scrambled_subject":
            for half in ("id", "ood"):
                s = extra.get(f"scrambled_subject_{half}")
                a = extra.get(f"scrambled_subject_{half}_beats_alt")
                if s:
                    m, c = _fmt(test, s)
                    rows.append([f"  {half} half", m, c, str(s["n"]), _pct(a["mean"]) if a else ""])
        if test == "neighbourhood":
            s = extra.get("neighbourhood_truth")
            if s:
                m, c = _fmt(test, s)
                rows.append(["neighbourhood_truth", m, c, str(s["n"]), ""])
    if has_rep(summary):
        n = str(extra.get("n_evaluated", ""))
        for label, key, fmt in REP_ROWS:
            rows.append([label, fmt(extra.get(key)), "", n, ""])
    return rows


TABLE_COLUMNS = ("test", "mean (%)", "95% CI", "n", "P(new)>P(true) (%)")


def comparison_rows(summaries: Sequence[dict[str, Any]]) -> list[list[str]]:
    """One row per test, one ``mean [lo, hi]`` cell per run (rates in %, fluency in bits)."""
    rows = []
    labels: list[tuple[str, str, str | None]] = []
    any_gen = any(s.get("tests_generate") is not None for s in summaries)
    for test in TESTS:
        labels.append((test, test, None))
        if any_gen and test in PROBE_TESTS:
            labels.append(("  generated", test, GENERATED))
        if test == "scrambled_subject":
            labels += [(f"  {h} half", test, f"scrambled_subject_{h}") for h in ("id", "ood")]
        if test == "neighbourhood":
            labels.append(("neighbourhood_truth", test, "neighbourhood_truth"))
    for label, test, key in labels:
        row = [label]
        for summ in summaries:
            if key is None:
                stat = summ["tests"].get(test)
            elif key == GENERATED:
                stat = (summ.get("tests_generate") or {}).get(test)
            else:
                stat = summ.get("extra", {}).get(key, {})
            m, c = _fmt(test, stat or {})
            row.append(m if c == "—" else f"{m} {c}")
        rows.append(row)
    if any(has_rep(s) for s in summaries):
        for label, key, fmt in REP_ROWS:
            rows.append([label, *(fmt(s.get("extra", {}).get(key)) for s in summaries)])
    return rows


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table: the first column left-aligned, the others right-aligned."""
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(columns) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def runs_markdown(names: Sequence[str], summaries: Sequence[dict[str, Any]]) -> str:
    """One run's table, or several runs side by side, as Markdown."""
    if len(summaries) == 1:
        return markdown_table(TABLE_COLUMNS, table_rows(summaries[0]))
    return markdown_table(["test (%; fluency in bits)", *names], comparison_rows(summaries))


def markdown(summary: dict[str, Any]) -> str:
    """A readable markdown rendering of a summary."""
    cfg = summary.get("config", {})
    extra = summary.get("extra", {})
    lines = [
        f"# {cfg.get('label') or cfg.get('method')} on {cfg.get('model')} — {cfg.get('data')} "
        f"({cfg.get('mode')})",
        "",
        markdown_table(TABLE_COLUMNS, table_rows(summary)).rstrip("\n"),
    ]
    spe = summary.get("seconds_per_edit")
    pps = extra.get("probes_per_s")
    lines += [
        "",
        "Success rates: exact match of every target token (teacher forcing), micro-averaged "
        "over (case, variant) pairs; neighbourhood, neighbourhood_plus (after the edit's own "
        "statement), near_subject (look-alike subjects): agreement with the unedited model; "
        "neighbourhood_truth: exact match to the dataset answer; generated: scored by greedy "
        "generation instead (the continuation begins with the target, or equals the unedited "
        "model's); fluency: n-gram entropy (bits, not %). CI: 95 % bootstrap over cases.",
        "",
        f"- cases: {extra.get('n_cases')} ({extra.get('n_failed')} failed)",
        f"- seconds per edit: {'—' if spe is None else f'{spe:.2f}'}"
        + (
            f" (+ REP training {extra['rep_seconds_mean']:.2f})"
            if extra.get("rep_seconds_mean") is not None
            else ""
        ),
        *([f"- REP overrides: {cfg.get('rep')}"] if cfg.get("rep") is not None else []),
        f"- probes/s: {'—' if pps is None else f'{pps:.1f}'}",
        f"- wall time: {extra.get('wall_seconds', 0.0):.1f} s",
        f"- model: {cfg.get('model_name')} (fingerprint {cfg.get('model_fingerprint')})",
        f"- data: {cfg.get('data_path')} (sha256 {str(cfg.get('data_sha256'))[:16]}…)",
        f"- seed: {cfg.get('seed')}; versions: "
        + ", ".join(f"{k} {v}" for k, v in (cfg.get("versions") or {}).items()),
    ]
    return "\n".join(lines) + "\n"


def summarize(run_dir: str | Path) -> dict[str, Any]:
    """Compute a run's summary and write ``summary.json`` and ``summary.md`` into it."""
    run_dir = Path(run_dir)
    summary = build_summary(run_dir)
    write_json(run_dir / SUMMARY, _finite(summary))
    readable(run_dir / SUMMARY)
    with atomic_path(run_dir / SUMMARY_MD) as tmp:
        tmp.write_text(markdown(summary), encoding="utf-8")
        readable(tmp)
    return summary


def _finite(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def load_summary(run_dir: str | Path) -> dict[str, Any]:
    """``summary.json`` of a run, computed (and written) if missing."""
    path = Path(run_dir) / SUMMARY
    if path.exists():
        return json.loads(path.read_text())
    return summarize(run_dir)

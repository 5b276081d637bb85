"""Regenerate the tables of docs/results.md from the runs' committed summaries.

Each folder ``docs/results/GROUP/`` holds one sub-folder per run with its ``summary.json``
(small, committed) and a ``commands.sh`` with the evaluation commands that produced them. The
table of each group is ``repedit report GROUP/* --markdown``; this script writes those tables
between the ``generated`` markers of docs/results.md, so the numbers are never copied by hand.
A group whose runs hold ``ceiling.json`` (``repedit analyze ceiling``) instead gets one table
of REP's rate, the share of the plain → oracle-key gap it closes and (newer runs) how often
REP's gate opened at the probes' subject token, per run, and, where runs are named
``*-seedN``, REP's mean and range over them. With a ``goals.json`` ({test: ">= 85" or
">= plain + 10"}) the group's table shows every rate beside its distance to the test's goal.
A group of ``repedit analyze readout`` runs (``readout.md``) gets each run's own tables, and a
group of ``benchmarks/mass_edit.py`` runs (``mass_edit.json``) one table of the runs side by
side with each run's plot of the first batch's efficacy; a group of ``tools/locality_keys.py``
runs (``locality_keys.json``) each run's table. ``docs/results/goal-board.json`` names, per
configuration and dataset, one ceiling run; the board puts them all in one table (plain, with
REP and with the oracle key), each rate beside its group's goal, ahead of the groups.
Usage: python tools/results_tables.py [--check]   (--check: fail if the file is out of date)
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

from repedit.evaluation.probes import TESTS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
TOOLS = ROOT / "tools"
PAGE = ROOT / "docs" / "results.md"
BOARD = RESULTS / "goal-board.json"
BEGIN, END = "<!-- generated:begin -->", "<!-- generated:end -->"


def _ceiling_docs(runs: list[Path]) -> dict[str, dict]:
    """Each run's ``ceiling.json``, with the tests of any ``ceiling.*.json`` beside it added:
    one configuration whose tests came from two runs of the same edits (its commands say so;
    a test both runs measured must agree, which checks that they made the same edits)."""
    docs = {}
    for r in runs:
        doc = json.loads((r / "ceiling.json").read_text(encoding="utf-8"))
        for part in sorted(r.glob("ceiling.*.json")):
            extra = json.loads(part.read_text(encoding="utf-8"))
            same = all(extra.get(k) == doc.get(k) for k in ("method", "data", "n_cases"))
            both = set(extra["tests"]) & set(doc["tests"])
            if not same or any(extra["tests"][t] != doc["tests"][t] for t in both):
                raise SystemExit(f"{part}: not the same edits as ceiling.json (a test differs)")
            doc["tests"] = {**doc["tests"], **extra["tests"]}
        docs[r.name] = doc
    return docs


def ceiling_table(runs: list[Path]) -> str:
    """Rows: tests; columns: plain and oracle key (shared when every run of the group made the
    same edits, else per run), then per run REP's rate and the gap it closes, in %. Runs of
    different editors get :func:`editors_table` instead."""
    docs = _ceiling_docs(runs)
    if len({d.get("method") for d in docs.values()}) > 1:
        return editors_table(docs)
    first = next(iter(docs.values()))["tests"]
    same = all(
        {t: (v["plain"], v["oracle_key"]) for t, v in d["tests"].items()}
        == {t: (v["plain"], v["oracle_key"]) for t, v in first.items()}
        for d in docs.values()
    )
    seeds = [name for name in docs if re.search(r"-seed\d+$", name)]
    seeds = seeds if len(seeds) > 1 else []
    own = [] if same else ["plain", "oracle key"]
    head = [
        "test",
        "n",
        *(["plain", "oracle key"] if same else []),
        *(f"{name}: {col}" for name in docs for col in [*own, "REP (gap closed, gate)"]),
        *([f"REP over {len(seeds)} seeds: mean [range], gap closed"] if seeds else []),
    ]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for test, t in first.items():
        cells = [test, str(t["n"])]
        cells += [_pct(t["plain"]), _pct(t["oracle_key"])] if same else []
        for doc in docs.values():
            r = doc["tests"].get(test, {})
            cells += [] if same else [_pct(r.get("plain")), _pct(r.get("oracle_key"))]
            cells.append(_rep_cell(r))
        if seeds:
            cells.append(_spread([docs[name]["tests"].get(test, {}) for name in seeds]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


GOAL = re.compile(r"^>=\s*(?:(plain)\s*([+-])\s*)?(\d+(?:\.\d+)?)$")


def _goal(spec: str, plain: float | None) -> float | None:
    """The threshold in [0, 1] of a goal ``">= 85"`` or ``">= plain + 10"`` / ``">= plain - 2"``
    (points; ``plain`` is the rate of the group's unmodified editor, or None where it has none)."""
    m = GOAL.match(spec.strip())
    if m is None:
        raise SystemExit(f"goal {spec!r}: write '>= 85', '>= plain + 10' or '>= plain - 2'")
    points = float(m.group(3)) / 100
    if m.group(1) is None:
        return points
    return None if plain is None else plain + (points if m.group(2) == "+" else -points)


def _goal_text(spec: str) -> str:
    """A goal as a table shows it: ``>= plain - 2`` as ``≥ plain − 2``."""
    return spec.replace(">=", "≥").replace(" - ", " − ")


def _against(x: float | None, goal: float | None) -> str:
    """A rate with ✓ where it meets the goal, else its distance below it in points."""
    if x is None or goal is None:
        return _pct(x)
    short = 100 * (goal - x)
    return f"{_pct(x)} ✓" if short < 1e-6 else f"{_pct(x)} [−{short:.1f}]"


def goals_table(docs: dict[str, dict], goals: dict[str, str]) -> str:
    """Rows: tests; per run (one configuration each) its plain edit, the oracle key and + REP
    (gap closed), every rate beside its goal's distance; the first run is the unmodified
    editor that relative goals (``plain + 10``) refer to."""
    tests = sorted({t for d in docs.values() for t in d["tests"]}, key=_test_order)
    base = next(iter(docs.values()))["tests"]
    head = ["test", "n"]
    for name in docs:
        head += [name, f"{name}: oracle key", f"{name} + REP (gap closed)"]
    lines = [
        "| " + " | ".join([*head, "goal"]) + " |",
        "|---|" + "---:|" * (len(head) - 1) + "---|",
    ]
    for test in tests:
        spec = goals.get(test)
        goal = None if spec is None else _goal(spec, base.get(test, {}).get("plain"))
        n = max(d["tests"][test]["n"] for d in docs.values() if test in d["tests"])
        cells = [test, str(n)]
        for doc in docs.values():
            r = doc["tests"].get(test, {})
            gap = r.get("gap_closed")
            note = "" if gap is None or r.get("rep") is None else f" ({100 * gap:.0f} %)"
            cells += [_against(r.get("plain"), goal), _pct(r.get("oracle_key"))]
            cells.append(_against(r.get("rep"), goal) + note)
        lines.append("| " + " | ".join([*cells, _goal_text(spec or "")]) + " |")
    return "\n".join(lines) + "\n"


def _test_order(test: str) -> tuple[int, str]:
    """The suite's report order (``evaluation.probes.TESTS``), a scramble half after its test."""
    base = re.sub(r"_(id|ood)$", "", test)
    return (TESTS.index(base) if base in TESTS else len(TESTS), test)


def editors_table(docs: dict[str, dict]) -> str:
    """Rows: runs (one editor each); columns: tests, each ``plain → REP (gap closed)`` in %."""
    tests = sorted({t for d in docs.values() for t in d["tests"]}, key=_test_order)
    lines = [
        "| run | method | " + " | ".join(tests) + " |",
        "|---|---|" + "---:|" * len(tests),
    ]
    for name, doc in docs.items():
        cells = [name, str(doc.get("method", "—"))]
        for test in tests:
            r = doc["tests"].get(test)
            if r is None:
                cells.append("—")
                continue
            gap = r.get("gap_closed")
            note = "" if gap is None else f" ({100 * gap:.0f} %)"
            cells.append(f"{_pct(r.get('plain'))} → {_pct(r.get('rep'))}{note}")
        lines.append("| " + " | ".join(cells) + " |")
    n = {t: max(d["tests"][t]["n"] for d in docs.values() if t in d["tests"]) for t in tests}
    lines.append("| probes per run | — | " + " | ".join(str(n[t]) for t in tests) + " |")
    return "\n".join(lines) + "\n"


def _rep_cell(r: dict) -> str:
    """REP's rate with the gap it closes and its gate-open share, where the run has them."""
    gap, gate = r.get("gap_closed"), r.get("rep_gate_open")
    notes = [] if gap is None else [f"{100 * gap:.0f} %"]
    notes += [] if gate is None else [f"gate {100 * gate:.0f} %"]
    return _pct(r.get("rep")) + (f" ({', '.join(notes)})" if notes else "")


def _spread(rows: list[dict]) -> str:
    """Mean REP rate over seeds with its range, and the mean gap closed."""
    reps = [100 * r["rep"] for r in rows if r.get("rep") is not None]
    if not reps:
        return "—"
    mean = sum(reps) / len(reps)
    gaps = [100 * r["gap_closed"] for r in rows if r.get("gap_closed") is not None]
    gap = f", {sum(gaps) / len(gaps):.0f} %" if gaps else ""
    return f"{mean:.1f} [{min(reps):.1f}–{max(reps):.1f}]{gap}"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _bits(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def _arrow(before: dict, after: dict, key: str, pct: bool = True) -> str:
    fmt = _pct if pct else _bits
    return f"{fmt(before.get(key))} → {fmt(after.get(key))}"


def mass_edit_rows(r: dict) -> list[tuple[str, str]]:
    """One run's column of the mass-edit table (rates in %)."""
    b, a = r["before"], r["after"]
    curve = r["first_batch_curve"]
    rows = [
        ("method", r["method"]),
        ("edits / batch size", f"{r['n']} / {r['batch_size']}"),
        ("key mode used", str(r.get("key_mode_used"))),
        ("edit seconds (value share)", f"{r['edit_seconds']:.0f} ({r['value_share']:.2f})"),
        ("seconds per edit", f"{r['seconds_per_edit']:.2f}"),
        (
            "peak RSS MB (before edits)",
            f"{r['peak_rss_mb']:.0f} ({r['peak_rss_mb_before_edits']:.0f})",
        ),
        ("efficacy, all N", _arrow(b, a, "efficacy")),
        (f"paraphrase (sample {r['sample_size']})", _arrow(b, a, "paraphrase")),
        ("neighbourhood", _arrow(b, a, "neighbourhood")),
        ("neighbourhood argmax unchanged", _pct(a.get("neighbourhood_agree"))),
        ("fluency bits", _arrow(b, a, "fluency", pct=False)),
        (
            "first batch's efficacy, after its batch → at the end",
            f"{_pct(curve[0]['first_batch_efficacy'])} → {_pct(curve[-1]['first_batch_efficacy'])}",
        ),
        ("threads", str(r["threads"])),
    ]
    other = r.get("other_key_mode")
    if other:
        o, mode = other["after"], other["key_mode"]
        rows += [
            (
                f"[{mode}] solve seconds, values reused",
                f"{other['edit_seconds_without_values']:.0f}",
            ),
            (f"[{mode}] efficacy, all N", _pct(other["efficacy"])),
            (f"[{mode}] paraphrase", _pct(o.get("paraphrase"))),
            (f"[{mode}] neighbourhood", _pct(o.get("neighbourhood"))),
            (f"[{mode}] neighbourhood argmax unchanged", _pct(o.get("neighbourhood_agree"))),
            (f"[{mode}] fluency bits", _bits(o.get("fluency"))),
        ]
    return rows


def mass_edit_section(group: Path, runs: list[Path], commands: str) -> str:
    """The runs' numbers side by side, the CPU flags, each run's plot, then the commands."""
    docs = {r.name: json.loads((r / "mass_edit.json").read_text(encoding="utf-8")) for r in runs}
    columns = {name: dict(mass_edit_rows(d)) for name, d in docs.items()}
    labels = list(dict.fromkeys(k for col in columns.values() for k in col))
    lines = ["| | " + " | ".join(docs) + " |", "|---|" + "---:|" * len(docs)]
    for label in labels:
        lines.append(
            f"| {label} | " + " | ".join(col.get(label, "") for col in columns.values()) + " |"
        )
    flags = sorted({", ".join(d["cpu_flags"]) for d in docs.values()})
    plots = [
        f"![{name}: the first batch's efficacy as batches arrive]"
        f"(results/{group.name}/{name}/mass_edit.png)"
        for name in docs
        if (group / name / "mass_edit.png").is_file()
    ]
    return (
        f"### {group.name}\n\n" + "\n".join(lines) + "\n\n"
        f"Table: `mass_edit.json` of {', '.join(docs)}; rates in %. CPU flags: "
        f"{'; '.join(flags)}.\n\n"
        + "".join(p + "\n\n" for p in plots)
        + f"Runs:\n\n```bash\n{commands}\n```\n"
    )


def _ceiling_runs(group: Path) -> list[Path]:
    """The group's runs with a ``ceiling.json``, by name (none when the group is missing)."""
    found = group.iterdir() if group.is_dir() else iter(())
    return sorted(p for p in found if (p / "ceiling.json").is_file())


def _goals(group: Path) -> dict[str, str] | None:
    """The group's ``goals.json`` ({test: goal}), or None without one."""
    path = group / "goals.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def group_section(group: Path) -> str:
    """The Markdown of one group: its table (``repedit report --markdown``, or the ceiling
    table) and its commands."""
    ceilings = _ceiling_runs(group)
    runs = sorted(p for p in group.iterdir() if (p / "summary.json").is_file())
    commands = (group / "commands.sh").read_text(encoding="utf-8").strip()
    if ceilings:
        spec = _goals(group)
        if spec is not None:
            table = goals_table(_ceiling_docs(ceilings), spec)
            table += "\n✓: the goal is met; [−x]: x points short of it.\n"
        else:
            table = ceiling_table(ceilings)
        return (
            f"### {group.name}\n\n{table.rstrip()}\n\n"
            f"Table: `repedit analyze ceiling` outputs ({', '.join(r.name for r in ceilings)})."
            f" Runs:\n\n```bash\n{commands}\n```\n"
        )
    masses = sorted(p for p in group.iterdir() if (p / "mass_edit.json").is_file())
    if masses:
        return mass_edit_section(group, masses, commands)
    keys = sorted(p for p in group.iterdir() if (p / "locality_keys.json").is_file())
    if keys:
        return locality_keys_section(group, keys, commands)
    readouts = sorted(p for p in group.iterdir() if (p / "readout.md").is_file())
    if readouts and not runs:
        return readout_section(group, readouts, commands)
    if not runs:
        raise SystemExit(f"{group}: no run folder with a summary.json, ceiling.json or readout.md")
    table = subprocess.run(
        ["repedit", "report", *map(str, runs), "--markdown"],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout
    rel = " ".join(str(r.relative_to(ROOT)) for r in runs)
    return (
        f"### {group.name}\n\n{table.rstrip()}\n\n"
        f"Table: `repedit report {rel} --markdown`. Runs:\n\n```bash\n{commands}\n```\n"
    )


def locality_keys_section(group: Path, runs: list[Path], commands: str) -> str:
    """Each run's table as ``tools/locality_keys.py`` prints it, then the group's commands."""
    spec = importlib.util.spec_from_file_location("locality_keys", TOOLS / "locality_keys.py")
    assert spec and spec.loader
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    parts = [f"### {group.name}\n"]
    for r in runs:
        doc = json.loads((r / "locality_keys.json").read_text(encoding="utf-8"))
        head = f"**{r.name}**: {doc['model']}, layer {doc['layer']}, {doc['data']} (n = {doc['n']})"
        parts.append(f"{head}, held subjects from {doc['pool']}\n\n{tool.table(doc)}\n")
    parts.append(
        "Mean over cases of the largest share |s| of the edit's residual written at a probe's "
        f"keys. Tables: `tools/locality_keys.py` outputs. Runs:\n\n```bash\n{commands}\n```\n"
    )
    return "\n".join(parts)


def readout_section(group: Path, runs: list[Path], commands: str) -> str:
    """Each run's ``readout.md`` as ``repedit analyze readout`` wrote it (its title made a
    bold line), then the group's commands."""
    parts = [f"### {group.name}\n"]
    for r in runs:
        body = (r / "readout.md").read_text(encoding="utf-8").strip().splitlines()
        title = body[0].lstrip("#").strip() if body and body[0].startswith("#") else r.name
        parts.append(f"**{r.name}**: {title}\n\n" + "\n".join(body[1:]).strip() + "\n")
    parts.append(
        f"Tables: `repedit analyze readout` outputs ({', '.join(r.name for r in runs)})."
        f" Runs:\n\n```bash\n{commands}\n```\n"
    )
    return "\n".join(parts)


#: the board's column names for the suite's tests (others keep their own)
SHORT = {
    "subject_paraphrase": "in-domain",
    "ood_subject_paraphrase": "OOD",
    "scrambled_subject_ood": "held-out scrambles",
    "long_context": "long context",
    "near_subject": "near subject",
}
#: the board's rows per configuration: the field of a ceiling test and the row label's suffix
BOARD_ROWS = (("plain", ""), ("rep", " + REP"), ("oracle_key", ": oracle key"))


def _board_source(ref: str) -> tuple[dict, dict[str, float | None], dict[str, str]]:
    """The run ``GROUP/RUN`` of the board: its ceiling document, the plain rates of its group's
    first run (what relative goals count from) and the group's goals."""
    group, _, run = ref.partition("/")
    path = RESULTS / group
    docs = _ceiling_docs(_ceiling_runs(path))
    if run not in docs:
        raise SystemExit(f"{BOARD}: no ceiling run {ref!r} under {RESULTS}")
    base = next(iter(docs.values()))["tests"]
    return docs[run], {t: v.get("plain") for t, v in base.items()}, _goals(path) or {}


def board_table(spec: dict) -> str:
    """Rows: each configuration plain, with REP and with the oracle key (the ceiling, shown
    without goal marks), a row none of its runs measured left out; columns: per dataset its
    cases and tests, each rate beside the goal of the run's group; a last row names the goals."""
    datasets: dict[str, list[str]] = spec["datasets"]
    head, goal_row = ["configuration"], ["goal"]
    for name, tests in datasets.items():
        head += [f"{name} cases", *(f"{name}: {SHORT.get(t, t)}" for t in tests)]
        goal_row += [""] * (len(tests) + 1)
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for conf in spec["configurations"]:
        unknown = set(conf["runs"]) - set(datasets)
        if unknown:
            raise SystemExit(f"{BOARD}: {conf['label']!r} names unknown datasets {sorted(unknown)}")
        sources = {name: _board_source(ref) for name, ref in conf["runs"].items()}
        for field, suffix in BOARD_ROWS:
            cells, measured = [conf["label"] + suffix], False
            for name, tests in datasets.items():
                if name not in sources:
                    cells += ["—"] * (len(tests) + 1)
                    continue
                doc, base, goals = sources[name]
                cells.append(str(doc.get("n_cases", "—")))
                for test in tests:
                    want = goals.get(test)
                    goal = None if want is None else _goal(want, base.get(test))
                    if want:  # this cell's column
                        goal_row[len(cells)] = _goal_text(want)
                    x = doc["tests"].get(test, {}).get(field)
                    measured = measured or x is not None
                    cells.append(_pct(x) if field == "oracle_key" else _against(x, goal))
            if measured:  # a configuration run without REP gets no REP row
                lines.append("| " + " | ".join(cells) + " |")
    lines.append("| " + " | ".join(goal_row) + " |")
    return "\n".join(lines) + "\n"


def board_section(spec: dict) -> str:
    """The board under its title, its note and where its numbers come from."""
    refs = sorted({ref for conf in spec["configurations"] for ref in conf["runs"].values()})
    return (
        f"### {spec['title']}\n\n{spec.get('note', '').strip()}\n\n{board_table(spec).rstrip()}\n\n"
        "✓: the goal is met; [−x]: x points short of it; a relative goal counts from the plain "
        "editor of the run's group. Oracle-key rows are the ceiling, not a configuration. "
        f"From the groups below: {', '.join(f'`{r}`' for r in refs)}.\n"
    )


def render(page: str) -> str:
    """``page`` with the text between the markers replaced by every group's section."""
    if BEGIN not in page or END not in page:
        raise SystemExit(f"{PAGE}: the {BEGIN} / {END} markers are missing")
    groups = sorted(p for p in RESULTS.iterdir() if p.is_dir())
    body = "\n".join(group_section(g) for g in groups)
    if BOARD.is_file():
        body = board_section(json.loads(BOARD.read_text(encoding="utf-8"))) + "\n" + body
    head, rest = page.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{body}{END}{tail}"


def main(argv: list[str]) -> int:
    page = PAGE.read_text(encoding="utf-8")
    new = render(page)
    if "--check" in argv:
        if new != page:
            print(f"{PAGE} is out of date: run python tools/results_tables.py")
            return 1
        return 0
    PAGE.write_text(new, encoding="utf-8")
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

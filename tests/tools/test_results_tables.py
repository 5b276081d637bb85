"""tools/results_tables.py renders a group of mass_edit.py runs from their JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "results_tables", Path(__file__).resolve().parents[2] / "tools" / "results_tables.py"
)
assert _SPEC and _SPEC.loader
results_tables = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(results_tables)


def _report(method: str, n: int, batch: int, other: dict | None = None) -> dict:
    scores = {"efficacy": 0.0, "paraphrase": 0.1, "neighbourhood": 0.5, "fluency": 4.8}
    after = {**scores, "efficacy": 0.93, "neighbourhood_agree": 0.97, "fluency": 4.75}
    return {
        "method": method, "n": n, "batch_size": batch, "key_mode_used": "mean",
        "edit_seconds": 1234.5, "value_share": 0.9, "seconds_per_edit": 1.2345,
        "peak_rss_mb": 3000.0, "peak_rss_mb_before_edits": 1000.0, "sample_size": 100,
        "before": scores, "after": after, "threads": 2, "cpu_flags": ["avx2", "amx_bf16"],
        "first_batch_curve": [
            {"edits": batch, "first_batch_efficacy": 0.95},
            {"edits": n, "first_batch_efficacy": 0.81},
        ],
        "other_key_mode": other,
    }  # fmt: skip


def test_mass_edit_group_gets_one_table_with_every_run(tmp_path: Path, monkeypatch) -> None:
    group = tmp_path / "mass-edit-x"
    other = {
        "key_mode": "each", "values_reused": True, "edit_seconds_without_values": 99.0,
        "efficacy": 0.42, "after": {"paraphrase": 0.2, "neighbourhood": 0.4, "fluency": 4.7},
    }  # fmt: skip
    for name, rep in (("memit", _report("memit", 1000, 1000, other)),
                      ("alphaedit-seq", _report("alphaedit", 1000, 100))):  # fmt: skip
        (group / name).mkdir(parents=True)
        (group / name / "mass_edit.json").write_text(json.dumps(rep))
    (group / "memit" / "mass_edit.png").write_bytes(b"\x89PNG")
    (group / "commands.sh").write_text("python benchmarks/mass_edit.py --n 1000\n")
    text = results_tables.group_section(group)
    assert text.startswith("### mass-edit-x")
    assert "| | alphaedit-seq | memit |" in text
    assert "| efficacy, all N | 0.0 → 93.0 | 0.0 → 93.0 |" in text
    assert "| first batch's efficacy, after its batch → at the end | 95.0 → 81.0 |" in text
    assert "| [each] efficacy, all N |  | 42.0 |" in text  # only the run that has it
    assert "(results/mass-edit-x/memit/mass_edit.png)" in text
    assert "alphaedit-seq/mass_edit.png" not in text  # no plot, no link
    assert "CPU flags: avx2, amx_bf16." in text and "--n 1000" in text


def test_locality_keys_group_gets_each_run_s_table(tmp_path: Path) -> None:
    group = tmp_path / "keys-x"
    (group / "rome").mkdir(parents=True)
    doc = {"model": "m", "layer": 5, "data": "d", "n": 3, "pool": "p",
           "rows": [{"held": 20, "mu": 0.0, "neighbourhood": 0.0823}]}  # fmt: skip
    (group / "rome" / "locality_keys.json").write_text(json.dumps(doc))
    (group / "commands.sh").write_text("python tools/locality_keys.py --n 3\n")
    text = results_tables.group_section(group)
    assert text.startswith("### keys-x")
    assert "**rome**: m, layer 5, d (n = 3), held subjects from p" in text
    assert "| 20 | 0 | 0.082 |" in text and "--n 3" in text


def _ceiling(root: Path, name: str, plain: float, rep: float) -> Path:
    run = root / name
    run.mkdir(parents=True)
    tests = {
        "efficacy": {"plain": 1.0, "rep": 1.0, "oracle_key": 0.9, "n": 4},
        "ood_subject_paraphrase": {
            "plain": plain, "rep": rep, "oracle_key": 0.8, "n": 20,
            "gap_closed": (rep - plain) / (0.8 - plain), "rep_gate_open": 0.5,
        },
    }  # fmt: skip
    (run / "ceiling.json").write_text(json.dumps({"tests": tests}))
    return run


def test_ceiling_runs_of_the_same_edits_share_plain_and_oracle(tmp_path: Path) -> None:
    runs = [_ceiling(tmp_path, "a", 0.6, 0.7), _ceiling(tmp_path, "b", 0.6, 0.75)]
    head, _, _, ood = results_tables.ceiling_table(runs).splitlines()
    assert head.count("plain") == 1 and "a: REP" in head and "b: REP" in head
    assert ood.split(" | ")[2:4] == ["60.0", "80.0"]
    assert "70.0 (50 %, gate 50 %)" in ood and "75.0 (75 %, gate 50 %)" in ood


def test_ceiling_runs_of_different_edits_get_their_own_plain_and_oracle(tmp_path: Path) -> None:
    """A value-side edit is another edit: its plain column must not be the first run's."""
    runs = [_ceiling(tmp_path, "plain-edit", 0.6, 0.7), _ceiling(tmp_path, "value-side", 0.7, 0.75)]
    head, _, _, ood = results_tables.ceiling_table(runs).splitlines()
    assert "plain-edit: plain" in head and "value-side: plain" in head
    assert ood.split(" | ")[2:] == ["60.0", "80.0", "70.0 (50 %, gate 50 %)", "70.0", "80.0",
                                    "75.0 (50 %, gate 50 %) |"]  # fmt: skip


def test_ceiling_runs_of_different_editors_get_one_row_each(tmp_path: Path) -> None:
    """The editors × REP table: one row per editor, each cell plain → REP (gap closed)."""
    runs = [_ceiling(tmp_path, "rome", 0.6, 0.7), _ceiling(tmp_path, "memit", 0.5, 0.65)]
    for run, method in zip(runs, ("rome", "memit"), strict=True):
        doc = json.loads((run / "ceiling.json").read_text())
        near = {"near_subject": {"plain": 0.9, "rep": 0.88, "oracle_key": 0.9, "n": 7}}
        tests = {**near, **doc["tests"]}  # stored first, shown last
        (run / "ceiling.json").write_text(json.dumps({"tests": tests, "method": method}))
    head, _, rome, memit, count = results_tables.ceiling_table(runs).splitlines()
    assert head == "| run | method | efficacy | ood_subject_paraphrase | near_subject |"
    assert rome.split(" | ")[1:] == ["rome", "100.0 → 100.0", "60.0 → 70.0 (50 %)", "90.0 → 88.0 |"]
    assert memit.split(" | ")[3] == "50.0 → 65.0 (50 %)"
    assert count == "| probes per run | — | 4 | 20 | 7 |"


def test_goals_table_puts_each_rate_beside_its_distance_to_the_goal(tmp_path: Path) -> None:
    """Absolute goals compare every rate to a number; relative ones to the first run's plain."""
    group = tmp_path / "robust"
    _ceiling(group, "a-plain", 0.6, 0.7)
    _ceiling(group, "b-value", 0.75, 0.85)
    (group / "goals.json").write_text(
        json.dumps({"ood_subject_paraphrase": ">= 80", "efficacy": ">= plain - 2"})
    )
    (group / "commands.sh").write_text("repedit analyze ceiling\n")
    text = results_tables.group_section(group)
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert "| b-value | b-value: oracle key | b-value + REP (gap closed) | goal |" in rows[0]
    ood = rows[2].split(" | ")
    assert ood[2:5] == ["60.0 [−20.0]", "80.0", "70.0 [−10.0] (50 %)"]
    assert ood[5:] == ["75.0 [−5.0]", "80.0", "85.0 ✓ (200 %)", "≥ 80 |"]
    assert rows[1].split(" | ")[-1] == "≥ plain − 2 |" and "100.0 ✓" in rows[1]
    assert "[−x]: x points short of it." in text


def test_a_goal_it_cannot_read_stops_the_tool(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="write '>= 85'"):
        results_tables._goal("at least 85", 0.5)
    assert results_tables._goal(">= plain + 10", None) is None  # no plain rate: no distance
    assert abs(results_tables._goal(">= plain + 10", 0.5) - 0.6) < 1e-12


def test_a_run_may_add_tests_from_a_second_run_of_the_same_edits(tmp_path: Path) -> None:
    run = _ceiling(tmp_path, "a", 0.6, 0.7)
    doc = json.loads((run / "ceiling.json").read_text())
    long = {"long_context": {"plain": 0.5, "rep": 0.6, "oracle_key": 0.5, "n": 4}}
    both = {"efficacy": doc["tests"]["efficacy"], **long}  # measured by both runs, the same
    (run / "ceiling.long.json").write_text(json.dumps({**doc, "tests": both}))
    assert list(results_tables._ceiling_docs([run])["a"]["tests"]) == [*doc["tests"], *long]
    other = {"efficacy": {**doc["tests"]["efficacy"], "plain": 0.9}}
    (run / "ceiling.other.json").write_text(json.dumps({**doc, "tests": other}))
    with pytest.raises(SystemExit, match="a test differs"):
        results_tables._ceiling_docs([run])


def _board(tmp_path: Path, monkeypatch, configurations: list[dict]) -> dict:
    """Two groups (CF with goals, ZsRE without) of ceiling runs under a results folder, and
    a board spec over them."""
    results = tmp_path / "results"
    _ceiling(results / "cf", "a-plain", 0.6, 0.7)
    _ceiling(results / "cf", "b-value", 0.75, 0.85)
    (results / "cf" / "goals.json").write_text(
        json.dumps({"ood_subject_paraphrase": ">= 80", "efficacy": ">= plain - 2"})
    )
    _ceiling(results / "zsre", "a-plain", 0.3, 0.35)
    monkeypatch.setattr(results_tables, "RESULTS", results)
    return {
        "title": "Board",
        "note": "what it shows",
        "datasets": {"CF": ["efficacy", "ood_subject_paraphrase"], "Z": ["ood_subject_paraphrase"]},
        "configurations": configurations,
    }


def test_goal_board_puts_every_configuration_beside_its_group_s_goals(
    tmp_path: Path, monkeypatch
) -> None:
    spec = _board(tmp_path, monkeypatch, [
        {"label": "plain", "runs": {"CF": "cf/a-plain", "Z": "zsre/a-plain"}},
        {"label": "value", "runs": {"CF": "cf/b-value"}},
    ])  # fmt: skip
    text = results_tables.board_section(spec)
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ")]
    assert rows[0][1:] == ["CF cases", "CF: efficacy", "CF: OOD", "Z cases", "Z: OOD |"]
    by_label = {r[0].removeprefix("| "): r[1:] for r in rows[1:]}
    assert by_label["plain"][1:3] == ["100.0 ✓", "60.0 [−20.0]"]
    assert by_label["plain"][4] == "30.0 |"  # a group without goals: the bare rate
    assert by_label["value + REP"][2] == "85.0 ✓"
    assert by_label["value: oracle key"][1:3] == ["90.0", "80.0"]  # the ceiling: no marks
    assert by_label["value"][3:] == ["—", "— |"]  # no ZsRE run for this configuration
    assert by_label["goal"][1:3] == ["≥ plain − 2", "≥ 80"]
    assert text.startswith("### Board\n\nwhat it shows") and "`cf/b-value`" in text


def test_goal_board_names_a_missing_run(tmp_path: Path, monkeypatch) -> None:
    spec = _board(tmp_path, monkeypatch, [{"label": "x", "runs": {"CF": "cf/c-none"}}])
    with pytest.raises(SystemExit, match="no ceiling run 'cf/c-none'"):
        results_tables.board_table(spec)
    spec["configurations"] = [{"label": "x", "runs": {"Q": "cf/a-plain"}}]
    with pytest.raises(SystemExit, match="unknown datasets"):
        results_tables.board_table(spec)


def test_goal_board_leaves_out_a_row_no_run_measured(tmp_path: Path, monkeypatch) -> None:
    """A configuration run without REP has no "+ REP" row rather than a row of dashes."""
    spec = _board(tmp_path, monkeypatch, [{"label": "plain", "runs": {"CF": "cf/a-plain"}}])
    doc_path = tmp_path / "results" / "cf" / "a-plain" / "ceiling.json"
    doc = json.loads(doc_path.read_text())
    for r in doc["tests"].values():
        r["rep"] = None
    doc_path.write_text(json.dumps(doc))
    labels = [line.split(" | ")[0] for line in results_tables.board_table(spec).splitlines()]
    assert labels[2:] == ["| plain", "| plain: oracle key", "| goal"]

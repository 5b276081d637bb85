"""Regenerate the tables of docs/results.md from the runs' committed summaries.

Each folder ``docs/results/GROUP/`` holds one sub-folder per run with its ``summary.json``
(small, committed) and a ``commands.sh`` with the evaluation commands that produced them. The
table of each group is ``repedit report GROUP/* --markdown``; this script writes those tables
between the ``generated`` markers of docs/results.md, so the numbers are never copied by hand.
Usage: python tools/results_tables.py [--check]   (--check: fail if the file is out of date)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
PAGE = ROOT / "docs" / "results.md"
BEGIN, END = "<!-- generated:begin -->", "<!-- generated:end -->"


def group_section(group: Path) -> str:
    """The Markdown of one group: its table from ``repedit report --markdown`` and commands."""
    runs = sorted(p for p in group.iterdir() if (p / "summary.json").is_file())
    if not runs:
        raise SystemExit(f"{group}: no run folder with a summary.json")
    table = subprocess.run(
        ["repedit", "report", *map(str, runs), "--markdown"],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout
    commands = (group / "commands.sh").read_text(encoding="utf-8").strip()
    rel = " ".join(str(r.relative_to(ROOT)) for r in runs)
    return (
        f"### {group.name}\n\n{table.rstrip()}\n\n"
        f"Table: `repedit report {rel} --markdown`. Runs:\n\n```bash\n{commands}\n```\n"
    )


def render(page: str) -> str:
    """``page`` with the text between the markers replaced by every group's section."""
    if BEGIN not in page or END not in page:
        raise SystemExit(f"{PAGE}: the {BEGIN} / {END} markers are missing")
    groups = sorted(p for p in RESULTS.iterdir() if p.is_dir())
    body = "\n".join(group_section(g) for g in groups)
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

"""Fail when a module in src/ is over 600 lines or a function is over 80 lines.

The house rule keeps every module and function readable top to bottom; CI runs this so a
regression is caught where it is written, not in a later review.
Usage: python tools/check_layout.py [ROOT]   (default: src)
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def violations(root: Path) -> list[str]:
    """Every module or function of ``root`` over its limit, as readable lines."""
    found: list[str] = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        n_lines = len(text.splitlines())
        if n_lines > MAX_MODULE_LINES:
            found.append(f"{path}: module has {n_lines} lines (max {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text, filename=str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(
                        f"{path}:{node.lineno}: function {node.name} has {length} lines "
                        f"(max {MAX_FUNCTION_LINES})"
                    )
    return found


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path("src")
    found = violations(root)
    for line in found:
        print(line)
    print(f"layout: {len(found)} violation(s) under {root}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

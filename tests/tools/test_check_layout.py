"""tools/check_layout.py flags long modules and functions, and passes short ones."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_SPEC = importlib.util.spec_from_file_location(
    "check_layout", Path(__file__).resolve().parents[2] / "tools" / "check_layout.py"
)
assert _SPEC and _SPEC.loader
check_layout = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(check_layout)


def _function(name: str, body_lines: int) -> str:
    return f"def {name}():\n" + "".join(f"    x{i} = {i}\n" for i in range(body_lines))


def test_flags_a_function_over_the_limit(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text(_function("long", 80) + _function("short", 79))
    found = check_layout.violations(tmp_path)
    assert len(found) == 1 and "function long has 81 lines" in found[0]


def test_flags_a_module_over_the_limit(tmp_path: Path) -> None:
    (tmp_path / "big.py").write_text("x = 1\n" * 601)
    (tmp_path / "ok.py").write_text("x = 1\n" * 600)
    found = check_layout.violations(tmp_path)
    assert found == [f"{tmp_path / 'big.py'}: module has 601 lines (max 600)"]


def test_main_exit_code(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text(_function("fine", 10))
    assert check_layout.main(["x", str(tmp_path)]) == 0
    (tmp_path / "b.py").write_text(
        _function("nested_ok", 5)
        + "class C:\n"
        + "\n".join("    " + line for line in _function("method", 90).splitlines())
        + "\n"
    )
    assert check_layout.main(["x", str(tmp_path)]) == 1

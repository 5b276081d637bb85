"""``repedit --version`` and ``repedit.__version__`` report the installed distribution's version."""

from __future__ import annotations

from importlib.metadata import version

import pytest

import repedit
from repedit.cli import main


def test_version_comes_from_the_package_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    assert repedit.__version__ == version("repedit")
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"repedit {version('repedit')}"

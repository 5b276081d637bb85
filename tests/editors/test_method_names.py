"""The light list of method names and the editor registry agree, name for name."""

from __future__ import annotations

from repedit.editors import EDITORS, make_editor
from repedit.methods import METHOD_NAMES


def test_every_registered_editor_is_named_by_its_key() -> None:
    assert tuple(EDITORS) == METHOD_NAMES
    for name, cls in EDITORS.items():
        assert cls.name == name
        assert make_editor(name).name == name


def test_cli_method_help_lists_the_registry() -> None:
    from repedit.cli.common import METHOD_HELP

    for name in METHOD_NAMES:
        assert name in METHOD_HELP

"""The editor registry's method names, importable without torch (the CLI lists them).

:data:`repedit.editors.EDITORS` maps each of these to its class (a test checks every class's
``name``); the command line reads them here so ``repedit --help`` stays instant.
"""

from __future__ import annotations

from typing import Literal

Method = Literal["rome", "r-rome", "memit", "emmet", "alphaedit", "core"]
#: every editor, in the order the command line lists them
METHOD_NAMES: tuple[Method, ...] = ("rome", "r-rome", "memit", "emmet", "alphaedit", "core")

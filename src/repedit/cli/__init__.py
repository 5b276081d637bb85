"""The ``repedit`` command line: argument parsing and printing only.

Each command lives in ``repedit/cli/<name>.py`` and exposes ``register(subparsers)`` and
``run(args) -> int``; adding a command means adding its name to ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

from repedit import __version__
from repedit.errors import RepeditError

COMMANDS = ("demo", "stats", "edit", "eval", "report", "analyze", "serve")

DESCRIPTION = """\
repedit: robust knowledge editing for causal language models
(ROME, R-ROME, MEMIT, EMMET, AlphaEdit, CoRE; the REP adapter; key statistics; saved,
revertible edits; a robustness suite; a playground).

example workflow:
  repedit demo                                   # built-in facts, plain edits against REP
  repedit stats --layers 5 --corpus $REPEDIT_DATA/wikitext/wiki.test.raw --tokens 100000
  repedit edit --subject Slovenia --prompt "{} is located in the continent of" \\
      --target Antarctica --target-true Europe --rep --save slovenia.safetensors
  repedit eval --method rome --rep --data rep-counterfact --n 20 --workers 2 --out runs/r
  repedit report runs/r --out report.html
  repedit serve                                  # the playground on http://127.0.0.1:8765
"""

EPILOG = """\
environment variables:
  REPEDIT_CACHE   cache root for converted models and key statistics (default ~/.cache/repedit)
  REPEDIT_DATA    shared data folder (wikitext/, counterfact/, ...); --corpus auto reads
                  $REPEDIT_DATA/wikitext first
  HF_HUB_OFFLINE  set to 1 to never contact the Hugging Face hub (local dirs, .gguf files and
                  the embedded smollm2-135m alias work offline)

run 'repedit COMMAND --help' for the options of one command.
"""


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"repedit.cli.{name.replace('-', '_')}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="repedit",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"repedit {__version__}")
    parser.add_argument(
        "-v",
        "--verbose",
        dest="verbose_global",
        action="store_true",
        help="log details; show tracebacks on errors",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    sub.required = True
    for name in COMMANDS:
        _module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``repedit`` console script; returns the exit code."""
    from repedit.cli import common

    parser = build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:  # --help, --version, usage errors (argparse exits 2)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    verbose = bool(getattr(args, "verbose", False) or args.verbose_global)
    args.verbose = verbose
    with common.session(verbose):
        try:
            return int(_module(args.command).run(args) or 0)
        except RepeditError as exc:
            if verbose:
                common.console.print_exception()
            common.error(str(exc))
            return 2
        except KeyboardInterrupt:
            common.error("interrupted")
            return 130


if __name__ == "__main__":
    sys.exit(main())

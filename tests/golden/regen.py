"""Rewrite the evaluation goldens: ``python tests/golden/regen.py [NAME ...]``.

Only when a change of behaviour is intended (say so in the commit); a refactor must pass
``test_golden_eval.py`` against the goldens as they are.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from golden_runs import GOLDENS, Inputs, run_golden, tiny_fingerprint, write_fixture


def main(names: list[str]) -> int:
    torch.set_num_threads(1)
    os.environ.pop("REPEDIT_DATA", None)  # passages come from the seeded corpus
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Inputs(Path(tmp))
        fingerprint = tiny_fingerprint(inputs)
        for name in names or GOLDENS:
            write_fixture(name, run_golden(name, inputs), fingerprint)
            print(f"wrote {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

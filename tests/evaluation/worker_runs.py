"""Shared by the worker tests: a tiny llama saved to a folder, and ``repedit eval`` on it.

The workers load the model by path in their own processes, so it has to be on disk.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harness_cases import write_files

from repedit.cli import main
from repedit.models.tiny import tiny_model, tiny_tokenizer


class Inputs:
    """The saved model, the cases and corpus files and a key-statistics cache under ``root``."""

    def __init__(self, root: Path):
        self.root = root
        self.model = root / "tiny-llama"
        tiny_model("llama", seed=0).save_pretrained(self.model)
        tiny_tokenizer().save_pretrained(self.model)
        self.files = write_files(root)

    def eval(self, out: Path, *extra: str) -> int:
        """``repedit eval`` (in this process) into ``out``; its exit code."""
        f = self.files
        argv = [
            "eval", "--model", str(self.model), "--threads", "1", "--data", str(f["data"]),
            "--corpus", str(f["corpus"]), "--stats-tokens", "2000", "--cache-dir",
            str(f["cache"]), "--set", "contexts=[[3, 2]]", "--set", "value.steps=5",
            "--long-context-corpus", str(f["corpus"]), "--long-context-tokens", "48",
            "--fluency-tokens", "8", "--no-progress", "--out", str(out), *extra,
        ]  # fmt: skip
        return main(argv)


def records(run: Path, name: str = "results.jsonl") -> list[dict[str, Any]]:
    path = run / name
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def case_ids(run: Path, name: str = "results.jsonl") -> list[str]:
    return sorted(str(r["case_id"]) for r in records(run, name))


def same_results(a: Path, b: Path) -> bool:
    """``repedit report --diff A B`` exits 0."""
    return main(["report", "--diff", str(a), str(b)]) == 0

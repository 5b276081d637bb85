"""The runs behind the evaluation goldens, what each keeps, and how two of them are compared.

Every golden is produced through the command line (``repedit eval`` / ``repedit edit``,
in-process) on a tiny random llama saved to a folder, with a seeded corpus and four small
cases, so a refactor of anything under the command line is checked end to end. A golden keeps
what must not change: case order, errors, every probe's success flags and probability, fluency
texts, sequential checkpoints and the summary's rates; timings and paths are dropped.

Imported by ``test_golden_eval.py`` and by ``regen.py`` (which rewrites the fixtures).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
from pathlib import Path
from typing import Any

from repedit.cli import main
from repedit.models.tiny import tiny_model, tiny_tokenizer

HERE = Path(__file__).resolve().parent

#: the issue's contract: probabilities of a refactored run within this of the golden's
PROB_TOL = 1e-5
#: fields holding a probability (compared with ``PROB_TOL``); every other value must be equal,
#: except rates derived from flags, compared to float round-off (``RATE_TOL``)
PROB_KEYS = frozenset({"p", "p_new", "p_true"})
RATE_TOL = 1e-9

# fmt: off
_WORDS = [
    "the", "of", "and", "a", "in", "is", "was", "to", "for", "on", "by", "with", "as", "at",
    "from", "his", "her", "river", "city", "king", "music", "school", "war", "team", "league",
    "station", "island", "church", "museum", "railway", "song", "album", "Paris", "Berlin",
    "Slovenia", "Japan", "Toyota", "French", "capital", "Europe", "football", "founded", "located",
    "continent", "Antarctica", "country",
]
# fmt: on

CASES = [
    {
        "case_id": 1,
        "prompt": "Slovenia is located in the continent of",
        "subject": "Slovenia",
        "target_new": "Asia",
        "target_true": "Europe",
        "rephrase_prompt": ["Slovenia lies on the continent of"],
        "rephrase_target": "Asia",
        "locality_prompt": ["Austria is located in the continent of", "Italy is located in"],
        "locality_ground_truth": "Europe",
        "subject_rephrase": ["the Republic of Slovenia", "Slovenija", "the Slovene state"],
    },
    {
        "case_id": 2,
        "prompt": "The Eiffel Tower is in Paris",
        "subject": "Paris",  # the prompt's last token: an edit a tiny model visibly takes
        "target_new": "Italy",
        "target_true": "France",
        "rephrase_prompt": ["Here is a fact: the Eiffel Tower is in Paris"],
        "rephrase_target": "Italy",
        "locality_prompt": ["The capital of France is"],
        "locality_ground_truth": "Paris",
        "subject_rephrase": ["the city of Paris", "Paris France"],
    },
    {
        "case_id": 3,
        "prompt": "The mother tongue of Danielle Darrieux is",
        "subject": "Danielle Darrieux",
        "target_new": "English",
        "target_true": "French",
        "rephrase_prompt": ["Danielle Darrieux grew up speaking"],
        "rephrase_target": "English",
        "locality_prompt": ["The mother tongue of Michel Rocard is"],
        "locality_ground_truth": "French",
        "subject_rephrase": ["the actress Danielle Darrieux", "Darrieux"],
    },
    {
        "case_id": 4,
        "prompt": "Microsoft was founded in the country of",
        "subject": "Microsoft",
        "target_new": "Japan",
        "target_true": "America",
        "rephrase_prompt": [],
        "rephrase_target": "Japan",
        "locality_prompt": ["Apple was founded in the country of"],
        "locality_ground_truth": "America",
        "subject_rephrase": ["Microsoft Corporation"],
    },
]

#: an edit and a REP training a tiny model takes in a fraction of a second
FAST = ["--set", "contexts=[[3, 2]]", "--set", "value.steps=5"]
#: REP as the goldens were made: the listed forms only (the generalisation defaults came later;
#: the goldens guard the harness, and those defaults have tests of their own)
REP_FAST = [
    "--rep-ablation", "listed-forms", "--rep-set", "steps=4", "--rep-set", "long_context_length=30",
]  # fmt: skip
SHORT_TESTS = "efficacy,prompt_paraphrase,subject_paraphrase,neighbourhood"

#: golden name → the ``repedit eval`` options that differ from the shared ones
EVAL_RUNS: dict[str, list[str]] = {
    "eval_single": [],
    "eval_batch": ["--mode", "batch", "--batch-size", "3"],
    "eval_sequential": ["--mode", "sequential", "--eval-every", "2", "--eval-sample", "0"],
    "eval_single_rep": ["--tests", SHORT_TESTS, "--rep", *REP_FAST],
    "eval_tau_sweep": [
        "--tests",
        SHORT_TESTS,
        "--n",
        "2",
        "--rep",
        *REP_FAST,
        "--rep-tau",
        "0.5,0.9",
    ],
}
EDIT_ARGS = [
    "--subject", "Paris", "--prompt", "The Eiffel Tower is in {}", "--target", "Italy",
    "--target-true", "France", "--probe", "The capital of France is",
]  # fmt: skip


# ----------------------------------------------------------------------------- inputs


class Inputs:
    """A tiny saved llama, a seeded corpus, the cases file and a key-statistics cache."""

    def __init__(self, root: Path):
        self.model = root / "tiny-llama"
        tiny_model("llama", seed=0).save_pretrained(self.model)
        tiny_tokenizer().save_pretrained(self.model)
        rng = random.Random(0)
        docs = []
        for d in range(6):
            lines = [" ".join(rng.choice(_WORDS) for _ in range(60)) for _ in range(8)]
            docs.append(f" = Article {d} = \n\n" + "\n\n".join(lines) + "\n")
        self.corpus = root / "corpus.txt"
        self.corpus.write_text("\n".join(docs))
        self.data = root / "cases.json"
        self.data.write_text(json.dumps(CASES))
        self.cache = root / "cache"
        self.root = root

    def common(self) -> list[str]:
        return [
            "--model", str(self.model), "--threads", "1", "--corpus", str(self.corpus),
            "--stats-tokens", "2000", "--cache-dir", str(self.cache), *FAST,
        ]  # fmt: skip


def _cli(argv: list[str]) -> str:
    """``repedit ARGV`` in-process; its standard output (the command must succeed)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(argv)
    assert code == 0, f"repedit {' '.join(argv)} exited {code}"
    return buf.getvalue()


def run_eval_golden(name: str, inputs: Inputs) -> dict[str, Any]:
    """Run ``repedit eval`` for the golden ``name`` into a fresh folder; its golden."""
    out = inputs.root / name
    argv = [
        "eval", *inputs.common(), "--data", str(inputs.data),
        "--long-context-corpus", str(inputs.corpus), "--long-context-tokens", "48",
        "--fluency-tokens", "8", "--no-progress", "--out", str(out), *EVAL_RUNS[name],
    ]  # fmt: skip
    _cli(argv)
    config = json.loads((out / "config.json").read_text())
    taus = config["run_config"].get("rep_taus") or []
    if taus:
        return {f"tau-{t:g}": eval_dir_golden(out / f"tau-{t:g}") for t in taus}
    return eval_dir_golden(out)


def run_edit_golden(inputs: Inputs) -> dict[str, Any]:
    """``repedit edit --json`` on one request with a probe; its golden."""
    got = json.loads(_cli(["edit", *inputs.common(), *EDIT_ARGS, "--json"]))
    return {
        "method": got["method"],
        "layers": got["layers"],
        "probes": [
            {
                "prompt": p["prompt"],
                **{
                    when: {k: p[when][k] for k in ("top1", "p_new", "p_true")}
                    for when in ("before", "after")
                },
            }
            for p in got["probes"]
        ],
    }


# ----------------------------------------------------------------------------- extraction


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _probe(p: dict[str, Any]) -> dict[str, Any]:
    out = {k: p[k] for k in ("exact", "beats_alt", "agree") if k in p}
    out["p"] = math.exp(p["logprob"])
    return out


def _case(rec: dict[str, Any]) -> dict[str, Any]:
    tests = rec.get("tests") or {}
    out: dict[str, Any] = {
        "case_id": rec["case_id"],
        "error": (rec.get("error") or {}).get("type"),
        "tests": {
            name: [_probe(p) for p in t["probes"]]
            for name, t in sorted(tests.items())
            if name != "fluency"
        },
    }
    if "fluency" in tests:
        out["fluency_texts"] = tests["fluency"]["texts"]
    for key in ("n_edits", "rep_tau", "chunk"):
        if key in rec:
            out[key] = rec[key]
    return out


def eval_dir_golden(run_dir: Path) -> dict[str, Any]:
    """What a golden keeps of one run directory (timings and paths dropped)."""
    records = _jsonl(run_dir / "results.jsonl")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "cases": [_case(r) for r in sorted(records, key=lambda r: str(r["case_id"]))],
        "results_lines": len(records),
        "sequential": [
            {k: c[k] for k in ("n_edits", "n_eval", "cases", "means", "beats_alt")}
            for c in _jsonl(run_dir / "sequential.jsonl")
        ],
        "summary": {
            name: {"mean": s["mean"], "n": s["n"]} for name, s in sorted(summary["tests"].items())
        },
    }


# ----------------------------------------------------------------------------- comparison


def differences(want: Any, got: Any, path: str = "") -> list[str]:
    """Where ``got`` departs from ``want``: flags, texts and counts exactly, probabilities
    within ``PROB_TOL`` (absolute, so a tiny probability compares stably) and other floats
    (rates over flags) within ``RATE_TOL``."""
    if isinstance(want, dict) and isinstance(got, dict):
        out = [f"{path}.{k}: missing" for k in want if k not in got]
        out += [f"{path}.{k}: unexpected" for k in got if k not in want]
        for k in want:
            if k in got:
                out += _value_diff(k, want[k], got[k], f"{path}.{k}")
        return out
    if isinstance(want, list) and isinstance(got, list):
        if len(want) != len(got):
            return [f"{path}: {len(got)} items, golden has {len(want)}"]
        return [d for i, (w, g) in enumerate(zip(want, got, strict=True))
                for d in differences(w, g, f"{path}[{i}]")]  # fmt: skip
    return _value_diff("", want, got, path)


def _value_diff(key: str, want: Any, got: Any, path: str) -> list[str]:
    if isinstance(want, dict | list):
        return differences(want, got, path)
    both_float = isinstance(want, float) and isinstance(got, int | float)
    if both_float and not isinstance(got, bool):
        tol = PROB_TOL if key in PROB_KEYS else RATE_TOL
        if abs(want - got) <= tol:
            return []
        return [f"{path}: {got!r}, golden {want!r} (tolerance {tol:g})"]
    if want != got or type(want) is not type(got):
        return [f"{path}: {got!r}, golden {want!r}"]
    return []


def fixture_path(name: str) -> Path:
    return HERE / f"{name}.json"


def load_fixture(name: str) -> dict[str, Any]:
    return json.loads(fixture_path(name).read_text())


def write_fixture(name: str, golden: dict[str, Any], fingerprint: str) -> None:
    payload = {"tiny_model_fingerprint": fingerprint, "golden": golden}
    fixture_path(name).write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")


def tiny_fingerprint(inputs: Inputs) -> str:
    from repedit.models import load_model

    return load_model(str(inputs.model), device="cpu", dtype="float32").fingerprint


def run_golden(name: str, inputs: Inputs) -> dict[str, Any]:
    """The golden ``name`` (an ``EVAL_RUNS`` key or ``edit_json``) computed afresh."""
    return run_edit_golden(inputs) if name == "edit_json" else run_eval_golden(name, inputs)


GOLDENS: tuple[str, ...] = (*EVAL_RUNS, "edit_json")

"""The small data set, corpus and run configuration the harness tests share.

Imported by the test modules of this folder (pytest puts the folder on ``sys.path``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from repedit.editors import StatsConfig
from repedit.evaluation.config import RunConfig

CORPUS = "".join(
    f"Line {i}: the capital of France is Paris, Toyota was founded in Japan and "
    f"Slovenia is located in Europe; item {i * 7} is Microsoft.\n"
    for i in range(150)
)


def case_record(case_id: int, prompt: str, subject: str, new: str, true: str, **kw: Any) -> dict:
    return {
        "case_id": case_id,
        "prompt": prompt,
        "subject": subject,
        "target_new": new,
        "target_true": true,
        "rephrase_prompt": kw.get("rephrase", []),
        "rephrase_target": new,
        "locality_prompt": kw.get("locality", []),
        "locality_ground_truth": true,
        "subject_rephrase": kw.get("paraphrases", []),
    }


CASES = [
    case_record(
        1,
        "Slovenia is located in the continent of",
        "Slovenia",
        "Asia",
        "Europe",
        rephrase=["Slovenia lies on the continent of", "Slovenia is located in the continent of"],
        locality=["Austria is located in the continent of", "Italy is located in"],
        paraphrases=[
            "the Republic of Slovenia",
            "Slovenija",
            "the Slovene state",
            "the country of Slovenia",
            "the nation of Slovenia",
            "the land of the Slovenes",
        ],
    ),
    case_record(
        2,
        "Toyota was founded in",
        "Toyota",
        "France",
        "Japan",
        locality=["Apple was founded in"],
        paraphrases=["the Toyota company", "Toyota Motor"],
    ),
    case_record(
        3,
        "The mother tongue of Danielle Darrieux is",
        "Danielle Darrieux",
        "English",
        "French",
        rephrase=["Danielle Darrieux grew up speaking"],
        locality=["The mother tongue of Michel Rocard is"],
        paraphrases=["the actress Danielle Darrieux", "Darrieux"],
    ),
    case_record(
        4,
        "Microsoft was founded in the country of",
        "Microsoft",  # one token in the tiny tokenizer: no scramble
        "Japan",
        "America",
        locality=["Apple was founded in the country of"],
        paraphrases=["Microsoft Corporation"],
    ),
]


def write_files(root: Path, cases: list[dict] = CASES) -> dict[str, Path]:
    """``cases`` as an EasyEdit-style JSON file and the corpus, under ``root``."""
    data = root / "cases.json"
    data.write_text(json.dumps(cases))
    corpus = root / "corpus.txt"
    corpus.write_text(CORPUS)
    return {"data": data, "corpus": corpus, "cache": root / "cache"}


#: a ROME fast enough for a tiny model: two context templates, five value steps
FAST_ROME = {"contexts": ((3, 2),), "value": {"steps": 5}}


def stats_config(files: dict[str, Path]) -> StatsConfig:
    return StatsConfig(
        corpus=str(files["corpus"]), n_tokens=2000, cache=str(files["cache"]), progress=False
    )


def run_config(files: dict[str, Path], out: Path, **kw: Any) -> RunConfig:
    """A tiny-llama ROME run on ``files``; ``kw`` overrides any field (flat names, as
    ``RunConfig.from_dict`` reads them: ``tests``, ``seed``, ``long_context_length``, ...)."""
    base = {
        "model": "tiny-llama",
        "method": "rome",
        "hparams": {"contexts": [[3, 2]], "value.steps": 5},
        "data": str(files["data"]),
        "out": str(out),
        "long_context_corpus": str(files["corpus"]),
        "long_context_length": 48,
        "fluency_tokens": 8,
        "stats_corpus": str(files["corpus"]),
        "stats_tokens": 2000,
    }
    base.update(kw)
    return RunConfig.from_dict(base)


def weights(lm: Any) -> dict[str, torch.Tensor]:
    """A copy of every weight, to check that a run leaves the model as it found it."""
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def same_weights(lm: Any, saved: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, saved[k]) for k, v in lm.model.state_dict().items())

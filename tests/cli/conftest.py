"""Fixtures shared by the CLI tests: tiny saved llamas and a small text corpus."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from repedit.models.tiny import tiny_model, tiny_tokenizer

_WORD_TEXT = """
the of and a in is was to for on by with as at from his her river city king music school war
team league station island church museum railway song album Paris Berlin Slovenia Japan Toyota
French capital Europe football founded located continent Antarctica country
"""
WORDS = _WORD_TEXT.split()


def _save_tiny(path: Path, seed: int) -> Path:
    tiny_model("llama", seed=seed).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tiny(tmp_path_factory.mktemp("tiny-llama"), seed=0)


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tiny(tmp_path_factory.mktemp("tiny-llama-other"), seed=1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    docs = []
    for d in range(6):
        lines = [" ".join(rng.choice(WORDS) for _ in range(60)) for _ in range(8)]
        docs.append(f" = Article {d} = \n\n" + "\n\n".join(lines) + "\n")
    path.write_text("\n".join(docs))
    return path

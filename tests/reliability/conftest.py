"""Fixtures of the reliability tests: a tiny saved model and a text corpus (see ``childproc``
for the child processes the tests fork)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from childproc import kill_leftover_children

from repedit.models.tiny import tiny_model, tiny_tokenizer

_WORD_TEXT = """
the of and a in is was to for on by with as at from his her river city king music school war
team league station island church museum railway song album Paris Berlin Slovenia Japan Toyota
French capital Europe football founded located continent Antarctica country
"""
_WORDS = _WORD_TEXT.split()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slow: forks child processes that load a model (seconds each)"
    )


@pytest.fixture(autouse=True)
def _no_orphans() -> Iterator[None]:
    """Children a test forked never outlive it, whatever the test's outcome."""
    yield
    kill_leftover_children()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random llama saved as a Hugging Face directory (loads offline in well under 1 s)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", seed=0).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~12k words of seeded word salad, enough for a few thousand tokens of statistics."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    docs = [
        f" = Article {d} = \n\n" + " ".join(rng.choice(_WORDS) for _ in range(400)) + "\n"
        for d in range(30)
    ]
    path.write_text("\n".join(docs))
    return path

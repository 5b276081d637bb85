"""Fixtures of the embedded-model tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from repedit.editors import StatsConfig


@pytest.fixture
def wikitext(shared_data: Path) -> Path:
    """WikiText-2's raw test file from the shared data (skip without it)."""
    raw = shared_data / "wikitext" / "wiki.test.raw"
    if not raw.is_file():
        pytest.skip(f"{raw} not found")
    return raw


@pytest.fixture
def wikitext_stats(wikitext: Path) -> StatsConfig:
    """Key statistics from 100k WikiText tokens: computed once, then read from the cache."""
    return StatsConfig(corpus=str(wikitext), n_tokens=100_000, progress=False)

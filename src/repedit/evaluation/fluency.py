"""Fluency: ROME's n-gram entropy of sampled text, and the seeded top-k sampler that feeds it.

ROME (``experiments/py/eval_utils_counterfact.py``) scores each generated text as::

    H_n   = -sum_g p(g) * log2 p(g)        over the n-gram frequency distribution of the text
    score = mean_i(w_i * H_{n_i})          ns = (2, 3), weights = (2/3, 4/3)

and averages the per-text scores arithmetically. With the default weights (which sum to
``len(ns)``) this equals the weighted mean ``sum(w*H) / sum(w)``; for other weights we keep
ROME's ``mean(w*H)`` so numbers stay comparable with published ones. ROME splits words with
``nltk.word_tokenize``; here a regex (runs of word characters, and each other non-space
character on its own) stands in for it without the nltk dependency, so punctuation is
separated from words as nltk does (contractions such as ``don't`` are split differently).
ROME also scores the full decoded text, prompt included; :func:`generate_texts` returns that
by default.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import torch

from repedit.errors import InvalidRequestError
from repedit.evaluation.scoring import Precision, generate
from repedit.models.loading import LoadedModel

_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Word tokens for the n-gram statistics (an nltk-free stand-in for ``word_tokenize``)."""
    return _WORD.findall(text)


def ngram_entropy_of(tokens: Sequence[str], n: int) -> float:
    """Entropy in bits of the n-gram frequency distribution of ``tokens`` (0 if none)."""
    counts = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    total = sum(counts.values())
    if total == 0:
        return 0.0
    return -sum(c / total * math.log2(c / total) for c in counts.values())


def text_ngram_entropy(
    text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)
) -> float:
    """ROME's per-text score ``mean_i(w_i * H_{n_i}(text))`` (entropies in bits)."""
    if len(ns) != len(weights) or not ns:
        raise InvalidRequestError(f"ns {tuple(ns)} and weights {tuple(weights)} must pair up")
    tokens = words(text)
    return sum(w * ngram_entropy_of(tokens, n) for n, w in zip(ns, weights, strict=True)) / len(ns)


def ngram_entropy(
    texts: Sequence[str], ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)
) -> float:
    """ROME's n-gram entropy: the arithmetic mean over ``texts`` of :func:`text_ngram_entropy`.

    Per text: ``mean_i(w_i * H_{n_i})`` with ``H_n = -Σ p log2 p`` over the text's n-gram
    frequencies; with the default weights this is ``sum(w*H)/sum(w)``.
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise InvalidRequestError("ngram_entropy needs at least one text")
    return sum(text_ngram_entropy(t, ns, weights) for t in texts) / len(texts)


def generate_texts(
    lm: LoadedModel,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 100,
    top_k: int = 5,
    seed: int = 0,
    include_prompt: bool = True,
    batch_size: int = 32,
    precision: Precision = "model",
) -> list[str]:
    """One top-k sample per prompt, reproducible for a given ``seed`` (and batch).

    Sampling runs under a forked RNG seeded with ``seed``, so the result does not depend on,
    and does not disturb, the global random state. Batches are left-padded. Generation may
    stop early at EOS. ``include_prompt`` (default, as ROME) returns ``prompt + sample``.
    Rows share batches (``batch_size``) and ``model.generate``'s KV cache; ``precision``:
    :data:`~repedit.evaluation.scoring.Precision`.
    """
    prompts = list(prompts)
    device = lm.device
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        samples = generate(
            lm,
            prompts,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            precision=precision,
            do_sample=True,
            top_k=top_k,
            top_p=None,
            temperature=None,
            num_beams=1,
        )
    if include_prompt:
        return [p + s for p, s in zip(prompts, samples, strict=True)]
    return samples

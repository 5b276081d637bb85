"""Context prefixes for keys and values: the bare prompt plus short model-generated texts.

Averaging the key (and optimising the value) over several prefixes makes an edit depend less
on the exact position of the subject, as in ROME. The prefixes are generated with a seeded
sampler, so they are reproducible and need no data file.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from repedit.models.loading import LoadedModel
from repedit.models.tokens import document_start, padding_side

STARTERS = ("The", "Therefore", "Because", "I", "You")


def sample_prefixes(
    lm: LoadedModel, starters: Sequence[str], length: int, top_k: int = 5
) -> list[str]:
    """One sampled continuation (``length`` new tokens, top-k) of each starter, starter
    included, braces removed and whitespace normalised. Uses the global torch generator: the
    caller seeds it."""
    tok = lm.tokenizer
    with torch.no_grad(), padding_side(tok, "left"):
        enc = tok(list(starters), return_tensors="pt", padding=True).to(lm.device)
        gen = lm.model.generate(
            **enc, do_sample=True, top_k=top_k, max_new_tokens=length, pad_token_id=tok.pad_token_id
        )
    texts = tok.batch_decode(gen, skip_special_tokens=True)
    return [" ".join(t.replace("{", " ").replace("}", " ").split()) for t in texts]


def generate_contexts(
    lm: LoadedModel, lengths: Sequence[tuple[int, int]] = ((5, 5), (10, 5)), seed: int = 0
) -> list[str]:
    """``["{}"]`` plus, for each (tokens, count), ``count`` sampled prefixes ending in ``". {}"``.

    Braces in generated text are replaced so that each template has exactly one slot.
    """
    start = document_start(lm.tokenizer)
    groups: list[list[str]] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for length, count in lengths:
            if count <= 0:
                continue
            starters = [start + STARTERS[i % len(STARTERS)] for i in range(count)]
            groups.append([text + ". {}" for text in sample_prefixes(lm, starters, length)])
    # interleave lengths, so the first few contexts already mix short and long prefixes
    width = max(map(len, groups), default=0)
    return ["{}"] + [g[i] for i in range(width) for g in groups if i < len(g)]

"""Context prefixes for keys and values: the bare prompt plus short model-generated texts.

Averaging the key (and optimising the value) over several prefixes makes an edit depend less
on the exact position of the subject, as in ROME. The prefixes are generated with a seeded
sampler, so they are reproducible and need no data file.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from repedit.models.tokens import document_start, padding_side

STARTERS = ("The", "Therefore", "Because", "I", "You")


def generate_contexts(
    lm: Any, lengths: Sequence[tuple[int, int]] = ((5, 5), (10, 5)), seed: int = 0
) -> list[str]:
    """``["{}"]`` plus, for each (tokens, count), ``count`` sampled prefixes ending in ``". {}"``.

    Braces in generated text are replaced so that each template has exactly one slot.
    """
    tok = lm.tokenizer
    start = document_start(tok)
    groups: list[list[str]] = []
    with torch.random.fork_rng(devices=[]), torch.no_grad(), padding_side(tok, "left"):
        torch.manual_seed(seed)
        for length, count in lengths:
            if count <= 0:
                continue
            starters = [start + STARTERS[i % len(STARTERS)] for i in range(count)]
            enc = tok(starters, return_tensors="pt", padding=True).to(lm.device)
            gen = lm.model.generate(
                **enc, do_sample=True, top_k=5, max_new_tokens=length, pad_token_id=tok.pad_token_id
            )
            group = []
            for text in tok.batch_decode(gen, skip_special_tokens=True):
                text = " ".join(text.replace("{", " ").replace("}", " ").split())
                group.append(text + ". {}")
            groups.append(group)
    # interleave lengths, so the first few contexts already mix short and long prefixes
    width = max(map(len, groups), default=0)
    return ["{}"] + [g[i] for i in range(width) for g in groups if i < len(g)]

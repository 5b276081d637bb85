"""Tokenisation that editors and scorers must agree on: subject positions and targets.

Subject positions come from the fast tokenizer's character offsets (robust to BPE merges
across the subject boundary); targets are tokenised as a continuation of their prompt.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch

from repedit.errors import InvalidRequestError

Position = Literal["last", "first_after"]


def prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a prompt as the model sees it (with BOS if the tokenizer adds one)."""
    return list(tokenizer(text)["input_ids"])


def continuation_ids(tokenizer: Any, prompt: str, target: str) -> list[int]:
    """Ids of ``" " + target`` as it continues ``prompt``.

    Uses the joint tokenisation when the prompt's ids are its prefix (true for byte-level BPE
    and most SentencePiece models); otherwise tokenises the target alone.
    """
    if not target.strip():
        raise InvalidRequestError(f"empty target after prompt {prompt!r}")
    head = prompt_ids(tokenizer, prompt)
    joint = prompt_ids(tokenizer, prompt + " " + target.strip())
    if joint[: len(head)] == head and len(joint) > len(head):
        ids = joint[len(head) :]
    else:
        ids = list(tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"])
    if not ids:
        raise InvalidRequestError(f"target {target!r} tokenises to nothing")
    return ids


def subject_span(template: str, subject: str, prefix: str = "") -> tuple[str, int, int]:
    """Fill ``prefix + template`` with ``subject``; return the text and the subject's char span."""
    head, _, _ = template.partition("{}")
    start = len(prefix) + len(head.replace("{{", "{").replace("}}", "}"))
    return prefix + template.format(subject), start, start + len(subject)


def subject_token_index(
    tokenizer: Any, text: str, start: int, end: int, position: Position = "last"
) -> int:
    """Index (in ``prompt_ids(text)``) of the subject's last token, or of the token after it."""
    enc = tokenizer(text, return_offsets_mapping=True)
    hits = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start and b > a]
    if not hits:
        raise InvalidRequestError(
            f"subject at chars {start}:{end} not found in the tokens of {text!r}"
        )
    index = hits[-1]
    if position == "first_after":
        index += 1
        if index >= len(enc["input_ids"]):
            raise InvalidRequestError(f"no token after the subject in {text!r}")
    return index


def locate(
    tokenizer: Any, template: str, subject: str, prefix: str = "", position: Position = "last"
) -> tuple[list[int], int]:
    """Token ids of the filled prompt and the index of the subject token to read keys at."""
    if subject not in template.format(subject) or "{}" not in template:
        raise InvalidRequestError(f"template {template!r} has no '{{}}' slot for {subject!r}")
    text, start, end = subject_span(template, subject, prefix)
    return prompt_ids(tokenizer, text), subject_token_index(tokenizer, text, start, end, position)


def document_start(tokenizer: Any) -> str:
    """Text that marks a document start, for generating from scratch.

    Empty when the tokenizer adds BOS itself; else ``<|endoftext|>`` when the vocabulary has it
    (GPT-2, SmolLM), else the EOS token. Without it, small models sampled from a bare word
    often produce code-like fragments instead of prose.
    """
    probe = tokenizer("a")["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and probe and probe[0] == bos:
        return ""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    if "<|endoftext|>" in vocab:
        return "<|endoftext|>"
    return getattr(tokenizer, "eos_token", None) or ""


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, max_len] ids and attention mask, right-padded (positions stay 0..len-1)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def pad_id(tokenizer: Any) -> int:
    pid = getattr(tokenizer, "pad_token_id", None)
    if pid is None:
        pid = getattr(tokenizer, "eos_token_id", None)
    return int(pid or 0)


@contextlib.contextmanager
def padding_side(tokenizer: Any, side: str) -> Iterator[None]:
    """Temporarily set ``tokenizer.padding_side`` (generation wants left, scoring right)."""
    old = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        yield
    finally:
        tokenizer.padding_side = old

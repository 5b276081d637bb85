"""Which tokens of a forward are the prompt: declared by the caller, read by rewrite hooks.

Scoring runs prompt and answer through one teacher-forced forward, and in generation the
prefill is the prompt while every later step is the model's own output. A rewrite that should
act on the prompt only (REP's ``prompt_only``) cannot tell them apart from the tensor it sees;
the caller can. The caller declares the prompt on the loaded model for one ``with`` block::

    with declare_prompt(lm, n_prompt):       # right padding: row b's first n_prompt[b] tokens
        lm.model(input_ids=ids, attention_mask=mask)
    with declare_prompt(lm):                 # generation: the whole first forward (the prefill)
        lm.model.generate(**enc)

and a hook asks ``prompt_span(lm).mask(key, x)``. The first forward a hook sees inside the block
is the prompt's; any later one (a generation step) has no prompt positions. Outside a block
``prompt_span`` is None: the caller said nothing, so every position counts as prompt.
:mod:`repedit.evaluation.scoring` declares the prompt in every forward it runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field

import torch

from repedit.errors import RepeditError
from repedit.models.loading import LoadedModel

#: the attribute of the loaded model that holds the declared span
ATTRIBUTE = "prompt_span"


@dataclass
class PromptSpan:
    """The prompt of the forward(s) run inside one :func:`declare_prompt` block.

    ``lengths``: per row, how many leading tokens are prompt (right padding); None: every
    position of the first forward is prompt (left-padded generation, whose prefill is all
    prompt and padding). ``where``: instead, an explicit bool ``[batch, seq]`` mask of the
    prompt tokens (packed rows, where prompts and answers interleave).
    """

    lengths: torch.Tensor | None = None
    seen: set[Hashable] = field(default_factory=set)
    where: torch.Tensor | None = None

    def mask(self, key: Hashable, x: torch.Tensor) -> torch.Tensor | None:
        """Prompt positions of ``x`` ([batch, seq, ...]) for hook ``key``: a bool [batch, seq]
        mask, or None for "all of them". A hook's first forward in the block is the prompt's;
        later ones are generated tokens and get an all-False mask."""
        if key in self.seen:
            return torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        self.seen.add(key)
        if self.where is not None:
            if tuple(self.where.shape) != tuple(x.shape[:2]):
                raise RepeditError(
                    f"a prompt mask of shape {tuple(self.where.shape)} was declared, but the "
                    f"forward has shape {tuple(x.shape)}"
                )
            return self.where.to(x.device)
        if self.lengths is None:
            return None
        if x.dim() < 2 or x.shape[0] != self.lengths.numel():
            raise RepeditError(
                f"a prompt span was declared for {self.lengths.numel()} rows, but the forward "
                f"has shape {tuple(x.shape)}"
            )
        positions = torch.arange(x.shape[1], device=x.device)
        return positions[None, :] < self.lengths.to(x.device)[:, None]


def prompt_span(lm: LoadedModel) -> PromptSpan | None:
    """The span declared on ``lm`` right now (None outside :func:`declare_prompt`)."""
    return getattr(lm, ATTRIBUTE, None)


@contextlib.contextmanager
def declare_prompt(
    lm: LoadedModel, lengths: torch.Tensor | None = None, *, where: torch.Tensor | None = None
) -> Iterator[PromptSpan]:
    """Declare the prompt of the forward(s) run in the block (see the module doc): by row
    ``lengths`` or by an explicit bool ``where`` mask; the previous declaration, if any, is
    restored on exit."""
    span = PromptSpan(None if lengths is None else torch.as_tensor(lengths).reshape(-1))
    span.where = None if where is None else torch.as_tensor(where, dtype=torch.bool)
    previous = prompt_span(lm)
    setattr(lm, ATTRIBUTE, span)
    try:
        yield span
    finally:
        setattr(lm, ATTRIBUTE, previous)

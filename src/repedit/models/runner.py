"""Run only the upper part of a network, from cached lower-layer activations.

Value optimisation changes one hidden state at layer ``l`` and asks how the output moves;
the layers below ``l`` never change, so they are run once. ``UpperRunner`` records each upper
decoder layer's call arguments (masks, rotary embeddings, ...) during that one forward and then
replays just those layers, which keeps it architecture-agnostic.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from repedit.models.hooks import Hooks, StopForward


class UpperRunner:
    """Replays decoder layers ``start..N-1`` on a (modified) input hidden state."""

    def __init__(self, lm: Any, start: int, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        self.lm, self.start = lm, start
        layers = lm.arch.layers()
        self.calls: list[tuple[tuple, dict]] = []
        handles = []

        def record(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            self.calls.append((args, kwargs))

        for layer in list(layers)[start:]:
            handles.append(layer.register_forward_pre_hook(record, with_kwargs=True))
        try:
            with torch.no_grad(), Hooks() as h:
                h.capture("final", layers[-1], which="output")
                h.stop_after(layers[-1])
                with contextlib.suppress(StopForward):
                    lm.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        if len(self.calls) != len(layers) - start:
            raise RuntimeError("UpperRunner: decoder layers were not all called once")
        first_args, first_kwargs = self.calls[0]
        self.hidden_in = (first_args[0] if first_args else first_kwargs["hidden_states"]).detach()
        #: final-layer hidden states of the unmodified forward [batch, seq, d_model]
        self.final_hidden = h["final"]

    def run(self, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Final-layer hidden states [batch, seq, d_model] from layer ``start``'s input."""
        h = self.hidden_in if hidden is None else hidden
        for layer, (args, kwargs) in zip(
            list(self.lm.arch.layers())[self.start :], self.calls, strict=True
        ):
            out = layer(h, *args[1:], **kwargs) if args else layer(**{**kwargs, "hidden_states": h})
            h = out[0] if isinstance(out, tuple) else out
        return h


@contextlib.contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """Turn off weight gradients while optimising something else (restored on exit).

    Backpropagating to a hidden-state delta then costs only input gradients, not the weight
    gradients of every layer above it.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)

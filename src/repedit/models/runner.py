"""Run only the upper part of a network, from cached lower-layer activations.

Value optimisation changes one hidden state at layer ``l`` and asks how the output moves;
the layers below ``l`` never change, so they are run once. ``UpperRunner`` records each upper
decoder layer's call arguments (masks, rotary embeddings, ...) during that one forward and then
replays just those layers, which keeps it architecture-agnostic. ``PrefixRunner`` also leaves
out the columns before the changed one, which no layer changes either: their keys and values
sit in a KV cache that is reset before every replay.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch

from repedit.models.batching import length_buckets
from repedit.models.hooks import Hooks
from repedit.models.loading import LoadedModel


def call_hidden(call: tuple[tuple, dict]) -> torch.Tensor:
    """The hidden-state input of a recorded decoder-layer call (``Hooks.record_call``)."""
    args, kwargs = call
    return args[0] if args else kwargs["hidden_states"]


def without_hidden(call: tuple[tuple, dict]) -> tuple[tuple, dict]:
    """``call`` with its hidden-state input dropped (``replay`` supplies one): what to keep of
    many recorded calls without holding every layer's activations."""
    args, kwargs = call
    if args:
        return (None, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": None}


def replay(layer: torch.nn.Module, call: tuple[tuple, dict], hidden: torch.Tensor) -> torch.Tensor:
    """Run a decoder layer as it was called in ``call`` (``Hooks.record_call``), on ``hidden``;
    returns its output hidden state. Hooks on its submodules fire as in the full forward."""
    args, kwargs = call
    if args:
        out = layer(hidden, *args[1:], **kwargs)
    else:
        out = layer(**{**kwargs, "hidden_states": hidden})
    return out[0] if isinstance(out, tuple) else out


def _same_call(a: tuple[tuple, dict], b: tuple[tuple, dict]) -> bool:
    (a_args, a_kwargs), (b_args, b_kwargs) = a, b
    return (
        len(a_args) == len(b_args)
        and all(x is y for x, y in zip(a_args, b_args, strict=True))
        and a_kwargs.keys() == b_kwargs.keys()
        and all(a_kwargs[k] is b_kwargs[k] for k in a_kwargs)
    )


def infer_calls(
    model: torch.nn.Module, recorded: dict[int, tuple[tuple, dict]], wanted: range | list[int]
) -> dict[int, tuple[tuple, dict]] | None:
    """The calls of decoder blocks ``wanted`` (hidden state dropped), from recorded calls of
    other blocks of the same forward, without running them; None where that is not safe.

    A model's forward builds its masks and position embeddings once and hands every block of one
    kind (``config.layer_types``, e.g. sliding vs full attention; one kind without it) the same
    objects: only the hidden state differs. A wanted block's call is therefore its kind's
    recorded call, provided at least two recorded blocks of that kind got identical (``is``)
    arguments. A kind no two recorded blocks share, or per-block arguments (a head mask per
    layer, a layer index), give None: the caller runs the blocks to record them.
    """
    types = getattr(getattr(model, "config", None), "layer_types", None)

    def kind(i: int) -> str | None:
        return types[i] if types and i < len(types) else None

    by_kind: dict[str | None, list[tuple[tuple, dict]]] = {}
    for i, call in sorted(recorded.items()):
        by_kind.setdefault(kind(i), []).append(without_hidden(call))
    shared = {  # per kind: the one call all its recorded blocks got, or None
        k: calls[0] if len(calls) > 1 and all(_same_call(calls[0], c) for c in calls) else None
        for k, calls in by_kind.items()
    }
    out = {j: shared.get(kind(j)) for j in wanted}
    return None if any(call is None for call in out.values()) else out  # type: ignore[return-value]


class UpperRunner:
    """Replays decoder layers ``start..N-1`` on a (modified) input hidden state."""

    def __init__(
        self,
        lm: LoadedModel,
        start: int,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        **forward_kwargs: Any,
    ):
        self.lm, self.start = lm, start
        forward_kwargs.setdefault("use_cache", False)
        layers = lm.arch.layers()
        with torch.no_grad(), Hooks() as h:
            for j in range(start, len(layers)):
                h.record_call(str(j), layers[j])
            h.capture("final", layers[-1], which="output")
            h.stop_after(layers[-1])
            h.run(lm.model, input_ids=input_ids, attention_mask=attention_mask, **forward_kwargs)
        if len(h.calls) != len(layers) - start:
            raise RuntimeError("UpperRunner: decoder layers were not all called once")
        self.hidden_in = call_hidden(h.calls[str(start)]).detach()
        self.calls = [without_hidden(h.calls[str(j)]) for j in range(start, len(layers))]
        #: final-layer hidden states of the unmodified forward [batch, seq, d_model]
        self.final_hidden = h["final"]

    def run(self, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Final-layer hidden states [batch, seq, d_model] from layer ``start``'s input."""
        h = self.hidden_in if hidden is None else hidden
        self._before_run()
        for layer, call in zip(list(self.lm.arch.layers())[self.start :], self.calls, strict=True):
            h = replay(layer, call, h)
        return h

    def _before_run(self) -> None:
        """Hook for subclasses that must reset state the replayed layers mutate."""


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


def cache_keyword(model: torch.nn.Module) -> str:
    """The forward keyword for a KV cache: ``cache`` in recent transformers, else the old name."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class PrefixRunner(UpperRunner):
    """``UpperRunner`` over columns ``split..T-1``, with columns ``< split`` as a fixed KV cache.

    Value optimisation changes one hidden state per row; when every row has it at column
    ``split``, no earlier column ever changes, in any layer (causal attention). Their keys and
    values are computed once and each replay runs the upper layers on the suffix only. The
    replayed layers append to the cache, so its per-layer state is restored before every run.
    """

    def __init__(
        self,
        lm: LoadedModel,
        start: int,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        split: int,
        cache: Any = None,
    ):
        if not 0 < split < input_ids.shape[1]:
            raise ValueError(f"PrefixRunner: split {split} leaves no prefix or no suffix")
        layers = lm.arch.layers()
        key = cache_keyword(lm.model)
        if cache is None:
            cache = prefix_cache(lm, input_ids, attention_mask, position_ids, split)
        cached = getattr(cache, "layers", None)
        if cached is None or len(cached) != len(layers):
            raise RuntimeError("PrefixRunner: the cache has no per-layer state to restore")
        for i, layer_cache in enumerate(cached):
            if (
                getattr(layer_cache, "is_sliding", False)
                and getattr(layer_cache, "sliding_window", 0) <= input_ids.shape[1]
            ):
                raise RuntimeError(f"PrefixRunner: layer {i}'s sliding window is shorter than T")
            if layer_cache.get_seq_length() != split:
                raise RuntimeError(f"PrefixRunner: layer {i} did not cache the prefix")
            if not all(torch.isfinite(t).all() for t in (layer_cache.keys, layer_cache.values)):
                raise RuntimeError(f"PrefixRunner: non-finite prefix keys/values at layer {i}")
        self.cache, self.split = cache, split
        self._state = [dict(vars(c)) for c in cached]
        self._versions = [
            (t, t._version) for state in self._state for t in state.values() if torch.is_tensor(t)
        ]
        super().__init__(
            lm,
            start,
            input_ids[:, split:],
            attention_mask,
            position_ids=position_ids[:, split:],
            use_cache=True,
            **{key: cache},
        )
        if not torch.isfinite(self.final_hidden).all():
            raise RuntimeError("PrefixRunner: non-finite hidden states on the suffix")

    def _before_run(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Put the cache back to the prefix (the last run appended the suffix to it)."""
        if any(t._version != v for t, v in self._versions):
            raise RuntimeError("PrefixRunner: the cached prefix was modified in place")
        for layer_cache, state in zip(self.cache.layers, self._state, strict=True):
            layer_cache.__dict__.clear()
            layer_cache.__dict__.update(state)


def prefix_buckets(lengths: torch.Tensor) -> list[torch.Tensor]:
    """Row indices (ascending) grouped by their real prefix length ``lengths`` with
    :func:`~repedit.models.batching.length_buckets`: a long passage in one row would otherwise
    make every row of the batch run, and cache, that many padded columns."""
    groups = length_buckets([int(n) for n in lengths.tolist()])
    return [torch.tensor(sorted(g), dtype=torch.long, device=lengths.device) for g in groups]


def prefix_cache(
    lm: LoadedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    split: int,
) -> Any:
    """A KV cache of columns ``< split`` of left-padded rows, each bucket of similar prefix
    length (:func:`prefix_buckets`) run on its own columns only.

    Columns a bucket leaves out hold zero keys and values: they are padding, which the mask
    hides, so every real column is what one padded forward gives, up to float rounding.
    """
    from transformers import DynamicCache

    if not 0 < split < input_ids.shape[1]:
        raise ValueError(f"PrefixRunner: split {split} leaves no prefix or no suffix")
    layers = lm.arch.layers()
    key = cache_keyword(lm.model)
    lengths = attention_mask[:, :split].sum(1)
    buckets = prefix_buckets(lengths)
    parts = []
    for rows in buckets:
        lead = split - max(int(lengths[rows].max()), 1)
        part = DynamicCache(config=lm.model.config)
        with torch.no_grad(), Hooks() as h:
            h.stop_after(layers[-1])
            h.run(
                lm.model,
                input_ids=input_ids[rows, lead:split],
                attention_mask=attention_mask[rows, lead:split],
                position_ids=position_ids[rows, lead:split],
                use_cache=True,
                **{key: part},
            )
        for i, c in enumerate(getattr(part, "layers", [None])):
            if not hasattr(c, "keys"):
                raise RuntimeError("PrefixRunner: the cache has no per-layer keys and values")
            if c.keys.shape[2] != split - lead:  # a sliding window dropped columns
                raise RuntimeError(f"PrefixRunner: layer {i}'s sliding window is shorter than T")
        parts.append((rows, lead, part))
    if len(parts) == 1 and parts[0][1] == 0:
        return parts[0][2]
    cache = DynamicCache(config=lm.model.config)
    for i in range(len(layers)):
        kv = []
        for t in ("keys", "values"):
            first = getattr(parts[0][2].layers[i], t)
            full = first.new_zeros((input_ids.shape[0], first.shape[1], split, first.shape[3]))
            for rows, lead, part in parts:
                full[rows, :, lead:] = getattr(part.layers[i], t)
            kv.append(full)
        cache.update(kv[0], kv[1], i)
    return cache

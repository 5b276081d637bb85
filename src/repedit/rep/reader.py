"""Reading the keys REP trains on: down-projection inputs at every token of the pool.

:func:`read_keys` runs one forward per length bucket, stopped after the deepest adapted layer;
:class:`LayerwiseReader` serves layer-wise training, running each decoder block once;
:class:`KeyCache` keeps keys that cannot depend on the adapters. Why: reading keys is most of
REP's cost, so no block runs more often than the training needs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence

import torch

from repedit.errors import RepeditError
from repedit.models.batching import length_buckets
from repedit.models.hooks import Hooks
from repedit.models.loading import LoadedModel
from repedit.models.runner import infer_calls, replay, without_hidden
from repedit.models.tokens import pad_id, pad_right
from repedit.rep.adapter import Adapter
from repedit.rep.variants import RepExample

#: token budget of one forward pass when reading keys
CHUNK_TOKENS = 8192


def length_chunks(examples: Sequence[RepExample]) -> list[list[int]]:
    """Indices grouped by length (:func:`~repedit.models.batching.length_buckets`), at most
    ``CHUNK_TOKENS`` padded tokens a forward."""
    return length_buckets([len(e.ids) for e in examples], max_tokens=CHUNK_TOKENS)


def _chunk_forwards(
    lm: LoadedModel,
    examples: Sequence[RepExample],
    capture: Sequence[int],
    until: int,
    *,
    upstream: Mapping[int, Adapter] | None = None,
) -> Iterator[tuple[list[int], Hooks]]:
    """One forward per chunk of ``examples`` (:func:`forward_chunk`); yields
    ``(example indices, hooks)``."""
    for idx in length_chunks(examples):
        yield idx, forward_chunk(lm, examples, idx, capture, until, upstream=upstream)


def forward_chunk(
    lm: LoadedModel,
    examples: Sequence[RepExample],
    idx: list[int],
    capture: Sequence[int],
    until: int,
    *,
    upstream: Mapping[int, Adapter] | None = None,
    record: Sequence[int] = (),
    outputs: int | None = None,
) -> Hooks:
    """One forward of ``examples[idx]`` (right-padded, no graph), stopped after layer ``until``'s
    down-projection, with the down-projection inputs of ``capture`` (``hooks[str(layer)]``,
    [chunk, seq, d_mlp]) and the calls of the ``record`` decoder blocks
    (``hooks.calls[str(block)]``). ``upstream`` adapters rewrite their layers' down-projection
    inputs (the caller sets their mode). ``outputs``: also keep that layer's block output
    (``hooks["block"]``) and down-projection output (``hooks["value"]``); the forward then runs
    to the end of the deeper of that block and ``until``'s."""
    blocks = lm.arch.layers()
    ids, mask = pad_right([examples[i].ids for i in idx], pad_id(lm.tokenizer))
    with torch.no_grad(), Hooks() as h:
        for block in record:
            h.record_call(str(block), blocks[block])
        for layer in capture:
            h.capture(str(layer), lm.arch.down_proj(layer))
        for layer, adapter in sorted((upstream or {}).items()):
            h.rewrite(lm.arch.down_proj(layer), adapter)
        if outputs is not None:
            h.capture("block", blocks[outputs], which="output")
            h.capture("value", lm.arch.down_proj(outputs), which="output")
        if outputs is not None and outputs >= until:
            h.stop_after(blocks[outputs])
        else:
            h.stop_after(lm.arch.down_proj(until))
        h.run(
            lm.model,
            input_ids=ids.to(lm.device),
            attention_mask=mask.to(lm.device),
            use_cache=False,
        )
    return h


def _scatter(
    out: list[torch.Tensor | None],
    examples: Sequence[RepExample],
    idx: list[int],
    keys: torch.Tensor,
) -> None:
    """Rows of a padded chunk's keys [chunk, seq, d] back to their examples, unpadded, float32."""
    for row, i in enumerate(idx):
        out[i] = keys[row, : len(examples[i].ids)].float()


def read_keys(
    lm: LoadedModel,
    layers: Sequence[int],
    examples: Sequence[RepExample],
    upstream: Mapping[int, Adapter] | None = None,
) -> dict[int, list[torch.Tensor]]:
    """Down-projection inputs at every token: ``{layer: [keys [len_i, d_mlp] float32]}``.

    The forward stops after the deepest layer. ``upstream`` adapters (eval mode) are applied
    at their layers below the deepest, so deeper keys see them, as at test time; the key read
    at a layer is always the raw one, before that layer's own adapter.
    """
    layers = sorted(layers)
    deepest = max(layers)
    out: dict[int, list[torch.Tensor | None]] = {layer: [None] * len(examples) for layer in layers}
    ups = {k: a for k, a in (upstream or {}).items() if k < deepest}
    modes = {k: a.training for k, a in ups.items()}
    try:
        for a in ups.values():
            a.eval()
        for idx, h in _chunk_forwards(lm, examples, layers, deepest, upstream=ups):
            for layer in layers:
                _scatter(out[layer], examples, idx, h[str(layer)])
    finally:
        for k, a in ups.items():
            a.train(modes[k])
    return {layer: _filled(rows) for layer, rows in out.items()}


def _filled(rows: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """``rows`` once every chunk has scattered its examples' keys into them."""
    out = [r for r in rows if r is not None]
    if len(out) != len(rows):
        raise RepeditError(f"no keys were read for {len(rows) - len(out)} of {len(rows)} examples")
    return out


class LayerwiseReader:
    """Keys for training adapters one layer at a time, lowest first, running each decoder block
    once.

    One forward per chunk runs to the end of the lowest layer's block: it reads that layer's
    keys, keeps the block's output and down-projection output, and records the calls of the
    blocks below, from which the calls of the adapted blocks above are inferred
    (:func:`~repedit.models.runner.infer_calls`; where that is not safe the forward runs on to
    the deepest layer to record them). :meth:`advance` then brings the last layer's block output
    up to date with its trained adapter, which changes it by exactly ``post(W k̂) − post(W k)``
    (the MLP output enters the residual stream additively, through the architecture's
    ``post_mlp`` where it has one), and runs the blocks up to and including the next layer with
    the trained adapters (eval mode, as at test time) rewriting their down-projection inputs,
    reading the next layer's raw key. These are the keys :func:`read_keys` gives with those
    adapters upstream, to float rounding.
    """

    def __init__(self, lm: LoadedModel, layers: list[int], examples: Sequence[RepExample]):
        self.lm, self.layers, self.examples = lm, layers, examples
        self.blocks = lm.arch.layers()
        lo, deepest = layers[0], layers[-1]
        self.chunks: list[list[int]] = []
        self.calls: list[dict[int, tuple[tuple, dict]]] = []  # without their hidden states
        #: per chunk, block ``self.at``'s output, its raw key and down-projection output, all
        #: computed without the adapter of ``self.at`` (trained later)
        self.state: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        current: list[torch.Tensor | None] = [None] * len(examples)
        #: whether the adapted blocks' calls were inferred (False: recorded by running them)
        self.inferred = True
        upper = range(lo + 1, deepest + 1)
        t0 = time.perf_counter()
        for idx in length_chunks(examples):
            calls = None
            if self.inferred:
                h = forward_chunk(lm, examples, idx, [lo], lo, record=range(lo + 1), outputs=lo)
                calls = infer_calls(lm.model, {int(k): v for k, v in h.calls.items()}, upper)
                self.inferred = calls is not None
            if calls is None:  # run the adapted blocks too, to record their calls
                h = forward_chunk(lm, examples, idx, [lo], deepest, record=upper, outputs=lo)
                calls = {int(k): without_hidden(v) for k, v in h.calls.items()}
            self.chunks.append(idx)
            self.calls.append(calls)
            self.state.append((h["block"], h[str(lo)], h["value"]))
            _scatter(current, examples, idx, h[str(lo)])
        #: the keys of layer ``self.at``, one [len_i, d_mlp] float32 tensor per example
        self.current = _filled(current)
        self.at = lo
        self.forward_seconds = time.perf_counter() - t0

    def _with_adapter(self, adapter: Adapter, state: tuple) -> torch.Tensor:
        """Block ``self.at``'s output once its own (trained) ``adapter`` rewrites its key."""
        out, k, value = state
        k_hat = adapter(k)
        changed = (k_hat != k).any(-1)
        if not bool(changed.any()):
            return out
        down, post = self.lm.arch.down_proj(self.at), self.lm.arch.post_mlp(self.at)
        new_value = down(k_hat[changed])
        old_value = value[changed]
        if post is not None:
            new_value, old_value = post(new_value), post(old_value)
        out = out.clone()
        out[changed] = (out[changed].float() + new_value.float() - old_value.float()).to(out.dtype)
        return out

    def advance(self, layer: int, adapters: Mapping[int, Adapter]) -> list[torch.Tensor]:
        """Raw keys at ``layer`` with ``adapters`` (all below it, trained) in place."""
        if layer <= self.at:
            raise RepeditError(f"layers advance upwards: {layer} after {self.at}")
        t0 = time.perf_counter()
        arch = self.lm.arch
        out: list[torch.Tensor | None] = [None] * len(self.examples)
        modes = {k: a.training for k, a in adapters.items()}
        try:
            for a in adapters.values():
                a.eval()
            with torch.no_grad():
                for c, idx in enumerate(self.chunks):
                    h = self.state[c][0]
                    if self.at in adapters:
                        h = self._with_adapter(adapters[self.at], self.state[c])
                    with Hooks() as hooks:
                        for j, adapter in adapters.items():
                            hooks.rewrite(arch.down_proj(j), adapter)
                        for j in range(self.at + 1, layer):
                            h = replay(self.blocks[j], self.calls[c][j], h)
                        hooks.capture("key", arch.down_proj(layer))
                        hooks.capture("value", arch.down_proj(layer), which="output")
                        h = replay(self.blocks[layer], self.calls[c][layer], h)
                    self.state[c] = (h, hooks["key"], hooks["value"])
                    _scatter(out, self.examples, idx, hooks["key"])
        finally:
            for k, a in adapters.items():
                a.train(modes[k])
        self.at, self.current = layer, _filled(out)
        self.forward_seconds += time.perf_counter() - t0
        return self.current

    def cache(self, layer: int) -> KeyCache:
        """The current layer's keys as a filled :class:`KeyCache` for a training run."""
        kc = KeyCache(self.lm, [layer], list(self.examples), cacheable=True)
        kc.store = {i: {layer: k} for i, k in enumerate(self.current)}
        return kc


class KeyCache:
    """Keys per pool example; cached when they cannot depend on the adapters (one layer)."""

    def __init__(
        self, lm: LoadedModel, layers: list[int], examples: list[RepExample], cacheable: bool
    ):
        self.lm, self.layers, self.examples, self.cacheable = lm, layers, examples, cacheable
        self.store: dict[int, dict[int, torch.Tensor]] = {}
        self.forward_seconds = 0.0

    def get(
        self, indices: Sequence[int], adapters: Mapping[int, Adapter]
    ) -> dict[int, list[torch.Tensor]]:
        need = [i for i in indices if not (self.cacheable and i in self.store)]
        if need:
            t0 = time.perf_counter()
            got = read_keys(self.lm, self.layers, [self.examples[i] for i in need], adapters)
            self.forward_seconds += time.perf_counter() - t0
            fresh = {i: {layer: got[layer][j] for layer in self.layers} for j, i in enumerate(need)}
            if self.cacheable:
                self.store.update(fresh)
        else:
            fresh = {}
        return {
            layer: [(self.store[i] if i in self.store else fresh[i])[layer] for i in indices]
            for layer in self.layers
        }

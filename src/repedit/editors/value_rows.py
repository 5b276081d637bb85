"""A value batch's rows as row-indexed tensors, so batches are rebuilt without the model.

Under the cached-prefix layout (``value_plan.prefix_plan``) everything a step reads about a
row is a tensor indexed by row: the input of the first replayed layer on the columns from the
subject on, every layer's cached keys and values of the columns before it, the site value at
the subject and the KL prompts' distributions before the edit. None of it depends on the other
rows of the batch (each row is computed as if unpadded). A subset of a batch's rows, or two
sets of rows side by side, is therefore again a valid batch: ``select`` and ``concat`` build
it by indexing and padding, and ``SelectedRunner`` replays the upper layers on it. The model
only runs for rows that are new (``rows_from_plan``); the masks and position embeddings the
replayed layers take come from a forward whose decoder layers are skipped (``layer_calls``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from repedit.editors.value_plan import Plan, RowBatch, left_align, position_ids
from repedit.errors import PrefixUnavailable
from repedit.models.hooks import Hooks
from repedit.models.loading import LoadedModel
from repedit.models.runner import PrefixRunner, cache_keyword, prefix_buckets, without_hidden
from repedit.models.tokens import pad_id


@dataclass
class Rows:
    """A batch's rows, left-padded so every subject token sits in column ``split``.

    Request-level indices (``owner``, ``bare_rows``) count requests within the batch; row
    indices (``target_rows``, ``kl_rows``, ``bare_rows``) count rows.
    """

    n: int  # requests
    ids: torch.Tensor  # [R, W] token ids (only the suffix's are read, by ``layer_calls``)
    mask: torch.Tensor  # [R, W] 1 on real tokens
    split: int
    hidden_in: torch.Tensor  # [R, W - split, d] the first replayed layer's input
    prefix: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [R, h, split, k]
    site_values: torch.Tensor  # [R, d] unmodified site output at the subject token
    owner: torch.Tensor  # [R] request of each row
    target_rows: torch.Tensor  # [m] row, column from ``split``, id and prompt of each target
    target_pos: torch.Tensor
    target_ids: torch.Tensor
    target_prompt: torch.Tensor
    kl_rows: torch.Tensor  # [r]
    kl_init: torch.Tensor  # [r, V] KL prompts' log-distributions before the edit
    bare_rows: torch.Tensor  # [n]


def rows_from_plan(lm: LoadedModel, b: RowBatch, plan: Plan) -> Rows:
    """The rows of a prefix plan (``plan.path == "prefix"``), read off its runner."""
    runner = plan.runner
    if not isinstance(runner, PrefixRunner):
        raise PrefixUnavailable(f"rows_from_plan: a {plan.path!r} plan has no cached prefix")
    ids, mask, split, _ = left_align(b, pad_id(lm.tokenizer))
    runner.reset()  # the cache back to the prefix: its per-layer keys and values
    prefix = []
    for i, layer_cache in enumerate(runner.cache.layers):
        keys, values = getattr(layer_cache, "keys", None), getattr(layer_cache, "values", None)
        if not (isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor)):
            raise PrefixUnavailable(f"rows_from_plan: layer {i} cached no keys and values")
        prefix.append((keys, values))
    device = lm.device
    kl_rows = b.kl_rows.to(device)
    with torch.no_grad():
        before = runner.final_hidden[kl_rows, plan.inject_pos[kl_rows]]
        kl_init = lm.arch.logits(before).float().log_softmax(-1)
    return Rows(
        n=len(b.bare_rows),
        ids=ids.to(device),
        mask=mask.to(device),
        split=split,
        hidden_in=runner.hidden_in,
        prefix=prefix,
        site_values=plan.site_values,
        owner=b.owner.to(device),
        target_rows=b.target_rows.to(device),
        target_pos=plan.target_pos,
        target_ids=b.target_ids.to(device),
        target_prompt=b.target_prompt.to(device),
        kl_rows=kl_rows,
        kl_init=kl_init,
        bare_rows=b.bare_rows.to(device),
    )


def _renumber(index: torch.Tensor, size: int) -> torch.Tensor:
    """``new[old]``: the position of each old index in ``index``, -1 where it is not kept."""
    new = torch.full((size,), -1, dtype=torch.long, device=index.device)
    new[index] = torch.arange(len(index), device=index.device)
    return new


def select(rows: Rows, keep: list[int]) -> Rows:
    """The rows of requests ``keep`` (batch indices, in that order), with columns that are
    padding in every kept row dropped."""
    device = rows.owner.device
    req_new = _renumber(torch.tensor(keep, dtype=torch.long, device=device), rows.n)
    owner_new = req_new[rows.owner]
    kept = torch.nonzero(owner_new >= 0).flatten()
    kept = kept[torch.sort(owner_new[kept], stable=True).indices]  # grouped in ``keep`` order
    row_new = _renumber(kept, rows.owner.shape[0])
    t_new = row_new[rows.target_rows]
    targets = torch.nonzero(t_new >= 0).flatten()
    targets = targets[torch.sort(t_new[targets], stable=True).indices]
    kl_new = row_new[rows.kl_rows]
    kl = torch.nonzero(kl_new >= 0).flatten()
    kl = kl[torch.sort(kl_new[kl], stable=True).indices]
    mask = rows.mask[kept]
    real = mask.bool()
    lead = min(int(real.int().argmax(1).min()), rows.split - 1)  # keep one prefix column
    end = int((real.int() * torch.arange(1, mask.shape[1] + 1, device=device)).max())
    return Rows(
        n=len(keep),
        ids=rows.ids[kept, lead:end],
        mask=mask[:, lead:end],
        split=rows.split - lead,
        hidden_in=rows.hidden_in[kept, : end - rows.split],
        prefix=[(k[kept, :, lead:], v[kept, :, lead:]) for k, v in rows.prefix],
        site_values=rows.site_values[kept],
        owner=owner_new[kept],
        target_rows=t_new[targets],
        target_pos=rows.target_pos[targets],
        target_ids=rows.target_ids[targets],
        target_prompt=row_new[rows.target_prompt[targets]],
        kl_rows=kl_new[kl],
        kl_init=rows.kl_init[kl],
        bare_rows=row_new[rows.bare_rows[torch.tensor(keep, dtype=torch.long, device=device)]],
    )


def _pad(x: torch.Tensor, dim: int, before: int, after: int, value: float = 0) -> torch.Tensor:
    """``x`` padded along ``dim`` with ``before`` / ``after`` entries of ``value``."""
    if not before and not after:
        return x
    spec = [0, 0] * (x.dim() - 1 - dim) + [before, after]
    return F.pad(x, spec, value=value)


def _widen(rows: Rows, split: int, suffix: int, pad: int) -> Rows:
    """``rows`` with ``split - rows.split`` padding columns before and enough after for a
    suffix of ``suffix`` columns (masked, zero keys, values and hidden states)."""
    lead, tail = split - rows.split, suffix - rows.hidden_in.shape[1]
    return replace(
        rows,
        ids=_pad(rows.ids, 1, lead, tail, pad),
        mask=_pad(rows.mask, 1, lead, tail),
        split=split,
        hidden_in=_pad(rows.hidden_in, 1, 0, tail),
        prefix=[(_pad(k, 2, lead, 0), _pad(v, 2, lead, 0)) for k, v in rows.prefix],
    )


def concat(a: Rows, b: Rows, pad: int) -> Rows:
    """``a``'s rows, then ``b``'s (its requests numbered after ``a``'s), padded to one layout."""
    split = max(a.split, b.split)
    suffix = max(a.hidden_in.shape[1], b.hidden_in.shape[1])
    a, b = _widen(a, split, suffix, pad), _widen(b, split, suffix, pad)
    r = a.owner.shape[0]
    cat = torch.cat
    return Rows(
        n=a.n + b.n,
        ids=cat([a.ids, b.ids]),
        mask=cat([a.mask, b.mask]),
        split=split,
        hidden_in=cat([a.hidden_in, b.hidden_in]),
        prefix=[
            (cat([ka, kb]), cat([va, vb]))
            for (ka, va), (kb, vb) in zip(a.prefix, b.prefix, strict=True)
        ],
        site_values=cat([a.site_values, b.site_values]),
        owner=cat([a.owner, b.owner + a.n]),
        target_rows=cat([a.target_rows, b.target_rows + r]),
        target_pos=cat([a.target_pos, b.target_pos]),
        target_ids=cat([a.target_ids, b.target_ids]),
        target_prompt=cat([a.target_prompt, b.target_prompt + r]),
        kl_rows=cat([a.kl_rows, b.kl_rows + r]),
        kl_init=cat([a.kl_init, b.kl_init]),
        bare_rows=cat([a.bare_rows, b.bare_rows + r]),
    )


def _passthrough(*args: Any, **kwargs: Any) -> torch.Tensor:
    """A decoder layer's forward that returns its input: what ``layer_calls`` runs instead."""
    return args[0] if args else kwargs["hidden_states"]


def layer_calls(lm: LoadedModel, start: int, rows: Rows, cache: Any) -> list[tuple[tuple, dict]]:
    """The calls of decoder layers ``start..`` (hidden state dropped) for ``rows``' suffix
    after the prefix in ``cache``: the model's forward with every decoder layer skipped, so it
    builds the masks and position embeddings and nothing else."""
    layers = list(lm.arch.layers())
    saved: list[Callable[..., Any] | None] = [vars(layer).get("forward") for layer in layers]
    mask = rows.mask
    with torch.no_grad(), Hooks() as h:
        for j in range(start, len(layers)):
            h.record_call(str(j), layers[j])
        h.stop_after(layers[-1])
        try:
            for layer in layers:
                layer.forward = _passthrough
            h.run(
                lm.model,
                input_ids=rows.ids[:, rows.split :],
                attention_mask=mask,
                position_ids=position_ids(mask)[:, rows.split :],
                use_cache=True,
                **{cache_keyword(lm.model): cache},
            )
        finally:
            for layer, forward in zip(layers, saved, strict=True):
                if forward is None:
                    del layer.forward
                else:
                    layer.forward = forward
    if len(h.calls) != len(layers) - start or cache.get_seq_length() != rows.split:
        raise PrefixUnavailable(
            "layer_calls: the skipped forward did not leave the prefix as it was"
        )
    return [without_hidden(h.calls[str(j)]) for j in range(start, len(layers))]


class SelectedRunner(PrefixRunner):
    """A ``PrefixRunner`` over ``rows``, set up without running any decoder layer."""

    def __init__(self, lm: LoadedModel, start: int, rows: Rows):
        from transformers import DynamicCache

        width = rows.mask.shape[1]
        cache = DynamicCache(config=lm.model.config)
        for i, (k, v) in enumerate(rows.prefix):
            cache.update(k, v, i)
        for i, layer_cache in enumerate(cache.layers):
            window = getattr(layer_cache, "sliding_window", None)
            if getattr(layer_cache, "is_sliding", False) and window is not None and window <= width:
                raise PrefixUnavailable(
                    f"SelectedRunner: layer {i}'s sliding window is shorter than T"
                )
        self.lm, self.start, self.cache, self.split = lm, start, cache, rows.split
        self.calls = layer_calls(lm, start, rows, cache)
        self.hidden_in = rows.hidden_in
        self._state = [dict(vars(c)) for c in cache.layers]
        self._versions = [
            (t, t._version) for state in self._state for t in state.values() if torch.is_tensor(t)
        ]


def runner_rows(rows: Rows, idx: torch.Tensor) -> Rows:
    """Rows ``idx`` of ``rows`` for a runner, with prefix columns that are padding in all of them
    dropped. Only a runner's fields (tokens, cache, first input) are subset; the loss reads the
    rest from the whole batch."""
    mask = rows.mask[idx]
    lead = rows.split - max(int(mask[:, : rows.split].sum(1).max()), 1)
    if lead == 0 and len(idx) == rows.mask.shape[0]:  # one bucket of every row: nothing to cut
        return rows
    return replace(
        rows,
        ids=rows.ids[idx, lead:],
        mask=mask[:, lead:],
        split=rows.split - lead,
        hidden_in=rows.hidden_in[idx],
        prefix=[(k[idx, :, lead:], v[idx, :, lead:]) for k, v in rows.prefix],
    )


class RowParts:
    """``rows`` replayed in buckets of similar prefix width (``prefix_buckets``): ``parts`` is
    a list of (row indices, ``SelectedRunner``), which ``values._Loss`` runs one by one.

    One long passage in a batch would otherwise have every row attend over, and copy, its
    hundreds of cached columns at every step.
    """

    def __init__(self, lm: LoadedModel, start: int, rows: Rows):
        lengths = rows.mask[:, : rows.split].sum(1)
        self.parts = [
            (idx, SelectedRunner(lm, start, runner_rows(rows, idx)))
            for idx in prefix_buckets(lengths)
        ]

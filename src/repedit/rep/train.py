"""Training REP adapters on an edited model.

``train_rep(lm, edit_result, cases, layers=..., stats=..., contexts=..., cfg=...)``:

1. targets ``t`` per layer and request: ``u = C⁻¹k*/‖C⁻¹k*‖`` (``cfg.target="whitened"``, every
   editor), or the raw ``k*`` (``"raw"``; ``"released"`` mixes them as the released code does);
   ``k*`` is the editor's own key, ``edit_result.tensors["keys.<layer>"]``.
2. the pool of training sequences (:mod:`repedit.rep.variants`);
3. ``cfg.steps`` Adam steps; each step takes ``cfg.batch`` pool items (without repetition) plus
   every bare prompt, reads the down-projection inputs of all their tokens in one forward that
   stops after the deepest adapted layer (model frozen, no graph), and applies the adapters to
   those detached keys. Loss, summed over *all* adapted layers (D3)::

       agg_weight·L_agg + consistency_weight·L_cons + gate_loss_weight·L_gate
           (+ negative_weight·L_neg with cfg.negatives)

   ``L_agg = −mean (k̂/‖k̂‖)·t`` over the subject-token keys (a key whose β̃ already reaches
   ``cfg.agg_beta_cap`` is not pushed further), ``L_cons = MSE(f(k_o), k_o)`` at the bare
   prompts, ``L_gate`` a BCE on the gate logits with three groups weighted alike (subject tokens
   → open; "near" negatives: the subject's earlier tokens and the few tokens after it → shut;
   "far" negatives: every other token → shut), ``L_neg = mean |(k̂/‖k̂‖)·t|`` over the tokens of
   the negative sequences.

Multi-layer editors (MEMIT, EMMET, AlphaEdit): ``keys.<l>`` is the key MEMIT solved layer ``l``
for, computed after layers below ``l`` were updated, which is exactly the key of the fully
edited model (an update at ``l`` or above cannot change the input of ``l``). REP trains on the
edited model and is applied at every layer, so the raw keys fed to the adapter at ``l`` are read
with the adapters below ``l`` attached (in eval mode, i.e. hard gate, as they will be at test
time); the target stays the editor's ``k*`` of that layer, the key ``ΔW_l`` was written for.
With a single adapted layer the keys do not depend on the adapters, so each sequence is read
once and cached.

The result reports, before and after training, the gate on positives (subject tokens, per
kind) and negatives (every other token of the training sequences, and the negative
sequences): the mean soft gate and the share of hard-open gates (``g > τ``), and the whitened
alignment of the adapted keys (cos to ``u`` and ``β̃ = k̂ᵀC⁻¹k*/(k*ᵀC⁻¹k*)``). With
layer-wise training (the default for several layers) "before" is each layer as its training
found it, the adapters below it already trained.
"""

from __future__ import annotations

import logging
import random
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from repedit.data.case import EditCase, EditRequest
from repedit.data.variants import PassageSampler
from repedit.editors.keys import compute_keys
from repedit.errors import InvalidRequestError, RepeditError
from repedit.models.batching import length_buckets
from repedit.models.hooks import Hooks
from repedit.models.runner import infer_calls, replay, without_hidden
from repedit.models.tokens import Position, pad_id, pad_right
from repedit.rep.adapter import (
    Adapter,
    RepAdapter,
    RepConfig,
    make_adapters,
    save_adapters,
    stack_adapters,
)
from repedit.rep.variants import (
    NoRepeatBatches,
    RepExample,
    RepItem,
    RepPool,
    build_pool,
    passage_sampler,
    rep_items,
)
from repedit.stats.second_moment import SecondMoment

log = logging.getLogger(__name__)

#: at most this many negative token keys enter one step's gate loss (a random subset)
MAX_NEGATIVE_TOKENS = 4096
#: token budget of one forward pass when reading keys
CHUNK_TOKENS = 8192

_AUTO: Any = object()


# --------------------------------------------------------------------------- key reading


def _chunks(examples: Sequence[RepExample]) -> list[list[int]]:
    """Indices grouped by length (:func:`~repedit.models.batching.length_buckets`), at most
    ``CHUNK_TOKENS`` padded tokens a forward."""
    return length_buckets([len(e.ids) for e in examples], max_tokens=CHUNK_TOKENS)


def _chunk_forwards(
    lm: Any,
    examples: Sequence[RepExample],
    capture: Sequence[int],
    until: int,
    *,
    upstream: Mapping[int, Adapter] | None = None,
) -> Iterator[tuple[list[int], Hooks]]:
    """One forward per chunk of ``examples`` (:func:`_forward_chunk`); yields
    ``(example indices, hooks)``."""
    for idx in _chunks(examples):
        yield idx, _forward_chunk(lm, examples, idx, capture, until, upstream=upstream)


def _forward_chunk(
    lm: Any,
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
    lm: Any,
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
    return out  # type: ignore[return-value]


class _LayerwiseReader:
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

    def __init__(self, lm: Any, layers: list[int], examples: Sequence[RepExample]):
        self.lm, self.layers, self.examples = lm, layers, examples
        self.blocks = lm.arch.layers()
        lo, deepest = layers[0], layers[-1]
        self.chunks: list[list[int]] = []
        self.calls: list[dict[int, tuple[tuple, dict]]] = []  # without their hidden states
        #: per chunk, block ``self.at``'s output, its raw key and down-projection output, all
        #: computed without the adapter of ``self.at`` (trained later)
        self.state: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.current: list[torch.Tensor | None] = [None] * len(examples)
        #: whether the adapted blocks' calls were inferred (False: recorded by running them)
        self.inferred = True
        upper = range(lo + 1, deepest + 1)
        t0 = time.perf_counter()
        for idx in _chunks(examples):
            calls = None
            if self.inferred:
                h = _forward_chunk(lm, examples, idx, [lo], lo, record=range(lo + 1), outputs=lo)
                calls = infer_calls(lm.model, {int(k): v for k, v in h.calls.items()}, upper)
                self.inferred = calls is not None
            if calls is None:  # run the adapted blocks too, to record their calls
                h = _forward_chunk(lm, examples, idx, [lo], deepest, record=upper, outputs=lo)
                calls = {int(k): without_hidden(v) for k, v in h.calls.items()}
            self.chunks.append(idx)
            self.calls.append(calls)
            self.state.append((h["block"], h[str(lo)], h["value"]))
            _scatter(self.current, examples, idx, h[str(lo)])
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
        self.at, self.current = layer, out
        self.forward_seconds += time.perf_counter() - t0
        return out  # type: ignore[return-value]

    def cache(self, layer: int) -> _KeyCache:
        """The current layer's keys as a filled :class:`_KeyCache` for :func:`fit`."""
        kc = _KeyCache(self.lm, [layer], list(self.examples), cacheable=True)
        kc.store = {i: {layer: k} for i, k in enumerate(self.current)}  # type: ignore[misc]
        return kc


class _KeyCache:
    """Keys per pool example; cached when they cannot depend on the adapters (one layer)."""

    def __init__(self, lm: Any, layers: list[int], examples: list[RepExample], cacheable: bool):
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


# --------------------------------------------------------------------------- targets


@dataclass
class _Targets:
    t: dict[int, torch.Tensor]  # [n, d] the loss target per layer
    u: dict[int, torch.Tensor]  # [n, d] whitened unit direction (reports)
    w: dict[int, torch.Tensor]  # [n, d] C⁻¹k*/(k*ᵀC⁻¹k*): β̃(k) = k·w (reports)
    k: dict[int, torch.Tensor]  # [n, d] k* itself (the ``match`` loss)
    source: dict[int, str]


def _request_rows(edit_result: Any, items: Sequence[RepItem]) -> list[int]:
    stored = [dict(r) for r in (getattr(edit_result, "requests", None) or [])]
    wanted = [it.request.to_dict() for it in items]
    if stored and all(w in stored for w in wanted):
        return [stored.index(w) for w in wanted]
    if not stored or len(stored) == len(items):
        return list(range(len(items)))
    raise InvalidRequestError(
        f"the edit holds {len(stored)} requests and none match the {len(items)} REP is asked to "
        "train for; pass the same requests (or cases) that were edited"
    )


def edit_targets(
    lm: Any,
    edit_result: Any,
    items: Sequence[RepItem],
    layers: Sequence[int],
    stats: Mapping[int, SecondMoment],
    cfg: RepConfig,
    *,
    contexts: Sequence[str] = ("{}",),
    position: Position = "last",
) -> _Targets:
    """``t``, ``u`` and ``w`` per layer for each item's request (see the module docstring)."""
    rows = _request_rows(edit_result, items)
    n_stored = len(getattr(edit_result, "requests", None) or []) or len(items)
    tensors = getattr(edit_result, "tensors", {}) or {}
    mode = cfg.target
    if mode == "released":
        method = str(getattr(edit_result, "method", "")).lower()
        mode = "whitened" if method in ("rome", "r-rome") else "raw"
    out = _Targets({}, {}, {}, {}, {})
    for layer in layers:
        if layer not in stats:
            raise InvalidRequestError(f"REP needs C for layer {layer} (stats has {sorted(stats)})")
        k = tensors.get(f"keys.{layer}")
        if k is not None and k.shape[0] != n_stored and k.shape[0] % n_stored == 0:
            # MEMIT key_mode="each": one key per context, request-major; k* is their mean
            k = k.reshape(n_stored, -1, k.shape[-1]).mean(1)
        if k is not None and k.shape[0] == n_stored:
            k_star = k[rows].float()
            out.source[layer] = "edit"
        else:
            reqs = [it.request for it in items]
            k_star = compute_keys(lm, [layer], reqs, list(contexts), position=position)[layer]
            out.source[layer] = "computed"
            log.warning("REP: no keys.%d in the edit result; k* recomputed on the model", layer)
        k_star = k_star.to(torch.float64).cpu()
        cinv = stats[layer].solve(k_star.T).T.reshape(k_star.shape)  # [n, d] C⁻¹k*
        u = cinv / cinv.norm(dim=-1, keepdim=True)
        w = cinv / (cinv * k_star).sum(-1, keepdim=True)
        dev = lm.device
        out.u[layer] = u.float().to(dev)
        out.w[layer] = w.float().to(dev)
        out.k[layer] = k_star.float().to(dev)
        out.t[layer] = (u if mode == "whitened" else k_star).float().to(dev)
    return out


# --------------------------------------------------------------------------- reports


class _Tally:
    """Gate and alignment sums per (layer, category), so groups add up."""

    def __init__(self) -> None:
        self.gate: dict[int, dict[str, list[float]]] = {}
        self.align: dict[int, dict[str, list[float]]] = {}

    def add_gate(self, layer: int, cat: str, g: torch.Tensor, tau: float) -> None:
        s = self.gate.setdefault(layer, {}).setdefault(cat, [0, 0, 0.0])
        s[0] += g.numel()
        s[1] += int((g > tau).sum())
        s[2] += float(g.sum())

    def add_align(self, layer: int, cat: str, cos: torch.Tensor, beta: torch.Tensor) -> None:
        s = self.align.setdefault(layer, {}).setdefault(cat, [0, 0.0, 0.0])
        s[0] += cos.numel()
        s[1] += float(cos.sum())
        s[2] += float(beta.sum())

    def merge(self, other: _Tally) -> None:
        for mine, theirs in ((self.gate, other.gate), (self.align, other.align)):
            for layer, cats in theirs.items():
                for cat, vals in cats.items():
                    cur = mine.setdefault(layer, {}).setdefault(cat, [0] * len(vals))
                    for i, v in enumerate(vals):
                        cur[i] += v

    def gate_dict(self) -> dict[int, dict[str, dict[str, float]]]:
        return {
            layer: {
                cat: {"n": n, "open": o / n if n else 0.0, "soft": s / n if n else 0.0}
                for cat, (n, o, s) in sorted(cats.items())
            }
            for layer, cats in self.gate.items()
        }

    def align_dict(self) -> dict[int, dict[str, dict[str, float]]]:
        return {
            layer: {
                cat: {"n": n, "cos": c / n if n else 0.0, "beta": b / n if n else 0.0}
                for cat, (n, c, b) in sorted(cats.items())
            }
            for layer, cats in self.align.items()
        }


def _measure(
    adapters: Mapping[int, Adapter],
    examples: Sequence[RepExample],
    keys: Mapping[int, Sequence[torch.Tensor]],
    targets: _Targets | None,
    request_map: Sequence[int] | None = None,
) -> _Tally:
    """Gate (eval semantics: hard-open share and soft mean) and alignment of adapted keys.

    Each layer's gate runs once over every token of every example, and the adapter once over
    all subject-token keys; the tallies are then split per example."""
    tally = _Tally()
    if not examples:
        return tally
    with torch.no_grad():
        for layer, adapter in adapters.items():
            modes = adapter.training
            adapter.eval()
            try:
                ks = list(keys[layer])
                flat = torch.cat(ks)
                if adapter.cfg.use_gate:
                    g_all = adapter.gate(flat).cpu()
                else:
                    g_all = torch.ones(flat.shape[0])
                gates = torch.split(g_all, [k.shape[0] for k in ks])
                pos_rows = [i for i, ex in enumerate(examples) if ex.position is not None]
                for ex, g in zip(examples, gates, strict=True):
                    if ex.position is None:
                        for cat in ("negative", f"neg:{ex.kind}"):
                            tally.add_gate(layer, cat, g, adapter.tau)
                        continue
                    pos = ex.position
                    for cat in ("positive", f"pos:{ex.kind}"):
                        tally.add_gate(layer, cat, g[pos : pos + 1], adapter.tau)
                    neg = torch.cat([g[:pos], g[pos + 1 :]])
                    if neg.numel():
                        tally.add_gate(layer, "negative", neg, adapter.tau)
                        tally.add_gate(layer, "neg:context", neg, adapter.tau)
                if targets is None or not pos_rows:
                    continue
                rows = [examples[i].request for i in pos_rows]
                if request_map is not None:
                    rows = [request_map[r] for r in rows]
                kh = adapter(torch.stack([ks[i][examples[i].position] for i in pos_rows]))
                cos = F.cosine_similarity(kh, targets.u[layer][rows], dim=-1).cpu()
                beta = (kh * targets.w[layer][rows]).sum(-1).cpu()
                for j, i in enumerate(pos_rows):
                    for cat in ("positive", f"pos:{examples[i].kind}"):
                        tally.add_align(layer, cat, cos[j : j + 1], beta[j : j + 1])
            finally:
                adapter.train(modes)
    return tally


def gate_rates(
    lm: Any,
    adapters: Mapping[int, Adapter],
    examples: Sequence[RepExample],
) -> dict[int, dict[str, dict[str, float]]]:
    """Gate report on any sequences (e.g. :func:`~repedit.rep.variants.heldout_examples`):
    per layer and category (``positive``, ``negative``, ``pos:<kind>``, ``neg:<kind>``,
    ``neg:context`` = the non-subject tokens of positive sequences) the token count ``n``, the
    hard-open share ``open`` (g > τ) and the mean soft gate ``soft``."""
    if not examples:
        return {}
    keys = read_keys(lm, sorted(adapters), examples, adapters)
    return _measure(adapters, examples, keys, None).gate_dict()


# --------------------------------------------------------------------------- training


@dataclass
class RepTrainResult:
    """Trained adapters ({layer: adapter}; a :class:`RepStack` per layer when several edits got
    their own adapters) and what training measured."""

    adapters: dict[int, Adapter]
    cfg: RepConfig
    #: per step, summed over layers (and over edits trained separately): total, agg, cons, ...
    losses: list[dict[str, float]]
    #: {layer: {category: {"n", "open", "soft"}}} on the training pool, before / after; with
    #: layer-wise training "before" is each layer as its training found it, the adapters
    #: below it already trained (they never change its raw key, so "after" reads the same keys)
    gate_before: dict[int, dict[str, dict[str, float]]]
    gate_after: dict[int, dict[str, dict[str, float]]]
    #: {layer: {category: {"n", "cos", "beta"}}}: adapted subject keys vs the edit's k*
    alignment_before: dict[int, dict[str, dict[str, float]]]
    alignment_after: dict[int, dict[str, dict[str, float]]]
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return sorted(self.adapters)

    def summary(self) -> dict[str, Any]:
        """The headline numbers: open rates and alignment on positives/negatives, per layer."""
        out: dict[str, Any] = {"seconds": round(self.seconds, 3)}
        for layer in self.layers:
            gb, ga = self.gate_before.get(layer, {}), self.gate_after.get(layer, {})
            ab, aa = self.alignment_before.get(layer, {}), self.alignment_after.get(layer, {})
            out[str(layer)] = {
                "open_pos": [
                    gb.get("positive", {}).get("open"),
                    ga.get("positive", {}).get("open"),
                ],
                "open_neg": [
                    gb.get("negative", {}).get("open"),
                    ga.get("negative", {}).get("open"),
                ],
                "soft_pos": [
                    gb.get("positive", {}).get("soft"),
                    ga.get("positive", {}).get("soft"),
                ],
                "soft_neg": [
                    gb.get("negative", {}).get("soft"),
                    ga.get("negative", {}).get("soft"),
                ],
                "beta_pos": [
                    ab.get("positive", {}).get("beta"),
                    aa.get("positive", {}).get("beta"),
                ],
                "cos_pos": [ab.get("positive", {}).get("cos"), aa.get("positive", {}).get("cos")],
            }
        if self.losses:
            out["loss"] = [self.losses[0]["total"], self.losses[-1]["total"]]
        return out

    def to_dict(self) -> dict[str, Any]:
        def keyed(d: dict[int, Any]) -> dict[str, Any]:
            return {str(k): v for k, v in d.items()}

        return {
            "cfg": self.cfg.to_dict(),
            "layers": self.layers,
            "losses": self.losses,
            "gate_before": keyed(self.gate_before),
            "gate_after": keyed(self.gate_after),
            "alignment_before": keyed(self.alignment_before),
            "alignment_after": keyed(self.alignment_after),
            "seconds": self.seconds,
            "info": self.info,
        }

    def save(self, path: str | Path, fingerprint: str | None = None) -> Path:
        return save_adapters(path, self.adapters, self.cfg, fingerprint, info=self.summary())


def _open_gate(adapter: RepAdapter) -> Any:
    """``k ↦ k + P(k)``: the adapter as the hard gate applies it where it opens."""
    return lambda k: k.float() + adapter.project(k)


def _losses(
    adapters: Mapping[int, RepAdapter],
    batch: Sequence[RepExample],
    keys: Mapping[int, Sequence[torch.Tensor]],
    targets: _Targets,
    request_map: Sequence[int],
    cfg: RepConfig,
    gen: torch.Generator,
) -> tuple[torch.Tensor, dict[str, float]]:
    total = torch.zeros(())
    parts = {"agg": 0.0, "cons": 0.0, "gate": 0.0, "neg": 0.0}
    pos_ex = [(i, ex) for i, ex in enumerate(batch) if ex.position is not None]
    anchor_kinds = ("prompt",) if cfg.consistency_on == "prompt" else ("prompt", "original", "long")
    prompt_ex = [(i, ex) for i, ex in pos_ex if ex.kind in anchor_kinds]
    anchored = torch.tensor([ex.kind in anchor_kinds for _, ex in pos_ex])
    neg_seq = [(i, ex) for i, ex in enumerate(batch) if ex.position is None]
    for layer, adapter in adapters.items():
        ks = keys[layer]
        dev = ks[0].device
        pos_k = torch.stack([ks[i][ex.position] for i, ex in pos_ex])  # [P, d]
        req = torch.tensor([request_map[ex.request] for _, ex in pos_ex], device=dev)
        t = targets.t[layer][req]  # [P, d]
        # decoupled: P learns what the hard gate will apply where it opens (k + P(k)), the
        # gate only from its BCE; coupled (the paper): both through the soft k + g·P(k)
        adapt = _open_gate(adapter) if cfg.decouple_gate and cfg.use_gate else adapter
        k_hat = adapt(pos_k)
        if cfg.agg == "match":
            k_star = targets.k[layer][req]
            agg = -((k_hat - k_star) ** 2).sum(-1) / (k_star**2).sum(-1)
        else:
            unit = F.normalize(k_hat, dim=-1) if cfg.use_norm else k_hat
            agg = (unit * t).sum(-1)
            if cfg.abs_agg:
                agg = agg.abs()
        if cfg.agg_beta_cap is not None and cfg.agg == "direction":
            with torch.no_grad():
                beta = (k_hat * targets.w[layer][req]).sum(-1)
            agg = torch.where(beta < cfg.agg_beta_cap, agg, agg.detach())
        if cfg.consistency_on == "original":
            agg = agg[~anchored.to(dev)]
        elif cfg.agg == "match":  # the bare prompt is anchored to its own key instead
            agg = agg[torch.tensor([ex.kind != "prompt" for _, ex in pos_ex], device=dev)]
        l_agg = -agg.mean() if agg.numel() else agg.sum()
        loss = cfg.agg_weight * l_agg
        parts["agg"] += float(l_agg.detach())
        if prompt_ex and cfg.consistency:
            k_o = torch.stack([ks[i][ex.position] for i, ex in prompt_ex])
            if cfg.agg == "match":  # relative, on the scale of the match loss
                l_cons = (((adapt(k_o) - k_o) ** 2).sum(-1) / (k_o**2).sum(-1)).mean()
            else:
                l_cons = F.mse_loss(adapt(k_o), k_o)
            loss = loss + cfg.consistency * l_cons
            parts["cons"] += float(l_cons.detach())
        # gate negatives, in two groups weighted alike: "near" = the subject's earlier tokens
        # and the few tokens after the subject token (hard: their keys resemble the positive
        # one), "far" = every other token and the negative sequences
        near, far = [], []
        if cfg.context_negatives:
            for i, ex in pos_ex:
                k = ks[i]
                is_far = torch.ones(k.shape[0], dtype=torch.bool, device=dev)
                is_near = torch.zeros(k.shape[0], dtype=torch.bool, device=dev)
                start = ex.subject_start if ex.subject_start is not None else ex.position
                is_near[ex.position + 1 : ex.position + 1 + cfg.gate_near_after] = True
                if cfg.gate_subject_tokens == "negative":
                    is_near[start : ex.position] = True
                is_far[start : ex.position + 1 + cfg.gate_near_after] = False
                near.append(k[is_near])
                far.append(k[is_far])
        far += [ks[i] for i, _ in neg_seq]
        if cfg.use_gate and cfg.gate_loss_weight:
            lp = adapter.gate_logit(pos_k)
            l_gate = F.binary_cross_entropy_with_logits(lp, torch.ones_like(lp))
            for group, cap in ((near, MAX_NEGATIVE_TOKENS), (far, cfg.gate_far_tokens)):
                kg = torch.cat(group) if group else pos_k[:0]
                if kg.shape[0] > cap:
                    pick = torch.randperm(kg.shape[0], generator=gen)[:cap]
                    kg = kg[pick.to(dev)]
                if kg.shape[0]:
                    ln = adapter.gate_logit(kg)
                    l_gate = l_gate + F.binary_cross_entropy_with_logits(ln, torch.zeros_like(ln))
            loss = loss + cfg.gate_loss_weight * l_gate
            parts["gate"] += float(l_gate.detach())
        if cfg.negatives and cfg.negative_weight and neg_seq:
            rows, reqs = [], []
            for i, ex in neg_seq:
                rows.append(ks[i])
                reqs += [request_map[ex.request]] * ks[i].shape[0]
            kn = torch.cat(rows)
            rq = torch.tensor(reqs, device=dev)
            if kn.shape[0] > MAX_NEGATIVE_TOKENS:
                pick = torch.randperm(kn.shape[0], generator=gen)[:MAX_NEGATIVE_TOKENS].to(dev)
                kn, rq = kn[pick], rq[pick]
            kh = adapter(kn)
            tn = targets.t[layer][rq]
            dots = (F.normalize(kh, dim=-1) * tn).sum(-1) if cfg.use_norm else (kh * tn).sum(-1)
            l_neg = dots.abs().mean()
            loss = loss + cfg.negative_weight * l_neg
            parts["neg"] += float(l_neg.detach())
        total = total.to(loss.device) + loss
    parts["total"] = float(total.detach())
    return total, parts


def _train_group(
    lm: Any,
    adapters: dict[int, RepAdapter],
    pool: RepPool,
    targets: _Targets,
    request_map: Sequence[int],
    cfg: RepConfig,
    seed_offset: int,
    report: bool,
) -> tuple[list[dict[str, float]], _Tally, _Tally, float]:
    layers = sorted(adapters)
    examples = pool.all_examples()
    n_prompts, n_pos = len(pool.prompts), len(pool.positives)
    pos_index = list(range(n_prompts, n_prompts + n_pos))
    neg_index = list(range(n_prompts + n_pos, len(examples)))
    cache = _KeyCache(lm, layers, examples, cacheable=len(layers) == 1)
    before, after = _Tally(), _Tally()
    if report and (len(layers) == 1 or not cfg.layerwise):
        everything = list(range(len(examples)))
        keys = cache.get(everything, adapters)
        before = _measure(adapters, examples, keys, targets, request_map)
    rng = random.Random(f"rep:{cfg.seed}:{seed_offset}")
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + seed_offset)

    def fit(trained: dict[int, RepAdapter], keys_from: _KeyCache) -> list[dict[str, float]]:
        proj = [p for a in trained.values() for p in a.projection_parameters()]
        gate = [p for a in trained.values() for p in a.gate_parameters()]
        opt = torch.optim.Adam(
            [{"params": proj, "lr": cfg.lr}, {"params": gate, "lr": cfg.gate_lr or cfg.lr}],
            weight_decay=0.0,
        )
        pos_batches = NoRepeatBatches(len(pos_index), cfg.batch, rng)
        neg_batches = NoRepeatBatches(len(neg_index), cfg.negative_batch, rng)
        out = []
        for a in trained.values():
            a.train()
        for _ in range(cfg.steps):
            chosen = list(range(n_prompts)) + [pos_index[i] for i in next(pos_batches)]
            if cfg.negatives and neg_index:
                chosen += [neg_index[i] for i in next(neg_batches)]
            keys = keys_from.get(chosen, adapters)
            batch = [examples[i] for i in chosen]
            loss, parts = _losses(trained, batch, keys, targets, request_map, cfg, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            out.append(parts)
        for a in trained.values():
            a.eval()
        return out

    def keep_prompt_keys(layer: int, keys_from: _KeyCache) -> None:
        """The edit prompts' subject keys as this layer will see them at test time."""
        got = keys_from.get(list(range(n_prompts)), adapters)[layer]
        k_o = [got[i][ex.position] for i, ex in enumerate(examples[:n_prompts])]
        adapters[layer].set_prompt_keys(torch.stack(k_o))

    if len(layers) == 1 or not cfg.layerwise:
        losses = fit(adapters, cache)
        if len(layers) == 1:
            keep_prompt_keys(layers[0], cache)
        else:  # joint training: each layer's prompt key through the other trained adapters
            joint = _KeyCache(lm, layers, examples, cacheable=False)
            for layer in layers:
                keep_prompt_keys(layer, joint)
        if report:
            keys = cache.get(list(range(len(examples))), adapters)
            after = _measure(adapters, examples, keys, targets, request_map)
        return losses, before, after, cache.forward_seconds
    # lowest layer first, each on keys read once with the (trained, frozen) adapters below it,
    # as at test time: no layer chases keys that move while the adapters under it learn
    # ("before" is each layer as its training found it: the adapters below already trained)
    reader = _LayerwiseReader(lm, layers, examples)
    losses = []
    after_keys: dict[int, list[torch.Tensor]] = {}
    for layer in layers:
        below = {j: adapters[j] for j in layers if j < layer}
        after_keys[layer] = reader.advance(layer, below) if below else reader.current
        if report:
            keys = {layer: after_keys[layer]}
            before.merge(_measure({layer: adapters[layer]}, examples, keys, targets, request_map))
        layer_keys = reader.cache(layer)
        steps = fit({layer: adapters[layer]}, layer_keys)
        keep_prompt_keys(layer, layer_keys)
        losses = steps if not losses else _sum_losses([losses, steps])
    if report:  # a layer's own adapter does not change its key: these are the adapted model's
        after = _measure(adapters, examples, after_keys, targets, request_map)
    return losses, before, after, reader.forward_seconds


def _sum_losses(runs: list[list[dict[str, float]]]) -> list[dict[str, float]]:
    if len(runs) == 1:
        return runs[0]
    out = []
    for step in zip(*runs, strict=True):
        out.append({k: sum(s[k] for s in step) for k in step[0]})
    return out


def train_rep(
    lm: Any,
    edit_result: Any,
    cases: Sequence[EditCase | EditRequest | RepItem] | EditCase | EditRequest,
    *,
    layers: Sequence[int] | None = None,
    stats: Mapping[int, SecondMoment],
    contexts: Sequence[str],
    cfg: RepConfig | None = None,
    position: Position | None = None,
    sampler: PassageSampler | None = _AUTO,
    keys: Sequence[str] | None = None,
    negative_subjects: Sequence[str] = (),
    report: bool = True,
) -> RepTrainResult:
    """Train REP adapters for the edit in ``edit_result`` (see the module docstring).

    ``cases``: the edited cases (``EditCase`` gives paraphrases and neighbours) or bare
    requests, in any order (matched to the edit's requests). ``layers``: default the edit's
    layers. ``stats``: ``C`` per layer. ``contexts``: the editor's templates. ``position``:
    default the editor's. ``sampler``: long-context passages (default from ``cfg``). ``keys``:
    case keys seeding scrambles/passages (default: case ids, as the evaluation suite).
    ``negative_subjects``: other subjects for ``cfg.negatives``. ``report``: measure gates and
    alignment on the whole pool before and after training.

    If the edit is not applied, it is applied for the training and reverted afterwards.
    The model's weights are never changed by REP and get no gradients.
    """
    t_start = time.perf_counter()
    cfg = cfg or RepConfig()
    items = rep_items(cases, keys)
    if layers is None:
        layers = list(getattr(edit_result, "layers", []) or [])
    layers = sorted(set(layers))
    if not layers:
        raise InvalidRequestError("REP needs at least one layer to adapt")
    for layer in layers:
        lm.arch.check_layer(layer)
    if position is None:
        position = (getattr(edit_result, "hparams", {}) or {}).get("position", "last")
    applied_here = False
    if hasattr(edit_result, "applied") and not edit_result.applied:
        edit_result.apply(lm)
        applied_here = True
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            return _train(
                lm, edit_result, items, layers, stats, contexts, cfg, position,  # type: ignore[arg-type]
                sampler, negative_subjects, report, t_start,
            )  # fmt: skip
    finally:
        if applied_here:
            edit_result.revert(lm)


def _train(
    lm: Any,
    edit_result: Any,
    items: list[RepItem],
    layers: list[int],
    stats: Mapping[int, SecondMoment],
    contexts: Sequence[str],
    cfg: RepConfig,
    position: Position,
    sampler: Any,
    negative_subjects: Sequence[str],
    report: bool,
    t_start: float,
) -> RepTrainResult:
    targets = edit_targets(
        lm, edit_result, items, layers, stats, cfg, contexts=contexts, position=position
    )
    wants_text = cfg.long_context or (cfg.negatives and "text" in cfg.negative_sources)
    if sampler is _AUTO:
        sampler = passage_sampler(lm, cfg) if wants_text else None
    n = len(items)
    groups = [list(range(n))] if cfg.shared or n == 1 else [[i] for i in range(n)]
    per_layer: dict[int, list[RepAdapter]] = {layer: [] for layer in layers}
    runs, pools = [], []
    before, after = _Tally(), _Tally()
    forward_seconds = 0.0
    for gi, group in enumerate(groups):
        others = [items[j].request.subject for j in range(n) if j not in group]
        pool = build_pool(
            lm,
            [items[i] for i in group],
            contexts,
            cfg,
            sampler=sampler,
            position=position,
            negative_subjects=[*negative_subjects, *others],
        )
        wanted_long = cfg.long_context and sampler is not None and cfg.n_long > 0
        if wanted_long and not any(ex.kind == "long" for ex in pool.positives):
            warnings.warn("REP: no long-context example could be built", stacklevel=3)
        adapters = make_adapters(lm.arch.d_mlp, layers, cfg, device=lm.device, seed_offset=gi)
        for layer in layers:  # for cfg.beta_guard (inference), now or set later
            adapters[layer].set_guard(targets.w[layer][group])
        losses, b, a, fs = _train_group(lm, adapters, pool, targets, group, cfg, gi, report)
        runs.append(losses)
        pools.append(pool.counts())
        before.merge(b)
        after.merge(a)
        forward_seconds += fs
        for layer in layers:
            per_layer[layer].append(adapters[layer])
    final: dict[int, Adapter] = {layer: stack_adapters(ads) for layer, ads in per_layer.items()}
    info = {
        "layers": layers,
        "target": cfg.target,
        "k_star": {str(k): v for k, v in targets.source.items()},
        "groups": len(groups),
        "pool": pools[0] if len(pools) == 1 else pools,
        "forward_seconds": round(forward_seconds, 3),
        "long_context_sampler": sampler is not None,
        "method": getattr(edit_result, "method", None),
    }
    return RepTrainResult(
        adapters=final,
        cfg=cfg,
        losses=_sum_losses(runs),
        gate_before=before.gate_dict(),
        gate_after=after.gate_dict(),
        alignment_before=before.align_dict(),
        alignment_after=after.align_dict(),
        seconds=time.perf_counter() - t_start,
        info=info,
    )


def train_rep_for_editor(
    lm: Any,
    editor: Any,
    cases: Sequence[EditCase | EditRequest | RepItem] | EditCase | EditRequest,
    cfg: RepConfig | None = None,
    **kwargs: Any,
) -> tuple[Any, RepTrainResult]:
    """Edit with ``editor`` (applied to ``lm``), then train REP on the edited model.

    Returns ``(edit_result, rep_result)``; ``rep_result.adapters`` go to
    :func:`~repedit.rep.inject.rep_applied`. On a REP failure the edit is reverted.
    """
    items = rep_items(cases, kwargs.pop("keys", None))
    result = editor.edit(lm, [it.request for it in items])
    try:
        rep = train_rep_after(lm, editor, result, items, cfg=cfg, **kwargs)
    except BaseException:
        if result.applied:
            result.revert(lm)
        raise
    return result, rep


def train_rep_after(
    lm: Any,
    editor: Any,
    edit_result: Any,
    cases: Sequence[EditCase | EditRequest | RepItem] | EditCase | EditRequest,
    *,
    cfg: RepConfig | None = None,
    layers: Sequence[int] | None = None,
    **kwargs: Any,
) -> RepTrainResult:
    """:func:`train_rep` for an edit made by ``editor``: its layers (unless given), its ``C``,
    context templates and key position, so every caller wires an editor to REP the same way."""
    hp = editor.resolved(lm)
    layers = list(layers or editor.layers(lm, hp))
    return train_rep(
        lm,
        edit_result,
        cases,
        layers=layers,
        stats=editor.second_moment(lm, layers),
        contexts=editor.contexts(lm, hp),
        cfg=cfg,
        position=hp.position,
        **kwargs,
    )


def check_no_model_grads(lm: Any) -> None:
    """Raise if any model parameter holds a gradient (REP must leave the model alone)."""
    bad = [n for n, p in lm.model.named_parameters() if p.grad is not None]
    if bad:
        raise RepeditError(f"model parameters received gradients: {bad[:5]}")

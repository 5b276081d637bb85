"""Training REP adapters on an edited model.

``train_rep(lm, edit_result, cases, layers=..., stats=..., contexts=..., cfg=...)``:

1. targets per layer and request from the edit's own keys ``k*``
   (:func:`~repedit.rep.targets.edit_targets`);
2. the pool of training sequences (:mod:`repedit.rep.variants`);
3. ``cfg.steps`` Adam steps; each step takes ``cfg.batch`` pool items (without repetition) plus
   every bare prompt, reads the down-projection inputs of all their tokens in one forward that
   stops after the deepest adapted layer (model frozen, no graph; :mod:`repedit.rep.reader`),
   and applies the adapters to those detached keys. The loss
   (:func:`~repedit.rep.losses.step_losses`) is summed over every adapted layer.

Multi-layer editors (MEMIT, EMMET, AlphaEdit): ``keys.<l>`` is the key the editor solved layer
``l`` for, computed after the layers below ``l`` were updated, which is the key of the fully
edited model. REP is applied at every layer, so the keys fed to the adapter at ``l`` are read
with the adapters below ``l`` attached in eval mode, as at test time. With ``cfg.layerwise``
(default) the layers train one at a time, lowest first, each on keys read once through the
trained adapters below it; with a single layer the keys do not depend on the adapters and are
read once.

The result reports, before and after training, the gate on positives (subject tokens, per
kind) and negatives, and the whitened alignment of the adapted subject keys
(:mod:`repedit.rep.tally`). With layer-wise training "before" is each layer as its training
found it, the adapters below it already trained. The method and its departures from the paper
are described in ``docs/method.md``.
"""

from __future__ import annotations

import random
import time
import warnings
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from repedit.data.case import EditCase, EditRequest
from repedit.data.variants import PassageSampler
from repedit.errors import InvalidRequestError, RepeditError
from repedit.models.loading import LoadedModel
from repedit.models.tokens import Position
from repedit.rep.adapter import (
    Adapter,
    RepAdapter,
    RepConfig,
    make_adapters,
    save_adapters,
    stack_adapters,
)
from repedit.rep.losses import step_losses
from repedit.rep.negatives import SubjectPool, find_pool
from repedit.rep.reader import KeyCache, LayerwiseReader, read_keys
from repedit.rep.tally import Tally, gate_rates, measure
from repedit.rep.targets import Targets, edit_targets
from repedit.rep.variants import (
    NoRepeatBatches,
    RepItem,
    RepPool,
    build_pool,
    passage_sampler,
    rep_items,
)
from repedit.stats.second_moment import SecondMoment

__all__ = [
    "RepTrainResult",
    "check_no_model_grads",
    "edit_targets",
    "gate_rates",
    "read_keys",
    "train_rep",
    "train_rep_after",
    "train_rep_for_editor",
]

_AUTO: Any = object()

Losses = list[dict[str, float]]


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


@dataclass
class _Group:
    """One adapter set's training: its pool, targets and random streams."""

    lm: LoadedModel
    adapters: dict[int, RepAdapter]
    pool: RepPool
    targets: Targets
    request_map: Sequence[int]
    cfg: RepConfig
    seed_offset: int

    def __post_init__(self) -> None:
        self.layers = sorted(self.adapters)
        self.examples = self.pool.all_examples()
        self.n_prompts = len(self.pool.prompts)
        n_pos = len(self.pool.positives)
        self.pos_index = list(range(self.n_prompts, self.n_prompts + n_pos))
        self.neg_index = list(range(self.n_prompts + n_pos, len(self.examples)))
        self.rng = random.Random(f"rep:{self.cfg.seed}:{self.seed_offset}")
        self.gen = torch.Generator().manual_seed(self.cfg.seed * 7919 + self.seed_offset)

    def measure(self, adapters: Mapping[int, Adapter], keys: Mapping[int, Any]) -> Tally:
        return measure(adapters, self.examples, keys, self.targets, self.request_map)

    def fit(self, trained: dict[int, RepAdapter], keys_from: KeyCache) -> Losses:
        """``cfg.steps`` Adam steps on ``trained``'s parameters; their losses per step."""
        cfg = self.cfg
        proj = [p for a in trained.values() for p in a.projection_parameters()]
        gate = [p for a in trained.values() for p in a.gate_parameters()]
        opt = _optimizer(cfg, proj, gate)
        pos_batches = NoRepeatBatches(len(self.pos_index), cfg.batch, self.rng)
        neg_batches = NoRepeatBatches(len(self.neg_index), cfg.negative_batch, self.rng)
        out = []
        for a in trained.values():
            a.train()
        for _ in range(cfg.steps):
            chosen = list(range(self.n_prompts)) + [self.pos_index[i] for i in next(pos_batches)]
            if self.neg_index:
                chosen += [self.neg_index[i] for i in next(neg_batches)]
            keys = keys_from.get(chosen, self.adapters)
            batch = [self.examples[i] for i in chosen]
            loss, parts = step_losses(
                trained, batch, keys, self.targets, self.request_map, cfg, self.gen
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if cfg.max_norm is not None:
                for a in trained.values():
                    a.clip_projection(cfg.max_norm)
            out.append(parts)
        for a in trained.values():
            a.eval()
        return out

    def keep_prompt_keys(self, layer: int, keys_from: KeyCache) -> None:
        """The edit prompts' subject keys as this layer will see them at test time: at the
        subject token and, with ``gate_subject_tokens="ignore"`` (where the gate may open on
        them), at the subject's earlier tokens too, whose keys feed the layers above."""
        got = keys_from.get(list(range(self.n_prompts)), self.adapters)[layer]
        k_o = []
        for i, ex in enumerate(self.examples[: self.n_prompts]):
            assert ex.position is not None  # a prompt example always has its subject token
            first = ex.position
            if self.cfg.gate_subject_tokens == "ignore" and ex.subject_start is not None:
                first = min(ex.subject_start, ex.position)
            k_o.append(got[i][first : ex.position + 1])
        self.adapters[layer].set_prompt_keys(torch.cat(k_o))


def _optimizer(
    cfg: RepConfig, proj: list[torch.Tensor], gate: list[torch.Tensor]
) -> torch.optim.Optimizer:
    """Adam over the projection (lr ``cfg.lr``) and the gate (``cfg.gate_lr``); AdamW with
    ``cfg.weight_decay`` on the projection alone when that is set."""
    groups: list[dict[str, Any]] = [
        {"params": proj, "lr": cfg.lr},
        {"params": gate, "lr": cfg.gate_lr or cfg.lr},
    ]
    if not cfg.weight_decay:
        return torch.optim.Adam(groups, weight_decay=0.0)
    groups[0]["weight_decay"] = cfg.weight_decay
    groups[1]["weight_decay"] = 0.0
    return torch.optim.AdamW(groups)


def _train_group(
    lm: LoadedModel,
    adapters: dict[int, RepAdapter],
    pool: RepPool,
    targets: Targets,
    request_map: Sequence[int],
    cfg: RepConfig,
    seed_offset: int,
    report: bool,
) -> tuple[Losses, Tally, Tally, float]:
    """Train one adapter set; ``(losses, before, after, forward seconds)``."""
    group = _Group(lm, adapters, pool, targets, request_map, cfg, seed_offset)
    if len(group.layers) == 1 or not cfg.layerwise:
        return _train_together(group, report)
    return _train_layerwise(group, report)


def _train_together(group: _Group, report: bool) -> tuple[Losses, Tally, Tally, float]:
    """All layers in one run (one layer, or ``layerwise=False``: keys re-read every step)."""
    layers, adapters = group.layers, group.adapters
    everything = list(range(len(group.examples)))
    cache = KeyCache(group.lm, layers, group.examples, cacheable=len(layers) == 1)
    before, after = Tally(), Tally()
    if report:
        before = group.measure(adapters, cache.get(everything, adapters))
    losses = group.fit(adapters, cache)
    if len(layers) == 1:
        group.keep_prompt_keys(layers[0], cache)
    else:  # joint training: each layer's prompt key through the other trained adapters
        joint = KeyCache(group.lm, layers, group.examples, cacheable=False)
        for layer in layers:
            group.keep_prompt_keys(layer, joint)
    if report:
        after = group.measure(adapters, cache.get(everything, adapters))
    return losses, before, after, cache.forward_seconds


def _train_layerwise(group: _Group, report: bool) -> tuple[Losses, Tally, Tally, float]:
    """Lowest layer first, each on keys read once with the (trained, frozen) adapters below it,
    as at test time: no layer chases keys that move while the adapters under it learn."""
    layers, adapters = group.layers, group.adapters
    reader = LayerwiseReader(group.lm, layers, group.examples)
    before, after = Tally(), Tally()
    losses: Losses = []
    after_keys: dict[int, list[torch.Tensor]] = {}
    for layer in layers:
        below = {j: adapters[j] for j in layers if j < layer}
        after_keys[layer] = reader.advance(layer, below) if below else reader.current
        if report:
            before.merge(group.measure({layer: adapters[layer]}, {layer: after_keys[layer]}))
        layer_keys = reader.cache(layer)
        steps = group.fit({layer: adapters[layer]}, layer_keys)
        group.keep_prompt_keys(layer, layer_keys)
        losses = steps if not losses else _sum_losses([losses, steps])
    if report:  # a layer's own adapter does not change its key: these are the adapted model's
        after = group.measure(adapters, after_keys)
    return losses, before, after, reader.forward_seconds


def _sum_losses(runs: list[list[dict[str, float]]]) -> list[dict[str, float]]:
    if len(runs) == 1:
        return runs[0]
    out = []
    for step in zip(*runs, strict=True):
        out.append({k: sum(s[k] for s in step) for k in step[0]})
    return out


def train_rep(
    lm: LoadedModel,
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
    exclude_subjects: Collection[str] = (),
    report: bool = True,
) -> RepTrainResult:
    """Train REP adapters for the edit in ``edit_result`` (see the module docstring).

    ``cases``: the edited cases (``EditCase`` gives paraphrases and neighbours) or bare
    requests, in any order (matched to the edit's requests). ``layers``: default the edit's
    layers. ``stats``: ``C`` per layer. ``contexts``: the editor's templates. ``position``:
    default the editor's. ``sampler``: long-context passages (default from ``cfg``). ``keys``:
    case keys seeding scrambles/passages (default: case ids, as the evaluation suite).
    ``negative_subjects``: other subjects for ``cfg.negatives``. ``exclude_subjects``: subjects
    no generated form (``cfg.augment``) may equal (the evaluation's look-alike subjects, e.g.
    :attr:`~repedit.data.variants.NearSubjects.subjects`). ``report``: measure gates and
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
        position = (getattr(edit_result, "hparams", {}) or {}).get("position")
    run = _Run(
        lm, edit_result, items, layers, stats, contexts, cfg, position or "last",
        sampler, negative_subjects, exclude_subjects, report, t_start,
    )  # fmt: skip
    applied_here = False
    if hasattr(edit_result, "applied") and not edit_result.applied:
        edit_result.apply(lm)
        applied_here = True
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            return _train(run)
    finally:
        if applied_here:
            edit_result.revert(lm)


@dataclass
class _Run:
    """What :func:`train_rep` resolved from its arguments, for :func:`_train`."""

    lm: LoadedModel
    edit_result: Any
    items: list[RepItem]
    layers: list[int]
    stats: Mapping[int, SecondMoment]
    contexts: Sequence[str]
    cfg: RepConfig
    position: Position
    sampler: PassageSampler | None
    negative_subjects: Sequence[str]
    exclude_subjects: Collection[str]
    report: bool
    t_start: float


def _train(run: _Run) -> RepTrainResult:
    """One adapter set per request (or one shared set), stacked per layer."""
    lm, cfg, items, layers = run.lm, run.cfg, run.items, run.layers
    targets = edit_targets(
        lm, run.edit_result, items, layers, run.stats, cfg,
        contexts=run.contexts, position=run.position,
    )  # fmt: skip
    sampler = run.sampler
    if sampler is _AUTO:
        wants_text = cfg.long_context or (cfg.negatives and "text" in cfg.negative_sources)
        sampler = passage_sampler(lm, cfg) if wants_text else None
    spool = find_pool(lm, cfg.negative_pool) if cfg.pool_negatives else None
    n = len(items)
    groups = [list(range(n))] if cfg.shared or n == 1 else [[i] for i in range(n)]
    per_layer: dict[int, list[RepAdapter]] = {layer: [] for layer in layers}
    runs, pools = [], []
    before, after = Tally(), Tally()
    forward_seconds = 0.0
    for gi, group in enumerate(groups):
        pool = _group_pool(run, group, sampler, spool)
        adapters = make_adapters(lm.arch.d_mlp, layers, cfg, device=lm.device, seed_offset=gi)
        for layer in layers:  # for cfg.beta_guard (inference), now or set later
            adapters[layer].set_guard(targets.w[layer][group])
        losses, b, a, fs = _train_group(lm, adapters, pool, targets, group, cfg, gi, run.report)
        runs.append(losses)
        pools.append(pool.counts())
        before.merge(b)
        after.merge(a)
        forward_seconds += fs
        for layer in layers:
            per_layer[layer].append(adapters[layer])
    info = {
        "layers": layers,
        "target": cfg.target,
        "k_star": {str(k): v for k, v in targets.source.items()},
        "groups": len(groups),
        "pool": pools[0] if len(pools) == 1 else pools,
        "subject_pool": spool.source if spool is not None else None,
        "forward_seconds": round(forward_seconds, 3),
        "long_context_sampler": sampler is not None,
        "method": getattr(run.edit_result, "method", None),
    }
    return RepTrainResult(
        adapters={layer: stack_adapters(ads) for layer, ads in per_layer.items()},
        cfg=cfg,
        losses=_sum_losses(runs),
        gate_before=before.gate_dict(),
        gate_after=after.gate_dict(),
        alignment_before=before.align_dict(),
        alignment_after=after.align_dict(),
        seconds=time.perf_counter() - run.t_start,
        info=info,
    )


def _group_pool(
    run: _Run, group: list[int], sampler: PassageSampler | None, spool: SubjectPool | None
) -> RepPool:
    """The training pool of the requests ``group``; the other requests' subjects are
    negatives. Warns when long-context examples were wanted but none could be built."""
    n, cfg = len(run.items), run.cfg
    others = [run.items[j].request.subject for j in range(n) if j not in group]
    pool = build_pool(
        run.lm,
        [run.items[i] for i in group],
        run.contexts,
        cfg,
        sampler=sampler,
        position=run.position,
        negative_subjects=[*run.negative_subjects, *others],
        exclude_subjects=run.exclude_subjects,
        subject_pool=spool,
    )
    wanted_long = cfg.long_context and sampler is not None and cfg.n_long > 0
    if wanted_long and not any(ex.kind == "long" for ex in pool.positives):
        warnings.warn("REP: no long-context example could be built", stacklevel=4)
    return pool


def train_rep_for_editor(
    lm: LoadedModel,
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
    result = editor.edit(lm, [it.edit_request for it in items])
    try:
        rep = train_rep_after(lm, editor, result, items, cfg=cfg, **kwargs)
    except BaseException:
        if result.applied:
            result.revert(lm)
        raise
    return result, rep


def train_rep_after(
    lm: LoadedModel,
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


def check_no_model_grads(lm: LoadedModel) -> None:
    """Raise if any model parameter holds a gradient (REP must leave the model alone)."""
    bad = [n for n, p in lm.model.named_parameters() if p.grad is not None]
    if bad:
        raise RepeditError(f"model parameters received gradients: {bad[:5]}")

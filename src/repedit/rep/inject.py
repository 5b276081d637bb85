"""Put REP adapters on a model's key path, through hooks only, and take them off again.

``RepInjection`` registers one input-rewrite hook per adapted layer on its down-projection
(``Hooks.rewrite(lm.arch.down_proj(layer), ..., which="input")``). Weights, modules and classes
are never touched, so ``remove()`` restores the model exactly. With ``count=True`` it also
tallies, per layer, how many token keys passed through and how many found the gate open::

    with rep_applied(lm, adapters, count=True) as rep:
        score_probes(lm, probes)
        print(rep.gate_rates())   # {layer: {"tokens": ..., "open": ..., "rate": ..., ...}}

Counts cover every position the adapters act on, padding included; for rates at chosen
positions (e.g. subject tokens) use :func:`repedit.rep.tally.gate_rates`.

With ``RepConfig.prompt_only`` (the default) an adapter acts only on the prompt's tokens
wherever the caller declares them (:func:`repedit.models.spans.declare_prompt`: repedit's
scoring declares each row's prompt length, its generation the prefill); elsewhere the key is
left as it is and not counted. A forward without a declaration is adapted at every token.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from repedit.errors import RepeditError
from repedit.models.hooks import Hooks
from repedit.models.loading import LoadedModel
from repedit.models.spans import prompt_span
from repedit.rep.adapter import Adapter, RepStack


class RepInjection:
    """Adapters attached to ``lm`` (eval mode by default) until ``remove()`` or ``with`` exit."""

    def __init__(
        self,
        lm: LoadedModel,
        adapters: Mapping[int, Adapter],
        *,
        count: bool = False,
        record: bool = False,
        eval_mode: bool = True,
    ):
        if not adapters:
            raise RepeditError("no REP adapters to attach")
        self.lm = lm
        self.adapters = dict(adapters)
        self.count = count
        self.record = record
        self.eval_mode = eval_mode
        self._hooks: Hooks | None = None
        self.counts: dict[int, dict[str, float]] = {}
        #: with ``record=True``: the soft gate of the latest forward per layer, [batch, seq]
        #: (0 where a prompt-only adapter did not act)
        self.last_gate: dict[int, torch.Tensor] = {}
        self.reset_counts()

    @property
    def attached(self) -> bool:
        return self._hooks is not None

    def attach(self) -> RepInjection:
        if self.attached:
            raise RepeditError("these REP adapters are already attached")
        for layer in self.adapters:
            self.lm.arch.check_layer(layer)
        hooks = Hooks()
        try:
            for layer, adapter in sorted(self.adapters.items()):
                adapter.to(self.lm.device)
                if self.eval_mode:
                    adapter.eval()
                hooks.rewrite(self.lm.arch.down_proj(layer), self._fn(layer, adapter))
        except Exception:
            hooks.remove()
            raise
        self._hooks = hooks
        return self

    def remove(self) -> None:
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None

    def __enter__(self) -> RepInjection:
        return self if self.attached else self.attach()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _fn(self, layer: int, adapter: Adapter) -> Any:
        def rewrite(k: torch.Tensor) -> torch.Tensor:
            span = prompt_span(self.lm) if adapter.cfg.prompt_only else None
            where = span.mask((id(self), layer), k) if span is not None else None
            if where is not None and not bool(where.any()):
                return k  # a generated token: not the prompt's
            out, g = adapter.forward_with_gate(k)
            if where is not None:
                out = torch.where(where[..., None], out, k)
                if g is not None:
                    g = torch.where(where, g, 0.0)  # the adapter did not act there
            if g is not None and (self.count or self.record):
                g = g.detach()
                if self.count:
                    seen = g if where is None else g[where]
                    c = self.counts[layer]
                    c["tokens"] += seen.numel()
                    c["open"] += int((seen > adapter.tau).sum())
                    c["guarded"] += _guarded_open(adapter, k if where is None else k[where], seen)
                    c["soft_sum"] += float(seen.float().sum())
                    c["max"] = max(c["max"], float(seen.max())) if seen.numel() else c["max"]
                if self.record:
                    self.last_gate[layer] = g.float().cpu()
            return out

        return rewrite

    def reset_counts(self) -> None:
        self.counts = {
            layer: {"tokens": 0, "open": 0, "guarded": 0, "soft_sum": 0.0, "max": 0.0}
            for layer in self.adapters
        }
        self.last_gate = {}

    def gate_rates(self) -> dict[int, dict[str, float | None]]:
        """Per layer: tokens seen, open count, open ``rate``, mean soft gate, max gate, and
        ``guarded``: open tokens the β̃ guard or the prompt-key rule kept as they were
        (``RepConfig.beta_guard``, ``keep_prompt_key``; in a stack: kept by some member)."""
        out: dict[int, dict[str, float | None]] = {}
        for layer, c in self.counts.items():
            n = c["tokens"]
            out[layer] = {
                "tokens": n,
                "open": c["open"],
                "guarded": c["guarded"],
                "rate": c["open"] / n if n else None,
                "soft_mean": c["soft_sum"] / n if n else None,
                "max": c["max"] if n else None,
            }
        return out


def _guarded_open(adapter: Adapter, k: torch.Tensor, g: torch.Tensor) -> int:
    """How many tokens of ``k`` have an open gate that the β̃ guard or the prompt-key rule
    overrode (for a stack: in at least one member, which another member may still change).
    ``g``: the gate ``adapter`` reported for ``k`` (a single adapter's own; a stack's is the
    largest of its members', so theirs are recomputed)."""
    kept = None
    stacked = isinstance(adapter, RepStack)
    members: list[Any] = adapter.members if isinstance(adapter, RepStack) else [adapter]
    for member in members:
        guarded = member.guarded(k)
        if guarded is None or not member.cfg.use_gate:
            continue
        hit = guarded & ((member.gate(k) if stacked else g) > member.tau)
        kept = hit if kept is None else kept | hit
    return int(kept.sum()) if kept is not None else 0


def attach(lm: LoadedModel, adapters: Mapping[int, Adapter], **kwargs: Any) -> RepInjection:
    """Attach ``adapters`` ({layer: adapter}) to ``lm``; call ``.remove()`` to undo."""
    return RepInjection(lm, adapters, **kwargs).attach()


@contextlib.contextmanager
def rep_applied(
    lm: LoadedModel, adapters: Mapping[int, Adapter], **kwargs: Any
) -> Iterator[RepInjection]:
    """``with rep_applied(lm, adapters): ...`` — the adapters are on inside the block only."""
    injection = RepInjection(lm, adapters, **kwargs).attach()
    try:
        yield injection
    finally:
        injection.remove()

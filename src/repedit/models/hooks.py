"""The hook layer: capture or rewrite a module's input or output, and stop a forward early.

Every piece of repedit that looks inside a model (keys, values, statistics, REP, analysis)
goes through ``Hooks``; it is a context manager, so hooks never outlive the ``with`` block,
even when the forward raises.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import nn

Which = Literal["input", "output"]
TensorFn = Callable[[torch.Tensor], torch.Tensor]


class StopForward(Exception):
    """Raised by a ``stop_after`` hook to cut the forward pass short; caught by ``Hooks.run``."""


def _main_tensor(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, tuple) else value


def _with_main_tensor(value: Any, tensor: torch.Tensor) -> Any:
    return (tensor, *value[1:]) if isinstance(value, tuple) else tensor


def select_positions(x: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """``x[b, positions[b]]`` for a [batch, seq, d] tensor; the whole tensor if None."""
    if positions is None:
        return x
    rows = torch.arange(x.shape[0], device=x.device)
    return x[rows, positions.to(x.device)]


def at_positions(positions: torch.Tensor, fn: TensorFn) -> TensorFn:
    """Wrap ``fn`` (acting on [batch, d] rows) so it rewrites only ``x[b, positions[b]]``."""

    def apply(x: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(x.shape[0], device=x.device)
        pos = positions.to(x.device)
        out = x.clone()
        out[rows, pos] = fn(x[rows, pos])
        return out

    return apply


class Hooks:
    """A set of forward hooks that is removed on exit.

    >>> with Hooks() as h:
    ...     h.capture("k", down_proj, positions=last_subject_token)
    ...     h.stop_after(down_proj)
    ...     h.run(model, input_ids=ids, attention_mask=mask)
    ...     keys = h["k"]  # [batch, d_mlp]
    """

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.captured: dict[str, torch.Tensor] = {}
        self.calls: dict[str, tuple[tuple, dict]] = {}

    def __enter__(self) -> Hooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.captured[name]

    def capture(
        self,
        name: str,
        module: nn.Module,
        *,
        which: Which = "input",
        positions: torch.Tensor | None = None,
        detach: bool = True,
    ) -> None:
        """Store ``module``'s input/output (at ``positions``, one per row) under ``name``."""

        def store(value: Any) -> None:
            x = select_positions(_main_tensor(value), positions)
            self.captured[name] = x.detach() if detach else x

        if which == "input":
            self._handles.append(module.register_forward_pre_hook(lambda m, args: store(args)))
        else:
            self._handles.append(module.register_forward_hook(lambda m, args, out: store(out)))

    def rewrite(self, module: nn.Module, fn: TensorFn, *, which: Which = "input") -> None:
        """Replace ``module``'s (first) input or output tensor by ``fn(tensor)``."""
        if which == "input":

            def pre(m: nn.Module, args: tuple) -> tuple:
                return (fn(args[0]), *args[1:])

            self._handles.append(module.register_forward_pre_hook(pre))
        else:

            def post(m: nn.Module, args: tuple, out: Any) -> Any:
                return _with_main_tensor(out, fn(_main_tensor(out)))

            self._handles.append(module.register_forward_hook(post))

    def record_call(self, name: str, module: nn.Module) -> None:
        """Keep the ``(args, kwargs)`` ``module`` is called with under ``self.calls[name]`` so it
        can be re-run later on another hidden state (:func:`repedit.models.runner.replay`):
        masks, rotary embeddings and the like are architecture-specific and simply reused."""

        def keep(m: nn.Module, args: tuple, kwargs: dict) -> None:
            if name in self.calls:
                raise RuntimeError(f"record_call: {name!r} was called twice in one forward")
            self.calls[name] = (args, kwargs)

        self._handles.append(module.register_forward_pre_hook(keep, with_kwargs=True))

    def stop_after(self, module: nn.Module) -> None:
        """Abort the forward once ``module`` has run: later layers are never computed."""

        def stop(m: nn.Module, args: tuple, out: Any) -> None:
            raise StopForward

        self._handles.append(module.register_forward_hook(stop))

    def stop_before(self, module: nn.Module) -> None:
        """Abort the forward as ``module`` is about to run (after earlier pre-hooks on it, such as
        an input capture): the module itself is never computed."""

        def stop(m: nn.Module, args: tuple) -> None:
            raise StopForward

        self._handles.append(module.register_forward_pre_hook(stop))

    def run(self, model: nn.Module, **inputs: Any) -> Any:
        """Call ``model(**inputs)``; returns its output, or None if a hook stopped it."""
        try:
            return model(**inputs)
        except StopForward:
            return None


def module_inputs(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    inputs: Mapping[str, torch.Tensor],
    *,
    positions: torch.Tensor | None = None,
    stop_at: nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """Inputs of several modules in one (possibly truncated) forward pass."""
    with Hooks() as h:
        for name, module in modules.items():
            h.capture(name, module, positions=positions)
        if stop_at is not None:
            h.stop_after(stop_at)
        h.run(model, **inputs, use_cache=False)
        return dict(h.captured)

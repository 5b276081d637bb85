"""Hyper-parameter dataclasses: defaults derived from the model, overridable from JSON/YAML.

Layers are chosen by *depth fraction* (so one default serves a 12-layer and a 32-layer model);
the few per-family exceptions live in ``FAMILY_OVERRIDES`` and nowhere else.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from repedit.errors import InvalidRequestError
from repedit.models.loading import LoadedModel

H = TypeVar("H", bound="Hparams")

#: family -> method -> field -> value. The only place per-family settings live.
FAMILY_OVERRIDES: dict[str, dict[str, dict[str, Any]]] = {
    # ROME's GPT-2 XL setting: layer 17 of 48.
    "gpt2": {"rome": {"layer_fraction": 0.35}, "r-rome": {"layer_fraction": 0.35}},
    "gptj": {"rome": {"layer_fraction": 0.18}, "r-rome": {"layer_fraction": 0.18}},
}


def _coerce(owner: type, name: str, value: Any) -> Any:
    """A JSON/YAML/CLI value converted to the field's *declared* type.

    ``"3"`` → 3 for ``int | None`` (``"none"``/``"null"`` → None), ``[4, 5]`` → ``(4, 5)``
    for tuples, ``"false"`` → False (never ``bool("False")``, defect D7 of the released REP
    code); a value that cannot be converted is an error naming the field.
    """
    hint = typing.get_type_hints(owner).get(name)
    try:
        return _to_type(hint, value)
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"hyper-parameter {name!r}: {exc}") from None


def _to_type(hint: Any, value: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (
            value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        ):
            return None
        options = [a for a in args if a is not type(None)]
        return _to_type(options[0], value) if len(options) == 1 else value
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"expected one of {list(args)}, got {value!r}")
        return value
    if hint is bool:
        if isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"expected true/false, got {value!r}")
            return value.lower() in ("true", "1")
        if value in (0, 1):
            return bool(value)
        raise ValueError(f"expected true/false, got {value!r}")
    if hint in (int, float):
        return _number(hint, value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"expected text, got {value!r:.60}")
        return value
    if isinstance(hint, type) and dataclasses.is_dataclass(hint) and not isinstance(value, hint):
        raise ValueError(f"expected a mapping of {hint.__name__} fields, got {value!r:.60}")
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace(" ", "").split(",") if v]
        if not isinstance(value, list | tuple):
            raise ValueError(f"expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_to_type(args[0], v) for v in value)
        if args and len(args) != len(value):
            raise ValueError(f"expected {len(args)} values, got {value!r}")
        return (
            tuple(_to_type(a, v) for a, v in zip(args, value, strict=False))
            if args
            else tuple(value)
        )
    return value


def _number(hint: type, value: Any) -> int | float:
    """``value`` (a number, or its text) as a finite ``int`` or ``float``."""
    kind = "a whole number" if hint is int else "a finite number"
    try:
        if isinstance(value, str):
            text = value.strip()
            value = int(text) if hint is int and text.lstrip("+-").isdigit() else float(text)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError
        if hint is int:
            if isinstance(value, float) and not value.is_integer():  # also inf and nan
                raise ValueError
            return int(value)
        if not math.isfinite(value := float(value)):
            raise ValueError
        return value
    except (ValueError, OverflowError):
        raise ValueError(f"expected {kind}, got {value!r:.60}") from None


def layer_at(fraction: float, n_layers: int) -> int:
    """The layer at ``fraction`` of the depth (0 = first layer), clamped to the model."""
    return max(0, min(n_layers - 1, round(fraction * n_layers)))


@dataclasses.dataclass
class Hparams:
    """Base class: dict/file round trip with unknown fields rejected."""

    method: ClassVar[str] = ""

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls) if f.init}

    def replace(self: H, **overrides: Any) -> H:
        """Copy with fields changed; nested dataclasses take dicts or dotted keys (``value.lr``)."""
        nested: dict[str, dict[str, Any]] = {}
        flat: dict[str, Any] = {}
        for key, val in overrides.items():
            head, dot, rest = key.partition(".")
            if dot:
                nested.setdefault(head, {})[rest] = val
            elif isinstance(val, dict) and dataclasses.is_dataclass(getattr(self, key, None)):
                nested.setdefault(key, {}).update(val)
            else:
                flat[key] = val
        unknown = (set(flat) | set(nested)) - self.field_names()
        if unknown:
            raise InvalidRequestError(
                f"unknown {self.method or type(self).__name__} hyper-parameter(s) "
                f"{sorted(unknown)}; known: {sorted(self.field_names())}"
            )
        for key, sub in nested.items():
            inner = getattr(self, key)
            known = {f.name for f in dataclasses.fields(inner)}
            bad = set(sub) - known
            if bad:
                raise InvalidRequestError(
                    f"unknown {key} hyper-parameter(s) {sorted(bad)}; known: {sorted(known)}"
                )
            flat[key] = dataclasses.replace(
                inner, **{k: _coerce(type(inner), k, v) for k, v in sub.items()}
            )
        return dataclasses.replace(self, **{k: _coerce(type(self), k, v) for k, v in flat.items()})

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for name in sorted(self.field_names()):
            val = getattr(self, name)
            nested = dataclasses.is_dataclass(val) and not isinstance(val, type)
            out[name] = dataclasses.asdict(val) if nested else val
        return out

    @classmethod
    def from_dict(cls: type[H], values: dict[str, Any]) -> H:
        return cls().replace(**values)

    def update_from_file(self: H, path: str | Path) -> H:
        """Override fields from a JSON or YAML file (a flat mapping of field -> value)."""
        path = Path(path)
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
        if not isinstance(values, dict):
            raise InvalidRequestError(f"{path}: expected a mapping of hyper-parameters")
        return self.replace(**values)

    def for_model(self: H, lm: LoadedModel) -> H:
        """Apply family overrides for ``lm`` (fields left at their defaults only)."""
        family = lm.model.config.model_type
        overrides = FAMILY_OVERRIDES.get(family, {}).get(self.method, {})
        defaults = type(self)()
        return self.replace(
            **{k: v for k, v in overrides.items() if getattr(self, k) == getattr(defaults, k)}
        )

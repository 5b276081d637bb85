"""``EditResult``: the weight deltas of an edit, and everything needed to apply, undo or ship it.

Deltas are kept in float32 and in the weight's storage orientation. ``apply`` remembers the
original tensors, so ``revert`` restores them bit for bit; ``save``/``load`` use safetensors +
JSON metadata, and a file made for another base model is refused by fingerprint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from repedit import __version__
from repedit.errors import EditError, FingerprintMismatchError, RepeditError
from repedit.faults import kill_point
from repedit.io import atomic_dir, read_safetensors, write_safetensors
from repedit.models.loading import LoadedModel
from repedit.models.registry import get_attr


@dataclass
class EditResult:
    """Weight deltas keyed by parameter name (e.g. ``model.layers.5.mlp.down_proj.weight``)."""

    method: str
    fingerprint: str
    deltas: dict[str, torch.Tensor]
    requests: list[dict[str, Any]] = field(default_factory=list)
    hparams: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    #: Tensors for REP and analysis: ``keys.<layer>`` ([n, d_mlp], or [n·contexts, d_mlp] for
    #: MEMIT-family ``key_mode='each'``), ``values.<layer>`` / ``targets.<layer>``.
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    _originals: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def applied(self) -> bool:
        return self._originals is not None

    @property
    def layers(self) -> list[int]:
        return sorted({int(p) for name in self.deltas for p in name.split(".") if p.isdigit()})

    def check_model(self, lm: LoadedModel) -> None:
        if lm.fingerprint != self.fingerprint:
            raise FingerprintMismatchError(
                f"this {self.method} edit was made for base model {self.fingerprint}, but the "
                f"model {getattr(lm, 'name', '')!r} has fingerprint {lm.fingerprint}; refusing "
                "to apply it"
            )

    def apply(self, lm: LoadedModel) -> EditResult:
        """Add the deltas to ``lm``'s weights (remembering the originals for ``revert``)."""
        self.check_model(lm)
        if self.applied:
            raise EditError("this edit is already applied")
        originals = {}
        with torch.no_grad():
            params = {name: _weight(lm, name) for name in self.deltas}
            for name, param in params.items():
                if param.shape != self.deltas[name].shape:
                    raise FingerprintMismatchError(
                        f"delta for {name} has shape {tuple(self.deltas[name].shape)}, the "
                        f"model's weight {tuple(param.shape)}"
                    )
            for name, param in params.items():
                originals[name] = param.detach().clone()
                param.add_(self.deltas[name].to(param.device, param.dtype))
        self._originals = originals
        return self

    def revert(self, lm: LoadedModel) -> EditResult:
        """Restore the exact original weights."""
        if self._originals is None:
            raise EditError("this edit is not applied")
        with torch.no_grad():
            for name, original in self._originals.items():
                _weight(lm, name).copy_(original)
        self._originals = None
        return self

    def metadata(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "fingerprint": self.fingerprint,
            "requests": self.requests,
            "hparams": self.hparams,
            "info": self.info,
            "repedit_version": __version__,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }

    def save(self, path: str | Path) -> Path:
        """Write deltas (and tensors) to ``path`` (.safetensors) with JSON metadata, atomically."""
        path = Path(path)
        tensors = {f"delta/{k}": v.float() for k, v in self.deltas.items()}
        tensors.update({f"tensor/{k}": v.float() for k, v in self.tensors.items()})
        write_safetensors(path, tensors, self.metadata())
        return path

    @classmethod
    def load(cls, path: str | Path, lm: LoadedModel | None = None) -> EditResult:
        """Read a saved edit; with ``lm``, refuse it unless it was made for that base model."""
        try:
            tensors, meta = read_safetensors(path)
        except FileNotFoundError:
            raise RepeditError(f"edit file not found: {path}") from None
        except Exception as exc:
            raise RepeditError(f"{path} is not a readable repedit edit file: {exc}") from exc
        if "method" not in meta or "fingerprint" not in meta:
            raise RepeditError(f"{path} has no repedit metadata (not an edit file?)")
        _check_metadata(path, meta)
        result = cls(
            method=meta["method"],
            fingerprint=meta["fingerprint"],
            deltas={k[6:]: v for k, v in tensors.items() if k.startswith("delta/")},
            requests=meta.get("requests", []),
            hparams=meta.get("hparams", {}),
            info=meta.get("info", {}),
            tensors={k[7:]: v for k, v in tensors.items() if k.startswith("tensor/")},
        )
        if lm is not None:
            result.check_model(lm)
        return result

    def export(self, lm: LoadedModel, directory: str | Path) -> Path:
        """Write the edited model as a Hugging Face directory (safetensors) + tokenizer.

        Built in a temporary directory beside ``directory`` and renamed into place once
        complete (see :func:`repedit.io.atomic_dir`), so a crash or a full disk never leaves
        a directory that loads as a model but holds half of one.
        """
        with atomic_dir(directory) as tmp:
            self.write_model(lm, tmp)
        return Path(directory)

    def write_model(self, lm: LoadedModel, directory: Path) -> None:
        """Save ``lm`` with this edit applied into ``directory`` (not atomic on its own)."""
        was_applied = self.applied
        if not was_applied:
            self.apply(lm)
        try:
            lm.model.save_pretrained(directory)
            kill_point("export.weights")
            lm.tokenizer.save_pretrained(directory)
        finally:
            if not was_applied:
                self.revert(lm)


#: metadata fields of an edit file and the JSON type each must have
_META_TYPES: dict[str, type | tuple[type, ...]] = {
    "method": str,
    "fingerprint": str,
    "requests": list,
    "hparams": dict,
    "info": dict,
}


def _check_metadata(path: str | Path, meta: dict[str, Any]) -> None:
    """Refuse an edit file whose metadata has the wrong shape (hand-edited or damaged)."""
    for key, kind in _META_TYPES.items():
        if key in meta and not isinstance(meta[key], kind):
            raise RepeditError(
                f"{path}: metadata field {key!r} should be a {getattr(kind, '__name__', kind)}, "
                f"not {type(meta[key]).__name__} (a damaged or hand-edited edit file?)"
            )
    if not all(isinstance(r, dict) for r in meta.get("requests", [])):
        raise RepeditError(f"{path}: metadata field 'requests' should hold objects")


def _weight(lm: LoadedModel, name: str) -> torch.Tensor:
    """The parameter ``name`` of ``lm``, or a RepeditError if the model has none."""
    try:
        param = get_attr(lm.model, name)
    except (AttributeError, IndexError, KeyError, TypeError):
        param = None
    if not isinstance(param, torch.Tensor):
        raise FingerprintMismatchError(
            f"the edit changes {name!r}, which is not a weight of model {getattr(lm, 'name', '')!r}"
        )
    return param


def merge_results(results: list[EditResult]) -> EditResult:
    """One result holding the summed deltas of several (e.g. sequential ROME) edits."""
    if not results:
        raise EditError("nothing to merge")
    deltas: dict[str, torch.Tensor] = {}
    for r in results:
        for name, d in r.deltas.items():
            deltas[name] = deltas[name] + d if name in deltas else d.clone()
    first = results[0]
    return EditResult(
        first.method,
        first.fingerprint,
        deltas,
        [q for r in results for q in r.requests],
        first.hparams,
        {"merged": len(results)},
    )

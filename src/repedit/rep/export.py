"""Export an edit with its REP adapters as a directory that loads without repedit.

The weight edit is baked into Hugging Face weights (``EditResult.export``). The adapters act on
the key path through hooks, so they cannot be: they go next to the weights as
``rep_adapters.safetensors`` (the :func:`~repedit.rep.adapter_file.save_adapters` format, with each
adapted layer's down-projection module path), together with ``load_with_rep.py``, a copy of
:mod:`repedit.rep.standalone` that attaches them with torch, transformers and safetensors only.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from repedit.io import atomic_dir
from repedit.models.fingerprint import model_fingerprint
from repedit.models.loading import LoadedModel
from repedit.rep import standalone
from repedit.rep.adapter import Adapter
from repedit.rep.adapter_file import save_adapters

LOADER_FILE = "load_with_rep.py"


def export_with_rep(
    lm: LoadedModel, result: Any, adapters: Mapping[int, Adapter], directory: str | Path
) -> Path:
    """Write ``result``'s edited model, its REP ``adapters`` and their loader to ``directory``.

    The adapter file carries the *edited* model's fingerprint, so
    ``load_adapters(directory / "rep_adapters.safetensors", load_model(directory))`` works and
    any other model is refused; ``info.base_fingerprint`` names the model that was edited.
    Everything is written to a temporary directory that is renamed into place when complete.
    """
    names = {id(module): name for name, module in lm.model.named_modules()}
    modules = {str(layer): names[id(lm.arch.down_proj(layer))] for layer in adapters}
    with atomic_dir(directory) as tmp:
        was_applied = result.applied
        if not was_applied:
            result.apply(lm)
        try:
            result.write_model(lm, tmp)  # applied: written as it is
            edited = model_fingerprint(lm.model)
        finally:
            if not was_applied:
                result.revert(lm)
        info = {"modules": modules, "base_fingerprint": lm.fingerprint, "method": result.method}
        save_adapters(tmp / standalone.ADAPTER_FILE, adapters, fingerprint=edited, info=info)
        shutil.copyfile(standalone.__file__, tmp / LOADER_FILE)
    return Path(directory)

"""Model access: loading, the architecture registry, hooks, fingerprints, tiny test models."""

from repedit.models.fingerprint import model_fingerprint
from repedit.models.hooks import Hooks, StopForward, at_positions, module_inputs, select_positions
from repedit.models.loading import DEFAULT_MODEL, LoadedModel, load_model
from repedit.models.registry import REGISTRY, Arch, ArchSpec, arch_of

__all__ = [
    "DEFAULT_MODEL",
    "REGISTRY",
    "Arch",
    "ArchSpec",
    "Hooks",
    "LoadedModel",
    "StopForward",
    "arch_of",
    "at_positions",
    "load_model",
    "model_fingerprint",
    "module_inputs",
    "select_positions",
]

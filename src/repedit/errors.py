"""One exception family, so callers can catch everything repedit raises on bad input."""

from __future__ import annotations


class RepeditError(Exception):
    """Base class: a message meant for a human, naming the record, file or layer at fault."""


class ModelLoadError(RepeditError):
    """A model spec could not be resolved or loaded."""


class UnsupportedArchitectureError(RepeditError):
    """The model's ``config.model_type`` has no entry in the architecture registry."""


class StatsCacheError(RepeditError):
    """A key-statistics cache file is corrupt or does not match what was asked for."""


class InvalidRequestError(RepeditError):
    """An edit request (or dataset record) is malformed."""


class EditError(RepeditError):
    """An edit could not be computed (NaN, ill-conditioned solve, ...)."""


class FingerprintMismatchError(RepeditError):
    """A saved edit or cache was made for a different base model."""


class DataError(RepeditError):
    """A dataset file is missing or malformed."""


class WriteError(RepeditError):
    """A file could not be written (disk full, file-size limit, permissions); whatever stood
    at that path before is left as it was."""


class PrefixUnavailable(RepeditError):
    """The cached-prefix value path cannot be set up for this model or batch; under
    ``path="auto"`` the caller falls back to running full rows."""

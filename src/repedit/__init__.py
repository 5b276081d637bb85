"""repedit: robust knowledge editing for causal language models."""

__version__ = "0.1.0"

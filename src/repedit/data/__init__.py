"""Datasets and edit cases: loading, built-in demo facts, and run-time robustness variants.

Free of torch, so data can be read, validated and split without loading a model.
"""

from repedit.data.case import EditCase, EditRequest, Neighbour
from repedit.data.facts import builtin_facts
from repedit.data.loaders import LoadResult, load_cases
from repedit.data.variants import PassageSampler, scrambled_subjects, split_half

__all__ = [
    "EditCase",
    "EditRequest",
    "LoadResult",
    "Neighbour",
    "PassageSampler",
    "builtin_facts",
    "load_cases",
    "scrambled_subjects",
    "split_half",
]

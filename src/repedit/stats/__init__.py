"""Key statistics: the uncentred second moment ``C = E[k kᵀ]`` of MLP keys, per layer."""

from repedit.stats.corpus import HubCorpus, LocalTextCorpus, ModelSampledCorpus, resolve_corpus
from repedit.stats.second_moment import SecondMoment, StatsKey, second_moments

__all__ = [
    "HubCorpus",
    "LocalTextCorpus",
    "ModelSampledCorpus",
    "SecondMoment",
    "StatsKey",
    "resolve_corpus",
    "second_moments",
]

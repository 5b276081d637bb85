"""Analysis of edit keys: whitened similarity of robustness-variant keys to ``k*``, plots."""

from repedit.analysis.plots import plot_distributions, plot_similarity_vs_success, plot_specificity
from repedit.analysis.similarity import (
    EQUIVALENT,
    VARIANTS,
    CaseSimilarity,
    SuccessAnalysis,
    VariantKeys,
    findings_markdown,
    key_similarity,
    similarity_vs_success,
    specificity_matrix,
    summarize_findings,
)

__all__ = [
    "EQUIVALENT",
    "VARIANTS",
    "CaseSimilarity",
    "SuccessAnalysis",
    "VariantKeys",
    "findings_markdown",
    "key_similarity",
    "plot_distributions",
    "plot_similarity_vs_success",
    "plot_specificity",
    "similarity_vs_success",
    "specificity_matrix",
    "summarize_findings",
]

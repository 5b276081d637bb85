"""Analysis of edit keys: whitened similarity of robustness-variant keys to ``k*``
(:mod:`~repedit.analysis.keys`), joined with edit success (:mod:`~repedit.analysis.success`),
the REP paper's findings (:mod:`~repedit.analysis.findings`), plots, and the pipeline that runs
them all (:func:`run_key_analysis`)."""

from repedit.analysis.findings import findings_markdown, summarize_findings
from repedit.analysis.keys import key_similarity, specificity_matrix
from repedit.analysis.pipeline import KeyAnalysis, KeyAnalysisConfig, run_key_analysis
from repedit.analysis.plots import plot_distributions, plot_similarity_vs_success, plot_specificity
from repedit.analysis.records import EQUIVALENT, VARIANTS, CaseSimilarity, VariantKeys
from repedit.analysis.success import SuccessAnalysis, similarity_vs_success

__all__ = [
    "EQUIVALENT",
    "VARIANTS",
    "CaseSimilarity",
    "KeyAnalysis",
    "KeyAnalysisConfig",
    "SuccessAnalysis",
    "VariantKeys",
    "findings_markdown",
    "key_similarity",
    "plot_distributions",
    "plot_similarity_vs_success",
    "plot_specificity",
    "run_key_analysis",
    "similarity_vs_success",
    "specificity_matrix",
    "summarize_findings",
]

"""Retrieval evaluation: embedding, exact kNN, Recall@K / MAP@R / NMI, density diagnostics.

Formulas and sources: docs/methods.md, "Retrieval metrics and diagnostics".
"""

from dmlkit.evaluate.clustering import kmeans, normalized_mutual_info
from dmlkit.evaluate.diagnostics import density_metrics, spectral_decay
from dmlkit.evaluate.embedding import embed
from dmlkit.evaluate.neighbours import knn
from dmlkit.evaluate.retrieval import r_precision_and_map, recall_at_k, retrieval_metrics
from dmlkit.evaluate.subclusters import subcluster_agreement, subcluster_preservation

__all__ = [
    "density_metrics",
    "embed",
    "kmeans",
    "knn",
    "normalized_mutual_info",
    "r_precision_and_map",
    "recall_at_k",
    "retrieval_metrics",
    "spectral_decay",
    "subcluster_agreement",
    "subcluster_preservation",
]

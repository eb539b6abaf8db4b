"""Retrieval metrics from one exact kNN pass: Recall@K, R-precision, MAP@R, NMI."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from dmlkit.evaluate.clustering import kmeans, normalized_mutual_info
from dmlkit.evaluate.neighbours import knn

_ROWS = 8192


def retrieval_metrics(
    embeddings: Tensor,
    labels: Tensor,
    *,
    ks: Sequence[int] = (1, 2, 4, 8),
    nmi: bool = True,
    seed: int = 0,
    block_size: int | None = None,
) -> dict[str, float | int]:
    """Recall@K, R-precision, MAP@R (and NMI) of the test set against itself.

    Every item is a query against all the others (itself excluded); neighbours are
    ordered by exact Euclidean distance, ties by the lower index (``knn``). One kNN pass
    with k = max(max(ks), largest class size − 1) serves every metric. Queries whose class
    has no other item are skipped and counted in ``num_skipped``.

    Args:
        embeddings: (N, D) float, usually L2-normalized. labels: (N,) integer classes.
        ks: the K of Recall@K (each ≤ N − 1).
        nmi: also cluster with k-means (k = number of classes, seeded) and report NMI.
        seed: k-means seed. block_size: passed to ``knn``.
    Returns: plain Python floats/ints — ``recall@K`` for each K, ``r_precision``,
        ``map@r``, ``nmi`` (when asked), ``num_queries``, ``num_skipped``.
    """
    labels = as_labels(labels, len(embeddings))
    if not all(isinstance(K, (int, np.integer)) and not isinstance(K, bool) for K in ks):
        raise ValueError(f"ks must be whole numbers, got {list(ks)}")
    ks = sorted({int(K) for K in ks})
    if not ks or ks[0] < 1 or ks[-1] > len(embeddings) - 1:
        raise ValueError(f"ks={ks} must lie in [1, N − 1] with N={len(embeddings)}")
    _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    relevant = counts[inverse] - 1  # (N,) R: other items of the query's class
    k = max(ks[-1], int(relevant.max()))
    _, neighbours = knn(embeddings, k=k, block_size=block_size)
    neighbours = neighbours.to(labels.device)
    hits = torch.cat(  # (N, k) bool, built in row chunks to keep peak memory low
        [
            labels[neighbours[s : s + _ROWS]] == labels[s : s + _ROWS, None]
            for s in range(0, len(labels), _ROWS)
        ]
    )
    del neighbours
    valid = relevant > 0
    out: dict[str, float | int] = {}
    out.update(recall_at_k(hits[valid], ks))
    out.update(r_precision_and_map(hits[valid], relevant[valid]))
    if nmi:
        clusters = kmeans(embeddings, len(counts), seed=seed)
        out["nmi"] = normalized_mutual_info(labels, clusters)
    out["num_queries"] = int(valid.sum())
    out["num_skipped"] = int((~valid).sum())
    return out


def recall_at_k(hits: Tensor, ks: Sequence[int]) -> dict[str, float]:
    """Recall@K (Song et al. 2016): fraction of queries with a hit among the first K.

    hits: (Q, k) bool, True where the neighbour at that rank shares the query's class.
    """
    if len(hits) == 0:
        return {f"recall@{K}": 0.0 for K in ks}
    first_hit = torch.where(hits.any(1), hits.float().argmax(1), hits.shape[1])  # (Q,)
    return {f"recall@{K}": float((first_hit < K).double().mean()) for K in ks}


def r_precision_and_map(hits: Tensor, relevant: Tensor) -> dict[str, float]:
    """R-precision and MAP@R (Musgrave et al. 2020), R = other items of the query's class.

    R-precision = (hits in the first R) / R;  MAP@R = (1/R) Σ_{i ≤ R} P(i)·rel(i) with
    P(i) = (hits in the first i) / i. hits: (Q, k) bool with k ≥ max R; relevant: (Q,) R ≥ 1.
    """
    if len(hits) == 0:
        return {"r_precision": 0.0, "map@r": 0.0}
    ranks = torch.arange(1, hits.shape[1] + 1, device=hits.device, dtype=torch.float64)
    r_precision, average_precision = [], []
    for start in range(0, len(hits), _ROWS):  # bounds the (rows, k) float64 temporaries
        r = relevant[start : start + _ROWS].double()
        rel = (hits[start : start + _ROWS] & (ranks[None, :] <= r[:, None])).double()
        r_precision.append(rel.sum(1) / r)
        average_precision.append((rel.cumsum(1) / ranks * rel).sum(1) / r)
    return {
        "r_precision": float(torch.cat(r_precision).mean()),
        "map@r": float(torch.cat(average_precision).mean()),
    }


def as_labels(labels, count: int) -> Tensor:
    """(N,) int64 CPU labels; ValueError unless 1-D integer (not bool) with ``count`` entries."""
    labels = torch.as_tensor(labels).cpu()
    if labels.dim() != 1:  # a (N/2, 2) array would be flattened into the wrong classes
        raise ValueError(f"labels must be 1-D (N,), got shape {tuple(labels.shape)}")
    if len(labels) != count:
        raise ValueError(f"{len(labels)} labels for {count} embeddings")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    return labels.long()

"""Per-class density statistics, shared by the density-adaptive loss and the evaluation.

The relative density of class c (METHODS.md, "Density-adaptive regularizer"):
    μ_c = mean_{i∈c} z_i,   s_c = mean_{i∈c} ||z_i − μ_c||,
    δ_c = min_{c'≠c} ||μ_c − μ_{c'}||,   r_c = s_c / (δ_c + ε).
Small r_c: the class is packed tightly compared with the distance to its nearest
neighbouring class.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class ClassStatistics(NamedTuple):
    """Per-class statistics; rows follow ``classes`` (sorted unique labels)."""

    classes: Tensor  # (C,) label values
    counts: Tensor  # (C,) samples per class
    centroids: Tensor  # (C, D) μ_c
    spread: Tensor  # (C,) s_c (0 for classes with one sample)
    separation: Tensor  # (C,) δ_c (inf when there is no other class)
    relative_density: Tensor  # (C,) r_c
    valid: Tensor  # (C,) bool: n_c ≥ 2 and another class exists


def class_statistics(
    embeddings: Tensor, labels: Tensor, *, eps: float = 1e-8, block_size: int = 4096
) -> ClassStatistics:
    """Centroid, spread, separation and relative density r_c of every class present.

    Args:
        embeddings: (N, D). labels: (N,) integer class ids (any values).
        eps: added to δ_c so two coincident centroids do not divide by zero.
        block_size: centroid rows per block when searching the nearest other centroid,
            so memory stays O(block_size · C) rather than O(C²) (SOP has ~11k classes).
    Returns: ClassStatistics. Differentiable w.r.t. ``embeddings``. The nearest other
        centroid δ_c is searched over every class present (singletons included); only
        classes with n_c ≥ 2 are ``valid`` for r_c.
    """
    # Statistics in fp32 even for half-precision inputs (autocast); float64 stays float64.
    z = embeddings.float() if embeddings.dtype in (torch.float16, torch.bfloat16) else embeddings
    classes, inverse = torch.unique(labels, return_inverse=True)  # (C,), (N,)
    num_classes = len(classes)
    counts = torch.bincount(inverse, minlength=num_classes)  # (C,)
    sums = z.new_zeros(num_classes, z.shape[1]).index_add_(0, inverse, z)
    centroids = sums / counts[:, None]  # (C, D)
    offsets = z - centroids[inverse]  # (N, D)
    # Clamp before sqrt: a sample equal to its centroid would give an infinite gradient.
    radius = offsets.pow(2).sum(1).clamp_min(1e-12).sqrt()  # (N,)
    spread = z.new_zeros(num_classes).index_add_(0, inverse, radius) / counts
    spread = torch.where(counts >= 2, spread, torch.zeros_like(spread))
    separation = _nearest_other_centroid(centroids, block_size)  # (C,)
    valid = (counts >= 2) & torch.isfinite(separation)
    relative = spread / (separation + eps)
    relative = torch.where(valid, relative, torch.zeros_like(relative))
    return ClassStatistics(classes, counts, centroids, spread, separation, relative, valid)


def _nearest_other_centroid(centroids: Tensor, block_size: int) -> Tensor:
    """min_{c'≠c} ||μ_c − μ_{c'}|| for every row, blocked over rows."""
    num_classes = len(centroids)
    squared_norms = centroids.pow(2).sum(1)  # (C,)
    parts = []
    for start in range(0, num_classes, block_size):
        rows = centroids[start : start + block_size]  # (b, D)
        sq = squared_norms[start : start + block_size, None] + squared_norms[None, :]
        sq = (sq - 2 * rows @ centroids.T).clamp_min(1e-12)  # (b, C)
        own = torch.arange(start, start + len(rows), device=centroids.device)
        sq[torch.arange(len(rows), device=centroids.device), own] = float("inf")
        parts.append(sq.min(1).values.sqrt())
    if not parts:
        return centroids.new_zeros(0)
    return torch.cat(parts)

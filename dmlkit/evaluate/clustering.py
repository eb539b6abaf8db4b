"""Seeded torch k-means (batched k-means++ seeding, blocked Lloyd) and NMI.

sklearn's KMeans at SOP scale (60k × 512, 11k clusters) is slow on a small CPU; this
version runs its distance work as large matmuls (bf16 on CPUs with AMX, fp32 elsewhere,
CUDA included) and owns its ``torch.Generator``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from dmlkit.evaluate._exact import resolve_precision, run_blocks

_BLOCK_BYTES = 2**26


def kmeans(
    embeddings: Tensor,
    num_clusters: int,
    *,
    seed: int = 0,
    max_iter: int = 30,
    tol: float = 1e-4,
    precision: str = "auto",
) -> Tensor:
    """Cluster ``embeddings`` (N, D) into ``num_clusters``; returns (N,) int64 labels (CPU).

    Seeding: k-means++ D² sampling (Arthur & Vassilvitskii 2007), drawing
    ceil(num_clusters / 64) centers per round from the current D² distribution (as in
    k-means||, Bahmani et al. 2012), so it costs 64 matmul rounds instead of one pass
    per center. Lloyd iterations stop when at most ``tol``·N points change cluster or
    after ``max_iter``. An emptied cluster is re-seeded at the point farthest from its
    center. Deterministic for a given seed, device and precision ("auto": bf16 on a CPU
    with AMX, else fp32 — only the assignment matmuls use it).
    Complexity: O(max_iter · N · num_clusters · D) time, O(block · num_clusters) memory.
    """
    x = embeddings.float()
    count = len(x)
    if not 1 <= num_clusters <= count:
        raise ValueError(f"num_clusters={num_clusters} must lie in [1, N={count}]")
    dtype = torch.bfloat16 if resolve_precision(precision, x.device) == "bf16" else x.dtype
    generator = torch.Generator(device="cpu").manual_seed(seed)
    centers = _seed_centers(x, num_clusters, generator)
    assignment = torch.full((count,), -1, dtype=torch.long, device=x.device)
    for _ in range(max_iter):
        previous = assignment
        assignment, sq_dist = _assign(x, centers, dtype)
        centers = _update_centers(x, assignment, sq_dist, num_clusters)
        if int((assignment != previous).sum()) <= tol * count:
            break
    return assignment.cpu()


def normalized_mutual_info(labels: Tensor | np.ndarray, clusters: Tensor | np.ndarray) -> float:
    """NMI = I(Y; C) / ((H(Y) + H(C)) / 2), natural logs (sklearn's arithmetic mean).

    Both all-in-one-group (or empty) → 1.0; I = 0 → 0.0, as in
    ``sklearn.metrics.normalized_mutual_info_score``.
    """
    y = np.asarray(torch.as_tensor(labels).cpu()).reshape(-1)
    c = np.asarray(torch.as_tensor(clusters).cpu()).reshape(-1)
    if len(y) != len(c):
        raise ValueError(f"{len(y)} labels but {len(c)} cluster ids")
    _, y_idx = np.unique(y, return_inverse=True)
    _, c_idx = np.unique(c, return_inverse=True)
    if y_idx.max(initial=-1) == c_idx.max(initial=-1) <= 0:
        return 1.0
    width = int(c_idx.max()) + 1
    pairs, joint = np.unique(y_idx.astype(np.int64) * width + c_idx, return_counts=True)
    pair_y, pair_c = np.divmod(pairs, width)
    a = np.bincount(y_idx).astype(np.float64)  # class sizes
    b = np.bincount(c_idx).astype(np.float64)  # cluster sizes
    total, n_ij = float(len(y)), joint.astype(np.float64)
    mi = np.sum(n_ij / total * (np.log(n_ij * total) - np.log(a[pair_y] * b[pair_c])))
    mi = max(float(mi), 0.0)
    if mi == 0.0:
        return 0.0
    h_y, h_c = _entropy(a, total), _entropy(b, total)
    return mi / ((h_y + h_c) / 2)


def _entropy(counts: np.ndarray, total: float) -> float:
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


def _seed_centers(x: Tensor, num_clusters: int, generator: torch.Generator) -> Tensor:
    """Batched k-means++: first center uniform, then rounds of D²-weighted draws."""
    count = len(x)
    per_round = math.ceil(num_clusters / 64)
    first = torch.randint(count, (1,), generator=generator).to(x.device)
    chosen = [first]
    min_sq = _sq_dist_to(x, x[first]).min(1).values  # (N,)
    total = 1
    while total < num_clusters:
        draw = min(per_round, num_clusters - total)
        weights = min_sq.double().cpu()
        if float(weights.sum()) <= 0:  # every point is already a center's duplicate
            weights = torch.ones_like(weights)
        new = torch.multinomial(weights, draw, replacement=False, generator=generator)
        new = new.to(x.device)
        chosen.append(new)
        min_sq = torch.minimum(min_sq, _sq_dist_to(x, x[new]).min(1).values)
        min_sq[new] = 0
        total += draw
    return x[torch.cat(chosen)].clone()


def _sq_dist_to(x: Tensor, centers: Tensor) -> Tensor:
    """(N, C) squared distances, fp32, blocked over rows."""
    out = torch.empty(len(x), len(centers), device=x.device)
    c_sq = centers.pow(2).sum(1)
    rows = max(1, _BLOCK_BYTES // (4 * max(1, len(centers))))

    def block(s: int) -> None:
        part = x[s : s + rows]
        sq = part.pow(2).sum(1, keepdim=True) + c_sq - 2 * part @ centers.T
        out[s : s + rows] = sq.clamp_min(0)

    run_blocks(block, range(0, len(x), rows), x.device)
    return out


def _assign(x: Tensor, centers: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Nearest center of every point (argmin of ||c||² − 2⟨x, c⟩) and its fp32 d²."""
    c_sq = centers.pow(2).sum(1)  # (C,)
    c_op = centers.to(dtype)
    labels = torch.empty(len(x), dtype=torch.long, device=x.device)
    rows = max(1, _BLOCK_BYTES // (4 * max(1, len(centers))))

    def block(s: int) -> None:
        score = c_sq - 2 * (x[s : s + rows].to(dtype) @ c_op.T).float()  # (rows, C)
        labels[s : s + rows] = score.argmin(1)

    run_blocks(block, range(0, len(x), rows), x.device)
    sq_dist = (x - centers[labels]).pow(2).sum(1)  # (N,) for re-seeding empty clusters
    return labels, sq_dist


def _update_centers(x: Tensor, labels: Tensor, sq_dist: Tensor, num_clusters: int) -> Tensor:
    """Means of the clusters; empty clusters move to the farthest points."""
    counts = torch.bincount(labels, minlength=num_clusters)
    sums = x.new_zeros(num_clusters, x.shape[1]).index_add_(0, labels, x)
    centers = sums / counts.clamp_min(1)[:, None]
    empty = torch.nonzero(counts == 0).flatten()
    if len(empty):
        farthest = sq_dist.topk(len(empty)).indices
        centers[empty] = x[farthest]
    return centers

"""Seeded k-means (batched k-means++ seeding, Lloyd iterations with exact assignments) and NMI.

sklearn's KMeans at SOP scale (60k × 512, 11k clusters) is slow on a small CPU. Here each
Lloyd assignment is an exact nearest-neighbour search (``knn`` with k = 1), so the
clustering does not depend on the machine's matmul rounding, only on the seed.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from dmlkit.evaluate.neighbours import knn, score_matrix

_BLOCK_SCORES = 2**22


def kmeans(
    embeddings: Tensor,
    num_clusters: int,
    *,
    seed: int = 0,
    max_iter: int = 30,
    tol: float = 1e-4,
) -> Tensor:
    """Cluster ``embeddings`` (N, D) into ``num_clusters``; returns (N,) int64 labels (CPU).

    Seeding: k-means++ D² sampling (Arthur & Vassilvitskii 2007), drawing
    ceil(num_clusters / 64) centers per round from the current D² distribution (as in
    k-means||, Bahmani et al. 2012), so it costs 64 nearest-center searches instead of one
    per center. Lloyd iterations stop when at most ``tol``·N points change cluster or
    after ``max_iter``. Each point goes to its nearest center by exact float64 distance,
    ties to the lower center index (``knn``); an emptied cluster is re-seeded at the point
    farthest from its center. Deterministic for a given seed.
    Complexity: O(max_iter · N · num_clusters · D) time, O(block · num_clusters) memory.
    """
    x = embeddings.float()
    count = len(x)
    if not 1 <= num_clusters <= count:
        raise ValueError(f"num_clusters={num_clusters} must lie in [1, N={count}]")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    centers = _seed_centers(x, num_clusters, generator)
    assignment = torch.full((count,), -1, dtype=torch.long, device=x.device)
    for _ in range(max_iter):
        previous = assignment
        distance, assignment = _nearest(x, centers)
        centers = _update_centers(x, assignment, distance, num_clusters)
        if int((assignment != previous).sum()) <= tol * count:
            break
    return assignment.cpu()


def normalized_mutual_info(labels: Tensor | np.ndarray, clusters: Tensor | np.ndarray) -> float:
    """NMI = I(Y; C) / ((H(Y) + H(C)) / 2): ``sklearn.metrics.normalized_mutual_info_score``."""
    # Deferred: scikit-learn takes ~0.8 s to import, and only NMI needs it here.
    from sklearn.metrics import normalized_mutual_info_score

    y = np.asarray(torch.as_tensor(labels).cpu()).reshape(-1)
    c = np.asarray(torch.as_tensor(clusters).cpu()).reshape(-1)
    if len(y) != len(c):
        raise ValueError(f"{len(y)} labels but {len(c)} cluster ids")
    return float(normalized_mutual_info_score(y, c))


def _seed_centers(x: Tensor, num_clusters: int, generator: torch.Generator) -> Tensor:
    """Batched k-means++: first center uniform, then rounds of D²-weighted draws.

    The D² weights come from fp32 matmuls: a weight off by its rounding changes a draw
    only if the draw falls that close to a boundary.
    """
    count = len(x)
    operand = torch.cat([x, x.new_ones(count, 1)], 1)  # [x, 1]: see _min_sq_distance
    sq_norms = x.pow(2).sum(1)
    per_round = math.ceil(num_clusters / 64)
    first = torch.randint(count, (1,), generator=generator).to(x.device)
    chosen = [first]
    min_sq = _min_sq_distance(operand, sq_norms, x[first])  # (N,)
    total = 1
    while total < num_clusters:
        draw = min(per_round, num_clusters - total)
        weights = min_sq.double().cpu()
        if float(weights.sum()) <= 0:  # every point is already a center's duplicate
            weights = torch.ones_like(weights)
        new = torch.multinomial(weights, draw, replacement=False, generator=generator)
        new = new.to(x.device)
        chosen.append(new)
        min_sq = torch.minimum(min_sq, _min_sq_distance(operand, sq_norms, x[new]))
        min_sq[new] = 0
        total += draw
    return x[torch.cat(chosen)].clone()


def _min_sq_distance(operand: Tensor, sq_norms: Tensor, centers: Tensor) -> Tensor:
    """(N,) float32 squared distance to the nearest of ``centers``: ||x||² + min_c of
    [x, 1]·[−2c; ||c||²], one fp32 matmul per block of points (``operand`` is [x, 1])."""
    out = torch.empty(len(operand), device=operand.device)
    # C' = C rounded up to a multiple of 16 (a ~25 % faster matmul); the padding columns score
    # the largest float32, above every center's score.
    width, largest = -(-len(centers) // 16) * 16, torch.finfo(torch.float32).max
    c_op = score_matrix(centers, centers.pow(2).sum(1), width, pad=largest)  # (D + 1, C')
    rows = max(1, _BLOCK_SCORES // max(1, len(centers)))
    buffer = operand.new_empty(min(rows, len(operand)), c_op.shape[1])
    for s in range(0, len(operand), rows):
        block = operand[s : s + rows]
        torch.amin(torch.mm(block, c_op, out=buffer[: len(block)]), 1, out=out[s : s + rows])
    return out.add_(sq_norms).clamp_min_(0)


def _nearest(x: Tensor, centers: Tensor) -> tuple[Tensor, Tensor]:
    """(N,) distance to the nearest center and its index (exact; ties to the lower)."""
    distance, index = knn(x, centers, k=1)
    return distance[:, 0], index[:, 0]


def _update_centers(x: Tensor, labels: Tensor, distance: Tensor, num_clusters: int) -> Tensor:
    """Means of the clusters; empty clusters move to the points farthest from theirs."""
    counts = torch.bincount(labels, minlength=num_clusters)
    sums = x.new_zeros(num_clusters, x.shape[1]).index_add_(0, labels, x)
    centers = sums / counts.clamp_min(1)[:, None]
    empty = torch.nonzero(counts == 0).flatten()
    if len(empty):
        farthest = distance.topk(len(empty)).indices
        centers[empty] = x[farthest]
    return centers

"""k-means inside many small groups at once (one tensor program, no loop over groups).

DAAL initialises each class's segments from the untrained embeddings of that class; this
is the k-means it uses (k = 2 for one segment's two vertices, k = S for S segments).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["grouped_kmeans"]


def grouped_kmeans(
    points: Tensor, groups: Tensor, num_groups: int, k: int, *, iterations: int = 20
) -> tuple[Tensor, Tensor, Tensor]:
    """k-means with ``k`` centres inside each group, all groups at once, deterministic.

    Initialisation (maximin): the first centre is the point farthest from its group's
    mean, each next one the point farthest from the centres chosen so far (ties → lowest
    index); then ``iterations`` Lloyd steps (ties → lower centre; a centre left without
    points keeps its place). A group with fewer than k distinct points repeats a point as
    a centre, and the repeat stays empty.

    Args:
        points: (N, D).  groups: (N,) int64 group of each point in 0..num_groups−1.
    Returns:
        centres (G, k, D), assignment (N,) centre of each point in 0..k−1, present (G,)
        bool (the group has a point). O(iterations·N·k·D) time, O(N·k + G·k·D) memory.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    count, dim = num_groups, points.shape[1]
    sizes = torch.bincount(groups, minlength=count)  # (G,)
    means = points.new_zeros(count, dim).index_add_(0, groups, points)
    means = means / sizes.clamp_min(1)[:, None]
    gap = (points - means[groups]).pow(2).sum(1)  # (N,) to the nearest reference so far
    chosen = []
    for _ in range(k):
        centre = points[_argmax_per_group(gap, groups, count)]  # (G, D)
        chosen.append(centre)
        to_centre = (points - centre[groups]).pow(2).sum(1)
        gap = to_centre if len(chosen) == 1 else torch.minimum(gap, to_centre)
    centres = torch.stack(chosen, 1)  # (G, k, D)
    assignment = _nearest(points, groups, centres)
    for _ in range(iterations):
        cluster = groups * k + assignment  # (N,) in 0..G·k−1
        sums = points.new_zeros(count * k, dim).index_add_(0, cluster, points)
        members = torch.bincount(cluster, minlength=count * k)[:, None]
        flat = centres.reshape(count * k, dim)
        centres = torch.where(members > 0, sums / members.clamp_min(1), flat).view(count, k, dim)
        assignment = _nearest(points, groups, centres)
    return centres, assignment, sizes > 0


def _nearest(points: Tensor, groups: Tensor, centres: Tensor) -> Tensor:
    """(N,) the nearest of its group's centres for each point (ties → lower index)."""
    # One centre at a time: (N, D) temporaries, never (N, k, D).
    gaps = [(points - centres[groups, j]).pow(2).sum(1) for j in range(centres.shape[1])]
    return torch.stack(gaps, 1).argmin(1)  # argmin returns the first of equal minima


def _argmax_per_group(values: Tensor, groups: Tensor, count: int) -> Tensor:
    """(G,) per group, the index of its largest value (ties → lowest index); 0 if empty."""
    best = values.new_full((count,), -torch.inf).scatter_reduce(0, groups, values, "amax")
    index = torch.arange(len(groups), device=groups.device)
    candidates = torch.where(values == best[groups], index, len(groups))
    chosen = torch.full((count,), len(groups), device=groups.device).scatter_reduce(
        0, groups, candidates, "amin"
    )
    return chosen.clamp_max(max(len(groups) - 1, 0))

"""DAAL: density-aware adaptive line-margin loss (a reconstruction from the abstract).

Each class c owns a segment [a_c, b_c] (learnable vertices). A sample is pulled towards
its class's segment only while it lies outside a tube of radius ρ_c around it — ρ_c
follows the class's own spread (EMA of the median distance), so dense classes get thin
tubes and spread ones wide tubes — and pushed out of the tubes of every other class.
Formulas, defaults and the design choices: docs/methods.md, "DAAL (reconstruction)".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from dmlkit.grouped import grouped_kmeans
from dmlkit.losses.pair import PAIR_LOSSES
from dmlkit.numerics import (
    checked_forward,
    class_rows,
    masked_logsumexp,
    resolve_classes,
    safe_sqrt,
    upcast,
)

ASSIGNMENTS = ("nearest", "soft")

__all__ = [
    "ASSIGNMENTS",
    "DAALLoss",
    "SegmentGeometry",
    "class_medians",
    "class_quantiles",
    "own_segments",
    "daal_terms",
    "segment_geometry",
    "two_means",
]


class SegmentGeometry(NamedTuple):
    """Every sample against every class segment."""

    distance: Tensor  # (B, C) D_ic, distance from z_i to segment c
    position: Tensor  # (B, C) t_ic in [0, 1], the foot's position along the segment
    length: Tensor  # (C,) ||b_c − a_c||


def segment_geometry(embeddings: Tensor, vertices: Tensor) -> SegmentGeometry:
    """Distances of all samples to all segments, from inner products only.

    t = clamp(<z − a, b − a> / ||b − a||², 0, 1), D = ||z − a − t(b − a)||, expanded into
    z·a, z·b and the per-class products a·a, a·b, b·b, so that no (B, C, D) tensor is
    ever built (SOP: 128 × 11,318 × 512 floats would be 3 GB).

    Args:
        embeddings: (B, D). vertices: (C, 2, D), a_c = vertices[:, 0], b_c = vertices[:, 1].
    Returns: SegmentGeometry. O(B·C·D) time (one matmul), O(B·C) memory.
    """
    count = len(vertices)
    # unbind (not indexing): its backward stacks the pieces instead of zero-filling a
    # full-size gradient per piece, which dominates at SOP scale.
    start, end = vertices.unbind(1)  # (C, D) each
    products = embeddings @ vertices.reshape(2 * count, -1).T  # (B, 2C), a_0 b_0 a_1 b_1 …
    z_a, z_b = products.view(-1, count, 2).unbind(2)  # (B, C) each
    a_a, b_b = vertices.pow(2).sum(2).unbind(1)  # (C,) each
    a_b = (start * end).sum(1)  # (C,)
    e_e = (a_a + b_b - 2 * a_b).clamp_min(0)  # (C,) ||b − a||²
    z_z = embeddings.pow(2).sum(1, keepdim=True)  # (B, 1)
    along = z_b - z_a - a_b + a_a  # (B, C) <z − a, b − a>
    t = (along / e_e.clamp_min(1e-12)).clamp(0, 1)  # (B, C)
    to_start = z_z - 2 * z_a + a_a  # (B, C) ||z − a||²
    squared = (to_start - 2 * t * along + t.pow(2) * e_e).clamp_min(0)
    return SegmentGeometry(safe_sqrt(squared), t, safe_sqrt(e_e))


def class_quantiles(
    values: Tensor, rows: Tensor, num_classes: int, quantile: float = 0.5
) -> tuple[Tensor, Tensor]:
    """The ``quantile`` of ``values`` (B,) per class row, linearly interpolated (NumPy's
    default: position q·(n − 1) among the class's sorted values).

    Returns (quantiles (C,), present (C,) bool); absent classes get 0. No host sync.
    """
    order = torch.argsort(values)
    order = order[torch.argsort(rows[order], stable=True)]  # by class, then by value
    ordered = values[order]  # (B,)
    counts = torch.bincount(rows, minlength=num_classes)  # (C,)
    starts = torch.cumsum(counts, 0) - counts
    present = counts > 0
    if len(values) == 0:
        return torch.zeros(num_classes, dtype=values.dtype, device=values.device), present
    position = quantile * (counts - 1).clamp_min(0).to(values.dtype)  # (C,)
    below = position.floor()
    last = len(values) - 1
    low = (starts + below.long()).clamp_max(last)
    high = (starts + position.ceil().long()).clamp_max(last)
    fraction = position - below
    result = ordered[low] + fraction * (ordered[high] - ordered[low])
    return torch.where(present, result, torch.zeros_like(result)), present


def class_medians(values: Tensor, rows: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Median of ``values`` (B,) per class row (mean of the two middle values when even).

    Returns (medians (C,), present (C,) bool); absent classes get 0. No host sync.
    """
    return class_quantiles(values, rows, num_classes, 0.5)


def own_segments(dist: Tensor, rows: Tensor, segments: int) -> Tensor:
    """(B,) the segment row (class row · S + s) nearest to each sample among its class's S.

    ``dist``: (B, C·S) distances to every segment. The choice carries no gradient.
    """
    if segments == 1:
        return rows
    own = dist.detach().view(len(rows), -1, segments)[torch.arange(len(rows)), rows]  # (B, S)
    return rows * segments + own.argmin(1)


def daal_terms(
    dist: Tensor,
    t: Tensor,
    rows: Tensor,
    radii: Tensor,
    lengths: Tensor,
    *,
    margin: float = 0.1,
    gamma: float = 16.0,
    min_spread: float = 1 / 24,
    max_length: float = 1.0,
    segments: int = 1,
    assign: str = "nearest",
    temperature: float = 0.05,
) -> dict[str, Tensor]:
    """The four DAAL terms (pull, push, spread, length) from the segment geometry.

    With S = ``segments`` per class, segment row g = class row · S + s. A sample belongs
    to the nearest segment of its class (``own_segments``): the pull and the spread use
    that segment, and its distance to another class is the distance to that class's
    nearest segment, with that segment's radius. ``assign="soft"`` pulls towards the
    soft minimum −τ·log Σ_s exp(−D_is/τ) of the own segments' distances instead (τ =
    ``temperature``; every own segment gets gradient). S = 1 is the one-segment loss.

    Args:
        dist, t: (B, C·S) from ``segment_geometry``. rows: (B,) class row of each sample.
        radii: (C·S,) tube radii ρ_g (no gradient). lengths: (C·S,) ||b_g − a_g||.
    Returns: dict of 0-dim tensors: pull and push are means over the B samples, spread a
        mean over the segments with ≥ 2 samples (0 if none), length a mean over all C·S
        segments; all four are 0 (graph-connected) for an empty batch. O(B·C·S) time and
        memory.
    """
    if assign not in ASSIGNMENTS:
        raise ValueError(f"unknown assign {assign!r}; valid: {', '.join(ASSIGNMENTS)}")
    batch, groups = len(rows), len(radii)
    count = groups // segments
    own_segment = own_segments(dist, rows, segments)  # (B,)
    own_dist = dist.gather(1, own_segment[:, None]).squeeze(1)  # (B,)
    if assign == "soft" and segments > 1:
        own_all = dist.view(batch, count, segments)[torch.arange(batch), rows]  # (B, S)
        own_dist = -temperature * torch.logsumexp(-own_all / temperature, 1)
    # ÷ max(B, 1), not .mean(): a mean over an empty batch is NaN.
    pull = (own_dist - radii[own_segment]).clamp_min(0).sum() / max(batch, 1)
    if segments == 1:
        class_dist, class_radius = dist, radii[None, :]  # (B, C), (1, C)
    else:
        class_dist, nearest = dist.view(batch, count, segments).min(2)  # (B, C) each
        class_radius = radii.view(count, segments).gather(1, nearest.T).T  # (B, C)
    own = rows[:, None] == torch.arange(count, device=rows.device)  # (B, C)
    logits = gamma * (class_radius + margin - class_dist)  # (B, C)
    push = masked_logsumexp(logits, ~own, dim=1, add_one=True).sum() / (gamma * max(batch, 1))
    own_t = t.gather(1, own_segment[:, None]).squeeze(1)  # (B,)
    counts = torch.bincount(own_segment, minlength=groups).to(own_t.dtype)  # (C·S,)
    mean_t = own_t.new_zeros(groups).index_add_(0, own_segment, own_t) / counts.clamp_min(1)
    squares = (own_t - mean_t[own_segment]).pow(2)  # two-pass population variance
    variance = own_t.new_zeros(groups).index_add_(0, own_segment, squares) / counts.clamp_min(1)
    several = counts >= 2
    shortfall = (min_spread - variance).clamp_min(0)
    spread = torch.where(several, shortfall, torch.zeros_like(shortfall)).sum()
    length = (lengths - max_length).clamp_min(0).mean()
    if batch == 0:
        # The length hinge does not depend on the batch; kept, it would be the whole loss
        # of an empty batch and move the vertices on a step that saw no data.
        length = length * 0
    return {
        "pull": pull,
        "push": push,
        "spread": spread / several.sum().clamp_min(1),
        "length": length,
    }


def two_means(
    embeddings: Tensor, rows: Tensor, num_classes: int, *, iterations: int = 20
) -> tuple[Tensor, Tensor]:
    """2-means of each class's embeddings, all classes at once (``dmlkit.grouped``).

    Deterministic: centre 1 is the sample farthest from the class mean, centre 2 the
    sample farthest from centre 1 (ties → lowest index), then Lloyd iterations.
    Returns (centres (C, 2, D), present (C,) bool). O(iterations·N·D) time, O(N·D) memory.
    """
    centres, _, present = grouped_kmeans(embeddings, rows, num_classes, 2, iterations=iterations)
    return centres, present


class DAALLoss(nn.Module):
    """DAAL loss: L = pull + push + spread_weight·spread + length_weight·length (+ base).

    Args:
        num_classes: C (may be None when ``classes`` is given). embedding_dim: D.
        classes: the label values (any integers), default 0..C−1.
        margin: δ, the extra clearance from other classes' tubes. gamma: push sharpness.
        rho_min, rho_max: clip of the tube radii. momentum: their EMA momentum.
        radius_quantile: the tube radius follows this quantile of the class's distances
            (0.5: the median). radius: a fixed radius for every tube instead (no density
            adaptation); None: adaptive.
        spread_weight, min_spread: weight and floor v_min of the variance of t along a
            segment. length_weight, max_length: weight and ℓ_max of the length hinge.
        segments: S segments per class (1: the abstract's one line per class; S > 1 is an
            alternative of this reconstruction, docs/methods.md). assign: how a sample is
            pulled when S > 1: "nearest" (to its class's nearest segment) or "soft" (to
            the soft minimum of its class's segments, ``temperature`` τ).
        base: optional pair loss added on top — a callable (embeddings, labels) or a
            name among contrastive/triplet/npair/ms (default hyper-parameters).
        init_offset: half-length of the random initial segment along v_c.
        seed: seeds the random vertex initialisation.
    ``vertices`` (C·S, 2, D) is a parameter (``high_lr_parameters``), row c·S + s the
    s-th segment of class row c; ``radii`` (C·S,) and ``radius_seen`` (C·S,) are buffers.
    The radii of the segments the batch's samples belong to are updated (training mode
    only) *before* the loss is computed, a segment's first quantile taken as is.
    ``last_terms``: pull, push, spread, length, mean_rho (mean ρ over the segments seen),
    and ``pair`` with a base loss. An empty batch gives a graph-connected 0 and leaves the
    buffers as they are. O(B·C·S·D) time, O(B·C·S + C·S·D) memory.
    """

    def __init__(
        self,
        num_classes: int | None,
        embedding_dim: int,
        *,
        classes: Sequence[int] | np.ndarray | Tensor | None = None,
        margin: float = 0.1,
        gamma: float = 16.0,
        rho_min: float = 0.05,
        rho_max: float = 0.5,
        momentum: float = 0.9,
        radius_quantile: float = 0.5,
        radius: float | None = None,
        spread_weight: float = 0.1,
        length_weight: float = 0.1,
        max_length: float = 1.0,
        min_spread: float = 1 / 24,
        segments: int = 1,
        assign: str = "nearest",
        temperature: float = 0.05,
        base: str | Callable[[Tensor, Tensor], Tensor] | None = None,
        init_offset: float = 0.05,
        seed: int = 0,
    ) -> None:
        super().__init__()
        _check_options(segments, assign, temperature, radius_quantile, radius)
        self.register_buffer("classes", resolve_classes(num_classes, classes))
        self.margin, self.gamma, self.momentum = margin, gamma, momentum
        self.rho_min, self.rho_max = rho_min, rho_max
        self.radius_quantile, self.radius = radius_quantile, radius
        self.spread_weight, self.length_weight = spread_weight, length_weight
        self.max_length, self.min_spread, self.init_offset = max_length, min_spread, init_offset
        self.segments, self.assign, self.temperature = segments, assign, temperature
        self.base = _resolve_base(base)
        self.embedding_dim = embedding_dim  # checked_forward compares the inputs' D with it
        count = len(self.classes) * segments
        generator = torch.Generator().manual_seed(seed)
        centre = _unit(torch.randn(count, embedding_dim, generator=generator))
        direction = _unit(torch.randn(count, embedding_dim, generator=generator))
        offset = init_offset * direction
        self.vertices = nn.Parameter(torch.stack([centre - offset, centre + offset], 1))
        start = float(rho_max if radius is None else radius)
        self.register_buffer("radii", torch.full((count,), start))
        self.register_buffer("radius_seen", torch.zeros(count, dtype=torch.bool))
        self.last_terms: dict[str, Tensor] = {}

    @checked_forward
    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        rows = class_rows(self.classes, labels)  # (B,)
        with torch.autocast(embeddings.device.type, enabled=False):
            z = upcast(embeddings)
            dist, t, lengths = segment_geometry(z, self.vertices.to(z.dtype))  # (B, C·S) ...
            if self.training:
                own = own_segments(dist, rows, self.segments)  # (B,)
                self._update_radii(dist.detach().gather(1, own[:, None]).squeeze(1), own)
            terms = daal_terms(
                dist,
                t,
                rows,
                self.radii.to(z.dtype),
                lengths,
                margin=self.margin,
                gamma=self.gamma,
                min_spread=self.min_spread,
                max_length=self.max_length,
                segments=self.segments,
                assign=self.assign,
                temperature=self.temperature,
            )
        total = terms["pull"] + terms["push"]
        total = total + self.spread_weight * terms["spread"] + self.length_weight * terms["length"]
        if self.base is not None:
            terms["pair"] = self.base(embeddings, labels)
            total = total + terms["pair"]
        seen = self.radius_seen
        mean_rho = torch.where(seen, self.radii, 0).sum() / seen.sum().clamp_min(1)
        self.last_terms = {**{k: v.detach() for k, v in terms.items()}, "mean_rho": mean_rho}
        return total

    def _update_radii(self, own_dist: Tensor, own: Tensor) -> None:
        """ρ_g ← clip(m·ρ_g + (1−m)·quantile_g, ρ_min, ρ_max); first sight: clip(quantile_g).

        With a fixed ``radius`` the radii stay as they are (only ``radius_seen`` is kept).
        """
        quantiles, present = class_quantiles(own_dist, own, len(self.radii), self.radius_quantile)
        if self.radius is None:
            quantiles = quantiles.to(self.radii.dtype)
            blended = self.momentum * self.radii + (1 - self.momentum) * quantiles
            updated = torch.where(self.radius_seen, blended, quantiles)
            updated = updated.clamp(self.rho_min, self.rho_max)
            self.radii.copy_(torch.where(present, updated, self.radii))
        self.radius_seen |= present

    @torch.no_grad()
    def init_from_embeddings(self, embeddings: Tensor, labels: Tensor) -> None:
        """Set each class's segments from its embeddings (the untrained model's, (N, D)).

        One segment: its vertices are the 2-means centres of the class. S segments: a
        k-means with S centres splits the class, and each part's 2-means centres are the
        vertices of one segment (``dmlkit.grouped.grouped_kmeans``). Classes (or parts)
        absent keep their random init; a segment whose two centres coincide (one
        sample, duplicates) becomes a short segment through its centre along its current
        direction (±``init_offset``).
        """
        device = self.vertices.device
        z = embeddings.to(device, self.vertices.dtype)
        rows = class_rows(self.classes, labels.to(device))
        groups, count = rows, len(self.classes)
        if self.segments > 1:
            _, part, _ = grouped_kmeans(z, rows, count, self.segments)
            groups, count = rows * self.segments + part, count * self.segments
        centres, present = two_means(z, groups, count)  # (C·S, 2, D), (C·S,)
        old_direction = _unit(self.vertices[:, 1] - self.vertices[:, 0])  # (C·S, D)
        middle = centres.mean(1)
        short = self.init_offset * old_direction
        fallback = torch.stack([middle - short, middle + short], 1)
        gap = (centres[:, 1] - centres[:, 0]).norm(dim=1)
        degenerate = (gap < 1e-6)[:, None, None]
        chosen = torch.where(degenerate, fallback, centres)
        self.vertices.copy_(torch.where(present[:, None, None], chosen, self.vertices))

    def high_lr_parameters(self) -> list[nn.Parameter]:
        return [self.vertices]


def _check_options(
    segments: int, assign: str, temperature: float, quantile: float, radius: float | None
) -> None:
    problems = []
    if not (isinstance(segments, int) and segments >= 1):
        problems.append(f"segments must be an int >= 1, got {segments!r}")
    if assign not in ASSIGNMENTS:
        problems.append(f"unknown assign {assign!r}; valid: {', '.join(ASSIGNMENTS)}")
    if not temperature > 0:
        problems.append(f"temperature must be > 0, got {temperature}")
    if not 0 <= quantile <= 1:
        problems.append(f"radius_quantile must be in [0, 1], got {quantile}")
    if radius is not None and not radius > 0:
        problems.append(f"radius must be > 0 or None, got {radius}")
    if problems:
        raise ValueError("; ".join(problems))


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _resolve_base(base: Any) -> Callable[[Tensor, Tensor], Tensor] | None:
    if base is None or callable(base):
        return base
    if base not in PAIR_LOSSES:
        raise ValueError(f"unknown base loss {base!r} for DAAL; valid: {', '.join(PAIR_LOSSES)}")
    return PAIR_LOSSES[base]

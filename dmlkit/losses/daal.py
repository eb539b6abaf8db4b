"""DAAL: density-aware adaptive line-margin loss (a reconstruction from the abstract).

Each class c owns a segment [a_c, b_c] (learnable vertices). A sample is pulled towards
its class's segment only while it lies outside a tube of radius ρ_c around it — ρ_c
follows the class's own spread (EMA of the median distance), so dense classes get thin
tubes and spread ones wide tubes — and pushed out of the tubes of every other class:

    t_ic = clamp(<z_i − a_c, b_c − a_c> / ||b_c − a_c||², 0, 1),
    D_ic = ||z_i − a_c − t_ic (b_c − a_c)||,
    ρ_c ← clip(m·ρ_c + (1 − m)·median_{i: y_i = c} D_ic, ρ_min, ρ_max)   (no gradient),
    pull   = mean_i [D_{i,y_i} − ρ_{y_i}]_+,
    push   = mean_i (1/γ) log(1 + Σ_{c ≠ y_i} exp(γ(ρ_c + δ − D_ic))),
    spread = mean_{c: n_c ≥ 2} [v_min − Var_{i: y_i = c}(t_ic)]_+,
    length = mean_c [||b_c − a_c|| − ℓ_max]_+,
    L = pull + push + spread_weight·spread + length_weight·length (+ a pair loss).

This module is the one-segment loss of the abstract; the alternatives the DAAL study
compares (several segments per class, soft assignment, quantile or fixed radii) are
``dmlkit.losses.daal_variants``. Formulas, defaults and the design choices:
docs/methods.md, "DAAL (reconstruction)".
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
    class_rows,
    loss_contract,
    masked_logsumexp,
    resolve_classes,
    safe_sqrt,
)

__all__ = [
    "DAALLoss",
    "SegmentGeometry",
    "class_medians",
    "class_quantiles",
    "daal_terms",
    "random_segments",
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
) -> dict[str, Tensor]:
    """The four DAAL terms from the segment geometry (one segment per class):

    pull = mean_i [D_{i,y_i} − ρ_{y_i}]_+;  push = mean_i (1/γ) log(1 + Σ_{c≠y_i}
    exp(γ(ρ_c + δ − D_ic))), δ = ``margin``, γ = ``gamma``;  spread = mean over the classes
    with ≥ 2 samples of [v_min − Var_i(t_{i,c})]_+ (population variance, v_min =
    ``min_spread``);  length = mean_c [||b_c − a_c|| − ℓ_max]_+, ℓ_max = ``max_length``.

    Args:
        dist, t: (B, C) from ``segment_geometry``. rows: (B,) class row of each sample.
        radii: (C,) tube radii ρ_c (no gradient). lengths: (C,) ||b_c − a_c||.
    Returns: dict of 0-dim tensors ``pull``, ``push``, ``spread``, ``length``; all four are
        0 (graph-connected) for an empty batch. O(B·C) time and memory.
    """
    batch, count = len(rows), len(radii)
    own_dist = dist.gather(1, rows[:, None]).squeeze(1)  # (B,) D_{i,y_i}
    # ÷ max(B, 1), not .mean(): a mean over an empty batch is NaN.
    pull = (own_dist - radii[rows]).clamp_min(0).sum() / max(batch, 1)
    own = rows[:, None] == torch.arange(count, device=rows.device)  # (B, C)
    logits = gamma * (radii[None, :] + margin - dist)  # (B, C)
    push = masked_logsumexp(logits, ~own, dim=1, add_one=True).sum() / (gamma * max(batch, 1))
    return {
        "pull": pull,
        "push": push,
        "spread": spread_term(t.gather(1, rows[:, None]).squeeze(1), rows, count, min_spread),
        "length": length_term(lengths, max_length, batch),
    }


def spread_term(own_t: Tensor, rows: Tensor, count: int, min_spread: float) -> Tensor:
    """mean over the segments with ≥ 2 samples of [v_min − Var(t)]_+ (0 if none).

    ``own_t``: (B,) each sample's position along its own segment; ``rows``: (B,) that
    segment's row among ``count``.
    """
    counts = torch.bincount(rows, minlength=count).to(own_t.dtype)  # (C,)
    mean_t = own_t.new_zeros(count).index_add_(0, rows, own_t) / counts.clamp_min(1)
    squares = (own_t - mean_t[rows]).pow(2)  # two-pass population variance
    variance = own_t.new_zeros(count).index_add_(0, rows, squares) / counts.clamp_min(1)
    several = counts >= 2
    shortfall = (min_spread - variance).clamp_min(0)
    spread = torch.where(several, shortfall, torch.zeros_like(shortfall)).sum()
    return spread / several.sum().clamp_min(1)


def length_term(lengths: Tensor, max_length: float, batch: int) -> Tensor:
    """mean over all segments of [||b − a|| − ℓ_max]_+."""
    length = (lengths - max_length).clamp_min(0).mean()
    if batch == 0:
        # The length hinge does not depend on the batch; kept, it would be the whole loss
        # of an empty batch and move the vertices on a step that saw no data.
        length = length * 0
    return length


def random_segments(count: int, embedding_dim: int, init_offset: float, seed: int) -> Tensor:
    """(count, 2, D) segments a = u − offset·v, b = u + offset·v, u and v random unit vectors."""
    generator = torch.Generator().manual_seed(seed)
    centre = _unit(torch.randn(count, embedding_dim, generator=generator))
    direction = _unit(torch.randn(count, embedding_dim, generator=generator))
    offset = init_offset * direction
    return torch.stack([centre - offset, centre + offset], 1)


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

    One segment per class, tube radii that follow each class's median distance (the module
    docstring has the formulas; ``daal_terms`` computes them).

    Args:
        num_classes: C (may be None when ``classes`` is given). embedding_dim: D.
        classes: the label values (any integers), default 0..C−1.
        margin: δ, the extra clearance from other classes' tubes. gamma: push sharpness γ.
        rho_min, rho_max: clip of the tube radii. momentum: m, their EMA momentum.
        spread_weight, min_spread: weight and floor v_min of the variance of t along a
            segment. length_weight, max_length: weight and ℓ_max of the length hinge.
        base: optional pair loss added on top — a callable (embeddings, labels) or a
            name among contrastive/triplet/npair/ms (default hyper-parameters).
        init_offset: half-length of the random initial segment along v_c.
        seed: seeds the random vertex initialisation.
    ``vertices`` (C, 2, D) is a parameter (``high_lr_parameters``); ``radii`` (C,) and
    ``radius_seen`` (C,) are buffers. The radii of the classes in the batch are updated
    (training mode only) *before* the loss is computed, a class's first median taken as
    is. ``last_terms``: pull, push, spread, length, mean_rho (mean ρ over the classes
    seen), and ``pair`` with a base loss. An empty batch gives a graph-connected 0 and
    leaves the buffers as they are. O(B·C·D) time, O(B·C + C·D) memory.
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
        spread_weight: float = 0.1,
        length_weight: float = 0.1,
        max_length: float = 1.0,
        min_spread: float = 1 / 24,
        base: str | Callable[[Tensor, Tensor], Tensor] | None = None,
        init_offset: float = 0.05,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.register_buffer("classes", resolve_classes(num_classes, classes))
        self.margin, self.gamma, self.momentum = margin, gamma, momentum
        self.rho_min, self.rho_max = rho_min, rho_max
        self.spread_weight, self.length_weight = spread_weight, length_weight
        self.max_length, self.min_spread, self.init_offset = max_length, min_spread, init_offset
        self.base = _resolve_base(base)
        self.embedding_dim = embedding_dim  # loss_contract compares the inputs' D with it
        count = len(self.classes)
        self.vertices = nn.Parameter(random_segments(count, embedding_dim, init_offset, seed))
        self.register_buffer("radii", torch.full((count,), float(rho_max)))
        self.register_buffer("radius_seen", torch.zeros(count, dtype=torch.bool))
        self.last_terms: dict[str, Tensor] = {}

    @loss_contract  # also: autocast off, embeddings in fp32 (or float64)
    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        rows = class_rows(self.classes, labels)  # (B,)
        z = embeddings
        dist, t, lengths = segment_geometry(z, self.vertices.to(z.dtype))  # (B, C) ...
        if self.training:
            self._update_radii(dist.detach(), rows)
        terms = self._terms(dist, t, rows, self.radii.to(z.dtype), lengths)
        total = terms["pull"] + terms["push"]
        total = total + self.spread_weight * terms["spread"] + self.length_weight * terms["length"]
        if self.base is not None:
            terms["pair"] = self.base(embeddings, labels)
            total = total + terms["pair"]
        seen = self.radius_seen
        mean_rho = torch.where(seen, self.radii, 0).sum() / seen.sum().clamp_min(1)
        self.last_terms = {**{k: v.detach() for k, v in terms.items()}, "mean_rho": mean_rho}
        return total

    def _terms(
        self, dist: Tensor, t: Tensor, rows: Tensor, radii: Tensor, lengths: Tensor
    ) -> dict[str, Tensor]:
        return daal_terms(
            dist,
            t,
            rows,
            radii,
            lengths,
            margin=self.margin,
            gamma=self.gamma,
            min_spread=self.min_spread,
            max_length=self.max_length,
        )

    def _update_radii(self, dist: Tensor, rows: Tensor) -> None:
        """ρ_c ← clip(m·ρ_c + (1−m)·median_c, ρ_min, ρ_max); first sight: clip(median_c)."""
        own_dist = dist.gather(1, rows[:, None]).squeeze(1)  # (B,)
        medians, present = class_medians(own_dist, rows, len(self.radii))
        self._blend_radii(medians, present)

    def _blend_radii(self, estimates: Tensor, present: Tensor) -> None:
        estimates = estimates.to(self.radii.dtype)
        blended = self.momentum * self.radii + (1 - self.momentum) * estimates
        updated = torch.where(self.radius_seen, blended, estimates)
        updated = updated.clamp(self.rho_min, self.rho_max)
        self.radii.copy_(torch.where(present, updated, self.radii))
        self.radius_seen |= present

    @torch.no_grad()
    def init_from_embeddings(self, embeddings: Tensor, labels: Tensor) -> None:
        """Set each class's segment from its embeddings (the untrained model's, (N, D)).

        Its vertices are the 2-means centres of the class (``two_means``). Classes absent
        keep their random init; a class whose two centres coincide (one sample,
        duplicates) gets a short segment through its centre along its current direction
        (±``init_offset``).
        """
        z = embeddings.to(self.vertices.device, self.vertices.dtype)
        rows = class_rows(self.classes, labels.to(self.vertices.device))
        self._set_segments(*two_means(z, rows, len(self.classes)))

    def _set_segments(self, centres: Tensor, present: Tensor) -> None:
        """vertices ← ``centres`` (rows, 2, D) where ``present``, a short segment if degenerate."""
        old_direction = _unit(self.vertices[:, 1] - self.vertices[:, 0])  # (rows, D)
        middle = centres.mean(1)
        short = self.init_offset * old_direction
        fallback = torch.stack([middle - short, middle + short], 1)
        gap = (centres[:, 1] - centres[:, 0]).norm(dim=1)
        degenerate = (gap < 1e-6)[:, None, None]
        chosen = torch.where(degenerate, fallback, centres)
        self.vertices.copy_(torch.where(present[:, None, None], chosen, self.vertices))

    def high_lr_parameters(self) -> list[nn.Parameter]:
        return [self.vertices]


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _resolve_base(base: Any) -> Callable[[Tensor, Tensor], Tensor] | None:
    if base is None or callable(base):
        return base
    if base not in PAIR_LOSSES:
        raise ValueError(f"unknown base loss {base!r} for DAAL; valid: {', '.join(PAIR_LOSSES)}")
    return PAIR_LOSSES[base]

"""The alternatives of the DAAL reconstruction that the DAAL study compares.

``DAALVariants`` is ``dmlkit.losses.daal.DAALLoss`` with five more keywords, all off by
default (and then the same loss, value, gradient and radii, as ``DAALLoss``):

- ``segments`` S: each class owns S segments, row g = c·S + s. A sample belongs to the
  nearest segment of its class, g_i = c_i·S + argmin_s D_{i,c_i·S+s} (no gradient through
  the choice); pull, spread and the radius update use that segment, and the distance to
  another class is that to its nearest segment, D_ic = min_s D_{i,c·S+s}, with that
  segment's radius in the push term.
- ``assign="soft"``: the pull uses the soft minimum −τ log Σ_s exp(−D_{i,c_i·S+s}/τ) of the
  own class's segments (τ = ``temperature``), so every own segment receives gradient.
- ``radius_quantile`` q: a tube radius follows the q-quantile of its segment's distances
  instead of the median; ``radius``: every tube has this fixed radius (no adaptation).

The study found none of them better than the default on glyphs-mini (docs/methods.md,
"DAAL revisited"). The formulas: docs/methods.md, "Alternatives of the reconstruction".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from dmlkit.grouped import grouped_kmeans
from dmlkit.losses.daal import (
    DAALLoss,
    class_quantiles,
    length_term,
    random_segments,
    spread_term,
    two_means,
)
from dmlkit.numerics import class_rows, masked_logsumexp

ASSIGNMENTS = ("nearest", "soft")

__all__ = ["ASSIGNMENTS", "DAALVariants", "daal_variant_terms", "own_segments"]


def own_segments(dist: Tensor, rows: Tensor, segments: int) -> Tensor:
    """(B,) the segment row (class row · S + s) nearest to each sample among its class's S.

    ``dist``: (B, C·S) distances to every segment. The choice carries no gradient.
    """
    if segments == 1:
        return rows
    own = dist.detach().view(len(rows), -1, segments)[torch.arange(len(rows)), rows]  # (B, S)
    return rows * segments + own.argmin(1)


def daal_variant_terms(
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
    """The four DAAL terms with S = ``segments`` per class (``daal.daal_terms`` for S = 1).

    g_i = own segment of sample i (``own_segments``), D_ic = min_s D_{i,c·S+s} with ρ of
    that segment:  pull = mean_i [D_{i,g_i} − ρ_{g_i}]_+ (``assign="soft"``: D_{i,g_i}
    replaced by −τ log Σ_s exp(−D_{i,c_i·S+s}/τ));  push = mean_i (1/γ) log(1 + Σ_{c≠y_i}
    exp(γ(ρ_ic + δ − D_ic)));  spread = mean over segments with ≥ 2 own samples of
    [v_min − Var(t)]_+;  length = mean over all C·S segments of [||b − a|| − ℓ_max]_+.

    Args:
        dist, t: (B, C·S) from ``segment_geometry``. rows: (B,) class row of each sample.
        radii: (C·S,) tube radii ρ_g (no gradient). lengths: (C·S,) ||b_g − a_g||.
    Returns: dict of 0-dim tensors ``pull``, ``push``, ``spread``, ``length``; all 0
        (graph-connected) for an empty batch. O(B·C·S) time and memory.
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
    return {
        "pull": pull,
        "push": push,
        "spread": spread_term(own_t, own_segment, groups, min_spread),
        "length": length_term(lengths, max_length, batch),
    }


class DAALVariants(DAALLoss):
    """``DAALLoss`` with the alternatives of the reconstruction (module docstring).

    Args: those of ``DAALLoss``, and
        radius_quantile: the tube radius follows this quantile of its segment's distances
            (0.5: the median). radius: a fixed radius for every tube instead (no density
            adaptation); None: adaptive.
        segments: S segments per class (1: the abstract's one line per class).
        assign: how a sample is pulled when S > 1: "nearest" (to its class's nearest
            segment) or "soft" (to the soft minimum of its class's segments, ``temperature``
            τ).
    ``vertices`` (C·S, 2, D), ``radii`` and ``radius_seen`` (C·S,): row c·S + s is the s-th
    segment of class row c. O(B·C·S·D) time, O(B·C·S + C·S·D) memory.
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
        _check_options(segments, assign, temperature, radius_quantile, radius)
        super().__init__(
            num_classes,
            embedding_dim,
            classes=classes,
            margin=margin,
            gamma=gamma,
            rho_min=rho_min,
            rho_max=rho_max,
            momentum=momentum,
            spread_weight=spread_weight,
            length_weight=length_weight,
            max_length=max_length,
            min_spread=min_spread,
            base=base,
            init_offset=init_offset,
            seed=seed,
        )
        self.radius_quantile, self.radius = radius_quantile, radius
        self.segments, self.assign, self.temperature = segments, assign, temperature
        count = len(self.classes) * segments
        self.vertices = nn.Parameter(random_segments(count, embedding_dim, init_offset, seed))
        self.radii = torch.full((count,), float(rho_max if radius is None else radius))
        self.radius_seen = torch.zeros(count, dtype=torch.bool)

    def _terms(
        self, dist: Tensor, t: Tensor, rows: Tensor, radii: Tensor, lengths: Tensor
    ) -> dict[str, Tensor]:
        return daal_variant_terms(
            dist,
            t,
            rows,
            radii,
            lengths,
            margin=self.margin,
            gamma=self.gamma,
            min_spread=self.min_spread,
            max_length=self.max_length,
            segments=self.segments,
            assign=self.assign,
            temperature=self.temperature,
        )

    def _update_radii(self, dist: Tensor, rows: Tensor) -> None:
        """As ``DAALLoss``, per own segment and with the q-quantile; a fixed ``radius`` stays."""
        own = own_segments(dist, rows, self.segments)  # (B,)
        own_dist = dist.gather(1, own[:, None]).squeeze(1)  # (B,)
        quantiles, present = class_quantiles(own_dist, own, len(self.radii), self.radius_quantile)
        if self.radius is None:
            self._blend_radii(quantiles, present)
        else:
            self.radius_seen |= present

    @torch.no_grad()
    def init_from_embeddings(self, embeddings: Tensor, labels: Tensor) -> None:
        """As ``DAALLoss``; with S segments a k-means with S centres first splits each class
        (``dmlkit.grouped.grouped_kmeans``) and each part's 2-means centres are the vertices
        of one segment."""
        z = embeddings.to(self.vertices.device, self.vertices.dtype)
        rows = class_rows(self.classes, labels.to(self.vertices.device))
        groups, count = rows, len(self.classes)
        if self.segments > 1:
            _, part, _ = grouped_kmeans(z, rows, count, self.segments)
            groups, count = rows * self.segments + part, count * self.segments
        self._set_segments(*two_means(z, groups, count))


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

"""Per-class density statistics and the density-adaptive regularizer built on them.

``class_statistics`` is shared by the regularizer and the evaluation; ``DensityAdaptive``
wraps any loss and adds λ·R (DML-DA, a reconstruction: docs/methods.md,
"Density-adaptive regularizer").

The relative density of class c (docs/methods.md, "Density-adaptive regularizer"):
    μ_c = mean_{i∈c} z_i,   s_c = mean_{i∈c} ||z_i − μ_c||,
    δ_c = min_{c'≠c} ||μ_c − μ_{c'}||,   r_c = s_c / (δ_c + ε).
Small r_c: the class is packed tightly compared with the distance to its nearest
neighbouring class.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmlkit.numerics import loss_contract


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


TARGETS = ("ema", "batch", "fixed", "learned")


def density_regularizer(
    embeddings: Tensor,
    labels: Tensor,
    *,
    tau: float | Tensor,
    detach_separation: bool = True,
    eps: float = 1e-8,
) -> Tensor:
    """DML-DA density regularizer (reconstruction): R = mean_c [τ − r_c]_+, where

        μ_c = mean_{i∈c} z_i,  s_c = mean_{i∈c} ||z_i − μ_c||,
        δ_c = min_{c'≠c} ||μ_c − μ_{c'}||,  r_c = s_c / (δ_c + ε).

    The mean runs over the classes with n_c ≥ 2 samples in the batch (0 if none), so only
    classes packed more tightly than τ relative to their nearest neighbour are penalised.

    Args:
        embeddings: (B, D). labels: (B,) integer class ids (any values).
        tau: the target relative density (float or 0-dim tensor, may carry a gradient).
        detach_separation: stop the gradient through δ_c, so R spreads an over-dense class
            out instead of also pulling its nearest neighbour closer (False: through both).
    Returns: 0-dim tensor. O(B·D + C²·D) time, O(B·D + C²) memory (C classes in batch).
    """
    stats = class_statistics(embeddings, labels, eps=eps)
    return _hinge_mean(_relative_density(stats, detach_separation, eps), stats.valid, tau)


def _relative_density(stats: ClassStatistics, detach_separation: bool, eps: float) -> Tensor:
    if not detach_separation:
        return stats.relative_density
    relative = stats.spread / (stats.separation.detach() + eps)
    return torch.where(stats.valid, relative, torch.zeros_like(relative))


def _hinge_mean(relative: Tensor, valid: Tensor, tau: float | Tensor) -> Tensor:
    hinge = (tau - relative).clamp_min(0)  # (C,)
    hinge = torch.where(valid, hinge, torch.zeros_like(hinge))
    return hinge.sum() / valid.sum().clamp_min(1)


class DensityAdaptive(nn.Module):
    """L = L_base + weight·R: the density-adaptive regularizer around any loss.

    ``target`` sets τ (docs/methods.md, "Density-adaptive regularizer"):
    "ema" τ = alpha·r̄ with r̄ an EMA (``momentum``, detached) of the batch mean of r_c,
    first batch taken as is, updated in training mode only before τ is read; "batch"
    τ = alpha·(batch mean of r_c, detached); "fixed" τ = ``tau``; "learned" τ =
    softplus(θ) with θ trained (initialised so τ = ``tau``), plus −beta·log τ in the total.
    ``detach_separation`` (default) stops R's gradient through δ_c, so the regularizer
    only spreads over-dense classes out and never pulls a neighbouring class closer;
    False differentiates r_c = s_c/(δ_c + ε) as a whole.

    ``base_loss``: a function ``(embeddings, labels) -> loss`` or a module (its
    ``last_terms``, ``high_lr_parameters`` and ``init_from_embeddings`` pass through).
    ``last_terms``: detached ``base``, ``R``, ``mean_r`` (batch mean r_c), ``tau``.
    Float, complex or bool labels are a ValueError; an empty batch adds 0 (no barrier)
    and leaves the EMA as it is. O(B·D + C_b²·D) time, O(B·D + C_b²) memory for the C_b
    classes in the batch, on top of the base loss.
    """

    def __init__(
        self,
        base_loss: Callable[[Tensor, Tensor], Tensor],
        *,
        weight: float = 1.0,
        target: str = "ema",
        tau: float = 0.3,
        alpha: float = 1.0,
        momentum: float = 0.9,
        beta: float = 0.01,
        detach_separation: bool = True,
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        if target not in TARGETS:
            raise ValueError(f"unknown density target {target!r}; valid: {', '.join(TARGETS)}")
        self.base_loss = base_loss
        self.weight, self.target, self.tau, self.alpha = weight, target, tau, alpha
        self.momentum, self.beta, self.eps = momentum, beta, eps
        self.detach_separation = detach_separation
        if target == "ema":
            self.register_buffer("running_r", torch.zeros(()))
            self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))
        if target == "learned":
            # Inverse softplus, so training starts from τ = tau.
            self.theta = nn.Parameter(torch.tensor(math.log(math.expm1(tau))))
        if hasattr(base_loss, "init_from_embeddings"):
            self.init_from_embeddings = base_loss.init_from_embeddings
        self.last_terms: dict[str, Tensor] = {}

    @loss_contract  # a user base loss may not check, and r_c groups by label
    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        base = self.base_loss(embeddings, labels)
        stats = class_statistics(embeddings, labels, eps=self.eps)
        relative = _relative_density(stats, self.detach_separation, self.eps)  # (C,)
        valid_count = stats.valid.sum()
        mean_r = relative.detach().sum() / valid_count.clamp_min(1)
        tau = self._tau(mean_r, valid_count > 0)
        reg = _hinge_mean(relative, stats.valid, tau)
        total = base + self.weight * reg
        # Not for an empty batch: the barrier alone would make its loss non-zero.
        if self.target == "learned" and len(labels) > 0:
            total = total - self.beta * torch.log(tau)
        self.last_terms = {
            **getattr(self.base_loss, "last_terms", {}),
            "base": base.detach(),
            "R": reg.detach(),
            "mean_r": mean_r,
            "tau": tau.detach(),
        }
        return total

    def _tau(self, mean_r: Tensor, has_classes: Tensor) -> Tensor:
        """τ for this batch; updates the EMA (without a host sync) when training."""
        if self.target == "fixed":
            return torch.full_like(mean_r, self.tau)
        if self.target == "batch":
            return self.alpha * mean_r
        if self.target == "learned":
            return F.softplus(self.theta).to(mean_r.dtype)
        if self.training:
            first = self.num_batches_tracked == 0
            blended = self.momentum * self.running_r + (1 - self.momentum) * mean_r
            updated = torch.where(first, mean_r.to(self.running_r.dtype), blended)
            self.running_r.copy_(torch.where(has_classes, updated, self.running_r))
            self.num_batches_tracked.add_(has_classes.long())
        return self.alpha * self.running_r.to(mean_r.dtype)

    @property
    def embedding_dim(self) -> int | None:
        """The base loss's embedding_dim (None for a loss without per-class parameters)."""
        return getattr(self.base_loss, "embedding_dim", None)

    def high_lr_parameters(self) -> list[nn.Parameter]:
        """The base loss's (proxies, vertices); θ of the learned τ takes the head rate."""
        return list(getattr(self.base_loss, "high_lr_parameters", list)())

"""Embedding-space diagnostics: density (Roth et al. 2020) and the per-class r_c."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from dmlkit.evaluate.retrieval import as_labels
from dmlkit.losses.density import class_statistics


def density_metrics(embeddings: Tensor, labels: Tensor) -> dict[str, Any]:
    """π_intra, π_inter, π_ratio, spectral decay ρ and the per-class relative density r_c.

    π_intra: mean over classes (with ≥ 2 items) of the mean pairwise cosine distance
    within the class; π_inter: mean pairwise cosine distance between the L2-normalized
    class means; π_ratio = π_intra / π_inter (Roth et al. 2020, "Revisiting training
    strategies ... in DML", their ``dists`` metric). ρ = KL(uniform ‖ s/Σs) over the
    min(N, D) singular values s of the embedding matrix (their ``rho_spectrum@1``).
    r_c = s_c / (δ_c + ε) from ``dmlkit.losses.density.class_statistics``
    (docs/methods.md, "Density-adaptive regularizer").

    Args: embeddings (N, D); labels (N,) integer classes.
    Returns: floats ``pi_intra``, ``pi_inter``, ``pi_ratio``, ``spectral_decay``,
        ``relative_density`` ({class: r_c} for classes with ≥ 2 items),
        ``relative_density_mean``, ``relative_density_median``.
    Complexity: O(N·D²) for the singular values, O(C²·D) blocked for δ_c.
    """
    labels = as_labels(labels, len(embeddings))
    z = embeddings.detach().double().cpu()
    if not torch.isfinite(z).all():  # the SVD would fail with a LinAlgError
        raise ValueError("embeddings contain NaN or infinite values")
    classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    unit = torch.nn.functional.normalize(z, dim=1)  # cosine distance is 1 − ⟨ẑ_i, ẑ_j⟩
    sums = unit.new_zeros(len(classes), z.shape[1]).index_add_(0, inverse, unit)  # (C, D)
    self_dot = unit.new_zeros(len(classes)).index_add_(0, inverse, unit.pow(2).sum(1))
    n = counts.double()
    # Σ_{i≠j} (1 − ẑ_i·ẑ_j) = n(n−1) − (||Σ_i ẑ_i||² − Σ_i ||ẑ_i||²), per class.
    pair_sum = n * (n - 1) - (sums.pow(2).sum(1) - self_dot)
    multi = counts >= 2
    pi_intra = float((pair_sum[multi] / (n[multi] * (n[multi] - 1))).mean()) if multi.any() else 0.0
    means = z.new_zeros(len(classes), z.shape[1]).index_add_(0, inverse, z) / n[:, None]
    pi_inter = _mean_pairwise_cosine_distance(torch.nn.functional.normalize(means, dim=1))
    stats = class_statistics(embeddings.detach().float().cpu(), labels)
    density = stats.relative_density[stats.valid].double()
    return {
        "pi_intra": pi_intra,
        "pi_inter": pi_inter,
        "pi_ratio": pi_intra / max(pi_inter, 1e-8),  # Roth et al. clip the denominator too
        "spectral_decay": spectral_decay(z),
        "relative_density": {
            int(c): float(r) for c, r in zip(stats.classes[stats.valid], density, strict=True)
        },
        "relative_density_mean": float(density.mean()) if len(density) else 0.0,
        "relative_density_median": float(density.quantile(0.5)) if len(density) else 0.0,
    }


def spectral_decay(embeddings: Tensor, eps: float = 1e-12) -> float:
    """ρ = KL(U ‖ S): U uniform, S the normalized singular values (Roth et al. 2020).

    Singular values below ``eps``·Σs (rank deficiency; ρ would be infinite) count as
    ``eps``·Σs, so the value stays finite and JSON-serialisable.
    """
    s = torch.linalg.svdvals(embeddings.detach().double().cpu())
    total = float(s.sum())
    if len(s) == 0 or total == 0.0:
        return 0.0
    p = (s / total).clamp_min(eps)
    return float((math.log(1 / len(s)) - p.log()).mean())


def _mean_pairwise_cosine_distance(unit: Tensor) -> float:
    """Mean over ordered pairs a ≠ b of 1 − ⟨u_a, u_b⟩, in O(C·D)."""
    count = len(unit)
    if count < 2:
        return 0.0
    total = unit.sum(0).pow(2).sum() - unit.pow(2).sum()  # Σ_{a≠b} ⟨u_a, u_b⟩
    return float(1 - total / (count * (count - 1)))

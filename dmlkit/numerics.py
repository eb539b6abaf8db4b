"""Numerically safe building blocks shared by the losses (dmlkit.losses).

Distances and exponentials in fp32 even under autocast (half inputs are cast up; float64
stays float64), ``sqrt`` only of clamped arguments, masked log-sum-exp, and the mapping
of arbitrary integer class labels (101..200, Unicode code points) to parameter rows.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

DISTANCES = ("euclidean", "squared", "cosine")
_SQRT_EPS = 1e-12  # below this a squared distance is treated as exactly 0


def full_precision(loss_fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Run ``loss_fn`` with autocast off and fp16/bf16 ``embeddings`` cast to fp32."""

    @functools.wraps(loss_fn)
    def wrapper(embeddings: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        # Autocast would send the Gram matmul back to half precision, where d ≈ 0.5
        # has ~3 significant digits and exp(50·s) overflows.
        with torch.autocast(embeddings.device.type, enabled=False):
            return loss_fn(upcast(embeddings), *args, **kwargs)

    return wrapper


def checked_batch(loss_fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Reject non-integer ``labels``; an empty batch (B = 0) gives a graph-connected 0."""

    @functools.wraps(loss_fn)
    def wrapper(embeddings: Tensor, labels: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        check_labels(labels)
        if len(labels) == 0 and len(embeddings) == 0:
            # max/argmax over an empty dimension raise and a mean over nothing is NaN; a
            # batch of nothing has no valid pair or triplet, so it gets that case's 0.
            return embeddings.sum() * 0
        return loss_fn(embeddings, labels, *args, **kwargs)

    return wrapper


def check_labels(labels: Tensor) -> None:
    """ValueError unless ``labels`` has an integer dtype (int8…int64, uint8)."""
    # A float label 1.5 would be truncated to class 1 (class_rows) or form a class of its
    # own (the pair losses), and bool labels are two classes by accident. An empty tensor
    # passes whatever its dtype, as in resolve_classes: torch.tensor([]) is float32.
    if labels.numel() and (
        labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool
    ):
        raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}")


def upcast(x: Tensor) -> Tensor:
    """fp16/bf16 → fp32; other dtypes unchanged (float64 tests stay float64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def masked_logsumexp(x: Tensor, mask: Tensor, dim: int, *, add_one: bool = False) -> Tensor:
    """log Σ_{mask} exp(x) along ``dim`` (with ``add_one``: log(1 + Σ_{mask} exp(x))).

    Stable (the row maximum is subtracted) and NaN-free: ``exp`` only ever sees
    arguments in [−80, 0], so a masked-out entry can neither overflow nor leak into the
    backward pass; a row with nothing selected gives a finite, gradient-free value (0
    with ``add_one``, a large negative number without) that callers mask out.
    """
    masked = x.detach().masked_fill(~mask, -math.inf)
    if x.shape[dim]:
        peak = masked.amax(dim, keepdim=True)
    else:  # amax over an empty dimension raises; the max of nothing is −inf
        peak = torch.full_like(masked.sum(dim, keepdim=True), -math.inf)
    if add_one:
        peak = peak.clamp_min(0)  # the implicit term exp(0)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    # A term below e^−80 times the largest changes nothing in fp32 or float64 sums, and
    # CPU exp is tens of times slower on arguments whose result underflows: hence a floor.
    shifted = (x - peak).masked_fill(~mask, -80.0).clamp_min(-80.0)  # selected: ≤ 0
    total = torch.where(mask, torch.exp(shifted), 0.0)
    total = total.sum(dim, keepdim=True)
    if add_one:
        total = total + torch.exp((-peak).clamp_min(-80.0))
    tiny = torch.finfo(total.dtype).tiny
    return (torch.log(total.clamp_min(tiny)) + peak).squeeze(dim)


def pairwise_distance(
    embeddings: Tensor, kind: str = "euclidean", other: Tensor | None = None
) -> Tensor:
    """All distances between rows of ``embeddings`` (B, D) and ``other`` (M, D) or itself.

    ``kind``: "euclidean" ||x−y||, "squared" ||x−y||², "cosine" 1 − cos(x, y); smaller is
    closer for every kind. Computed from the Gram matrix in fp32 (float64 kept): O(B·M·D)
    time, O(B·M) memory. The self-distance diagonal is exactly 0.
    """
    if kind not in DISTANCES:
        raise ValueError(f"unknown distance kind {kind!r}; valid: {', '.join(DISTANCES)}")
    x = upcast(embeddings)
    y = x if other is None else upcast(other)
    with torch.autocast(x.device.type, enabled=False):
        if kind == "cosine":
            return 1 - F.normalize(x, dim=1) @ F.normalize(y, dim=1).T
        norms = x.pow(2).sum(1)[:, None] + y.pow(2).sum(1)[None, :]  # (B, M)
        squared = torch.addmm(norms, x, y.T, alpha=-2)  # ||x||² + ||y||² − 2<x, y>, fused
        squared = squared.clamp_min(0)  # rounding can make the Gram form slightly negative
        if other is None:
            squared.diagonal().zero_()  # exactly 0, not rounding noise (clamp saved its input)
        if kind == "squared":
            return squared
        return safe_sqrt(squared)


def safe_sqrt(squared: Tensor) -> Tensor:
    """sqrt with a zero (not infinite) gradient at 0."""
    # Clamp before sqrt: d sqrt(x)/dx is infinite at x = 0 (the diagonal, duplicate
    # samples), and 0·inf = NaN would poison every gradient that touches it.
    root = squared.clamp_min(_SQRT_EPS).sqrt()
    return torch.where(squared > _SQRT_EPS, root, 0.0)


def resolve_classes(
    num_classes: int | None, classes: Sequence[int] | np.ndarray | Tensor | None
) -> Tensor:
    """The sorted class labels (C,) long tensor; 0..num_classes−1 when ``classes`` is None."""
    if classes is None:
        if num_classes is None or num_classes < 1:
            raise ValueError("give num_classes (≥ 1) or the list of classes")
        return torch.arange(num_classes)
    values = classes.detach().cpu() if isinstance(classes, Tensor) else torch.as_tensor(classes)
    if values.numel() and (values.is_floating_point() or values.dtype == torch.bool):
        raise ValueError(f"classes must be integer labels, got dtype {values.dtype}")
    values = values.long().flatten()
    if len(values) == 0 or len(torch.unique(values)) != len(values):
        raise ValueError("classes must be a non-empty list of distinct integer labels")
    if num_classes is not None and num_classes != len(values):
        raise ValueError(f"num_classes={num_classes} but {len(values)} classes were given")
    return torch.sort(values).values


def class_rows(classes: Tensor, labels: Tensor) -> Tensor:
    """Row of each label in the sorted ``classes`` (C,); ValueError naming unknown labels.

    ValueError for a float, complex or bool ``labels`` tensor (``check_labels``). The
    membership check reads one boolean back from the device (a host sync).
    """
    check_labels(labels)
    labels = labels.to(classes.device, torch.long)
    rows = torch.searchsorted(classes, labels).clamp_max(len(classes) - 1)  # (B,)
    unknown = classes[rows] != labels
    if unknown.any():
        missing = torch.unique(labels[unknown])[:10].tolist()
        raise ValueError(f"labels not among this loss's classes: {missing}")
    return rows

"""Numerically safe building blocks shared by the losses (dmlkit.losses).

Distances and exponentials in fp32 even under autocast (half inputs are cast up; float64
stays float64), ``sqrt`` only of clamped arguments, masked log-sum-exp, and the mapping
of arbitrary integer class labels (101..200, Unicode code points) to parameter rows.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

DISTANCES = ("euclidean", "squared", "cosine")
_SQRT_EPS = 1e-12  # below this a squared distance is treated as exactly 0
_ONE_DIMENSIONAL = "; one embedding is embeddings[None], one number per sample embeddings[:, None]"


def _is_float_tensor(x: Any) -> bool:
    return isinstance(x, Tensor) and x.is_floating_point()


def check_batch(
    embeddings: Any, labels: Any, *, embedding_dim: int | None = None, name: str = "labels"
) -> None:
    """ValueError unless ``embeddings`` is (B, D) floating and ``labels`` (B,) integer.

    Also: both on one device, D >= 1, and D == ``embedding_dim`` when given (a loss with
    per-class parameters). Reads only shapes and dtypes: no host sync, a few microseconds.
    ``name`` is what the messages call the second tensor ("labels", "targets").
    """
    if not isinstance(embeddings, Tensor):
        raise ValueError(
            f"embeddings must be a torch.Tensor (B, D), got {type(embeddings).__name__}"
        )
    if not isinstance(labels, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor (B,), got {type(labels).__name__}")
    if embeddings.dim() != 2 or embeddings.shape[1] == 0:
        raise ValueError(
            f"embeddings must be 2-D (B, D) with D >= 1, got shape {tuple(embeddings.shape)}"
            + (_ONE_DIMENSIONAL if embeddings.dim() == 1 else "")
        )
    if not embeddings.is_floating_point():
        raise ValueError(
            f"embeddings must be floating (float16, bfloat16, float32 or float64), got dtype "
            f"{embeddings.dtype}"
        )
    if labels.dim() != 1:
        raise ValueError(
            f"{name} must be 1-D (B,), got shape {tuple(labels.shape)}"
            + (f" (flatten them: {name}.view(-1))" if labels.numel() == len(embeddings) else "")
        )
    check_labels(labels)
    if len(labels) != len(embeddings):
        raise ValueError(
            f"embeddings have {len(embeddings)} rows but {name} has {len(labels)} entries; "
            "give one per embedding"
        )
    if labels.device != embeddings.device:
        raise ValueError(
            f"embeddings are on {embeddings.device} but {name} on {labels.device}; move both "
            "to the same device"
        )
    if embedding_dim is not None and embeddings.shape[1] != embedding_dim:
        raise ValueError(
            f"embeddings have D = {embeddings.shape[1]} columns but this loss was built with "
            f"embedding_dim={embedding_dim} (its per-class parameters)"
        )


def non_finite_as_nan(loss: Tensor, embeddings: Tensor) -> Tensor:
    """``loss``, made NaN when any embedding is NaN or ±inf (no host sync, ~5 µs at B = 128).

    Masks (an active mean keeps terms > 0, mining compares distances) would otherwise drop
    the NaN terms and return a finite loss with NaN gradients. Σz · 0 is 0 for finite z
    (summed in fp32 or float64, so it overflows only for |z| ~ 1e33, where every distance
    has long overflowed) and NaN otherwise; a finite loss and its gradients are unchanged.
    """
    wide = embeddings.dtype == torch.float64
    total = embeddings.detach().sum(dtype=torch.float64 if wide else torch.float32)
    return loss + total * 0


def loss_contract(loss: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """The one wrapper of every loss: ``loss(embeddings, labels, *state, **hyperparams)``
    or a loss module's ``forward(self, embeddings, labels)``. In order:

    1. validate (``check_batch``): the width D is checked against the first floating
       tensor of ``state`` (e.g. proxies (C, D)) or ``self.embedding_dim``; the second
       parameter's name ("labels", "targets") is used in the messages;
    2. B = 0: a function returns 0, connected to its inputs (masks, max and mean need a
       non-empty batch); a module's forward runs (its terms are defined when empty);
    3. precision: autocast off; ``embeddings`` and floating ``state`` in fp32, or all in
       float64 if any of them is float64 (half precision would give distances ~3
       significant digits and overflow exp(α·s); mixed float64/fp32 matmuls raise);
    4. NaN propagation: the result is NaN when any embedding is NaN or ±inf
       (``non_finite_as_nan``).
    """
    parameters = list(inspect.signature(loss).parameters)
    method = parameters[0] == "self"
    name = parameters[2 if method else 1]

    @functools.wraps(loss)
    def wrapper(*args: Any, **kwargs: Any) -> Tensor:
        owner, (embeddings, labels, *state) = (args[:1], args[1:]) if method else ((), args)
        if method:
            width = getattr(owner[0], "embedding_dim", None)
        else:
            width = next((x.shape[-1] for x in state if _is_float_tensor(x) and x.dim()), None)
        check_batch(embeddings, labels, embedding_dim=width, name=name)
        if not method and len(embeddings) == 0:
            return sum((x.sum() * 0 for x in state if _is_float_tensor(x)), embeddings.sum() * 0)
        floats = [x for x in (embeddings, *state) if _is_float_tensor(x)]
        dtype = torch.float64 if any(x.dtype == torch.float64 for x in floats) else torch.float32
        wide, *state = (x.to(dtype) if _is_float_tensor(x) else x for x in (embeddings, *state))
        with torch.autocast(embeddings.device.type, enabled=False):
            result = loss(*owner, wide, labels, *state, **kwargs)
        return non_finite_as_nan(result, embeddings)

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
        if other is None:
            return _SelfDistance.apply(x, kind == "squared")
        norms = x.pow(2).sum(1)[:, None] + y.pow(2).sum(1)[None, :]  # (B, M)
        squared = torch.addmm(norms, x, y.T, alpha=-2)  # ||x||² + ||y||² − 2<x, y>, fused
        squared = squared.clamp_min(0)  # rounding can make the Gram form slightly negative
        if kind == "squared":
            return squared
        return safe_sqrt(squared)


class _SelfDistance(torch.autograd.Function):
    """Euclidean (or squared) distances among the rows of x (B, D), diagonal exactly 0.

    The same values as the Gram form of ``pairwise_distance`` with ``safe_sqrt``, built
    with in-place passes over one (B, B) buffer. Backward: with u = ∂L/∂d / d (0 where
    d = 0, as ``safe_sqrt``'s gradient; 2·∂L/∂d² for squared) and U = u + uᵀ,
    ∂L/∂x = rowsum(U)·x − U·x — one matmul where autograd's Gram backward needs two.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, squared: bool) -> Tensor:
        norms = x.pow(2).sum(1)  # (B,)
        dist = torch.addmm(norms[None, :], x, x.T, alpha=-2)  # (B, B) ||y||² − 2<x, y>
        dist.add_(norms[:, None]).clamp_min_(0)  # rounding can make the Gram form negative
        dist.diagonal().zero_()  # exactly 0, not rounding noise
        if not squared:
            # The threshold of safe_sqrt: below it the distance is 0 and carries no gradient.
            tiny = dist <= _SQRT_EPS  # (B, B)
            dist.sqrt_().masked_fill_(tiny, 0.0)
        ctx.squared = squared
        ctx.save_for_backward(x, dist)
        return dist

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        x, dist = ctx.saved_tensors
        if ctx.squared:
            u = 2 * grad  # (B, B)
        else:
            # d = 0 (the diagonal, coincident points) gets gradient 0, not grad/0.
            u = (grad / dist).masked_fill_(dist == 0, 0.0)
        # u + uᵀ: a transposed elementwise add strides through memory, a transposed copy
        # is a tuned kernel (~7× faster at B = 2048).
        u = u.T.contiguous().add_(u)
        u.diagonal().zero_()  # the diagonal is a constant 0
        return u.sum(1, keepdim=True) * x - u @ x, None


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

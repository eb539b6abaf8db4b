"""Proxy-Anchor (Kim et al. 2020): the pure loss and the module that owns the proxies."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmlkit.numerics import (
    class_rows,
    loss_contract,
    masked_logsumexp,
    resolve_classes,
)

EXP_BOUND = 60.0
"""Largest α(1 + |δ|) summed without subtracting a maximum: e^60 times any batch size up
to 10^12 stays below fp32's largest value (3.4·10^38). Larger ones take the masked
log-sum-exp (``dmlkit.numerics.masked_logsumexp``)."""


@loss_contract
def proxy_anchor_loss(
    embeddings: Tensor,
    targets: Tensor,
    proxies: Tensor,
    *,
    margin: float = 0.1,
    alpha: float = 32.0,
) -> Tensor:
    """Proxy-Anchor loss (Kim et al. 2020, eq. 4), with s = cos(z_i, p_c) and δ = ``margin``:

    L = (1/|P+|) Σ_{c∈P+} log(1 + Σ_{i: y_i=c} exp(−α(s − δ)))
        + (1/C) Σ_c log(1 + Σ_{i: y_i≠c} exp(α(s + δ))),

    P+ the proxies with a sample in the batch: the sum of ``_proxy_anchor_terms``.

    Args:
        embeddings: (B, D). targets: (B,) row of each sample's proxy in 0..C−1.
        proxies: (C, D) (normalized here).
    Returns: 0-dim tensor. O(B·C·D) time, O(B·C) memory.
    """
    positive, negative = _proxy_anchor_terms(
        embeddings, targets, proxies, margin=margin, alpha=alpha
    )
    return positive + negative


def _proxy_anchor_terms(
    embeddings: Tensor,
    targets: Tensor,
    proxies: Tensor,
    *,
    margin: float = 0.1,
    alpha: float = 32.0,
) -> tuple[Tensor, Tensor]:
    """The positive and the negative term of the Proxy-Anchor loss (Kim et al. 2020, eq. 4).

    With s = cos(z_i, p_c): (1/|P+|) Σ_{c∈P+} log(1 + Σ_{i: y_i=c} exp(−α(s − δ)))
    + (1/C) Σ_c log(1 + Σ_{i: y_i≠c} exp(α(s + δ))), P+ the proxies with a sample in the
    batch, δ = ``margin``.

    Args:
        embeddings: (B, D), fp32 or float64 (as ``loss_contract`` passes them).
        targets: (B,) row of each sample's proxy in 0..C−1. proxies: (C, D) (normalized here).
    Returns: (positive, negative) 0-dim tensors, the two sums above. O(B·C·D) time,
        O(B·C) memory. When α(1 + |δ|) ≤ ``EXP_BOUND`` the sums of exponentials are taken
        directly (the exponents are bounded), else through the masked log-sum-exp.
    """
    proxies = proxies.to(embeddings.dtype)  # fp32 or float64: the callers' loss_contract
    cos = F.normalize(embeddings, dim=1) @ F.normalize(proxies, dim=1).T  # (B, C)
    count = len(proxies)
    with_positives = torch.bincount(targets, minlength=count).count_nonzero().clamp_min(1)
    if alpha * (1 + abs(margin)) > EXP_BOUND:
        own = targets[:, None] == torch.arange(count, device=targets.device)  # (B, C)
        pos_term = masked_logsumexp(-alpha * (cos - margin), own, dim=0, add_one=True)  # (C,)
        neg_term = masked_logsumexp(alpha * (cos + margin), ~own, dim=0, add_one=True)  # (C,)
        return pos_term.sum() / with_positives, neg_term.sum() / count
    # |cos| ≤ 1 bounds every exponent by α(1 + |δ|): no overflow, no maximum to subtract,
    # and each sample's own proxy is one entry per row, gathered rather than masked.
    rows = torch.arange(len(targets), device=targets.device)
    own_exp = torch.exp(-alpha * (cos[rows, targets] - margin))  # (B,)
    pos_sum = cos.new_zeros(count).index_add(0, targets, own_exp)  # (C,)
    neg_exp = torch.exp(alpha * (cos + margin)).index_put((rows, targets), cos.new_zeros(()))
    return torch.log1p(pos_sum).sum() / with_positives, torch.log1p(neg_exp.sum(0)).sum() / count


class ProxyAnchorLoss(nn.Module):
    """Proxy-Anchor loss with one learnable proxy per class (Kim et al. 2020).

    Proxies: kaiming-normal (fan-out) from a generator seeded with ``seed``, as in the
    authors' code; they want a learning rate ~100× the backbone's
    (``high_lr_parameters``). ``classes``: the label values (any integers) in row order
    after sorting; default 0..num_classes−1. O(B·C·D) time, O(B·C) memory.
    """

    def __init__(
        self,
        num_classes: int | None,
        embedding_dim: int,
        *,
        classes: Sequence[int] | np.ndarray | Tensor | None = None,
        margin: float = 0.1,
        alpha: float = 32.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.register_buffer("classes", resolve_classes(num_classes, classes))
        self.margin, self.alpha = margin, alpha
        self.embedding_dim = embedding_dim  # loss_contract compares the inputs' D with it
        generator = torch.Generator().manual_seed(seed)
        count = len(self.classes)
        scale = math.sqrt(2.0 / count)
        self.proxies = nn.Parameter(torch.randn(count, embedding_dim, generator=generator) * scale)
        self.last_terms: dict[str, Tensor] = {}

    @loss_contract
    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        targets = class_rows(self.classes, labels)
        positive, negative = _proxy_anchor_terms(
            embeddings, targets, self.proxies, margin=self.margin, alpha=self.alpha
        )
        loss = positive + negative
        self.last_terms = {
            "base": loss.detach(),
            "positive": positive.detach(),
            "negative": negative.detach(),
        }
        return loss

    def high_lr_parameters(self) -> list[nn.Parameter]:
        return [self.proxies]

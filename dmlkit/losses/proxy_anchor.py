"""Proxy-Anchor (Kim et al. 2020): the pure loss and the module that owns the proxies."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmlkit.numerics import (
    checked_forward,
    checked_loss,
    class_rows,
    full_precision,
    masked_logsumexp,
    resolve_classes,
    upcast,
)


@checked_loss
def proxy_anchor_loss(
    embeddings: Tensor,
    targets: Tensor,
    proxies: Tensor,
    *,
    margin: float = 0.1,
    alpha: float = 32.0,
) -> Tensor:
    """Proxy-Anchor loss (Kim et al. 2020, eq. 4): the sum of ``proxy_anchor_terms``."""
    positive, negative = proxy_anchor_terms(
        embeddings, targets, proxies, margin=margin, alpha=alpha
    )
    return positive + negative


@full_precision
def proxy_anchor_terms(
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
        embeddings: (B, D). targets: (B,) row of each sample's proxy in 0..C−1.
        proxies: (C, D) (normalized here).
    Returns: (positive, negative) 0-dim tensors, the two sums above. O(B·C·D) time,
        O(B·C) memory.
    """
    proxies = upcast(proxies)
    cos = F.normalize(embeddings, dim=1) @ F.normalize(proxies, dim=1).T  # (B, C)
    own = targets[:, None] == torch.arange(len(proxies), device=targets.device)  # (B, C)
    pos_term = masked_logsumexp(-alpha * (cos - margin), own, dim=0, add_one=True)  # (C,)
    neg_term = masked_logsumexp(alpha * (cos + margin), ~own, dim=0, add_one=True)  # (C,)
    with_positives = own.any(0).sum().clamp_min(1)
    return pos_term.sum() / with_positives, neg_term.sum() / len(proxies)


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
        self.embedding_dim = embedding_dim  # checked_forward compares the inputs' D with it
        generator = torch.Generator().manual_seed(seed)
        count = len(self.classes)
        scale = math.sqrt(2.0 / count)
        self.proxies = nn.Parameter(torch.randn(count, embedding_dim, generator=generator) * scale)
        self.last_terms: dict[str, Tensor] = {}

    @checked_forward
    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        targets = class_rows(self.classes, labels)
        positive, negative = proxy_anchor_terms(
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

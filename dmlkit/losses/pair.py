"""The pair- and triplet-based losses: pure functions and the module that holds one.

Contrastive, triplet (all / semihard / hard mining), multi-class N-pair and
Multi-Similarity. Formulas, defaults and sources: docs/methods.md, "Base losses"; the
numerical conventions shared by every loss: ``dmlkit.losses``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmlkit.numerics import (
    loss_contract,
    masked_logsumexp,
    pairwise_distance,
    safe_sqrt,
)

MINING = ("all", "semihard", "hard")


def _active_mean(terms: Tensor, valid: Tensor) -> Tensor:
    """Mean over the valid terms that are > 0; a graph-connected 0 when there are none."""
    kept = torch.where(valid & (terms > 0), terms, 0.0)
    # count_nonzero, not bool .sum(): the latter widens to int64 first (~20× slower on CPU).
    return kept.sum() / kept.count_nonzero().clamp_min(1)


def _pair_masks(labels: Tensor) -> tuple[Tensor, Tensor]:
    """(positives, negatives) as (B, B) bool masks; a sample is not its own positive."""
    same = labels[:, None] == labels[None, :]  # (B, B)
    not_self = ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return same & not_self, ~same


@loss_contract
def contrastive_loss(
    embeddings: Tensor,
    labels: Tensor,
    *,
    margin: float = 0.5,
    pos_margin: float = 0.0,
    squared: bool = True,
) -> Tensor:
    """Contrastive loss (Hadsell, Chopra, LeCun 2006, eq. 4) over all pairs i < j.

    L = active_mean_pos([d_ij − pos_margin]_+^p) + active_mean_neg([margin − d_ij]_+^p),
    p = 2 if ``squared`` else 1; d is the Euclidean distance.

    Args:
        embeddings: (B, D). labels: (B,) int class ids.
    Returns: 0-dim tensor, the two active means summed (each 0 when it has no active
        pair). O(B²·D) time, O(B²) memory.
    """
    dist = pairwise_distance(embeddings)  # (B, B)
    positive, negative = _pair_masks(labels)
    pos_terms = (dist - pos_margin).clamp_min(0)  # (B, B)
    neg_terms = (margin - dist).clamp_min(0)  # (B, B)
    if squared:
        pos_terms, neg_terms = pos_terms.square(), neg_terms.square()
    # Each unordered pair appears twice (i, j) and (j, i): the active means are unchanged.
    return _active_mean(pos_terms, positive) + _active_mean(neg_terms, negative)


@loss_contract
def triplet_margin_loss(
    embeddings: Tensor,
    labels: Tensor,
    *,
    margin: float = 0.2,
    mining: str = "all",
    block_elements: int = 1 << 22,
) -> Tensor:
    """Triplet loss [d(a,p) − d(a,n) + margin]_+ (Schroff et al. 2015, eq. 1).

    Args:
        embeddings: (B, D). labels: (B,) int class ids.
        mining: "all" every valid triplet (a, p, n); "semihard" per (a, p) the closest
            negative with d(a,n) > d(a,p), else the hardest (closest) one (Schroff et al.);
            "hard" per anchor the farthest positive and closest negative (batch-hard,
            Hermans et al. 2017).
        block_elements: "all"/"semihard" visit the P positive pairs (a, p) in blocks of
            at most this many (pair, negative) entries; it bounds memory and never
            changes the value (the blocks only count and select, without gradient).
    Returns: 0-dim tensor, the active mean over the selected triplets (0 when none).
        Euclidean distance. "all"/"semihard": O(B²·D + P·B) time for the P positive
        pairs (B·(K−1) for a P×K batch, up to ~B²/2 with two classes), O(B² +
        block_elements) memory for every label layout, one host sync (selecting the
        pairs). "hard": O(B²·D) time, O(B²) memory; its gradient flows through the 2·B
        selected distances only.
    """
    if mining not in MINING:
        raise ValueError(f"unknown mining {mining!r}; valid: {', '.join(MINING)}")
    positive, negative = _pair_masks(labels)
    if mining == "hard":
        return _batch_hard(embeddings, positive, negative, margin)
    dist = pairwise_distance(embeddings)  # (B, B)
    anchor, pos = positive.nonzero(as_tuple=True)  # (P,) each
    rows = max(1, block_elements // max(len(labels), 1))
    if mining == "all":
        weight, count = _all_triplet_weights(dist.detach(), anchor, pos, negative, margin, rows)
        # Σ_active (d_ap − d_an + margin) = Σ weight·dist + margin·count, weight integer.
        return ((weight * dist).sum() + margin * count) / count.clamp_min(1)
    chosen, has_negative = _semihard_negatives(dist.detach(), anchor, pos, negative, rows)
    terms = (dist[anchor, pos] - dist[anchor, chosen] + margin).clamp_min(0)  # (P,)
    return _active_mean(terms, has_negative)


def _batch_hard(embeddings: Tensor, positive: Tensor, negative: Tensor, margin: float) -> Tensor:
    """Batch-hard triplet loss; the selected distances are recomputed from the rows, so
    the gradient costs O(B·D) instead of a (B, B) backward through the distance matrix."""
    with torch.no_grad():
        dist = pairwise_distance(embeddings)  # (B, B)
        farthest = torch.where(positive, dist, -math.inf).argmax(1)  # (B,)
        closest = torch.where(negative, dist, math.inf).argmin(1)  # (B,)
    d_ap = safe_sqrt((embeddings - embeddings[farthest]).pow(2).sum(1))  # (B,)
    d_an = safe_sqrt((embeddings - embeddings[closest]).pow(2).sum(1))  # (B,)
    valid = positive.any(1) & negative.any(1)
    return _active_mean((d_ap - d_an + margin).clamp_min(0), valid)


@torch.no_grad()
def _all_triplet_weights(
    dist: Tensor, anchor: Tensor, pos: Tensor, negative: Tensor, margin: float, rows: int
) -> tuple[Tensor, Tensor]:
    """weight (B, B) and count (0-dim) such that Σ weight·dist + margin·count is the sum
    of the active triplet terms: weight[a, p] = +#active n of (a, p), weight[a, n] =
    −#active p of (a, n). Integer-valued, so the blocking cannot change it."""
    weight = torch.zeros_like(dist)  # (B, B)
    count = torch.zeros((), dtype=torch.int64, device=dist.device)
    for start in range(0, len(anchor), rows):
        a, p = anchor[start : start + rows], pos[start : start + rows]  # (b,) each
        active = negative[a] & (dist[a, p][:, None] - dist[a] + margin > 0)  # (b, B)
        per_pair = active.sum(1, dtype=torch.int64)  # (b,)
        weight[a, p] = per_pair.to(dist.dtype)  # (a, p) pairs are distinct
        weight.index_add_(0, a, active.to(dist.dtype), alpha=-1)
        count += per_pair.sum()
    return weight, count.to(dist.dtype)


@torch.no_grad()
def _semihard_negatives(
    dist: Tensor, anchor: Tensor, pos: Tensor, negative: Tensor, rows: int
) -> tuple[Tensor, Tensor]:
    """Per positive pair (a, p): the closest negative farther than p, else the closest
    one (P,) index, and whether a has any negative (P,) bool."""
    chosen = torch.zeros_like(anchor)
    has_negative = torch.zeros_like(anchor, dtype=torch.bool)
    for start in range(0, len(anchor), rows):
        a, p = anchor[start : start + rows], pos[start : start + rows]  # (b,) each
        d_an, neg = dist[a], negative[a]  # (b, B) each
        harder = neg & (d_an > dist[a, p][:, None])  # (b, B)
        semihard = torch.where(harder, d_an, math.inf).argmin(1)  # (b,)
        hardest = torch.where(neg, d_an, math.inf).argmin(1)  # (b,)
        chosen[start : start + rows] = torch.where(harder.any(1), semihard, hardest)
        has_negative[start : start + rows] = neg.any(1)
    return chosen, has_negative


@loss_contract
def npair_loss(
    embeddings: Tensor, labels: Tensor, *, scale: float = 10.0, l2_reg: float = 0.0
) -> Tensor:
    """Multi-class N-pair loss (Sohn 2016, eq. 6), the cross-entropy form.

    One (anchor, positive) pair per class: its first and second sample in batch order
    (classes with one sample are skipped). With s_ij = scale·<anchor_i, positive_j>:
    L = mean_i log(1 + Σ_{j≠i} exp(s_ij − s_ii)) + l2_reg · mean ||z||² over the pair
    members.

    Args:
        embeddings: (B, D). labels: (B,) int class ids.
    Returns: 0-dim tensor (plain mean over pairs; 0 with no pair). O(B log B + n²·D)
        time for n pairs, O(n² + n·D) memory; selecting the pairs syncs with the host once.
    """
    # A stable sort keeps batch order within a class: a class's first two samples are
    # neighbours in ``order``, found in O(B log B) without a (B, B) mask.
    sorted_labels, order = torch.sort(labels, stable=True)  # (B,) each
    repeat = sorted_labels[1:] == sorted_labels[:-1]  # (B − 1,) [i]: i + 1 same class as i
    starts = torch.cat([repeat.new_ones(1), ~repeat[:-1]]) if len(repeat) else repeat
    first = (starts & repeat).nonzero(as_tuple=True)[0]  # (n,) sorted positions
    anchors, positives = embeddings[order[first]], embeddings[order[first + 1]]  # (n, D)
    logits = scale * (anchors @ positives.T)  # (n, n), targets on the diagonal
    if len(first) == 0:
        return logits.sum()  # graph-connected 0
    target = torch.arange(len(first), device=logits.device)
    loss = F.cross_entropy(logits, target)  # = mean log(1 + Σ_{j≠i} exp(s_ij − s_ii))
    if l2_reg:
        loss = loss + l2_reg * torch.cat([anchors, positives]).pow(2).sum(1).mean()
    return loss


@loss_contract
def multi_similarity_loss(
    embeddings: Tensor,
    labels: Tensor,
    *,
    alpha: float = 2.0,
    beta: float = 50.0,
    base: float = 0.5,
    epsilon: float = 0.1,
) -> Tensor:
    """Multi-Similarity loss with its pair mining (Wang et al. 2019, eqs. 4 and 7).

    With S = <z_i, z_j> (cosine for normalized inputs), keep positive pairs with
    S_ij − ε < max_{negatives k} S_ik and negative pairs with S_ij + ε > min_{positives k}
    S_ik; per anchor: (1/α) log(1 + Σ_P exp(−α(S − base))) + (1/β) log(1 + Σ_N exp(β(S −
    base))).

    Args:
        embeddings: (B, D). labels: (B,) int class ids.
    Returns: 0-dim tensor, the plain mean over all B anchors (÷ B as in the authors' code;
        as in pytorch-metric-learning an anchor keeps its positive part when none of its
        negatives is kept, and vice versa). O(B²·D) time, O(B²) memory.
    """
    sim = embeddings @ embeddings.T  # (B, B)
    positive, negative = _pair_masks(labels)
    plain = sim.detach()  # mining thresholds carry no gradient
    hardest_neg = torch.where(negative, plain, -math.inf).amax(1, keepdim=True)  # (B, 1)
    hardest_pos = torch.where(positive, plain, math.inf).amin(1, keepdim=True)  # (B, 1)
    keep_pos = positive & (plain - epsilon < hardest_neg)
    keep_neg = negative & (plain + epsilon > hardest_pos)
    pos_loss = masked_logsumexp(-alpha * (sim - base), keep_pos, dim=1, add_one=True) / alpha
    neg_loss = masked_logsumexp(beta * (sim - base), keep_neg, dim=1, add_one=True) / beta
    return (pos_loss + neg_loss).sum() / max(len(labels), 1)


class PairLoss(nn.Module):
    """A pure pair/triplet loss function with fixed hyper-parameters, as a module."""

    def __init__(self, loss_fn: Callable[..., Tensor], **hyperparams: Any) -> None:
        super().__init__()
        self.loss_fn = loss_fn
        self.hyperparams = hyperparams
        # A bad value (e.g. mining="easy") fails here, not at the first training step.
        loss_fn(torch.eye(2), torch.tensor([0, 1]), **hyperparams)
        self.last_terms: dict[str, Tensor] = {}

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        loss = self.loss_fn(embeddings, labels, **self.hyperparams)
        self.last_terms = {"base": loss.detach()}
        return loss

    def high_lr_parameters(self) -> list[nn.Parameter]:
        return []

    def extra_repr(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.hyperparams.items())
        return f"{getattr(self.loss_fn, '__name__', self.loss_fn)}({options})"


PAIR_LOSSES: dict[str, Callable[..., Tensor]] = {
    "contrastive": contrastive_loss,
    "triplet": triplet_margin_loss,
    "npair": npair_loss,
    "ms": multi_similarity_loss,
}
"""The pure pair/triplet losses by name (the registry and DAAL's ``base=`` read it)."""

"""Retrieval metrics from one exact kNN pass: Recall@K, R-precision, MAP@R, NMI."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from dmlkit.evaluate.clustering import kmeans, normalized_mutual_info
from dmlkit.evaluate.neighbours import check_inputs, search

_VALUES = 2**20  # (rows, c) entries per TieGroups


def retrieval_metrics(
    embeddings: Tensor,
    labels: Tensor,
    *,
    ks: Sequence[int] = (1, 2, 4, 8),
    nmi: bool = True,
    seed: int = 0,
    block_size: int | None = None,
) -> dict[str, float | int]:
    """Recall@K, R-precision, MAP@R (and NMI) of the test set against itself.

    Every item is a query against all the others (itself excluded); neighbours are
    ordered by exact Euclidean distance (``knn``). A group of neighbours at exactly the
    same distance counts by its expected value over the random orders of the group, so
    ties favour no class (docs/methods.md#ties). One exact search with
    k = max(max(ks), largest class size − 1) serves every metric, consumed a block of
    queries at a time: memory does not grow with the class sizes. Queries whose class has
    no other item are skipped and counted in ``num_skipped``; when every query is skipped
    (every class a singleton) the metrics are undefined: NaN, with a warning.

    Args:
        embeddings: (N, D) float, usually L2-normalized. labels: (N,) integer classes.
        ks: the K of Recall@K (each ≤ N − 1).
        nmi: also cluster with k-means (k = number of classes, seeded) and report NMI
            (NaN with a warning when the classes are all singletons or all one class).
        seed: k-means seed. block_size: queries per search block (``knn``).
    Returns: plain Python floats/ints — ``recall@K`` for each K, ``r_precision``,
        ``map@r``, ``nmi`` (when asked), ``num_queries``, ``num_skipped``.
    """
    labels = as_labels(labels, len(embeddings))
    if not all(isinstance(K, (int, np.integer)) and not isinstance(K, bool) for K in ks):
        raise ValueError(f"ks must be whole numbers, got {list(ks)}")
    ks = sorted({int(K) for K in ks})
    if not ks or ks[0] < 1 or ks[-1] > len(embeddings) - 1:
        raise ValueError(f"ks={ks} must lie in [1, N − 1] with N={len(embeddings)}")
    queries, keys, _ = check_inputs(embeddings, None, ks[-1], True)
    _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    relevant = counts[inverse] - 1  # (N,) R: other items of the query's class
    k = max(ks[-1], int(relevant.max()))
    found = {K: torch.zeros(len(labels), dtype=torch.float64) for K in ks}
    r_precision = torch.zeros(len(labels), dtype=torch.float64)
    average_precision = torch.zeros(len(labels), dtype=torch.float64)
    for start, sq, idx in search(queries, keys, k, skip_self=True, block_size=block_size):
        step = max(1, _VALUES // sq.shape[1])  # bounds TieGroups' (rows, c) temporaries
        for s in range(0, len(sq), step):
            part = sq[s : s + step].cpu()
            rows = torch.arange(start + s, start + s + len(part))
            hits = labels[idx[s : s + step].cpu()] == labels[rows, None]  # (m, c)
            # Rows without a tie up to the k-th place take the plain formulas (faster).
            width = min(k + 1, part.shape[1])  # places 1..k, and the k-th against the next
            tied = (part[:, 1:width] == part[:, : width - 1]).any(1)  # (m,)
            plain, ties = ~tied, TieGroups(part[tied], hits[tied], k)
            for K in ks:
                found[K][rows[plain]] = hits[plain, :K].any(1).double()
                found[K][rows[tied]] = ties.any_hit(torch.full((int(tied.sum()),), K))
            r = relevant[rows].clamp_min(1)
            values = r_precision_and_map(hits[plain, :k], r[plain], mean=False)
            r_precision[rows[plain]], average_precision[rows[plain]] = values
            r_precision[rows[tied]] = ties.expected_hits(r[tied]) / r[tied]
            average_precision[rows[tied]] = ties.average_precision(r[tied])
    valid = relevant > 0
    out: dict[str, float | int] = {f"recall@{K}": _mean(found[K][valid]) for K in ks}
    out["r_precision"] = _mean(r_precision[valid])
    out["map@r"] = _mean(average_precision[valid])
    if not valid.any():
        warnings.warn(
            "every class has a single item: Recall@K, R-precision and MAP@R are undefined (NaN)",
            stacklevel=2,
        )
    if nmi:
        out["nmi"] = _nmi(embeddings, labels, len(counts), seed)
    out["num_queries"] = int(valid.sum())
    out["num_skipped"] = int((~valid).sum())
    return out


class TieGroups:
    """Runs of equal distances in sorted neighbour rows, for expected values over the
    random orders of each run (docs/methods.md#ties).

    sq: (m, c) float64 ascending, complete up to the k-th (every key with d² ≤ sq[:, k−1]
    is in the row); hits: (m, c) bool. Positions past the k-th's run are ignored. Per
    position (m, c): ``before`` items ahead of its run, ``size`` and ``hits`` of the run,
    ``hits_before`` its run.
    """

    def __init__(self, sq: Tensor, hits: Tensor, k: int):
        m, c = sq.shape
        valid = sq <= sq[:, k - 1 : k]  # (m, c)
        hits = hits & valid
        new = torch.ones(m, c, dtype=torch.bool)
        new[:, 1:] = sq[:, 1:] != sq[:, :-1]
        run = new.long().cumsum(1) - 1  # (m, c) run number within the row
        positions = torch.arange(c).expand(m, c)
        self.before = torch.where(new, positions, 0).cummax(1).values.double()
        self.size = torch.zeros(m, c).scatter_add_(1, run, valid.float()).gather(1, run).double()
        self.hits = torch.zeros(m, c).scatter_add_(1, run, hits.float()).gather(1, run).double()
        cumulative = hits.double().cumsum(1)
        start = self.before.long()
        self.hits_before = (cumulative - hits.double()).gather(1, start)
        self.valid = valid

    def any_hit(self, K: Tensor) -> Tensor:
        """(m,) P(a hit among the first K): 1 − C(s − h, t)/C(s, t) when none precedes
        the run holding position K, t = K − before of its positions drawn from the run."""
        at = (K - 1)[:, None]
        before, size, hits, ahead = (x.gather(1, at)[:, 0] for x in self._stats())
        t = K.double() - before
        misses = size - hits
        log_none = (
            torch.lgamma(misses.clamp_min(t) + 1) - torch.lgamma((misses - t).clamp_min(0) + 1)
        ) - (torch.lgamma(size + 1) - torch.lgamma(size - t + 1))
        none = torch.where(misses >= t, log_none.exp(), 0.0)
        return torch.where(ahead > 0, 1.0, 1 - none)

    def expected_hits(self, R: Tensor) -> Tensor:
        """(m,) expected hits among the first R: ahead + h·(R − before)/s."""
        at = (R - 1)[:, None]
        before, size, hits, ahead = (x.gather(1, at)[:, 0] for x in self._stats())
        return ahead + hits * (R.double() - before) / size

    def average_precision(self, R: Tensor) -> Tensor:
        """(m,) expected AP@R = (1/R) Σ_{i ≤ R} E[rel(i)·H(i)]/i, H(i) = hits in the first
        i: for position i, p-th of a run of s with h hits behind a hits ahead,
        E[rel(i)·H(i)] = (h/s)·(a + 1 + (p − 1)(h − 1)/(s − 1))."""
        before, size, hits, ahead = self._stats()
        rank = torch.arange(1, size.shape[1] + 1, dtype=torch.float64)  # (c,) i
        p = rank - before  # (m, c) place within the run
        pair = torch.where(size > 1, (p - 1) * (hits - 1) / (size - 1).clamp_min(1), 0.0)
        term = hits / size * (ahead + 1 + pair) / rank
        term = torch.where(self.valid & (rank <= R[:, None]), term, 0.0)
        return term.sum(1) / R.double()

    def _stats(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.before, self.size, self.hits, self.hits_before


def _mean(values: Tensor) -> float:
    return float(values.mean()) if len(values) else float("nan")


def _nmi(embeddings: Tensor, labels: Tensor, num_classes: int, seed: int) -> float:
    """NMI of k-means clusters; NaN (warned) when the classes leave nothing to cluster."""
    if num_classes in (1, len(labels)):
        warnings.warn(
            f"NMI is undefined with {num_classes} class(es) for {len(labels)} items: NaN",
            stacklevel=3,
        )
        return float("nan")
    return normalized_mutual_info(labels, kmeans(embeddings, num_classes, seed=seed))


def recall_at_k(hits: Tensor, ks: Sequence[int]) -> dict[str, float]:
    """Recall@K (Song et al. 2016) of ranked hits without ties: fraction of queries with
    a hit among the first K. hits: (Q, k) bool (NaN when Q = 0)."""
    first_hit = torch.where(hits.any(1), hits.float().argmax(1), hits.shape[1])  # (Q,)
    return {f"recall@{K}": _mean((first_hit < K).double()) for K in ks}


def r_precision_and_map(
    hits: Tensor, relevant: Tensor, *, mean: bool = True
) -> dict[str, float] | tuple[Tensor, Tensor]:
    """R-precision and MAP@R (Musgrave et al. 2020) of ranked hits without ties.

    R-precision = (hits in the first R) / R;  MAP@R = (1/R) Σ_{i ≤ R} P(i)·rel(i) with
    P(i) = (hits in the first i) / i. hits: (Q, k) bool with k ≥ max R; relevant: (Q,) R ≥ 1.
    mean=False: the (Q,) float64 values per query instead of their means.
    """
    ranks = torch.arange(1, hits.shape[1] + 1, dtype=torch.float64)
    r = relevant.double()
    rel = (hits.cpu() & (ranks[None, :] <= r[:, None])).double()
    precision = rel.sum(1) / r
    average_precision = (rel.cumsum(1) / ranks * rel).sum(1) / r
    if not mean:
        return precision, average_precision
    return {"r_precision": _mean(precision), "map@r": _mean(average_precision)}


def as_labels(labels, count: int) -> Tensor:
    """(N,) int64 CPU labels; ValueError unless 1-D integer (not bool) with ``count`` entries."""
    labels = torch.as_tensor(labels).cpu()
    if labels.dim() != 1:  # a (N/2, 2) array would be flattened into the wrong classes
        raise ValueError(f"labels must be 1-D (N,), got shape {tuple(labels.shape)}")
    if len(labels) != count:
        raise ValueError(f"{len(labels)} labels for {count} embeddings")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    return labels.long()

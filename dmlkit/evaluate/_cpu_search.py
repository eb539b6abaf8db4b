"""Exact kNN block search on CPU: every key whose candidate score passes a certified threshold.

``neighbours.knn`` runs this per block of queries on worker threads. Per block:

1. candidate scores σ̃ (m, M) with one matmul in the candidate precision (``_exact``);
2. a threshold per query: s = the k-th largest of the chunk maxima (the columns are cut
   into c strided chunks, so at least k keys score ≥ s), lowered by twice the certified
   error bound E_i and the output rounding: a key scoring below it cannot be among the
   k nearest, by the same bound as ``_exact.certified``;
3. the candidates — every key above the threshold, read from the chunks whose maximum
   passes — so their number adapts to each query (k plus the keys inside the error band)
   instead of being a fixed k + margin;
4. their float64 squared distances by sampled dot products (``torch.sparse.sampled_addmm``),
   ordered by key so that each key row is read once per block; a duplicate key is scored
   through its representative, so bitwise-equal keys get bitwise-equal distances;
5. the (d², index) order by one numpy sort of integer keys (the fp32 rounding of d², then
   the candidate's column): fp32 rounding is monotone, so this is the exact float64 order
   unless two candidates share an fp32 value where it matters, which is checked, and such
   rows are sorted again in float64;
6. the certificate (``_exact.certified``) with the threshold as the bound on every left-out
   score. Uncertified queries, and searches where k is a large part of the keys, take the
   dense float64 path (all distances, same sort).
"""

from __future__ import annotations

import math
import threading
import warnings

import numpy as np
import torch
from torch import Tensor

from dmlkit.evaluate._exact import build_key_index, certified, query_operand

# Scores held per block: a few MB, so that the passes after the matmul (chunk maxima,
# threshold tests) read them from cache.
_BLOCK_SCORES = 2**21
# float64 query rows per block: they are read once per sampled dot product, from cache.
_BLOCK_ROWS = 2**20
_DENSE_BYTES = 2**25  # float64 distances per dense chunk
# Dense float64 search when k is at least this part of the keys (the candidates would be
# too large a part of them for sampled dot products to pay).
_DENSE_FRACTION = 1 / 8


class ThresholdSearch:
    """Certified block search on CPU; safe to call from several threads at once."""

    def __init__(
        self, keys: Tensor, precision: str, k: int, *, skip_self: bool, max_candidates: int
    ) -> None:
        self.k, self.skip_self, self.max_candidates = k, skip_self, max_candidates
        self.index = build_key_index(keys, precision)
        self.keys64 = keys.double()  # (M, D) the re-rank's operand (no copy if float64)
        count = len(keys)
        available = count - int(skip_self)
        self.dense = k >= _DENSE_FRACTION * available
        self.chunk = _chunk_size(count, k)
        self.length = -(-count // self.chunk)  # L chunks of c strided columns
        self.width = self.chunk * self.length  # score columns, padded with −inf
        # Candidates from the passing chunks (few) or from one pass over all scores.
        self.gather_chunks = 8 * k * self.chunk <= count
        self.refine = self.length < 16 * k  # chunk maxima collide often
        augmented = self.index.operand_t.shape[0] > keys.shape[1]
        norms = self.index.sq_norms
        # Unequal norms not folded into σ̃ widen the band by their spread (see _threshold).
        self.spread = 0.0 if augmented else float(norms.max() - norms.min()) / 2
        self.count = 0  # candidates, for the debug log
        self.retried = self.exhaustive = 0
        self._local = threading.local()
        self._lock = threading.Lock()

    def default_block(self, num_queries: int, threads: int) -> int:
        """Queries per block: about _BLOCK_SCORES scores, and work for every thread."""
        dim = self.keys64.shape[1]
        block = min(max(64, _BLOCK_SCORES // self.width), max(16, _BLOCK_ROWS // (8 * dim)))
        return max(1, min(block, -(-num_queries // max(1, threads))))

    def block(self, queries: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """(d² (m, k) float64, indices (m, k)) of the block of queries starting at ``start``."""
        m = len(queries)
        own = torch.arange(start, start + m) if self.skip_self else None
        if self.dense:
            return self._dense(queries, own)
        operand, error = query_operand(self.index, queries)
        scores = self._scores(operand, own)  # (m, width)
        threshold = self._first_threshold(scores, error)  # (m,) float32
        rows, cols = self._candidates(scores, threshold)
        if self.refine:
            rows, cols, threshold = self._refine(scores, error, rows, cols)
        counts = torch.bincount(rows, minlength=m)
        usable = (counts >= self.k) & (counts <= self.max_candidates)
        if not usable.all():  # such rows take the dense path below
            keep = usable[rows]
            rows, cols, counts = rows[keep], cols[keep], counts * usable
        sq = self._sq_distances(queries, start, rows, cols)
        padded_sq, padded_cols = _padded(rows, counts, sq, cols, self.k)
        top_sq, top_cols = sorted_rows(padded_sq, padded_cols, self.k)
        q_sq = self._query_sq_norms(queries, start)
        ok = usable & certified(self.index, q_sq, error, threshold.double(), top_sq[:, -1])
        with self._lock:
            self.count += len(cols)
        if not ok.all():
            redo = torch.nonzero(~ok).flatten()
            with self._lock:
                self.retried += len(redo)
                self.exhaustive += len(redo)
            redo_own = None if own is None else own[redo]
            top_sq[redo], top_cols[redo] = self._dense(queries[redo], redo_own)
        return top_sq, top_cols

    def _scores(self, operand: Tensor, own: Tensor | None) -> Tensor:
        """σ̃ (m, width) into this thread's buffer; own key and padding columns −inf."""
        m, count = len(operand), len(self.index.keys)
        buffer = getattr(self._local, "scores", None)
        if buffer is None or len(buffer) < m:
            buffer = operand.new_empty(m, self.width)
            buffer[:, count:] = -math.inf  # padding: never written by the matmul
            self._local.scores = buffer
        scores = buffer[:m]
        torch.mm(operand, self.index.operand_t, out=scores[:, :count])
        if own is not None:
            scores[torch.arange(m), own] = -math.inf
        return scores

    def _first_threshold(self, scores: Tensor, error: Tensor) -> Tensor:
        """Threshold from the k-th largest chunk maximum; keeps the chunk maxima."""
        m = len(scores)
        if self.chunk > 1:
            chunk_max = scores.view(m, self.chunk, self.length).amax(dim=1)  # (m, L)
        else:
            chunk_max = scores
        self._local.chunk_max = chunk_max
        if self.k == 1:
            best = chunk_max.amax(dim=1).double()
        else:
            values = chunk_max.float().numpy()
            cut = values.shape[1] - self.k
            best = torch.from_numpy(np.partition(values, cut, axis=1)[:, cut]).double()
        return self._threshold(best, error)

    def _threshold(self, best: Tensor, error: Tensor) -> Tensor:
        """(m,) float32 t such that a key with σ̃ < t cannot beat a key with σ̃ ≥ ``best``.

        A key with σ̃ ≥ best has σ ≥ L(best) − E; one with σ̃ < t has σ ≤ U(t) + E (U, L:
        the output rounding's bounds, relative u). t is the largest value with
        U(t) + E < L(best) − E − spread − slack, rounded down to float32.
        """
        u = self.index.output_unit
        low = torch.where(best >= 0, best / (1 + u), best / (1 - u))
        slack = 2.0**-40 * (best.abs() + error) + 1e-300
        v = low - 2 * error - self.spread - slack
        t = torch.where(v >= 0, v * (1 - u), v * (1 + u))
        t32 = t.float()
        too_high = t32.double() > t
        t32[too_high] = torch.nextafter(t32[too_high], torch.tensor(-math.inf))
        return t32

    def _candidates(self, scores: Tensor, threshold: Tensor) -> tuple[Tensor, Tensor]:
        """(rows, cols) of every score ≥ its row's threshold, in row-major column order."""
        if not self.gather_chunks:  # many candidates: one pass over all scores
            return torch.nonzero(scores >= threshold[:, None]).unbind(1)
        chunk_max = self._local.chunk_max
        passing = chunk_max >= threshold[:, None]  # (m, L)
        if self.chunk == 1:
            flat = torch.nonzero(passing.view(-1)).flatten()
        else:
            r, j = torch.nonzero(passing).unbind(1)
            lanes = torch.arange(self.chunk) * self.length
            flat = (r * self.width + j)[:, None] + lanes  # (n, c) flat score indices
            keep = scores.view(-1)[flat] >= threshold[r][:, None]
            flat = torch.from_numpy(np.sort(flat[keep].numpy()))
        rows = torch.div(flat, self.width, rounding_mode="floor")
        return rows, flat - rows * self.width

    def _refine(self, scores: Tensor, error: Tensor, rows: Tensor, cols: Tensor):
        """Raise the threshold to the one of the exact k-th candidate score; drop the rest.

        Chunk maxima collide when k is a large part of the chunks, so the first threshold
        can sit well below the k-th score.
        """
        m = len(scores)
        values = scores[rows, cols].float()
        counts = torch.bincount(rows, minlength=m)
        width = max(self.k, int(counts.max()))
        starts = torch.cumsum(counts, 0) - counts
        padded = torch.full((m, width), -math.inf)
        padded[rows, torch.arange(len(rows)) - starts[rows]] = values
        cut = width - self.k
        best = np.partition(padded.numpy(), cut, axis=1)[:, cut]
        threshold = self._threshold(torch.from_numpy(best).double(), error)
        keep = values >= threshold[rows]
        return rows[keep], cols[keep], threshold

    def _sq_distances(self, queries: Tensor, start: int, rows: Tensor, cols: Tensor) -> Tensor:
        """float64 d² of each (row, col) pair; duplicate keys through their representative."""
        n, count = len(rows), len(self.index.keys)
        key_rows = self.index.representative[cols]
        if self.skip_self:
            q64 = self.keys64[start : start + len(queries)]
        else:
            q64 = queries.double()
        # Key-major order: each key row is read once, the block's queries stay in cache.
        bits = max(1, (n - 1).bit_length())
        order = np.sort((key_rows << bits | torch.arange(n)).numpy())
        pairs = torch.from_numpy(order & ((1 << bits) - 1))
        crow = torch.zeros(count + 1, dtype=torch.long)
        crow[1:] = torch.cumsum(torch.bincount(key_rows, minlength=count), 0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            pattern = torch.sparse_csr_tensor(
                crow,
                rows[pairs],
                torch.zeros(n, dtype=torch.float64),
                size=(count, len(q64)),
                check_invariants=False,
            )
        dots = torch.empty(n, dtype=torch.float64)
        dots[pairs] = torch.sparse.sampled_addmm(pattern, self.keys64, q64.T, beta=0.0).values()
        q_sq = self._query_sq_norms(queries, start)
        sq = q_sq[rows] + self.index.sq_norms[cols] - 2 * dots
        return sq.clamp_min_(0)

    def _query_sq_norms(self, queries: Tensor, start: int) -> Tensor:
        if self.skip_self:
            return self.index.sq_norms[start : start + len(queries)]
        return queries.double().pow(2).sum(1)

    def _dense(self, queries: Tensor, own: Tensor | None) -> tuple[Tensor, Tensor]:
        """All float64 distances, chunked rows, exact sort: (d² (m, k), indices (m, k))."""
        count = len(self.index.keys)
        rows = max(1, _DENSE_BYTES // (8 * count))
        columns = torch.arange(count)
        parts_sq, parts_cols = [], []
        for s in range(0, len(queries), rows):
            q64 = queries[s : s + rows].double()
            sq = q64.pow(2).sum(1, keepdim=True) + self.index.sq_norms - 2 * (q64 @ self.keys64.T)
            sq = sq.clamp_min_(0)[:, self.index.representative]  # duplicates share one value
            if own is not None:
                sq[torch.arange(len(sq)), own[s : s + rows]] = math.inf
            top = sorted_rows(sq, columns.expand(len(sq), -1), self.k)
            parts_sq.append(top[0])
            parts_cols.append(top[1])
        return torch.cat(parts_sq), torch.cat(parts_cols)


def sorted_rows(sq: Tensor, cols: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k smallest (d², column) of each row, in that order, exactly.

    sq: (m, w) float64 ≥ 0 (+inf for padding); cols: (m, w) int64, ascending along each
    row (so a tie in d² goes to the lower column by position). One numpy sort of
    ``fp32(d²) bits << b | position``: fp32 rounding is monotone, so the order is exact
    wherever the first k fp32 values are float64-ordered and the k-th and (k+1)-th differ
    in fp32; the other rows (ties in fp32 that float64 separates) are sorted in float64.
    """
    m, w = sq.shape
    bits = max(1, (w - 1).bit_length())
    high = sq.float().view(torch.int32).long() & 0x7FFFFFFF  # −0.0 sorts as +0.0
    key = np.sort((high << bits | torch.arange(w)).numpy(), axis=1)[:, : min(w, k + 1)]
    key = torch.from_numpy(key)
    pos = key & ((1 << bits) - 1)
    top_sq, top_cols = sq.gather(1, pos[:, :k]), cols.gather(1, pos[:, :k])
    exact = (top_sq[:, 1:] >= top_sq[:, :-1]).all(1)
    if w > k:
        exact &= (key[:, k - 1] >> bits) < (key[:, k] >> bits)
    if not exact.all():
        redo = torch.nonzero(~exact).flatten()
        order = sq[redo].sort(dim=1, stable=True).indices[:, :k]
        top_sq[redo], top_cols[redo] = sq[redo].gather(1, order), cols[redo].gather(1, order)
    return top_sq, top_cols


def _padded(
    rows: Tensor, counts: Tensor, sq: Tensor, cols: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """Row-major pairs as (m, max(k, max count)) tensors: d² padded with +inf, columns −1."""
    m, width = len(counts), max(k, int(counts.max()) if len(counts) else 0)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(len(rows)) - starts[rows]
    padded_sq = torch.full((m, width), math.inf, dtype=torch.float64)
    padded_cols = torch.full((m, width), -1, dtype=torch.long)
    padded_sq[rows, pos] = sq
    padded_cols[rows, pos] = cols
    return padded_sq, padded_cols


def _chunk_size(count: int, k: int) -> int:
    """c ≈ sqrt(M / k), a power of 2 in [1, 64], with at least 2k chunks (1: no chunks)."""
    if count < 4 * k:
        return 1
    c = 2 ** max(0, min(6, round(math.log2(math.sqrt(count / k)))))
    while c > 1 and count // c < 2 * k:
        c //= 2
    return c

"""Exact kNN block search on CPU: every key whose candidate score passes a certified threshold.

``neighbours.knn`` runs this per block of queries on worker threads. Per block of m queries:

1. candidate scores σ̃ (m, M) with one matmul in the candidate precision (``_exact``);
2. a threshold per query: s = the k-th largest chunk maximum (c strided columns per chunk,
   c = 1 when k is a large part of the keys; at least k keys score ≥ s), lowered by twice
   the certified error bound E_i and the output rounding, so that a key scoring below it
   cannot be among the k nearest (the bound of ``_exact.certified``). Selection works on
   the scores' bits as integers in numpy, several times faster than torch's float ops;
3. the candidates: every key at or above the threshold — k plus the keys inside the
   error band, a number that adapts to each query instead of a fixed k + margin;
4. their float64 squared distances by sampled dot products (``torch.sparse.sampled_addmm``)
   in key-major order, so that each key row is read once per block while the block's
   float64 queries stay in cache; a duplicate key is scored through its representative
   (bitwise-equal keys get bitwise-equal distances);
5. the (d², index) order by one numpy sort per row of integer keys (the float64 bits of
   d², shortened, then the candidate's position in index order), checked against the
   float64 values; a row where shortening tied two different values is sorted again;
6. the certificate (``_exact.certified``) with the threshold as the bound on every left-out
   score. Uncertified queries, queries with too many candidates, and searches where k is a
   large part of the keys take the dense float64 path (all distances, same sort).
"""

from __future__ import annotations

import math
import threading
import warnings

import numpy as np
import torch
from torch import Tensor

from dmlkit.evaluate._exact import build_key_index, certified, intra_op_threads, query_operand

# Scores per block (16 MB in bf16), and float64 query rows per block (4 MB): larger
# blocks make the matmul more efficient and read the keys fewer times in the sampled dot
# products (measured at N = 10,000 and 60,502: 512 rows of 512 dims beat 128 by 30 %).
_BLOCK_SCORES = 2**23
_BLOCK_ROWS = 2**22
_DENSE_BYTES = 2**25  # float64 distances per dense chunk
_GATHERED = 2**18  # pair-row elements up to which the re-rank gathers rows instead
# Dense float64 search when k is at least this part of the keys (the candidates would be
# too large a part of them for sampled dot products to pay).
_DENSE_FRACTION = 1 / 8
_DENSE_KEYS = 512  # and when there are this few keys
# A search of at most _ONE_BLOCK_SCORES scores whose re-rank is light (k·D below
# _ONE_BLOCK_RERANK) is one block, so one thread: a second block's hand-over costs more
# than it saves. Measured at N = 1,000 on the 2-core AMD EPYC (medians of 31, ms, one
# block / two): k = 1: 2.25 / 2.66 (D = 128), 4.81 / 5.28 (D = 512); k = 10: 4.25 / 4.36
# (D = 128) but 7.83 / 7.16 (D = 512); k = 30: 6.21 / 6.49 (D = 128), 11.98 / 8.88 (D =
# 512); N = 2,000, k = 1: 7.06 / 5.99 (D = 128).
_ONE_BLOCK_SCORES = 2**20
_ONE_BLOCK_RERANK = 4096
_INT = {torch.bfloat16: torch.int16, torch.float32: torch.int32}
_SIGN_FREE = 0x7FFF_FFFF_FFFF_FFFF


class ThresholdSearch:
    """Certified block search on CPU; safe to call from several threads at once."""

    def __init__(
        self, keys: Tensor, precision: str, k: int, *, skip_self: bool, max_candidates: int
    ) -> None:
        self.k, self.skip_self, self.max_candidates = k, skip_self, max_candidates
        self.index = build_key_index(keys, precision)
        count = len(keys)
        self.dense = count <= _DENSE_KEYS or k >= _DENSE_FRACTION * (count - int(skip_self))
        self.chunk = _chunk_size(count, k)
        self.length = -(-count // self.chunk)  # L chunks of c strided columns
        self.width = self.chunk * self.length  # score columns, padded with −inf
        self.duplicates = bool((self.index.representative != torch.arange(count)).any())
        # numpy views for the per-pair work (see _sq_distances)
        self._keys = self.index.keys.numpy()
        self._sq_norms = self.index.sq_norms.numpy()
        self._representative = self.index.representative.numpy()
        augmented = self.index.operand_t.shape[0] > keys.shape[1]
        norms = self.index.sq_norms
        # Unequal norms not folded into σ̃ widen the band by their spread (see _threshold).
        self.spread = 0.0 if augmented else float(norms.max() - norms.min()) / 2
        self.count = self.retried = self.exhaustive = 0  # for the debug log
        # Intra-op threads of the block's big matmul: 1 while blocks share the threads;
        # a search that is one block sets all of them (see neighbours.knn).
        self.matmul_threads = 1
        self._float64_keys = None  # (M, D), see _keys64
        self._local = threading.local()
        self._lock = threading.Lock()

    def default_block(self, num_queries: int, threads: int) -> int:
        """Queries per block: about _BLOCK_SCORES scores, and work for every thread."""
        dim = self.index.keys.shape[1]
        small = num_queries * self.width <= _ONE_BLOCK_SCORES
        if small and self.k * dim < _ONE_BLOCK_RERANK:
            return max(1, num_queries)
        block = min(max(64, _BLOCK_SCORES // self.width), max(16, _BLOCK_ROWS // (8 * dim)))
        # As many blocks for every thread: the last one would otherwise run alone.
        threads = max(1, threads)
        blocks = -(-max(1, num_queries // block) // threads) * threads
        return max(1, -(-num_queries // blocks))

    def block(self, queries: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """(d² (m, k) float64, indices (m, k)) of the block of queries starting at ``start``."""
        m = len(queries)
        own = torch.arange(start, start + m) if self.skip_self else None
        if self.dense:
            return self._dense(queries, own)
        operand, error = query_operand(self.index, queries, own)
        scores = self._scores(operand, own)  # (m, width)
        cols, rows, threshold = self._select(scores, error)  # row-major pairs; (m,) float32
        counts = np.bincount(rows, minlength=m)
        usable = (counts >= self.k) & (counts <= self.max_candidates)
        if not usable.all():  # such rows take the dense path below
            keep = usable[rows]
            cols, rows, counts = cols[keep], rows[keep], counts * usable
        sq = self._sq_distances(queries, start, rows, cols)
        top_sq, top_cols = _top_k(sq, cols, rows, counts, self.k)
        q_sq = self._query_sq_norms(queries, start)
        usable = torch.from_numpy(usable)
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
        with intra_op_threads(self.matmul_threads):
            torch.mm(operand, self.index.operand_t, out=scores[:, :count])
        if own is not None:
            scores[torch.arange(m), own] = -math.inf
        return scores

    def _select(self, scores: Tensor, error: Tensor) -> tuple[np.ndarray, np.ndarray, Tensor]:
        """(cols, rows) of every score ≥ its row's threshold, row-major; the thresholds.

        On the scores' bits as integers: a float's bits order positive values like the
        values, so the raw bits serve while every threshold is positive; otherwise
        ``_order_keys`` makes them monotone.
        """
        bits = scores.view(_INT[scores.dtype]).numpy()  # (m, width)
        keys = bits
        best = self._kth_chunk_max(keys)
        if (best <= 0).any():
            keys = _order_keys(bits)
            best = self._kth_chunk_max(keys)
        threshold = self._threshold(_key_values(best, scores.dtype), error)
        cut = _ceil_keys(threshold, scores.dtype)
        if keys is bits and (cut <= 0).any():
            keys = _order_keys(bits)
        rows, cols = np.divmod(np.flatnonzero(keys >= cut[:, None]), self.width)
        return cols, rows, threshold

    def _kth_chunk_max(self, keys: np.ndarray) -> np.ndarray:
        """(m,) the k-th largest chunk maximum of each row (as keys): ≥ k keys reach it."""
        m = len(keys)
        if self.chunk > 1:
            chunk_max = np.maximum.reduce(keys.reshape(m, self.chunk, self.length), axis=1)
        else:
            chunk_max = keys
        if self.k == 1:
            return chunk_max.max(axis=1)
        cut = chunk_max.shape[1] - self.k
        return np.partition(chunk_max, cut, axis=1)[:, cut]

    def _threshold(self, best: Tensor, error: Tensor) -> Tensor:
        """(m,) float32 t such that a key with σ̃ < t cannot beat a key with σ̃ ≥ ``best``.

        A key with σ̃ ≥ best has σ ≥ L(best) − E; one with σ̃ < t has σ ≤ U(t) + E (U, L:
        the output rounding's bounds, relative u). t is the largest value with
        U(t) + E < L(best) − E − spread − slack, rounded down to float32. A row without k
        finite scores gets +inf: no candidate, so it takes the dense path.
        """
        u = self.index.output_unit
        low = torch.where(best >= 0, best / (1 + u), best / (1 - u))
        slack = 2.0**-40 * (best.abs() + error) + 1e-300
        v = low - 2 * error - self.spread - slack
        t = torch.where(v >= 0, v * (1 - u), v * (1 + u))
        t32 = t.float()
        too_high = t32.double() > t
        t32[too_high] = torch.nextafter(t32[too_high], torch.tensor(-math.inf))
        t32[~torch.isfinite(t32)] = math.inf
        return t32

    def _sq_distances(
        self, queries: Tensor, start: int, rows: np.ndarray, cols: np.ndarray
    ) -> np.ndarray:
        """float64 d² of each (row, col) pair; duplicate keys through their representative.

        Per-pair indexing and arithmetic in numpy: its ``take`` is several times faster
        than torch's indexing at these sizes (about 60,000 pairs per block at N = 1,000).
        """
        key_rows = self._representative[cols] if self.duplicates else cols
        if len(rows) * queries.shape[1] <= _GATHERED:  # few pairs: gather their rows
            q64 = torch.from_numpy(queries.numpy().take(rows, axis=0)).double()
            k64 = torch.from_numpy(self._keys.take(key_rows, axis=0)).double()
            dots = (k64 * q64).sum(1).numpy()
        else:
            dots = self._sampled_dots(queries, start, rows, key_rows)
        q_sq = self._query_sq_norms(queries, start).numpy()
        sq = self._sq_norms.take(key_rows)  # ||k||² + ||q||² − 2⟨q, k⟩ (+ commutes exactly)
        sq += q_sq.take(rows)
        sq -= 2 * dots
        return np.maximum(sq, 0, out=sq)

    def _sampled_dots(self, queries, start, rows, key_rows) -> np.ndarray:
        """float64 ⟨q_row, k_key⟩ per pair, computed in key order: each key row is read
        once per block and dotted with the block's queries, which stay in cache."""
        n, count = len(rows), len(self.index.keys)
        if count <= 2**16:  # numpy sorts 16-bit integers by radix
            order = np.argsort(key_rows.astype(np.uint16), kind="stable")
        else:
            bits = max(1, (n - 1).bit_length())
            order = np.sort(key_rows << bits | np.arange(n)) & ((1 << bits) - 1)
        keys64 = self._keys64()
        q64 = keys64[start : start + len(queries)] if self.skip_self else queries.double()
        crow = np.zeros(count + 1, dtype=np.int64)
        np.cumsum(np.bincount(key_rows, minlength=count), out=crow[1:])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            pattern = torch.sparse_csr_tensor(
                torch.from_numpy(crow),
                torch.from_numpy(rows.take(order)),
                torch.zeros(n, dtype=torch.float64),
                size=(count, len(q64)),
            )
        dots = torch.sparse.sampled_addmm(pattern, keys64, q64.T, beta=0.0).values().numpy()
        out = np.empty_like(dots)
        out[order] = dots
        return out

    def _keys64(self) -> Tensor:
        """(M, D) float64 keys, made by the first block that needs them (no copy if float64)."""
        if self._float64_keys is None:
            with self._lock:
                if self._float64_keys is None:
                    self._float64_keys = self.index.keys.double()
        return self._float64_keys

    def _query_sq_norms(self, queries: Tensor, start: int) -> Tensor:
        if self.skip_self:
            return self.index.sq_norms[start : start + len(queries)]
        return queries.double().pow(2).sum(1)

    def _dense(self, queries: Tensor, own: Tensor | None) -> tuple[Tensor, Tensor]:
        """All float64 distances, chunked rows, exact sort: (d² (m, k), indices (m, k))."""
        count = len(self.index.keys)
        rows = max(1, _DENSE_BYTES // (8 * count))
        keys64 = self._keys64()
        parts_sq, parts_cols = [], []
        for s in range(0, len(queries), rows):
            q64 = queries[s : s + rows].double()
            with intra_op_threads(self.matmul_threads):
                sq = torch.addmm(self.index.sq_norms, q64, keys64.T, alpha=-2)
            sq = sq.add_(q64.pow(2).sum(1, keepdim=True)).clamp_min_(0)
            if self.duplicates:
                sq = sq[:, self.index.representative]  # duplicates share one value
            if own is not None:
                sq[torch.arange(len(sq)), own[s : s + rows]] = math.inf
            top_sq, top_cols = sorted_rows(sq, self.k)
            parts_sq.append(top_sq)
            parts_cols.append(top_cols)
        return torch.cat(parts_sq), torch.cat(parts_cols)


def _top_k(sq: np.ndarray, cols, rows, counts, k) -> tuple[Tensor, Tensor]:
    """Per row, the k smallest (d², column) of the pairs (row-major, columns ascending; a
    row with fewer than k pairs is left with whatever its slots hold)."""
    m = len(counts)
    starts = np.cumsum(counts) - counts
    width = max(k, int(counts.max(initial=0)))
    slots = np.arange(len(rows)) + np.repeat(np.arange(m) * width - starts, counts)
    padded = np.full(m * width, np.inf)
    padded[slots] = sq
    top_sq, top_slots = sorted_rows(torch.from_numpy(padded.reshape(m, width)), k)
    if not len(rows):
        return top_sq, top_slots
    flat = np.minimum(starts[:, None] + top_slots.numpy(), len(rows) - 1)
    return top_sq, torch.from_numpy(cols[flat])


def sorted_rows(sq: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(values, positions) of the k smallest of each row of ``sq`` (m, w) float64 ≥ 0, in
    (value, position) order — the exact order, ties to the lower position.

    One numpy sort per row of int64 keys ``(d² bits >> b) << b | position`` (b bits hold a
    position; the bits of a non-negative double order like its value, and dropping the
    last b keeps that order, only tying values closer than ~2⁻⁴⁰ relative). A row whose
    first k float64 values are out of order, or whose k-th and (k+1)-th keys tie, is
    sorted again in float64.
    """
    m, w = sq.shape
    bits = max(1, (w - 1).bit_length())
    # (bits >> b) << b in one pass: the sign (−0.0 sorts as +0.0) and the low b bits cleared.
    key = sq.numpy().view(np.int64) & (_SIGN_FREE & ~((1 << bits) - 1))
    key |= np.arange(w)
    if 4 * k < w:  # the k + 1 smallest first (the keys are distinct), then sort those
        key = np.partition(key, k, axis=1)[:, : k + 1]
    key = np.sort(key, axis=1)[:, : min(w, k + 1)]
    pos = torch.from_numpy(key[:, :k] & ((1 << bits) - 1))
    top = sq.gather(1, pos)
    exact = (top[:, 1:] >= top[:, :-1]).all(1)
    if w > k:
        exact &= torch.from_numpy((key[:, k - 1] >> bits) < (key[:, k] >> bits))
    if not exact.all():
        redo = torch.nonzero(~exact).flatten()
        pos[redo] = sq[redo].sort(dim=1, stable=True).indices[:, :k]
        top[redo] = sq[redo].gather(1, pos[redo])
    return top, pos


def _order_keys(bits: np.ndarray) -> np.ndarray:
    """Integers ordered like the floats whose bits they are (an involution: the negative
    values' magnitude bits flipped); −0.0 sorts just below +0.0."""
    return bits ^ ((bits >> (8 * bits.itemsize - 1)) & np.iinfo(bits.dtype).max)


def _key_values(keys: np.ndarray, dtype: torch.dtype) -> Tensor:
    """float64 values of keys from ``_order_keys`` (or raw bits of positive values)."""
    bits = torch.from_numpy(_order_keys(np.ascontiguousarray(keys)))
    return bits.view(dtype).double()


def _ceil_keys(threshold: Tensor, dtype: torch.dtype) -> np.ndarray:
    """(m,) the smallest key whose value is ≥ the float32 threshold (+inf: above all)."""
    rounded = threshold.to(dtype)
    below = (rounded.float() < threshold).numpy()
    keys = _order_keys(rounded.view(_INT[dtype]).numpy()) + below
    # A zero threshold must let −0.0 pass too: its key is the one just below +0.0's.
    keys[(rounded == 0).numpy() & ~below] = -1
    keys[np.isposinf(threshold.numpy())] = np.iinfo(keys.dtype).max
    return keys


def _chunk_size(count: int, k: int) -> int:
    """Columns per chunk: a power of 2 ≤ 64 leaving at least 16k chunks, so that the k
    largest scores rarely share one (else the k-th chunk maximum sits below the k-th
    score and lets more candidates through); 1 (no chunks) when that is impossible, and
    for k = 1 (the row maximum is one pass either way)."""
    c = 64 if k > 1 else 1
    while c > 1 and count // c < 16 * k:
        c //= 2
    return c

"""Exact kNN block search with a fixed number of candidates per query: the CUDA path.

Per block: candidate scores (``_exact``), the ``count`` best per query by topk on chunk
maxima (``_exact.select_candidates``), their float64 distances gathered a few queries at a
time, the (d², index) sort, the certificate with the smallest kept score; uncertified
queries are searched again with fp32 candidates (twice as many), then exhaustively.
Device-agnostic torch ops throughout; on CPU ``_cpu_search`` is used instead.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import torch
from torch import Tensor

from dmlkit.evaluate import _exact

_BLOCK_BYTES = 2**25  # float64 distances per exhaustive chunk
_BLOCK_BYTES_GPU = 2**30  # a GPU wants fewer, larger launches
# float64 candidate rows staged at once: L2-sized on CPU, large on a GPU (fewer launches).
_GATHER_BYTES = {"cpu": 2**20}
_GATHER_BYTES_OTHER = 2**28


class CountSearch:
    """Certified block search; safe to call from several threads at once."""

    def __init__(
        self,
        keys: Tensor,
        precision: str,
        k: int,
        *,
        skip_self: bool,
        candidate_count: Callable[[int, str, int], int],
    ) -> None:
        self.keys, self.k, self.skip_self = keys, k, skip_self
        self.index = _exact.build_key_index(keys, precision)
        available = len(keys) - int(skip_self)
        self._candidate_count = candidate_count
        self.count = candidate_count(k, precision, available)
        self._fp32 = self.index if precision == "fp32" else None
        self._local = threading.local()  # one score buffer per thread
        self._lock = threading.Lock()
        self.retried = self.exhaustive = 0  # query counts, for the debug log and tests

    def block(self, queries: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """(sq, idx) of the block of ``queries`` starting at query index ``start``."""
        own = None
        if self.skip_self:
            own = torch.arange(start, start + len(queries), device=queries.device)
        sq, idx, ok = self._candidates(self.index, queries, own, self.count)
        if not ok.all():
            redo = torch.nonzero(~ok).flatten()
            sq[redo], idx[redo] = self._fallback(queries[redo], None if own is None else own[redo])
        return sq, idx

    def _fallback(self, queries: Tensor, own: Tensor | None) -> tuple[Tensor, Tensor]:
        """fp32 candidates (twice as many) unless that was the first try; then exhaustive."""
        with self._lock:
            self.retried += len(queries)
            second_try = self._fp32 is None or self._fp32 is not self.index
            if self._fp32 is None:
                self._fp32 = _exact.build_key_index(self.keys, "fp32")
        ok = torch.zeros(len(queries), dtype=torch.bool, device=queries.device)
        sq = torch.empty(len(queries), self.k, dtype=torch.float64, device=queries.device)
        idx = torch.empty(len(queries), self.k, dtype=torch.long, device=queries.device)
        if second_try:
            available = len(self.keys) - int(own is not None)
            count = min(available, 2 * self._candidate_count(self.k, "fp32", available))
            sq, idx, ok = self._candidates(self._fp32, queries, own, count)
        if not ok.all():
            redo = torch.nonzero(~ok).flatten()
            with self._lock:
                self.exhaustive += len(redo)
            sq[redo], idx[redo] = _exhaustive(
                self._fp32, queries[redo], None if own is None else own[redo], self.k
            )
        return sq, idx

    def _candidates(self, index, queries, own, count) -> tuple[Tensor, Tensor, Tensor]:
        """Top-``count`` candidates, float64 re-rank, certificate. Returns sq, idx, ok (m,)."""
        k = self.k
        if count >= len(index.keys) - int(own is not None):  # nothing would be left out
            sq, idx = _exhaustive(index, queries, own, k)
            return sq, idx, torch.ones(len(queries), dtype=torch.bool, device=queries.device)
        operand, error = _exact.query_operand(index, queries)
        scores = _exact.candidate_scores(index, operand, own, out=self._buffer(index, operand))
        values, columns = _exact.select_candidates(scores, count)  # (m, count)
        worst_kept = values.min(dim=1).values
        columns = columns.sort(dim=1).values  # index order: cache-friendly gathers
        sq = exact_sq_distances(index, queries, columns)
        sq, columns = sort_by_distance(sq, columns)
        q_sq = queries.double().pow(2).sum(1)
        ok = _exact.certified(index, q_sq, error, worst_kept, sq[:, k - 1])
        return sq[:, :k], columns[:, :k], ok

    def _buffer(self, index: _exact.KeyIndex, operand: Tensor) -> Tensor:
        """This thread's reused (rows, M) score buffer (a fresh 32 MiB tensor per block
        would be page-faulted in again every time)."""
        buffers = self._local.__dict__.setdefault("buffers", {})
        key = (operand.dtype, len(index.keys))
        if key not in buffers or len(buffers[key]) < len(operand):
            buffers[key] = operand.new_empty(len(operand), len(index.keys))
        return buffers[key][: len(operand)]


def _exhaustive(index, queries, own, k) -> tuple[Tensor, Tensor]:
    """float64 distances to every key, full stable sort; rows chunked to ~32 MiB."""
    rows = max(1, _BLOCK_BYTES // (8 * max(1, len(index.keys))))
    parts_sq, parts_idx = [], []
    for start in range(0, len(queries), rows):
        chunk_own = None if own is None else own[start : start + rows]
        sq = exhaustive_sq_distances(index, queries[start : start + rows], chunk_own)
        sq, order = sq.sort(dim=1, stable=True)  # ties keep index order
        parts_sq.append(sq[:, :k])
        parts_idx.append(order[:, :k])
    return torch.cat(parts_sq), torch.cat(parts_idx)


def default_block(num_keys: int, element_size: int, device: torch.device) -> int:
    budget = _BLOCK_BYTES if device.type == "cpu" else _BLOCK_BYTES_GPU
    block = budget // max(1, num_keys * element_size)
    return int(min(4096, max(32, block // 32 * 32)))


def exact_sq_distances(index: _exact.KeyIndex, queries: Tensor, columns: Tensor) -> Tensor:
    """float64 d² (m, kc) of each query to its candidate keys, duplicates made equal.

    Memory-bound (m·kc key rows are read), so the gathers go, a few queries at a time,
    into reused buffers (~1 MiB on CPU) that stay in cache for the float64 products
    (fp32 products are exact in float64; the sums err by ≤ D·2⁻⁵³ relative).
    """
    m, count = columns.shape
    width = index.keys.shape[1]
    budget = _GATHER_BYTES.get(queries.device.type, _GATHER_BYTES_OTHER)
    rows = max(1, min(m, budget // (8 * count * width)))
    staged = index.keys.new_empty(rows * count, width)
    wide = torch.empty(rows * count, width, dtype=torch.float64, device=queries.device)
    dots = torch.empty(m, count, 1, dtype=torch.float64, device=queries.device)
    q64 = queries.double()
    for start in range(0, m, rows):
        stop = min(m, start + rows)
        used = (stop - start) * count
        torch.index_select(index.keys, 0, columns[start:stop].reshape(-1), out=staged[:used])
        gathered = wide[:used].copy_(staged[:used]).view(stop - start, count, width)
        torch.bmm(gathered, q64[start:stop, :, None], out=dots[start:stop])
    sq = (q64.pow(2).sum(1, keepdim=True) + index.sq_norms[columns]) - 2 * dots[..., 0]
    return canonical_ties(sq.clamp_min(0), index.representative[columns])


def canonical_ties(sq: Tensor, reps: Tensor) -> Tensor:
    """Give every candidate the value of the first candidate with the same representative.

    Bitwise-equal keys have equal distances in exact arithmetic; gathered dot products
    could differ in the last bit, so they are made identical here. sq, reps: (m, kc).
    """
    order = reps.argsort(dim=1, stable=True)
    sorted_reps = reps.gather(1, order)
    starts = torch.ones_like(sorted_reps, dtype=torch.bool)
    starts[:, 1:] = sorted_reps[:, 1:] != sorted_reps[:, :-1]
    positions = torch.arange(sq.shape[1], device=sq.device).expand_as(sq)
    first = torch.where(starts, positions, torch.zeros_like(positions)).cummax(dim=1).values
    canonical = sq.gather(1, order).gather(1, first)
    return torch.empty_like(sq).scatter_(1, order, canonical)


def sort_by_distance(sq: Tensor, columns: Tensor) -> tuple[Tensor, Tensor]:
    """Sort each row by (d², index): index order first, then a stable sort on d²."""
    by_index = columns.argsort(dim=1)
    sq, columns = sq.gather(1, by_index), columns.gather(1, by_index)
    by_dist = sq.argsort(dim=1, stable=True)
    return sq.gather(1, by_dist), columns.gather(1, by_dist)


def exhaustive_sq_distances(
    index: _exact.KeyIndex, queries: Tensor, self_rows: Tensor | None, key_rows: int = 8192
) -> Tensor:
    """float64 d² (m, M) to every key, duplicates tied, own key +inf. O(m·M) memory."""
    q64 = queries.double()
    dots = torch.cat(
        [
            q64 @ index.keys[s : s + key_rows].double().T
            for s in range(0, len(index.keys), key_rows)
        ],
        dim=1,
    )  # (m, M), float64 keys converted a chunk at a time
    sq = q64.pow(2).sum(1, keepdim=True) + index.sq_norms[None, :] - 2 * dots
    sq = sq.clamp_min(0)[:, index.representative]  # bitwise-equal keys share one value
    if self_rows is not None:
        sq[torch.arange(len(sq), device=sq.device), self_rows] = math.inf
    return sq

"""Exact, blocked k-nearest-neighbour search (Euclidean), CPU or CUDA."""

from __future__ import annotations

import logging
import threading
from numbers import Integral

import torch
from torch import Tensor

from dmlkit.evaluate import _exact
from dmlkit.evaluate._cpu_search import ThresholdSearch

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp32")
# Candidate scores held at once per thread on CPU: 32 MiB. At SOP scale (60,502 keys, 2
# threads) 64 MiB was ~5 % faster but peaked ~0.13 GB higher, too close to the 1.5 GB bound.
_BLOCK_BYTES = 2**25
_BLOCK_BYTES_GPU = 2**30  # a GPU wants fewer, larger launches


def knn(
    queries: Tensor,
    keys: Tensor | None = None,
    k: int = 1,
    *,
    block_size: int | None = None,
    exclude_self: bool = True,
    precision: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Exact k nearest neighbours by Euclidean distance, ties broken by the lower index.

    Exact means: the order of the squared distances evaluated in float64 from the inputs;
    keys with bitwise-equal vectors are always tied (so the lower index comes first). The
    search scores blocks of queries against all keys in a fast candidate precision, keeps
    more candidates than needed, re-ranks them in float64 and certifies with a rigorous
    rounding-error bound that no other key can be as close; uncertified queries are
    searched again in fp32, then exhaustively. The result is therefore the same for every
    ``precision``; only the time differs. Details: ``dmlkit/evaluate/_exact.py``.

    On CPU the blocks run on ``torch.get_num_threads()`` Python threads with torch's
    intra-op threads set to 1 for the duration of the call (restored afterwards): a block
    is many small ops, and each parallel op would pay an OpenMP barrier that costs
    milliseconds whenever other processes share the cores.

    Args:
        queries: (Q, D) floating tensor (CPU or CUDA).
        keys: (M, D) on the same device, or None to search ``queries`` among themselves.
        k: neighbours per query; at most the number of keys available.
        block_size: queries per block (default: about 32 MiB of candidate scores on CPU).
        exclude_self: when ``keys`` is None, a query is not its own neighbour (its
            duplicates at other indices still are). Ignored when ``keys`` is given.
        precision: candidate scoring — "bf16" (fast on CPUs with AMX), "fp32", or "auto"
            (bf16 on a CPU with AMX, else fp32).
    Returns:
        distances (Q, k) in the queries' float dtype (float32 for half inputs), ascending,
        and indices (Q, k) int64 into ``keys``; both on the input device.
    Complexity: O(Q·M·D) time; memory O(threads·block·M + (Q + M)·k + M·D), never O(Q·M).
    """
    if isinstance(queries, Tensor) and queries.device.type == "mps":
        # MPS has no float64 (the exact re-rank): search on CPU, answer on MPS.
        cpu_keys = None if keys is None else keys.cpu()
        d, i = knn(
            queries.cpu(),
            cpu_keys,
            k,
            block_size=block_size,
            exclude_self=exclude_self,
            precision=precision,
        )
        return d.to(queries.device), i.to(queries.device)
    device = queries.device if isinstance(queries, Tensor) else torch.device("cpu")
    with _exact.coarse_threads(device) as workers:
        queries, keys_, self_search = _check_inputs(queries, keys, k, exclude_self, precision)
        if len(queries) == 0:
            empty = torch.zeros(0, k, device=device)
            return empty.to(_output_dtype(queries)), empty.long()
        skip_self = self_search and exclude_self
        search, block, precision = _prepare(queries, keys_, k, skip_self, precision, workers)
        block = block_size or block
        distances = torch.empty(len(queries), k, dtype=_output_dtype(queries), device=device)
        indices = torch.empty(len(queries), k, dtype=torch.long, device=device)

        def run(start: int) -> None:
            rows = slice(start, start + block)
            sq, indices[rows] = search.block(queries[rows], start)
            distances[rows] = sq.sqrt()  # from the float64 d², rounded once

        _exact.run_blocks(run, range(0, len(queries), block), device, workers)
    log.debug(
        "knn %s: %d queries, %d keys, k=%d, %d candidates; uncertified %d, exhaustive %d",
        *(precision, len(queries), len(keys_), k, search.count),
        *(search.retried, search.exhaustive),
    )
    return distances, indices


def _prepare(queries, keys, k, skip_self, precision, workers) -> tuple:
    """(search, default block, resolved precision): the threshold search on CPU."""
    device = queries.device
    precision = _exact.resolve_precision(precision, device)
    if device.type == "cpu":
        # A query with more candidates than this is searched densely (bounds its work).
        most = 4 * _candidate_count(k, precision, len(keys) - int(skip_self))
        search = ThresholdSearch(keys, precision, k, skip_self=skip_self, max_candidates=most)
        return search, search.default_block(len(queries), workers), precision
    search = _Search(keys, precision, k, skip_self=skip_self)
    element = search.index.operand_t.element_size()
    return search, _default_block(len(keys), element, device), precision


class _Search:
    """Certified block search; safe to call from several threads at once."""

    def __init__(self, keys: Tensor, precision: str, k: int, *, skip_self: bool) -> None:
        self.keys, self.k, self.skip_self = keys, k, skip_self
        self.index = _exact.build_key_index(keys, precision)
        available = len(keys) - int(skip_self)
        self.count = _candidate_count(k, precision, available)
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
            count = min(available, 2 * _candidate_count(self.k, "fp32", available))
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
        sq = _exact.exact_sq_distances(index, queries, columns)
        sq, columns = _exact.sort_by_distance(sq, columns)
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
        sq = _exact.exhaustive_sq_distances(index, queries[start : start + rows], chunk_own)
        sq, order = sq.sort(dim=1, stable=True)  # ties keep index order
        parts_sq.append(sq[:, :k])
        parts_idx.append(order[:, :k])
    return torch.cat(parts_sq), torch.cat(parts_idx)


def _candidate_count(k: int, precision: str, available: int) -> int:
    """Candidates kept per query: enough that the certificate nearly always passes."""
    margin = max(32, k // 2) if precision == "bf16" else max(8, k // 16)
    return min(available, k + margin)


def _default_block(num_keys: int, element_size: int, device: torch.device) -> int:
    budget = _BLOCK_BYTES if device.type == "cpu" else _BLOCK_BYTES_GPU
    block = budget // max(1, num_keys * element_size)
    return int(min(4096, max(32, block // 32 * 32)))


def _output_dtype(queries: Tensor) -> torch.dtype:
    return torch.float64 if queries.dtype == torch.float64 else torch.float32


def _check_inputs(queries, keys, k, exclude_self, precision) -> tuple[Tensor, Tensor, bool]:
    """Validate; returns (queries, keys) as float32/float64 and whether keys is None."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    self_search = keys is None
    tensors = [queries] if self_search else [queries, keys]
    for name, x in zip(("queries", "keys"), tensors, strict=False):
        if not isinstance(x, Tensor) or x.dim() != 2 or not x.is_floating_point():
            raise ValueError(f"{name} must be a 2-D floating tensor")
        # A float64 sum of fp32 values cannot overflow: it is finite iff they all are.
        finite = x.sum(1, dtype=torch.float64) if x.dtype != torch.float64 else x
        if not torch.isfinite(finite).all():
            raise ValueError(f"{name} contain NaN or infinite values")
    queries = queries if queries.dtype in (torch.float32, torch.float64) else queries.float()
    keys = queries if self_search else keys
    keys = keys if keys.dtype in (torch.float32, torch.float64) else keys.float()
    if keys.shape[1] != queries.shape[1] or keys.device != queries.device:
        raise ValueError(
            f"queries {tuple(queries.shape)} on {queries.device} and keys "
            f"{tuple(keys.shape)} on {keys.device} need the same width and device"
        )
    available = len(keys) - int(self_search and exclude_self)
    if isinstance(k, bool) or not isinstance(k, Integral) or not 1 <= k <= available:
        raise ValueError(f"k={k} but only {available} keys are available per query")
    if keys.dtype != queries.dtype:  # compare like with like (float64 if either is)
        keys, queries = keys.double(), queries.double()
    return queries.contiguous(), keys.contiguous(), self_search

"""Exact, blocked k-nearest-neighbour search (Euclidean), CPU or CUDA."""

from __future__ import annotations

import logging
from numbers import Integral

import torch
from torch import Tensor

from dmlkit.evaluate import _exact
from dmlkit.evaluate._count_search import CountSearch, default_block
from dmlkit.evaluate._cpu_search import ThresholdSearch
from dmlkit.runtime import settle_heap

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp32")
# Searches of at least this many scores hand their freed heap back to the OS afterwards.
_RELEASE_SCORES = 2**24


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
    search scores blocks of queries against all keys in a fast candidate precision and
    re-ranks candidates in float64, certified by a rigorous rounding-error bound that no
    other key can be as close: on CPU every key above a per-query score threshold
    (``_cpu_search.py``), on CUDA a fixed number of best-scored keys (``_count_search.py``).
    Uncertified queries are searched again, in the end exhaustively. The result is
    therefore the same for every ``precision``; only the time differs. Details:
    docs/methods.md, "Exact kNN".

    On CPU the whole call runs with torch's intra-op threads set to 1 (restored
    afterwards) and the blocks on ``torch.get_num_threads()`` Python threads, started once
    per process and kept: a block is many small ops, and each parallel op would pay an
    OpenMP barrier that costs milliseconds whenever other processes share the cores. A
    search that is a single block runs its one matmul on all the threads instead.

    Args:
        queries: (Q, D) floating tensor (CPU or CUDA).
        keys: (M, D) on the same device, or None to search ``queries`` among themselves.
        k: neighbours per query; at most the number of keys available.
        block_size: queries per block (default on CPU: ~8M scores or 4 MB of float64
            queries, the same number of blocks for every thread; CUDA: ~1 GiB of scores).
        exclude_self: when ``keys`` is None, a query is not its own neighbour (its
            duplicates at other indices still are). Ignored when ``keys`` is given.
        precision: candidate scoring — "bf16", "fp32", or "auto" (bf16 on a CPU whose
            bf16 matmuls are ≥ 1.5× as fast as fp32, measured once; else fp32).
    Returns:
        distances (Q, k) in the queries' float dtype (float32 for half inputs), ascending,
        and indices (Q, k) int64 into ``keys``; both on the input device.
    Complexity: O(Q·M·D) time; memory O(threads·block·M + (Q + M)·k + M·D), never O(Q·M)
    (on CPU the float64 keys: M·D·8 bytes).
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
    if device.type == "cpu":
        settle_heap()  # MB-sized temporaries: from the heap, not fresh pages each time
    with _exact.coarse_threads(device) as workers:
        queries, keys_, self_search = _check_inputs(queries, keys, k, exclude_self, precision)
        if len(queries) == 0:
            empty = torch.zeros(0, k, device=device)
            return empty.to(_output_dtype(queries)), empty.long()
        skip_self = self_search and exclude_self
        search, block, precision = _prepare(queries, keys_, k, skip_self, precision, workers)
        block = block_size or block
        if block >= len(queries) and device.type == "cpu":
            search.matmul_threads = workers  # one block: its matmul gets every thread
        distances = torch.empty(len(queries), k, dtype=_output_dtype(queries), device=device)
        indices = torch.empty(len(queries), k, dtype=torch.long, device=device)

        def run(start: int) -> None:
            rows = slice(start, start + block)
            sq, indices[rows] = search.block(queries[rows], start)
            distances[rows] = sq.sqrt()  # from the float64 d², rounded once

        large = len(queries) * len(keys_) >= _RELEASE_SCORES
        _exact.run_blocks(run, range(0, len(queries), block), device, workers, release=large)
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
    search = CountSearch(keys, precision, k, skip_self=skip_self, candidate_count=_candidate_count)
    element = search.index.operand_t.element_size()
    return search, default_block(len(keys), element, device), precision


def _candidate_count(k: int, precision: str, available: int) -> int:
    """Candidates kept per query on CUDA: enough that the certificate nearly always passes.
    On CPU a query with more than 4× this many above its threshold is searched densely."""
    margin = max(32, k // 2) if precision == "bf16" else max(8, k // 16)
    return min(available, k + margin)


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
    if isinstance(k, bool) or not isinstance(k, Integral) or k < 1:
        raise ValueError(f"k={k!r}: must be a whole number >= 1")
    available = len(keys) - int(self_search and exclude_self)
    if k > available and len(queries):  # no query, nothing to find: an empty answer
        own = " (each query excluding itself)" if self_search and exclude_self else ""
        raise ValueError(
            f"k={k} but only {max(available, 0)} keys per query{own}: "
            f"{len(keys)} {'points' if self_search else 'keys'} given"
        )
    if keys.dtype != queries.dtype:  # compare like with like (float64 if either is)
        keys, queries = keys.double(), queries.double()
    return queries.contiguous(), keys.contiguous(), self_search

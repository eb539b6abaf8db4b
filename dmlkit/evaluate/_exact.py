"""Building blocks of the exact kNN search: key index, candidate scores, error bound, certificate.

The search ranks keys by the exact squared distance d²_ij = ||q_i||² + ||k_j||² − 2⟨q_i,k_j⟩
evaluated in float64 from the (float32) inputs, ties broken by the lower key index, and
bitwise-equal key vectors always tied. To get there fast it

1. scores a block of queries against all keys with one matmul in a *candidate precision*
   (bf16 where a one-time probe finds it fast, else fp32): σ_ij ≈ ⟨q_i,k_j⟩ −
   (||k_j||² − n̄)/2, larger = closer;
2. keeps candidates — on CPU every key above a certified per-query threshold
   (``_cpu_search``), on CUDA the ``kc`` best-scored keys (chunk maxima, then topk);
3. re-ranks those candidates with float64 distances;
4. *certifies* each query: every key left out has, by a rigorous bound on the error of
   step 1, a true distance strictly larger than the k-th re-ranked one. Queries that fail
   are searched again (CUDA: in fp32, then exhaustively; CPU: densely in float64). So
   the result never depends on the candidate precision.

Error bound of a candidate score (Higham, "Accuracy and Stability of Numerical
Algorithms", §3.1): with x̃ the operand rounded to the candidate dtype and δx = x − x̃,
|x̃_q·x̃_k − x_q·x_k| ≤ ||x̃_q||·||δx_k|| + ||δx_q||·||x̃_k|| + ||δx_q||·||δx_k|| (Cauchy–Schwarz),
plus γ_n·||x̃_q||·||x̃_k|| for fp32 accumulation over n terms (γ_n = n·u/(1 − n·u),
u = 2⁻²⁴), plus the rounding of the output to the candidate dtype (relative u_out).
"""

from __future__ import annotations

import functools
import math
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from dmlkit.runtime import release_free_heap

_FP32_UNIT = 2.0**-24
_BF16_UNIT = 2.0**-8
# Norms spread by more than this (relative) are folded into the candidate score.
_NORM_SPREAD = 1e-4


@dataclass
class KeyIndex:
    """Keys prepared for repeated candidate scoring; built once per search."""

    keys: Tensor  # (M, D) float32/float64 input keys
    operand_t: Tensor  # (D', M) candidate-precision keys, transposed (+ norm coordinates)
    sq_norms: Tensor  # (M,) float64 ||k_j||²
    norm_offset: float  # n̄ folded into σ (augmented) or n_min (not augmented)
    max_operand_norm: float  # max_j ||x̃_k||
    max_residual_norm: float  # max_j ||x_k − x̃_k||
    input_unit: float  # relative rounding the hardware applies to operands (TF32), else 0
    accumulation_unit: float  # u of the γ-bound of the accumulation
    output_unit: float  # relative rounding of the score output (bf16), else 0
    representative: Tensor  # (M,) lowest index of a bitwise-equal key vector
    # Per key, when the operand is the key itself (no norm coordinates): upper bounds of
    # ||x̃_k|| and ||x_k − x̃_k|| (M,) float64 — a query that is key j reuses them.
    operand_norms: Tensor | None = None
    residual_norms: Tensor | None = None


def build_key_index(keys: Tensor, precision: str) -> KeyIndex:
    """Prepare ``keys`` (M, D) for candidate scoring in ``precision`` ("bf16" | "fp32").

    Exact operand of key j: x_k = [k_j] or, when squared norms spread, x_k = [k_j, parts of
    −(||k_j||² − n̄)/2] with queries x_q = [q, 1, ...], so that σ = x_q·x_k ranks like −d².
    """
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    sq_norms = _rowwise_sq_norms(keys)
    n_min, n_max = sq_norms.min().item(), sq_norms.max().item()
    augmented = (n_max - n_min) > _NORM_SPREAD * max(n_max, 1e-30)
    offset = sq_norms.mean().item() if augmented else n_min
    shift = (-(sq_norms - offset) / 2)[:, None] if augmented else None  # (M, 1) float64
    norms = residuals = None
    if shift is None and keys.dtype == dtype:
        # fp32 matmuls do not mind a transposed view, so the fp32 keys are not copied.
        operand_t, norm, residual = keys.T, math.sqrt(n_max), 0.0
        norms, residuals = sq_norms.sqrt(), torch.zeros_like(sq_norms)
    elif shift is None and keys.dtype == torch.float32:
        operand_t, norms, residuals = _round_keys_t(keys, dtype)
        norm, residual = norms.max().item(), residuals.max().item()
    else:
        # bf16 matmuls (oneDNN) run about 2× faster on a contiguous (D', M) operand.
        operand_t, norm, residual = _round_operand_t(keys, shift, dtype)
    input_unit, accumulation_unit = _hardware_units(keys.device, dtype)
    return KeyIndex(
        keys=keys,
        operand_t=operand_t,
        sq_norms=sq_norms,
        norm_offset=offset,
        max_operand_norm=norm,
        max_residual_norm=residual,
        input_unit=input_unit,
        accumulation_unit=accumulation_unit,
        output_unit=_BF16_UNIT if dtype == torch.bfloat16 else 0.0,
        representative=duplicate_representatives(keys, sq_norms),
        operand_norms=norms,
        residual_norms=residuals,
    )


def query_operand(
    index: KeyIndex, queries: Tensor, rows: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Queries in candidate precision (with ones for the norm coordinates), and E_i.

    rows: when the queries are the keys at these indices, their norms come from the index.
    Returns: operand (m, D'), error (m,) float64 — the bound on |σ̃_acc − σ| per query
    before output rounding.
    """
    dtype = index.operand_t.dtype
    extra = index.operand_t.shape[0] - queries.shape[1]
    exact = torch.cat([queries, queries.new_ones(len(queries), extra)], 1) if extra else queries
    operand = exact.to(dtype)
    if rows is not None and index.operand_norms is not None:
        norm, residual = index.operand_norms[rows], index.residual_norms[rows]
    else:
        residual = (exact.double() - operand.double()).norm(dim=1)  # (m,) ||δx_q||
        norm = operand.double().norm(dim=1)  # (m,) ||x̃_q||
    dim = operand.shape[1] + 1  # +1: the final rounding of an fp32 output
    nu = dim * index.accumulation_unit
    gamma = nu / (1 - nu) if nu < 1 else math.inf  # no bound: the certificate fails
    k_norm, k_res = index.max_operand_norm, index.max_residual_norm
    hidden = 2 * index.input_unit + index.input_unit**2  # TF32 rounds x̃ once more
    error = norm * k_res + residual * k_norm + residual * k_res
    error = error + (gamma + hidden) * norm * k_norm
    # Absolute slack: flushed subnormal products on AMX/tensor cores.
    return operand, error + 1e-30 * dim


def run_blocks(
    function: Callable[[int], None],
    starts: Iterable[int],
    device,
    workers: int | None = None,
    *,
    release: bool = True,
) -> None:
    """Call ``function(start)`` for every block start; independent blocks.

    On CPU they run on ``torch.get_num_threads()`` Python threads while torch's intra-op
    threads are set to 1 (restored afterwards): a block is many small ops, and each
    parallel op would pay an OpenMP barrier that costs milliseconds whenever other
    processes share the cores. The threads are kept for the next call (``_pool``).
    Elsewhere (CUDA) the blocks run in order. Inside ``coarse_threads`` pass the worker
    count it yielded as ``workers``. release: hand the heap the blocks freed back to the
    OS afterwards (worth it after a large search; a small one would only fault the same
    pages in again next time).
    """
    if workers is None:
        with coarse_threads(torch.device(device)) as available:
            return run_blocks(function, starts, device, available, release=release)
    starts = list(starts)
    if workers > 1 and len(starts) > 1:  # one block: no thread to wake
        try:
            list(_pool(workers).map(_one_thread(function), starts))  # list(): re-raise errors
        finally:
            if release:
                release_free_heap()  # the threads' arenas keep their freed blocks otherwise
    else:
        for start in starts:
            function(start)


_POOL: ThreadPoolExecutor | None = None
_POOL_WORKERS = 0
_POOL_LOCK = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    """The process's block workers, started once: a fresh thread costs more than a small
    search (measured ~2.5 ms at N = 1,000: thread start, a new malloc arena whose pages
    fault in, oneDNN's per-thread set-up)."""
    global _POOL, _POOL_WORKERS
    with _POOL_LOCK:
        if _POOL is None or _POOL_WORKERS != workers:
            if _POOL is not None:
                _POOL.shutdown(wait=False)
            _POOL = ThreadPoolExecutor(workers, thread_name_prefix="dmlkit-blocks")
            _POOL_WORKERS = workers
        return _POOL


def _forget_pool() -> None:
    """In a forked child the parent's worker threads do not exist: start new ones."""
    global _POOL, _POOL_WORKERS, _POOL_LOCK
    _POOL, _POOL_WORKERS, _POOL_LOCK = None, 0, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _one_thread(function: Callable[[int], None]) -> Callable[[int], None]:
    """``function`` run with one intra-op thread in this worker (torch's count is per thread
    once set; a worker started under another setting would otherwise oversubscribe)."""

    def call(start: int) -> None:
        if torch.get_num_threads() != 1:
            torch.set_num_threads(1)
        function(start)

    return call


@contextmanager
def coarse_threads(device: torch.device):
    """Yield the worker count; on CPU, torch ops run single-threaded inside.

    Under load a parallel op's OpenMP barrier costs tens of milliseconds, more than a
    whole small search: everything of a search (inputs, key index, blocks) runs inside.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads <= 1:
        yield 1
        return
    with intra_op_threads(1):
        yield threads


@contextmanager
def intra_op_threads(threads: int):
    """Run the enclosed op on ``threads`` intra-op threads, then restore the count.

    For the one matmul of a search that is a single block: the other thread would idle,
    and a bf16 matmul at N = 1,000 takes half the time on two (0.51 → 0.26 ms at D = 128).
    """
    previous = torch.get_num_threads()
    if threads == previous:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def resolve_precision(precision: str, device: torch.device) -> str:
    """Resolve "auto": bf16 on a CPU that runs bf16 matmuls fast (see below), else fp32."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cpu" and bf16_matmul_is_fast() else "fp32"


@functools.cache
def bf16_matmul_is_fast() -> bool:
    """True when this CPU multiplies bf16 matrices at least 1.5× as fast as fp32 ones.

    Measured once per process (a few ms, on one thread, as the search runs them): a CPU
    with AMX runs them ~7× fp32, the AMD EPYC with AVX512-BF16 of the benchmarks ~4.5×,
    and one without bf16 dot-product instructions emulates them slower than fp32. Best
    of 3 of each, alternated, so that another process on the cores does not decide it.
    The result never depends on it (the search is exact either way), only the speed.
    """
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(128, 512, generator=g), torch.randn(512, 512, generator=g)
    pairs = {torch.float32: (a, b), torch.bfloat16: (a.bfloat16(), b.bfloat16())}
    with coarse_threads(torch.device("cpu")):  # one thread: the way the search runs them
        for x, y in pairs.values():
            torch.mm(x, y)  # warm-up: oneDNN builds its bf16 kernel on the first call
        best = dict.fromkeys(pairs, math.inf)
        for _ in range(3):
            for dtype, (x, y) in pairs.items():
                start = time.perf_counter()
                torch.mm(x, y)
                best[dtype] = min(best[dtype], time.perf_counter() - start)
    return 1.5 * best[torch.bfloat16] < best[torch.float32]


def candidate_scores(
    index: KeyIndex, operand: Tensor, self_rows: Tensor | None, out: Tensor | None = None
) -> Tensor:
    """σ̃ (m, M) in candidate precision (into ``out`` if given); own key −inf if self_rows."""
    scores = torch.mm(operand, index.operand_t, out=out)  # (m, M)
    if self_rows is not None:
        scores[torch.arange(len(scores), device=scores.device), self_rows] = -math.inf
    return scores


def select_candidates(scores: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """The ``count`` largest scores per row and their columns, without sorting rows.

    Columns are split into c strided chunks per row (chunk t = {t, t+L, t+2L, ...}); the
    ``count`` chunks with the largest maxima contain the ``count`` largest scores (each of
    those is ≥ the count-th chunk maximum), so topk runs on L chunk maxima and on
    count·c gathered scores instead of on all M. Ties at the cut are taken arbitrarily;
    the certificate covers them. Returns: values (m, count), columns (m, count) int64.
    """
    m, width = scores.shape
    chunk = _chunk_width(width, count)
    length = width // chunk
    if chunk == 1 or length <= count:
        values, columns = scores.topk(count, dim=1, sorted=False)
        return values, columns
    body = scores.as_strided((m, chunk, length), (scores.stride(0), length, 1))
    chunk_max = body.amax(dim=1)  # (m, L)
    best = chunk_max.topk(count, dim=1, sorted=False).indices  # (m, count)
    gathered = body.gather(2, best[:, None, :].expand(m, chunk, count)).reshape(m, -1)
    tail = scores[:, chunk * length :]  # (m, < c) columns outside the chunks
    values, pos = torch.cat([gathered, tail], 1).topk(count, dim=1, sorted=False)
    in_body = pos < chunk * count
    body_col = best.gather(1, (pos % count).clamp_max(count - 1)) + (pos // count) * length
    columns = torch.where(in_body, body_col, pos - chunk * count + chunk * length)
    return values, columns


def certified(
    index: KeyIndex, q_sq_norms: Tensor, error: Tensor, worst_kept: Tensor, kth_sq: Tensor
) -> Tensor:
    """(m,) bool: no key outside the candidates can be closer than (or tie) the k-th.

    A key left out has σ̃ ≤ worst_kept (the smallest kept score), hence true
    σ ≤ U(worst_kept) + E_i and d² ≥ ||q||² + offset − 2·(U + E_i); the test is strict.
    """
    u = index.output_unit
    w = worst_kept.double()
    upper = torch.where(w >= 0, w / (1 - u), w / (1 + u)) + error
    lower = q_sq_norms + index.norm_offset - 2 * upper
    # Slack for the float64 evaluation of both sides: 4·(D + 2)·2⁻⁵³ of the magnitudes.
    n_max = index.sq_norms.max()
    scale = q_sq_norms + n_max + 2 * (q_sq_norms * n_max).sqrt()
    return lower - 4 * (index.keys.shape[1] + 2) * 2.0**-53 * scale > kth_sq


def duplicate_representatives(keys: Tensor, sq_norms: Tensor | None = None) -> Tensor:
    """(M,) for each key the lowest index of a key with the same values (−0.0 == +0.0).

    sq_norms: the keys' float64 squared norms, if at hand: a row's norm depends only on its
    values, so its bits are a hash; only rows that share a norm are hashed again by their
    bits (the norms of distinct random vectors almost never coincide).
    """
    count = len(keys)
    rep = torch.arange(count, device=keys.device)
    if count < 2:
        return rep
    hashes = _row_hashes(keys) if sq_norms is None else _norm_hashes(keys, sq_norms)
    order = torch.argsort(hashes, stable=True)  # equal hashes stay in index order
    sorted_hash = hashes[order]
    starts = torch.ones(count, dtype=torch.bool, device=keys.device)
    starts[1:] = sorted_hash[1:] != sorted_hash[:-1]
    if starts.all():
        return rep
    positions = torch.arange(count, device=keys.device)
    run_start = torch.where(starts, positions, torch.zeros_like(positions)).cummax(0).values
    first = order[run_start]  # (M,) lowest index in each run of equal hashes
    # Equal hashes are verified; a (rare) run of different vectors is resolved exactly.
    later = torch.nonzero(~starts).flatten()  # sorted positions after a run's first
    equal = (keys[order[later]] == keys[first[later]]).all(1)  # −0.0 == +0.0 here
    rep[order[later[equal]]] = first[later[equal]]
    for start in torch.unique(run_start[later[~equal]]).tolist():
        members = order[start : int((run_start == start).sum()) + start]
        _, inverse = torch.unique(keys[members] + 0.0, dim=0, return_inverse=True)
        lowest = torch.full((int(inverse.max()) + 1,), count, device=keys.device)
        lowest = lowest.scatter_reduce(0, inverse, members, reduce="amin")
        rep[members] = lowest[inverse]
    return rep


def _norm_hashes(keys: Tensor, sq_norms: Tensor) -> Tensor:
    """(M,) int64: the norms' bits, plus the bit hash for rows whose norm is shared."""
    hashes = sq_norms.view(torch.int64).clone()
    ordered, order = hashes.sort()
    tied = ordered[1:] == ordered[:-1]
    shared = torch.zeros(len(hashes), dtype=torch.bool, device=keys.device)
    shared[order[1:][tied]] = True
    shared[order[:-1][tied]] = True
    rows = torch.nonzero(shared).flatten()
    if len(rows):
        hashes[rows] += _row_hashes(keys[rows])  # wraps mod 2⁶⁴, like the hash itself
    return hashes


def _row_hashes(values: Tensor, rows: int = 4096) -> Tensor:
    """(M,) int64 hash of each row's bits (+0.0 for −0.0; wraps mod 2⁶⁴), chunked."""
    g = torch.Generator(device="cpu").manual_seed(0x5EED)
    mult = torch.randint(1, 2**62, (values.shape[1],), generator=g).to(values.device) | 1
    bit_dtype = torch.int64 if values.dtype == torch.float64 else torch.int32
    parts = [
        ((values[s : s + rows] + 0.0).view(bit_dtype).long() * mult).sum(1)
        for s in range(0, len(values), rows)
    ]
    return torch.cat(parts)


def _rowwise_sq_norms(x: Tensor, rows: int = 2048) -> Tensor:
    """(M,) float64 squared norms, converting at most ``rows`` rows at a time."""
    parts = [x[s : s + rows].double().pow(2).sum(1) for s in range(0, len(x), rows)]
    return torch.cat(parts) if parts else x.new_zeros(0, dtype=torch.float64)


def _round_operand_t(
    keys: Tensor, shift: Tensor | None, dtype: torch.dtype, rows: int = 2048
) -> tuple[Tensor, float, float]:
    """x̃_k in ``dtype`` as a contiguous (D', M) tensor, max ||x̃_k||, max ||x_k − x̃_k||.

    Written ``rows`` keys at a time, so no full float64 or untransposed copy is made.
    """
    extra = 0 if shift is None else (2 if dtype == torch.bfloat16 else 1)
    operand_t = keys.new_empty(keys.shape[1] + extra, len(keys), dtype=dtype)
    best_norm, best_residual = 0.0, 0.0
    for s in range(0, len(keys), rows):
        exact = keys[s : s + rows].double()
        if shift is not None:
            part = shift[s : s + rows]
            if dtype == torch.bfloat16:  # hi + lo, both exact in bf16 up to lo's rounding
                hi = part.to(dtype).double()
                part = torch.cat([hi, part - hi], 1)
            exact = torch.cat([exact, part], 1)
        rounded = exact.to(dtype)
        operand_t[:, s : s + rows] = rounded.T
        rounded64 = rounded.double()
        best_norm = max(best_norm, rounded64.norm(dim=1).max().item())
        best_residual = max(best_residual, (exact - rounded64).norm(dim=1).max().item())
    return operand_t, best_norm, best_residual


def _round_keys_t(keys: Tensor, dtype: torch.dtype, rows: int = 4096):
    """fp32 keys rounded to ``dtype`` as a contiguous (D, M) tensor, and per key upper
    bounds of ||x̃_k|| and ||x_k − x̃_k|| (M,) float64 — in fp32, a chunk at a time (the
    difference of an fp32 value and its rounding is exact in fp32)."""
    operand_t = keys.new_empty(keys.shape[1], len(keys), dtype=dtype)
    norms, residuals = [], []
    for s in range(0, len(keys), rows):
        rounded = keys[s : s + rows].to(dtype)
        operand_t[:, s : s + rows] = rounded.T
        back = rounded.float()
        norms.append(_norm_bound(back))
        residuals.append(_norm_bound(keys[s : s + rows] - back))
    return operand_t, torch.cat(norms), torch.cat(residuals)


def _norm_bound(x: Tensor) -> Tensor:
    """(rows,) float64 upper bounds of the fp32 rows' Euclidean norms, computed in fp32.

    fp32 sums of D squares and the square root err by at most (D + 2)/2 · 2⁻²⁴ relative
    (Higham §3.1); the factor takes four times that, the absolute term squares that
    underflow.
    """
    dim = x.shape[1]
    norm = torch.linalg.vector_norm(x, dim=1).double()
    return norm * (1 + (dim + 4) * 2.0**-23) + 2.0**-70 * math.sqrt(dim)


def _hardware_units(device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    """(input_unit, accumulation_unit) of a matmul in ``dtype`` on ``device``."""
    if device.type == "cuda" and dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return 2.0**-10, _FP32_UNIT  # TF32 keeps 10 mantissa bits (rounded or truncated)
    if (
        device.type == "cuda"
        and dtype == torch.bfloat16
        and torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    ):
        return 0.0, _BF16_UNIT  # partial sums may be rounded to bf16
    return 0.0, _FP32_UNIT


def _chunk_width(width: int, count: int) -> int:
    """Chunk size c ≈ sqrt(width / count) (balances the two topk calls), a power of 2."""
    if width <= 4 * count:
        return 1
    target = math.sqrt(width / count)
    return int(2 ** max(0, min(6, round(math.log2(target)))))

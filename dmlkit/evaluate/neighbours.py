"""Exact k nearest neighbours (Euclidean) on CPU or CUDA: fp32 candidates, float64 re-rank.

Exact means the order of the squared distances d²_ij = ||q_i||² + ||k_j||² − 2⟨q_i, k_j⟩
evaluated in float64 (each term one float64 dot product by the same kernel, so a query
equal to a key is at 0 and bitwise-equal keys tie), ties broken by the lower key index.
Per block of queries (docs/methods.md#exact-knn):

1. one fp32 matmul scores every key, r̃_ij = fl(||k_j||² − 2⟨q_i, k_j⟩) (smaller = closer);
2. the c = k + margin smallest r̃ per query are the candidates, re-ranked in float64;
3. certificate: a key left out has r̃ ≥ cut (the largest kept r̃) and, by the error bound
   below, a float64 d² ≥ lower_i = ||q_i||² + cut − slack_i. If lower_i is strictly
   above the k-th re-ranked distance, no left-out key can enter the top k or tie the
   k-th, so the candidates hold every key with d² ≤ d²_(k) — the complete tie group at
   the k-th, which the tie-aware metrics need (docs/methods.md#ties). Otherwise the query
   is searched again with 4× the candidates, in the end with all keys.

Error bound (Higham, "Accuracy and Stability of Numerical Algorithms", §3.1): an fp32 dot
product of D terms errs by at most γ_D·||q||·||k||, γ_D = D·u/(1 − D·u), u = 2⁻²⁴, in any
summation order; rounding ||k||² and the subtraction adds u-sized terms of the same
magnitude B_i = (||q_i|| + max_j ||k_j||)², and fp64 inputs rounded to fp32 two more.
slack_i = (4·D + 32)·u·B_i covers all of them twice over; TF32 or bf16 matmuls (a float32
matmul precision below "highest") round the operands once more, + 6·u_op·B_i. The float64
evaluation of d² errs by at most (D + 4)·2⁻⁵³·B_i, and that of lower_i by a few 2⁻⁵³ of
its terms: lower_i is lowered by (2·D + 16)·2⁻⁵³ of their sum.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from numbers import Integral

import torch
from torch import Tensor

_SCORES = 2**22  # fp32 scores per block of queries (16 MB)
_MARGIN = 16  # spare candidates per query beyond k (and k/8): certifies nearly all at once


def knn(
    queries: Tensor,
    keys: Tensor | None = None,
    k: int = 1,
    *,
    block_size: int | None = None,
    exclude_self: bool = True,
) -> tuple[Tensor, Tensor]:
    """Exact k nearest neighbours by Euclidean distance, ties broken by the lower index.

    Args:
        queries: (Q, D) floating tensor (CPU or CUDA; half inputs are searched in fp32).
        keys: (M, D) on the same device, or None to search ``queries`` among themselves.
        k: neighbours per query; at most the number of keys available.
        block_size: queries per block (default: ~4M scores per block).
        exclude_self: when ``keys`` is None, a query is not its own neighbour (its
            duplicates at other indices still are). Ignored when ``keys`` is given.
    Returns:
        distances (Q, k) in the queries' float dtype (float32 for half inputs), ascending,
        and indices (Q, k) int64 into ``keys``; both on the input device.
    Complexity: O(Q·M·D) time; memory O(block·M + M·D), never O(Q·M).
    """
    if isinstance(queries, Tensor) and queries.device.type == "mps":
        # MPS has no float64 (the exact re-rank): search on CPU, answer on MPS.
        cpu_keys = None if keys is None else keys.cpu()
        d, i = knn(queries.cpu(), cpu_keys, k, block_size=block_size, exclude_self=exclude_self)
        return d.to(queries.device), i.to(queries.device)
    queries, keys_, self_search = check_inputs(queries, keys, k, exclude_self)
    double = torch.float64 in (queries.dtype, keys_.dtype)
    distances = queries.new_empty(len(queries), k, dtype=torch.float64 if double else torch.float32)
    indices = torch.empty(len(queries), k, dtype=torch.long, device=queries.device)
    if len(queries) == 0:
        return distances, indices
    skip = self_search and exclude_self
    for start, sq, idx in search(queries, keys_, k, skip_self=skip, block_size=block_size):
        # Rounded once from float64; a near-duplicate's d² may come out a few ulps below 0.
        distances[start : start + len(sq)] = sq[:, :k].clamp_min(0).sqrt()
        indices[start : start + len(sq)] = idx[:, :k]
    return distances, indices


def search(
    queries: Tensor,
    keys: Tensor,
    k: int,
    *,
    skip_self: bool = False,
    block_size: int | None = None,
) -> Iterator[tuple[int, Tensor, Tensor]]:
    """Yield (start, sq (m, c) float64, indices (m, c)) per block of queries, c ≥ k.

    Each row is sorted by (d², index) and holds every key with d² ≤ its k-th d² (and
    maybe more, whose order past that point is not complete). skip_self: query i is key
    i (a self-search) and is left out. Inputs as returned by ``check_inputs``.
    """
    count = len(keys)
    available = count - int(skip_self)
    keys64 = keys.double()
    key_sq = _sq_norms(keys64)  # (M,) float64
    key_op, key_sq32, key_max = keys.float(), key_sq.float(), key_sq.max().sqrt()
    slack_unit = (4 * keys.shape[1] + 32) * 2.0**-24 + 6 * _operand_unit(keys.device)
    rho = (2 * keys.shape[1] + 16) * 2.0**-53  # float64 evaluation of d² and of the bound
    margin = max(_MARGIN, k // 8)
    rows = block_size or max(1, _SCORES // max(1, count))
    for start in range(0, len(queries), rows):
        q = queries[start : start + rows]
        block = torch.arange(start, start + len(q), device=q.device)
        scores = torch.addmm(key_sq32, q.float(), key_op.T, alpha=-2)  # (m, M) r̃
        if skip_self:
            scores[torch.arange(len(q), device=q.device), block] = math.inf
        q64 = q.double()
        q_sq = key_sq[block] if skip_self else _sq_norms(q64)  # (m,)
        bound = (q_sq.sqrt() + key_max) ** 2  # (m,) B_i
        kept = min(available, k + margin)
        sq = torch.empty(len(q), 0, dtype=torch.float64, device=q.device)
        idx = torch.empty(len(q), 0, dtype=torch.long, device=q.device)
        todo = torch.arange(len(q), device=q.device)  # rows still uncertified
        while len(todo):
            if kept >= available:  # every key: nothing left out to certify
                cand = torch.arange(available, device=q.device).expand(len(todo), -1)
                if skip_self:
                    cand = cand + (cand >= block[todo, None])
            else:
                rows_left = scores if len(todo) == len(q) else scores[todo]  # no copy at first
                values, cand = rows_left.topk(kept, dim=1, largest=False, sorted=False)
                cut = values.max(1).values.double()  # every left-out key has r̃ ≥ cut
            d2, cand = _sorted_sq_distances(q64[todo], q_sq[todo], keys64, key_sq, cand)
            ok = torch.ones(len(todo), dtype=torch.bool, device=q.device)
            if kept < available:
                slack = slack_unit * bound[todo]
                margin_ = rho * (bound[todo] + q_sq[todo] + cut.abs() + slack)
                lower = q_sq[todo] + cut - slack - margin_  # ≤ every left-out key's d²
                ok = torch.isfinite(lower) & (lower > d2[:, k - 1])
            if len(todo) == len(q) and ok.all():  # the usual case: all done at once
                sq, idx = d2, cand
                break
            if sq.shape[1] < d2.shape[1]:  # widen the output for the rows searched again
                pad = d2.shape[1] - sq.shape[1]
                sq = torch.nn.functional.pad(sq, (0, pad), value=math.inf)
                idx = torch.nn.functional.pad(idx, (0, pad), value=-1)
            sq[todo[ok], : d2.shape[1]] = d2[ok]
            idx[todo[ok], : d2.shape[1]] = cand[ok]
            todo, kept = todo[~ok], min(available, 4 * kept)
        yield start, sq, idx


def _sorted_sq_distances(
    q64: Tensor, q_sq: Tensor, keys64: Tensor, key_sq: Tensor, cand: Tensor
) -> tuple[Tensor, Tensor]:
    """float64 d² = ||q||² + ||k||² − 2⟨q, k⟩ of each query's candidates (m, c), rows
    sorted by (d², index). The dot products are sampled from the (m, M) product (sparse
    CSR pattern): each is one float64 dot, computed in place of gathering (m, c, D) rows."""
    d2 = q_sq[:, None] + key_sq[cand] - 2 * _dots(q64, keys64, cand)
    d2, order = d2.sort(dim=1)
    cand = cand.gather(1, order)
    tied = (d2[:, 1:] == d2[:, :-1]).any(1)  # (m,) rows whose ties need index order
    if tied.any():
        by_index, order = cand[tied].sort(1)
        d2_tied, again = d2[tied].gather(1, order).sort(dim=1, stable=True)
        d2[tied], cand[tied] = d2_tied, by_index.gather(1, again)
    return d2, cand


def _dots(a: Tensor, b: Tensor, columns: Tensor, *, ordered: bool = False) -> Tensor:
    """(m, c) float64 ⟨a_i, b_j⟩ for j = columns[i, :]."""
    m, c = columns.shape
    if a.device.type != "cpu" and not ordered:  # cuSPARSE wants each row's columns in order
        columns, order = columns.sort(1)
        dots = _dots(a, b, columns, ordered=True)
        return torch.empty_like(dots).scatter_(1, order, dots)
    rows = torch.arange(0, m * c + 1, c, device=a.device)
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(
            rows, columns.reshape(-1), a.new_zeros(m * c), size=(m, len(b)), check_invariants=False
        )
    return torch.sparse.sampled_addmm(pattern, a, b.T, beta=0.0).values().view(m, c)


def _sq_norms(x64: Tensor, rows: int = 4096) -> Tensor:
    """(n,) float64 ⟨x_i, x_i⟩ by the same dot product as ``_dots``, so that a query equal
    to a key is at d² = 0 exactly."""
    parts = [_dots(x, x, torch.arange(len(x), device=x.device)[:, None]) for x in x64.split(rows)]
    return torch.cat(parts)[:, 0] if parts else x64.new_zeros(0)


def _operand_unit(device: torch.device) -> float:
    """Extra relative rounding of fp32 matmul operands: TF32 (10 bits) or bf16 (7 bits)."""
    precision = torch.get_float32_matmul_precision()
    if precision == "medium":
        return 2.0**-7
    tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    return 2.0**-10 if precision == "high" or tf32 else 0.0


def check_inputs(queries, keys, k, exclude_self) -> tuple[Tensor, Tensor, bool]:
    """Validate; returns (queries, keys) as float32/float64 and whether keys is None."""
    self_search = keys is None
    if isinstance(queries, Tensor) and queries.device.type == "mps":  # MPS has no float64
        queries, keys = queries.cpu(), None if self_search else keys.cpu()
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
    return queries.contiguous(), keys.contiguous(), self_search

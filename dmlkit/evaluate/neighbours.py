"""Exact k nearest neighbours (Euclidean) on CPU or CUDA: fp32 candidates, float64 re-rank.

Exact means the order of the squared distances d²_ij = ||q_i||² + ||k_j||² − 2⟨q_i, k_j⟩
evaluated in float64 (each term one float64 dot product by the same kernel, so a query
equal to a key is at 0 and bitwise-equal keys tie), ties broken by the lower key index.
Per block of queries (docs/methods.md#exact-knn):

1. one fp32 matmul of [q_i, 1] with [−2k_j, fl(||k_j||²)] scores every key,
   r̃_ij = fl(||k_j||² − 2⟨q_i, k_j⟩) (smaller = closer);
2. the c = k + margin smallest r̃ per query are the candidates, re-ranked in float64.
   They are found stepwise (``_smallest``): the keys fall into G groups (key j in group
   j mod G); the c groups with the smallest minima hold c keys no larger than any key of
   another group, so the c smallest of their keys are the c smallest of all; the same
   argument finds those c groups among the group minima;
3. certificate: a key left out has r̃ ≥ cut (the largest kept r̃) and, by the error bound
   below, a float64 d² ≥ lower_i = ||q_i||² + cut − slack_i. If lower_i is strictly
   above the k-th re-ranked distance, no left-out key can enter the top k or tie the
   k-th, so the candidates hold every key with d² ≤ d²_(k) — the complete tie group at
   the k-th, which the tie-aware metrics need (docs/methods.md#ties). Otherwise the query
   is searched again with 4× the candidates, in the end with all keys.

Error bound (Higham, "Accuracy and Stability of Numerical Algorithms", §3.1): the fp32 dot
product of D + 1 terms errs by at most γ_{D+1}·(2·||q||·||k|| + ||k||²) ≤ γ_{D+1}·B_i,
γ_n = n·u/(1 − n·u), u = 2⁻²⁴, B_i = (||q_i|| + max_j ||k_j||)², in any summation order;
rounding ||k||² to fp32 adds u·B_i, and fp64 inputs rounded to fp32 two more such terms.
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

_SCORES = 2**22  # fp32 scores per block of queries (16 MB)...
_MIN_ROWS = 256  # ...but at least this many queries: the matmul reads all keys per block
_MARGIN = 8  # spare candidates per query beyond k (and k/32): certifies nearly all at once
_GROUP = 8  # keys per group in the stepwise selection (docs/methods.md#exact-knn)


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
        block_size: queries per block (default: ~4M scores, at least 256 queries;
            256 when the candidates are over 1/16 of the keys).
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
    key_max = key_sq.max().sqrt()
    # M' = count rounded up to a multiple of _GROUP² (two steps of groups); the padding
    # keys' scores are set to +inf.
    key_op = score_matrix(keys, key_sq, -(-count // _GROUP**2) * _GROUP**2)
    width = key_op.shape[1]
    slack_unit = (4 * keys.shape[1] + 32) * 2.0**-24 + 6 * _operand_unit(keys.device)
    rho = (2 * keys.shape[1] + 16) * 2.0**-53  # float64 evaluation of d² and of the bound
    margin = max(_MARGIN, k // 32)
    rows = block_size or max(_MIN_ROWS, _SCORES // max(1, count))
    if block_size is None and 2 * _GROUP * (k + margin) > count:
        rows = _MIN_ROWS  # the re-rank dominates; it reads each query row c times
    buffer = key_op.new_empty(min(rows, len(queries)), width)  # reused: no page faults
    for start in range(0, len(queries), rows):
        q = queries[start : start + rows]
        block = torch.arange(start, start + len(q), device=q.device)
        q_op = torch.cat([q.float(), q.new_ones(len(q), 1, dtype=torch.float32)], 1)
        scores = torch.mm(q_op, key_op, out=buffer[: len(q)])  # (m, M') r̃
        scores[:, count:] = math.inf
        if skip_self:
            scores[torch.arange(len(q), device=q.device), block] = math.inf
        q64 = keys64[start : start + len(q)] if queries is keys else q.double()
        q_sq = key_sq[block] if skip_self else _sq_norms(q64)  # (m,)
        bound = (q_sq.sqrt() + key_max) ** 2  # (m,) B_i
        kept = min(available, k + margin)
        sq = torch.empty(len(q), 0, dtype=torch.float64, device=q.device)
        idx = torch.empty(len(q), 0, dtype=torch.long, device=q.device)
        todo = torch.arange(len(q), device=q.device)  # rows still uncertified
        while len(todo):
            part = slice(None) if len(todo) == len(q) else todo  # no copies at first
            if kept >= available:  # every key: nothing left out to certify
                cand = torch.arange(available, device=q.device).expand(len(todo), -1)
                if skip_self:
                    cand = cand + (cand >= block[todo, None])
            else:
                values, cand = _smallest(scores[part], kept)
                cand.clamp_max_(count - 1)  # a padding key only where the cut is inf or NaN
                cut = values.max(1).values.double()  # every left-out key has r̃ ≥ cut
            d2, cand = _sorted_sq_distances(q64[part], q_sq[part], keys64, key_sq, cand)
            ok = torch.ones(len(todo), dtype=torch.bool, device=q.device)
            if kept < available:
                slack = slack_unit * bound[part]
                margin_ = rho * (bound[part] + q_sq[part] + cut.abs() + slack)
                lower = q_sq[part] + cut - slack - margin_  # ≤ every left-out key's d²
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


def score_matrix(points: Tensor, sq_norms: Tensor, width: int, pad: float = 0.0) -> Tensor:
    """(D + 1, width) fp32 [−2pᵀ; fl(||p||²)]: one matmul of [x, 1] with it scores every
    point, ||p||² − 2⟨x, p⟩. Columns past ``len(points)`` are zero, with ``pad`` in the last
    row, so they score ``pad``."""
    rows = points.new_zeros(width, points.shape[1] + 1, dtype=torch.float32)
    torch.mul(points, -2, out=rows[: len(points), :-1])
    rows[:, -1] = pad
    rows[: len(points), -1] = sq_norms
    # Built row by row, transposed by one copy (a blocked kernel: 4x faster than writing
    # the transpose element by element).
    return rows.new_empty(rows.shape[::-1]).copy_(rows.T)


def _smallest(scores: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """The ``count`` smallest values per row of ``scores`` (m, M') and their columns.

    With G = M' / _GROUP groups (column j in group j mod G), the ``count`` groups of
    smallest minimum hold ``count`` values no larger than the rest of the row, so the
    ``count`` smallest of their values are the row's. Applied to the group minima again
    while there are at least 2·_GROUP·count of them: a few small ``topk`` calls instead of
    one over the row, 2-3x cheaper on the CPU (docs/benchmarks.md, "Exact kNN").
    """
    levels = [scores]
    while levels[-1].shape[1] >= 2 * _GROUP * count and levels[-1].shape[1] % _GROUP == 0:
        level = levels[-1]
        levels.append(level.view(len(level), _GROUP, -1).amin(1))  # (m, G) group minima
    values, chosen = levels.pop().topk(count, dim=1, largest=False, sorted=False)
    while levels:  # from the chosen groups' minima to their members
        level = levels.pop()
        groups = level.shape[1] // _GROUP
        members = level.view(len(level), _GROUP, groups).gather(
            2, chosen[:, None, :].expand(-1, _GROUP, -1)
        )  # (m, _GROUP, count): member r of chosen group i is column i + r·G
        values, picked = members.flatten(1).topk(count, dim=1, largest=False, sorted=False)
        chosen = chosen.gather(1, picked % count) + picked // count * groups
    return values, chosen


def _sorted_sq_distances(
    q64: Tensor, q_sq: Tensor, keys64: Tensor, key_sq: Tensor, cand: Tensor
) -> tuple[Tensor, Tensor]:
    """float64 d² = ||q||² + ||k||² − 2⟨q, k⟩ of each query's candidates (m, c), rows
    sorted by (d², index). The dot products are sampled from the (m, M) product (sparse
    CSR pattern): each is one float64 dot, computed in place of gathering (m, c, D) rows."""
    d2 = key_sq.take(cand).add_(q_sq[:, None]).sub_(_dots(q64, keys64, cand), alpha=2)
    d2, order = d2.sort(dim=1)
    cand = cand.gather(1, order)
    tied = (d2[:, 1:] == d2[:, :-1]).any(1)  # (m,) rows whose ties need index order
    if tied.any():
        by_index, order = cand[tied].sort(1)
        d2_tied, again = d2[tied].gather(1, order).sort(dim=1, stable=True)
        d2[tied], cand[tied] = d2_tied, by_index.gather(1, again)
    return d2, cand


def _dots(a: Tensor, b: Tensor, columns: Tensor) -> Tensor:
    """(m, c) float64 ⟨a_i, b_j⟩ for j = columns[i, :], each one float64 dot.

    Sampled from the product b·aᵀ with a sparse CSR pattern, one row per row of ``b``
    (key-major): each key row is read once per call, not once per query that lists it,
    ~1.5x faster on the CPU; the stable sort keeps each row's columns in order, which
    cuSPARSE requires.
    """
    m, c = columns.shape
    keys, order = columns.flatten().int().sort(stable=True)  # int32: twice as fast
    rows = torch.zeros(len(b) + 1, dtype=torch.long, device=b.device)
    rows[1:] = torch.bincount(keys, minlength=len(b)).cumsum(0)
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(
            rows, order // c, a.new_zeros(m * c), size=(len(b), m), check_invariants=False
        )
    values = torch.sparse.sampled_addmm(pattern, b, a.T, beta=0.0).values()
    return torch.empty_like(values).index_put_((order,), values).view(m, c)


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
        # The sum (cheap) is finite if every value is, unless it overflows; a float64 sum of
        # fp32 values cannot overflow, so it is finite iff they all are.
        if not x.sum().isfinite():
            finite = x.sum(1, dtype=torch.float64) if x.dtype != torch.float64 else x
            if not finite.isfinite().all():
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

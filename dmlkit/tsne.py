"""Barnes-Hut t-SNE coordinates (openTSNE) with an on-disk cache, and seeded subsampling.

The papers' embedding maps (DAAL Figures 3-4) are Barnes-Hut t-SNE of test embeddings.
openTSNE is deterministic for a fixed input, seed and ``n_jobs`` (with an approximate
neighbour index, ``neighbors="annoy"``, the index built in parallel depends on it), so the
cache key covers the embeddings' bytes and every parameter, including ``n_jobs`` and
openTSNE's version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dmlkit.io import atomic_writer

logger = logging.getLogger(__name__)

_CACHE_FORMAT = 1


def tsne_coordinates(
    embeddings: Any,
    *,
    perplexity: float = 30.0,
    random_state: int = 0,
    n_jobs: int = 1,
    cache_path: str | os.PathLike | None = None,
    n_iter: int = 500,
    early_exaggeration_iter: int = 250,
    theta: float = 0.5,
    metric: str = "euclidean",
    neighbors: str = "exact",
    log: Callable[[str], None] | None = None,
) -> np.ndarray:
    """Barnes-Hut t-SNE of ``embeddings`` with openTSNE, PCA initialisation, cached.

    Args:
        embeddings: (N, D) array or tensor (any float dtype; computed in float64).
        perplexity: t-SNE perplexity; openTSNE lowers it (with a warning) when N is small.
        random_state: seed of the kNN index and of openTSNE's own randomness.
        n_jobs: threads for kNN and gradients. Part of the cache key: above 1,000 points
            the result depends on it.
        cache_path: None (no cache), a ``.npz`` file (holds one result; replaced when the
            inputs change), or a folder (one ``tsne-<key>.npz`` per distinct input).
        n_iter, early_exaggeration_iter, theta, metric, neighbors: passed to
            ``openTSNE.TSNE`` (theta is the Barnes-Hut accuracy/speed trade-off).
            ``neighbors="exact"`` finds the 3·perplexity nearest neighbours of the
            perplexity-based affinities exactly (scikit-learn's kNN): at 8,131 × 512 it
            takes ~1.7 s of one core where openTSNE's default above 1,000 points, the
            approximate "annoy", takes ~7 s (``benchmarks/bench_tsne.py --settings``).
        log: optional callable for one-line progress messages (else ``logging``).
    Returns: (N, 2) float64 coordinates; identical for identical inputs and parameters.
    Complexity: O(N log N) time per iteration (Barnes-Hut), O(N · 3·perplexity) memory.
    """
    data = _as_float64(embeddings)
    params = {
        "perplexity": float(perplexity),
        "random_state": int(random_state),
        "n_jobs": int(n_jobs),
        "n_iter": int(n_iter),
        "early_exaggeration_iter": int(early_exaggeration_iter),
        "theta": float(theta),
        "metric": metric,
        "neighbors": neighbors,
    }
    key = cache_key(data, params)
    file = _cache_file(cache_path, key)
    say = log or logger.info
    if file is not None:
        cached = _read_cache(file, key)
        if cached is not None:
            say(f"t-SNE: cache hit {file}")
            return cached
    say(f"t-SNE: Barnes-Hut on {data.shape[0]} points (perplexity {perplexity:g})")
    coords = _run_open_tsne(data, params)
    if file is not None:
        with atomic_writer(file) as handle:
            np.savez(handle, coordinates=coords, key=np.array(key), params=json.dumps(params))
        say(f"t-SNE: cached to {file}")
    return coords


def cache_key(data: np.ndarray, params: dict[str, Any]) -> str:
    """SHA-256 of the array (shape, dtype, bytes), the parameters and openTSNE's version."""
    import openTSNE

    digest = hashlib.sha256()
    header = {"format": _CACHE_FORMAT, "openTSNE": openTSNE.__version__, "params": params}
    digest.update(json.dumps(header, sort_keys=True).encode())
    digest.update(repr((data.shape, data.dtype.str)).encode())
    digest.update(np.ascontiguousarray(data).tobytes())
    return digest.hexdigest()


def _run_open_tsne(data: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    import openTSNE

    if data.ndim != 2 or data.shape[0] < 4:
        raise ValueError(f"t-SNE needs an (N, D) array with N >= 4, got shape {data.shape}")
    tsne = openTSNE.TSNE(
        n_components=2,
        negative_gradient_method="bh",  # Barnes-Hut, as in the papers' figures (not FFT)
        initialization="pca",
        **params,
    )
    return np.array(tsne.fit(data), dtype=np.float64)  # plain ndarray, not TSNEEmbedding


def _as_float64(embeddings: Any) -> np.ndarray:
    if hasattr(embeddings, "detach"):  # torch tensor on any device
        embeddings = embeddings.detach().float().cpu().numpy()
    data = np.ascontiguousarray(embeddings, dtype=np.float64)
    if not np.isfinite(data).all():
        raise ValueError("embeddings contain NaN or inf; t-SNE needs finite values")
    return data


def _cache_file(cache_path: str | os.PathLike | None, key: str) -> Path | None:
    if cache_path is None:
        return None
    path = Path(cache_path)
    if path.suffix == ".npz":
        return path
    return path / f"tsne-{key[:16]}.npz"


def _read_cache(file: Path, key: str) -> np.ndarray | None:
    if not file.exists():
        return None
    try:
        with np.load(file, allow_pickle=False) as stored:
            if str(stored["key"]) != key:
                return None
            return np.array(stored["coordinates"], dtype=np.float64)
    except (OSError, ValueError, KeyError) as error:  # truncated/foreign file: recompute
        logger.warning("t-SNE: ignoring unreadable cache %s (%s)", file, error)
        return None


def subsample(n: int, max_points: int, *, seed: int = 0, labels: Any | None = None) -> np.ndarray:
    """Seeded choice of at most ``max_points`` of ``range(n)``, returned sorted.

    Args:
        n: number of items. max_points: how many to keep (all of them when n <= max_points).
        seed: seed of the choice (own ``numpy.random.Generator``).
        labels: optional (n,) class labels of any type. When given the choice is
            stratified: every class gets an equal share capped at its size, and what small
            classes leave unused goes to the larger ones, so small classes stay visible.
            With more classes than ``max_points``, the largest classes get one each (ties
            broken by the seed).
    Returns: (min(n, max_points),) int64 indices, strictly increasing.
    """
    if n < 0 or max_points < 0:
        raise ValueError(f"n and max_points must be >= 0, got {n}, {max_points}")
    if n <= max_points:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    if labels is None:
        return np.sort(rng.choice(n, size=max_points, replace=False)).astype(np.int64)
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {labels.shape}")
    _, inverse = np.unique(labels, return_inverse=True)
    counts = np.bincount(inverse)
    quota = _stratified_quota(counts, max_points, rng)
    chosen = [
        rng.choice(np.flatnonzero(inverse == c), size=q, replace=False) for c, q in enumerate(quota)
    ]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def _stratified_quota(counts: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    """Per-class sample counts summing to ``total``: equal shares capped at class sizes."""
    quota = np.zeros_like(counts)
    budget = total
    # Smallest classes first: whatever they cannot use is shared among the larger ones.
    # Ties (and so which classes get a place when there are more classes than places) are
    # broken by the seeded generator, not by label order.
    order = np.lexsort((rng.permutation(len(counts)), counts))
    for rank, c in enumerate(order):
        quota[c] = min(counts[c], budget // (len(order) - rank))
        budget -= quota[c]
    # The integer remainder (fewer than the number of classes): one more for random classes.
    open_classes = np.flatnonzero(quota < counts)
    extra = rng.choice(open_classes, size=min(budget, len(open_classes)), replace=False)
    quota[extra] += 1
    return quota

"""Sub-clusters inside a class: are a class's modes (glyphs: font families) kept apart?

The measurable form of DAAL's claim that sub-clusters within a class are preserved
(docs/methods.md, "Sub-cluster measures"). Two views of the same question:
``subcluster_preservation`` looks at each item's nearest same-class neighbours,
``subcluster_agreement`` clusters each class on its own and compares the clusters with
the modes.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dmlkit.evaluate.neighbours import check_inputs, search
from dmlkit.evaluate.retrieval import TieGroups, as_labels

__all__ = ["subcluster_agreement", "subcluster_preservation"]


def subcluster_preservation(
    embeddings: Tensor, labels: Tensor, modes: Any, *, k: int = 1
) -> dict[str, Any]:
    """How often a query's nearest *same-class* neighbours share its mode (family purity@k).

    For each query whose class has ≥ 2 items: its min(k, n_c − 1) exact nearest
    neighbours among the other items of its class (Euclidean; a run of equal distances
    counts by its expected value over its random orders, docs/methods.md#ties), and the
    fraction of them with the query's mode (e.g. the glyph's font family);
    ``preservation`` is the mean of that fraction over the queries. ``chance`` = the same
    expected for neighbours drawn at random from the class, (m_{c,mode} − 1)/(n_c − 1)
    averaged over the queries. k = 1 is the nearest-neighbour measure.

    Args: embeddings (N, D); labels (N,) integer classes; modes (N,) any comparable ids.
    Returns: ``preservation``, ``chance`` (floats), ``num_queries`` (int).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    labels, mode_ids = _labels_and_modes(embeddings, labels, modes)
    hits, chances = [], []
    for members in _classes(labels):
        if len(members) < 2:
            continue
        points, _, _ = check_inputs(embeddings[members.to(embeddings.device)], None, 1, True)
        count = min(k, len(members) - 1)
        own = mode_ids[members]
        for start, sq, idx in search(points, points, count, skip_self=True):
            same = mode_ids[members[idx.cpu()]] == own[start : start + len(sq), None]
            expected = TieGroups(sq.cpu(), same, count).expected_hits(torch.full((len(sq),), count))
            hits.append(expected / count)
        same_mode = torch.bincount(own)[own].double()  # members sharing each one's mode
        chances.append((same_mode - 1) / (len(members) - 1))
    if not hits:
        return {"preservation": 0.0, "chance": 0.0, "num_queries": 0}
    return {
        "preservation": float(torch.cat(hits).mean()),
        "chance": float(torch.cat(chances).mean()),
        "num_queries": int(sum(len(h) for h in hits)),
    }


def subcluster_agreement(
    embeddings: Tensor, labels: Tensor, modes: Any, *, n_init: int = 10, seed: int = 0
) -> dict[str, Any]:
    """Per-class k-means against the modes: adjusted Rand index and NMI, mean over classes.

    Each class with ≥ 2 distinct modes is clustered on its own (scikit-learn ``KMeans``,
    k = the number of modes in the class, k-means++ with ``n_init`` restarts, seeded) and
    the clusters are compared with the modes: ARI (Hubert & Arabie 1985; 0 for a random
    clustering, 1 for the modes exactly) and NMI (arithmetic normalisation, as
    scikit-learn). Classes count equally.

    Args: embeddings (N, D); labels (N,) integer classes; modes (N,) any comparable ids.
    Returns: ``ari``, ``nmi`` (floats; 0 when no class qualifies), ``num_classes`` (int).
    Cost: one small k-means per class (about 10 ms each).
    """
    # Deferred: scikit-learn takes ~0.8 s and ~100 MB to import, and only this needs it.
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    labels, mode_ids = _labels_and_modes(embeddings, labels, modes)
    points = embeddings.detach().float().cpu().numpy()
    aris, nmis = [], []
    for members in _classes(labels):
        truth = mode_ids[members].numpy()
        count = len(np.unique(truth))
        if count < 2:
            continue
        with warnings.catch_warnings():  # a collapsed class has fewer distinct points than k
            warnings.simplefilter("ignore", ConvergenceWarning)
            kmeans = KMeans(count, n_init=n_init, random_state=seed)
            clusters = kmeans.fit_predict(points[members])
        aris.append(adjusted_rand_score(truth, clusters))
        nmis.append(normalized_mutual_info_score(truth, clusters))
    if not aris:
        return {"ari": 0.0, "nmi": 0.0, "num_classes": 0}
    return {"ari": float(np.mean(aris)), "nmi": float(np.mean(nmis)), "num_classes": len(aris)}


def _labels_and_modes(embeddings: Tensor, labels: Tensor, modes: Any) -> tuple[Tensor, Tensor]:
    labels = as_labels(labels, len(embeddings))
    modes = np.asarray(torch.as_tensor(modes) if isinstance(modes, Tensor) else modes)
    if len(modes) != len(labels):
        raise ValueError(f"{len(modes)} modes for {len(labels)} embeddings")
    mode_ids = torch.from_numpy(np.unique(modes.reshape(-1), return_inverse=True)[1].reshape(-1))
    return labels, mode_ids


def _classes(labels: Tensor) -> tuple[Tensor, ...]:
    """The item indices of each class, classes in sorted order."""
    order = torch.argsort(labels, stable=True)
    _, counts = torch.unique_consecutive(labels[order], return_counts=True)
    return torch.split(order, counts.tolist())

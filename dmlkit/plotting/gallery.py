"""What a run retrieves: top-k galleries of queries and the class pairs it confuses.

The test set is searched against itself as the evaluation does (``dmlkit.evaluate.knn``:
exact Euclidean, each query excluded from its own results, ties to the lower index), so
a gallery shows exactly the neighbours that Recall@K counted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from dmlkit.plotting._common import as_numpy

HIT_COLOR, MISS_COLOR, QUERY_COLOR = "#2ca02c", "#d62728", "#222222"


class TopK(NamedTuple):
    """The k nearest other test items of every test item."""

    indices: np.ndarray  # (N, k) int64, nearest first
    distances: np.ndarray  # (N, k) float64, Euclidean, ascending
    hits: np.ndarray  # (N, k) bool: the neighbour has the query's class


def top_k(embeddings: Any, labels: Any, k: int = 5) -> TopK:
    """Each item's k nearest other items (the evaluation's search), with hit/miss."""
    from dmlkit.evaluate import knn

    distances, indices = knn(torch.as_tensor(as_numpy(embeddings, dtype=np.float32)), k=k)
    indices, labels = indices.numpy(), as_numpy(labels)
    return TopK(indices, distances.double().numpy(), labels[indices] == labels[:, None])


def gallery_queries(
    found: TopK, *, num_random: int = 4, num_failures: int = 4, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(a seeded random sample of queries, the hardest failures), as index arrays.

    A failure is a query whose first neighbour has another class; the hardest are those
    with the most misses among their k, then the nearest wrong first neighbour (the most
    confident mistake). The random sample is drawn from the other queries.
    """
    failed = np.flatnonzero(~found.hits[:, 0])
    misses = (~found.hits[failed]).sum(1)
    order = np.lexsort((failed, found.distances[failed, 0], -misses))  # last key sorts first
    hardest = failed[order[:num_failures]]
    rest = np.setdiff1d(np.arange(len(found.indices)), hardest)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(rest, size=min(num_random, len(rest)), replace=False))
    return sample.astype(np.int64), hardest.astype(np.int64)


def retrieval_gallery(
    queries: Sequence[int],
    found: TopK,
    images: Mapping[int, np.ndarray],
    *,
    labels: Any,
    class_names: Mapping[Any, str] | None = None,
    row_titles: Sequence[str] | None = None,
    cell: float = 1.1,
    title: str | None = None,
) -> Figure:
    """One row per query: the query (dark frame), then its top-k, hits green, misses red.

    Args:
        queries: item indices, one row each. found: ``top_k`` of the whole test set.
        images: item index → H×W(×3) uint8 image, for every query and its k neighbours.
        labels: (N,) classes; class_names: optional class → name shown under the query.
        row_titles: optional text left of each row (e.g. "random", "failure").
        cell: inches per image.
    Returns: a pyplot-free Figure; every image Axes carries its frame colour on its spines.
    """
    labels = as_numpy(labels)
    k = found.indices.shape[1]
    height = cell * 1.3 * len(queries) + 0.5
    fig = Figure(figsize=(cell * (k + 1.3), height))
    grid = fig.add_gridspec(len(queries), k + 1, wspace=0.08, hspace=0.45, top=1 - 0.4 / height)
    for row, query in enumerate(queries):
        name = _class_name(labels[query], class_names)
        ax = fig.add_subplot(grid[row, 0])
        _framed_image(ax, images[int(query)], QUERY_COLOR, f"query\n{name}")
        if row_titles is not None:
            ax.set_ylabel(row_titles[row], fontsize=8)
        for col in range(k):
            item, hit = int(found.indices[query, col]), bool(found.hits[query, col])
            caption = f"{found.distances[query, col]:.3f}"
            if not hit:
                caption += f"\n{_class_name(labels[item], class_names)}"
            ax = fig.add_subplot(grid[row, col + 1])
            _framed_image(ax, images[item], HIT_COLOR if hit else MISS_COLOR, caption)
    fig.suptitle(
        title or f"top-{k} retrievals (green: same class, red: other class; distance below)",
        fontsize=9,
    )
    return fig


def confused_pairs(labels: Any, found: TopK, *, top: int = 10) -> pd.DataFrame:
    """The class pairs most often retrieved for each other at k = 1.

    Every query whose first neighbour has another class counts once for the unordered
    pair {query class, neighbour class}.
    Returns: a DataFrame sorted by ``count`` (ties: class order) with columns class_a,
        class_b (class_a < class_b), count, a_to_b, b_to_a (the two directions),
        share (count / number of queries) and query, neighbour (the first such query in
        index order and its first neighbour: example images).
    """
    labels = as_numpy(labels)
    first = found.indices[:, 0]
    wrong = np.flatnonzero(labels[first] != labels)
    if len(wrong) == 0:
        columns = ["class_a", "class_b", "count", "a_to_b", "b_to_a", "share", "query", "neighbour"]
        return pd.DataFrame(columns=columns)
    frame = pd.DataFrame({"query_class": labels[wrong], "found_class": labels[first[wrong]]})
    frame["class_a"] = np.minimum(frame.query_class, frame.found_class)
    frame["class_b"] = np.maximum(frame.query_class, frame.found_class)
    frame["a_to_b"] = frame.query_class == frame.class_a
    frame["query"], frame["neighbour"] = wrong, first[wrong]
    table = frame.groupby(["class_a", "class_b"], sort=True).agg(
        count=("query", "size"),
        a_to_b=("a_to_b", "sum"),
        query=("query", "first"),
        neighbour=("neighbour", "first"),
    )
    table["b_to_a"] = table["count"] - table["a_to_b"]
    table["share"] = table["count"] / len(labels)
    table = table.reset_index().sort_values("count", ascending=False, kind="stable").head(top)
    columns = ["class_a", "class_b", "count", "a_to_b", "b_to_a", "share", "query", "neighbour"]
    return table[columns].reset_index(drop=True)


def confused_pairs_figure(
    table: pd.DataFrame,
    images: Mapping[int, np.ndarray],
    *,
    class_names: Mapping[Any, str] | None = None,
    cell: float = 0.9,
) -> Figure:
    """Each confused pair as an example: a query and the other-class image it retrieved."""
    rows = max(len(table), 1)
    height = cell * 1.15 * rows + 0.4
    fig = Figure(figsize=(cell * 2 + 3.6, height))
    grid = fig.add_gridspec(rows, 2, wspace=0.05, hspace=0.3, right=0.4, top=1 - 0.35 / height)
    for row, pair in enumerate(table.itertuples(index=False)):
        query_class = pair.class_a if pair.a_to_b else pair.class_b
        for col, item in enumerate((pair.query, pair.neighbour)):
            ax = fig.add_subplot(grid[row, col])
            _framed_image(ax, images[int(item)], QUERY_COLOR if col == 0 else MISS_COLOR, "")
        names = [_class_name(c, class_names) for c in (pair.class_a, pair.class_b)]
        text = (
            f"{names[0]} ↔ {names[1]}: {pair.count}× at k = 1 ({pair.a_to_b} / {pair.b_to_a})\n"
            f"example: a query of {_class_name(query_class, class_names)}"
        )
        ax.text(1.15, 0.5, text, transform=ax.transAxes, fontsize=8, va="center")
    fig.suptitle("class pairs most often retrieved for each other (first neighbour)", fontsize=9)
    return fig


def _framed_image(ax, image: np.ndarray, color: str, caption: str) -> None:
    image = np.asarray(image)
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(3)
    if caption:
        ax.set_xlabel(caption, fontsize=7, color=color if color != QUERY_COLOR else "black")


def _class_name(label: Any, class_names: Mapping[Any, str] | None) -> str:
    label = label.item() if hasattr(label, "item") else label
    return str(class_names.get(label, label)) if class_names else str(label)

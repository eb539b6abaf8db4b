"""Image-thumbnail maps with zoomed insets, in the style of DAAL (arXiv 2410.05438) Figs. 3-4.

Thumbnails are drawn with ``imshow`` at data-coordinate extents, so an inset (a zoomed
view of the same data) shows the images of its region larger without re-layout. Which
thumbnails are drawn is decided by a seeded order and a greedy non-overlap rule, so the
same inputs always give the same picture.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image, ImageOps

from dmlkit.plotting._common import (
    as_coordinates,
    class_codes,
    class_colors,
    root_figure,
    set_equal_limits,
)

Region = tuple[float, float, float, float]  # (x0, x1, y0, y1) in map coordinates
_INSET_COLORS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def thumbnail_map(
    coords: Any,
    images: Sequence[Any | None],
    *,
    labels: Any | None = None,
    zoom_regions: Sequence[Region] | None = None,
    num_insets: int = 3,
    thumb_size: float = 0.05,
    max_thumbnails: int = 300,
    overlap: float = 0.25,
    region_size: float = 0.12,
    inset_thumb_size: float = 0.16,
    max_inset_thumbnails: int = 40,
    seed: int = 0,
    ax: Axes | None = None,
    figsize: tuple[float, float] = (12.0, 7.5),
    title: str | None = None,
) -> Figure:
    """Images at their t-SNE positions, with zoomed insets on a few regions.

    Args:
        coords: (N, 2) map coordinates. images: N images aligned with ``coords`` (H×W×3/4
            or H×W arrays, uint8 or float in [0, 1]; see ``dataset_images``); ``None``
            marks a point drawn as a dot only.
        labels: optional (N,) classes: dots and thumbnail frames coloured by class.
        zoom_regions: (x0, x1, y0, y1) boxes to zoom into; default ``num_insets`` dense,
            non-overlapping squares chosen by ``dense_regions``.
        thumb_size: thumbnail side as a fraction of the map's extent; ``max_thumbnails``
            caps how many are drawn on the main map.
        overlap: how much two thumbnails may overlap (fraction of a side): candidates are
            tried in a seeded order and kept when no kept one is nearer than
            (1 − overlap) · side (Chebyshev), so dense regions stay readable.
        region_size: side of the automatic regions as a fraction of the map's extent.
        inset_thumb_size, max_inset_thumbnails: thumbnail side (fraction of the region)
            and cap for each inset.
        seed: order in which candidate thumbnails are tried (main map and each inset).
        ax: main Axes; the insets go to its right (leave room). Default: a new Figure.
    Returns: the Figure. The main Axes holds one dot collection, one AxesImage per drawn
        thumbnail and one inset indicator per region; ``ax.child_axes`` are the insets.
    """
    xy = as_coordinates(coords)
    if len(images) != len(xy):
        raise ValueError(f"got {len(images)} images for {len(xy)} points")
    if ax is None:
        ax = Figure(figsize=figsize).add_axes((0.02, 0.03, 0.6, 0.94))
    data = _MapData(xy, images, _point_colors(labels, len(xy)), labels is not None, overlap)
    ax.scatter(xy[:, 0], xy[:, 1], s=4, c=data.colors, linewidth=0, zorder=1)
    side = thumb_size * _extent(xy)
    order = np.random.default_rng(seed).permutation(np.flatnonzero(data.has_image))
    shown = _draw_thumbnails(ax, data, order, side, max_thumbnails)
    if zoom_regions is None:
        zoom_regions = dense_regions(xy, num_insets, size=region_size)
    bounds = _inset_bounds(ax, len(zoom_regions))
    for k, region in enumerate(zoom_regions):
        inset = ax.inset_axes(bounds[k])
        _draw_inset(inset, region, data, [seed, k + 1], inset_thumb_size, max_inset_thumbnails)
        x0, x1, y0, y1 = region
        set_equal_limits(inset, x0, x1, y0, y1, ratio=bounds[k][3] / bounds[k][2] * _ratio(ax))
        _style_inset(ax, inset, region, k)
    lo, hi = xy.min(0) - side, xy.max(0) + side
    set_equal_limits(ax, lo[0], hi[0], lo[1], hi[1])
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title if title is not None else f"{len(shown)} of {len(xy)} images", fontsize=10)
    return root_figure(ax)


def dense_regions(
    coords: Any,
    num_regions: int = 3,
    *,
    size: float = 0.2,
    grid: int = 24,
    separation: float = 1.25,
) -> list[Region]:
    """The densest square windows of the map that are far apart, deterministically.

    Windows of side ``size`` × the map's extent are centred on a ``grid`` × ``grid``
    lattice; each counts the points inside it. The windows are taken greedily by count
    (ties: lattice order) whenever their centre is at least ``separation`` × side away
    (Chebyshev) from every window already taken, so with separation ≥ 1 no two overlap.

    Args: coords: (N, 2). Returns: up to ``num_regions`` (x0, x1, y0, y1), densest first.
    Complexity: O(grid² · N) time, O(64 · N) memory (lattice points in blocks of 64).
    """
    xy = as_coordinates(coords)
    side = size * _extent(xy)
    lo, hi = xy.min(0) + side / 2, xy.max(0) - side / 2
    axes = [
        np.linspace(l, h, grid) if h > l else np.array([(l + h) / 2])
        for l, h in zip(lo, hi, strict=True)
    ]
    centres = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 2)  # (G², 2)
    counts = np.concatenate(
        [
            (np.abs(xy[None] - block[:, None]).max(-1) <= side / 2).sum(1)
            for block in np.array_split(centres, max(1, len(centres) // 64))
        ]
    )
    chosen: list[np.ndarray] = []
    for j in np.argsort(-counts, kind="stable"):
        if len(chosen) == num_regions or counts[j] == 0:
            break
        if all(np.abs(centres[j] - c).max() >= separation * side for c in chosen):
            chosen.append(centres[j])
    half = side / 2
    return [(float(x - half), float(x + half), float(y - half), float(y + half)) for x, y in chosen]


def place_without_overlap(
    coords: np.ndarray, candidates: Sequence[int], spacing: float, *, limit: int
) -> list[int]:
    """Greedily keep candidates (in the given order) at least ``spacing`` from all kept ones.

    Distances are Chebyshev (max over x, y), so with spacing = a thumbnail's side no two
    kept thumbnails overlap. A spatial hash with cells of ``spacing`` makes each test look
    at 9 cells only. Returns at most ``limit`` indices, in the order they were kept.
    """
    cells: dict[tuple[int, int], list[np.ndarray]] = {}
    kept: list[int] = []
    for index in candidates:
        if len(kept) >= limit:
            break
        point = coords[index]
        cx, cy = (int(v) for v in np.floor(point / spacing))
        near = (
            q for dx in (-1, 0, 1) for dy in (-1, 0, 1) for q in cells.get((cx + dx, cy + dy), ())
        )
        if any(np.abs(q - point).max() < spacing for q in near):
            continue
        cells.setdefault((cx, cy), []).append(point)
        kept.append(int(index))
    return kept


class _MapData:
    """What every panel of one thumbnail map draws from."""

    def __init__(self, xy, images, colors, framed: bool, overlap: float) -> None:
        self.xy, self.images, self.colors = xy, images, colors  # (N, 2), N, (N, 4)
        self.framed, self.overlap = framed, overlap
        self.has_image = np.array([image is not None for image in images], dtype=bool)


def _draw_inset(
    inset: Axes, region: Region, data: _MapData, seed: list[int], thumb_fraction: float, limit: int
) -> None:
    """A zoomed view of ``region``: its dots and larger thumbnails of its points."""
    x0, x1, y0, y1 = region
    xy = data.xy
    inside = (xy[:, 0] >= x0) & (xy[:, 0] <= x1) & (xy[:, 1] >= y0) & (xy[:, 1] <= y1)
    inset.scatter(xy[inside, 0], xy[inside, 1], s=8, c=data.colors[inside], linewidth=0)
    side = thumb_fraction * max(x1 - x0, y1 - y0)
    order = np.random.default_rng(seed).permutation(np.flatnonzero(inside & data.has_image))
    _draw_thumbnails(inset, data, order, side, limit)
    inset.set_title(f"{int(inside.sum())} points", fontsize=9)


def _style_inset(ax: Axes, inset: Axes, region: Region, k: int) -> None:
    """Colour-code inset k and its region on the main map; connect them (mark_inset style)."""
    color = _INSET_COLORS[k % len(_INSET_COLORS)]
    letter = chr(ord("A") + k)
    inset.set_xticks([])
    inset.set_yticks([])
    inset.set_title(f"{letter}: {inset.get_title()}", fontsize=9, color=color)
    for spine in inset.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(1.5)
    ax.indicate_inset_zoom(inset, edgecolor=color, linewidth=1.2, alpha=0.9)
    ax.text(
        region[0],
        region[3],
        letter,
        color=color,
        fontsize=10,
        fontweight="bold",
        ha="right",
        va="bottom",
    )


def _draw_thumbnails(
    ax: Axes, data: _MapData, order: np.ndarray, side: float, limit: int
) -> list[int]:
    """One AxesImage (longer side ``side``, centred on its point) per kept candidate."""
    shown = place_without_overlap(data.xy, order, side * (1 - data.overlap), limit=limit)
    for i in shown:
        image = _as_image(data.images[i])
        height, width = image.shape[:2]
        half_w = side * width / max(height, width) / 2
        half_h = side * height / max(height, width) / 2
        x, y = data.xy[i]
        gray = {"cmap": "gray", "vmin": 0, "vmax": 255 if image.dtype == np.uint8 else 1}
        ax.imshow(
            image,
            extent=(x - half_w, x + half_w, y - half_h, y + half_h),
            aspect="auto",
            zorder=2,
            **(gray if image.ndim == 2 else {}),
        )
        if data.framed:
            frame = Rectangle(
                (x - half_w, y - half_h),
                2 * half_w,
                2 * half_h,
                fill=False,
                edgecolor=data.colors[i],
                linewidth=0.8,
                zorder=3,
            )
            ax.add_patch(frame)
    return shown


def _inset_bounds(ax: Axes, count: int, gap: float = 0.04) -> list[tuple[float, ...]]:
    """Square insets stacked to the right of ``ax``, in its axes coordinates."""
    height = min((1 - gap * (count - 1)) / max(count, 1), 0.48)
    width = height * _ratio(ax)
    top = 0.5 + (count * height + (count - 1) * gap) / 2
    return [(1.04, top - (k + 1) * height - k * gap, width, height) for k in range(count)]


def _ratio(ax: Axes) -> float:
    """Height / width of ``ax``'s box in inches."""
    fig = root_figure(ax)
    box = ax.get_position()
    return (box.height * fig.get_figheight()) / (box.width * fig.get_figwidth())


def _point_colors(labels: Any | None, count: int) -> np.ndarray:
    if labels is None:
        return np.tile(np.array([[0.45, 0.45, 0.45, 1.0]]), (count, 1))
    classes, codes = class_codes(labels)
    palette = np.array([(*c, 1.0) for c in class_colors(len(classes))])
    return palette[codes]


def _extent(xy: np.ndarray) -> float:
    extent = float(np.ptp(xy, axis=0).max()) if len(xy) else 0.0
    return extent if extent > 0 else 1.0


def _as_image(image: Any) -> np.ndarray:
    array = np.asarray(image)
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ValueError(f"an image must be H×W, H×W×3 or H×W×4, got shape {array.shape}")
    return array


def dataset_images(dataset: Any, indices: Sequence[int], *, size: int = 64) -> list[np.ndarray]:
    """Thumbnails of ``dataset[i][0]`` for each index: RGB uint8, longer side ``size``.

    Args:
        dataset: indexable, items ``(image, label, ...)`` with a PIL image, as returned by
            ``dmlkit.data.get_dataset(name, split, transform=None)``; H×W(×3) uint8 arrays
            are accepted too. A dataset with a tensor transform is refused (its images are
            normalised tensors, not pictures): build it again with ``transform=None``.
        indices: which items, in the order wanted (e.g. from ``dmlkit.tsne.subsample``).
        size: the longer side in pixels; the aspect ratio is kept (Lanczos resampling).
    Returns: one (h, w, 3) uint8 array per index, max(h, w) == size.
    """
    thumbnails = []
    for index in indices:
        item = dataset[int(index)]
        image = item[0] if isinstance(item, tuple | list) else item
        if isinstance(image, np.ndarray) and image.dtype == np.uint8:
            image = Image.fromarray(image)
        if not isinstance(image, Image.Image):
            raise TypeError(
                f"item {int(index)} holds a {type(image).__name__}, not a PIL image; "
                "build the dataset with transform=None, e.g. "
                "dmlkit.data.get_dataset(name, split, transform=None)"
            )
        image = ImageOps.contain(image.convert("RGB"), (size, size), Image.Resampling.LANCZOS)
        thumbnails.append(np.asarray(image, dtype=np.uint8))
    return thumbnails

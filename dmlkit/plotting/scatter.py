"""Embedding maps as scatter plots: coloured by class, and by mode inside chosen classes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from dmlkit.plotting._common import (
    as_coordinates,
    as_numpy,
    class_codes,
    class_colors,
    figure_and_axes,
    set_equal_limits,
)

# One marker per class in the small multiples (cycled), so classes stay distinguishable
# in print even where the mode colours repeat.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def scatter_by_class(
    coords: Any,
    labels: Any,
    *,
    ax: Axes | None = None,
    max_legend: int = 20,
    point_size: float | None = None,
    alpha: float = 0.8,
    title: str | None = None,
    seed: int = 0,
    figsize: tuple[float, float] = (6.5, 6.0),
) -> Figure:
    """t-SNE map coloured by class (seaborn), the points drawn in data order.

    Args:
        coords: (N, 2) map coordinates. labels: (N,) class labels of any type.
        ax: draw into this Axes (else a new Figure).
        max_legend: classes above this get a shuffled cyclic (HLS) palette and no legend.
        point_size: marker area; default shrinks with N (30 up to 267 points, 3 from 2,667).
        seed: order of the shuffled palette (only used above 20 classes).
    Returns: the Figure. The points are one PathCollection with N offsets.
    """
    xy = as_coordinates(coords)
    classes, codes = class_codes(labels)
    colors = class_colors(len(classes), seed=seed)
    fig, ax = figure_and_axes(ax, figsize)
    names = [str(c) for c in classes]
    show_legend = len(classes) <= max_legend
    size = point_size if point_size is not None else float(np.clip(8000 / len(xy), 3, 30))
    sns.scatterplot(
        x=xy[:, 0],
        y=xy[:, 1],
        hue=np.asarray(names, dtype=object)[codes],
        hue_order=names,
        palette=colors,
        s=size,
        alpha=alpha,
        linewidth=0,
        legend="full" if show_legend else False,
        ax=ax,
    )
    if show_legend:
        ax.legend(
            title="class",
            loc="center left",
            bbox_to_anchor=(1.01, 0.5),
            frameon=False,
            markerscale=max(1.0, 6 / np.sqrt(size)),
        )
    _map_axes(ax, title if title is not None else f"{len(xy)} points, {len(classes)} classes")
    return fig


def scatter_by_mode(
    coords: Any,
    labels: Any,
    modes: Any,
    *,
    classes: Sequence[Any] | None = None,
    num_classes: int = 4,
    mode_names: Mapping[Any, str] | None = None,
    class_names: Mapping[Any, str] | None = None,
    mode_title: str = "mode",
    ncols: int = 4,
    zoom: bool = True,
    point_size: float = 18.0,
    panel_size: float = 3.2,
) -> Figure:
    """Sub-clusters: a few classes' points coloured by mode (e.g. font family), one panel each.

    Args:
        coords: (N, 2) map coordinates. labels: (N,) classes. modes: (N,) sub-cluster
            labels (e.g. the glyph's font family), any type.
        classes: the classes to show; default the ``num_classes`` classes with the most
            distinct modes, then the most points, then the smallest label (deterministic).
        mode_names: display name per mode value (legend), default ``str(mode)``.
        class_names: display name per class for the panel titles (e.g. the glyph's
            character), shown as "name (class id)"; default "class id".
        mode_title: the legend's title (e.g. "font family").
        ncols: panels per row. zoom: limit each panel to its class (the rest of the map
            stays as grey context); else every panel shows the whole map.
    Returns: the Figure: one Axes per class, each with a grey context collection and one
        collection per mode present in the class (marker per class), and one legend of modes.
    """
    xy = as_coordinates(coords)
    labels, modes = as_numpy(labels), as_numpy(modes)
    chosen = list(classes) if classes is not None else _most_modal(labels, modes, num_classes)
    if not chosen:
        raise ValueError("no classes to show")
    all_modes = np.unique(modes[np.isin(labels, chosen)]).tolist()
    mode_colors = dict(zip(all_modes, class_colors(len(all_modes)), strict=True))
    ncols = max(1, min(ncols, len(chosen)))
    nrows = -(-len(chosen) // ncols)
    fig = Figure(figsize=(panel_size * ncols + 1.6, panel_size * nrows + 0.4))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for extra in axes[len(chosen) :]:
        fig.delaxes(extra)
    # Final panel geometry first: the zoomed limits are fitted to each panel's box.
    fig.subplots_adjust(left=0.01, right=1 - 1.5 / fig.get_figwidth(), wspace=0.08, hspace=0.2)
    pad = 0.08 * (float(np.ptp(xy, axis=0).max()) or 1.0)
    for k, (ax, cls) in enumerate(zip(axes, chosen, strict=False)):
        ax.scatter(xy[:, 0], xy[:, 1], s=2, color="0.85", linewidth=0, zorder=1)
        own = labels == cls
        for mode in all_modes:
            pick = own & (modes == mode)
            if pick.any():
                ax.scatter(
                    *xy[pick].T,
                    s=point_size,
                    color=mode_colors[mode],
                    zorder=2,
                    marker=MARKERS[k % len(MARKERS)],
                    edgecolor="white",
                    linewidth=0.4,
                )
        lo, hi = (xy[own] if zoom else xy).min(0) - pad, (xy[own] if zoom else xy).max(0) + pad
        set_equal_limits(ax, lo[0], hi[0], lo[1], hi[1])
        name = (class_names or {}).get(cls)
        _map_axes(ax, f"{name} (class {cls})" if name else f"class {cls}", axis_labels=False)
    names = mode_names or {}
    handles = [
        Line2D([], [], marker="o", linestyle="", color=mode_colors[m], label=names.get(m, str(m)))
        for m in all_modes
    ]
    fig.legend(handles=handles, title=mode_title, loc="center right", frameon=False)
    return fig


def _most_modal(labels: np.ndarray, modes: np.ndarray, count: int) -> list[Any]:
    """The ``count`` classes with the most distinct modes, then most points, then smallest."""
    stats = []
    for cls in np.unique(labels):
        own = labels == cls
        value = cls.item() if hasattr(cls, "item") else cls
        stats.append((-len(np.unique(modes[own])), -int(own.sum()), value))
    return [cls for _, _, cls in sorted(stats)[:count]]


def _map_axes(ax: Axes, title: str, *, axis_labels: bool = True) -> None:
    """Map conventions: equal aspect, no ticks (t-SNE axes carry no units)."""
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xticks([])
    ax.set_yticks([])
    if axis_labels:
        ax.set_xlabel("t-SNE 1")
        ax.set_ylabel("t-SNE 2")
    ax.set_title(title, fontsize=10)

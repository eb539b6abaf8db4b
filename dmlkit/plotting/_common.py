"""Helpers shared by the plotting functions: figure/axes creation, arrays, colours."""

from __future__ import annotations

from typing import Any

import numpy as np
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure


def figure_and_axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    """``ax``'s figure, or a new pyplot-free Figure with one Axes.

    The library never uses pyplot's global figure list, so nothing leaks in long notebook
    sessions and no interactive backend is needed; a returned Figure displays in Jupyter
    when it is a cell's last expression and is written with ``save_figure``.
    """
    if ax is not None:
        return root_figure(ax), ax
    fig = Figure(figsize=figsize)
    return fig, fig.add_subplot()


def root_figure(ax: Axes) -> Figure:
    """The top-level Figure holding ``ax`` (also when ``ax`` is on a SubFigure)."""
    try:
        return ax.get_figure(root=True)
    except TypeError:  # matplotlib < 3.10 has no ``root=``; a SubFigure's .figure is the root
        return ax.figure.figure


def as_numpy(values: Any, *, dtype: Any = None) -> np.ndarray:
    """A NumPy copy of an array, list or torch tensor (any device)."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=dtype)


def as_coordinates(coords: Any) -> np.ndarray:
    """(N, 2) float64 coordinates, checked."""
    array = as_numpy(coords, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 2:
        raise ValueError(f"coords must have shape (N, 2), got {array.shape}")
    return array


def class_colors(num_classes: int, *, seed: int = 0) -> list[tuple[float, float, float]]:
    """Distinct colours for ``num_classes`` classes.

    Up to 20 classes: the tab10/tab20 qualitative palettes. More: evenly spaced hues of
    the cyclic HLS wheel, shuffled with ``seed`` so that neighbouring class ids (often
    neighbours in the map too) do not get neighbouring hues.
    """
    if num_classes <= 10:
        return list(sns.color_palette("tab10", num_classes))
    if num_classes <= 20:
        return list(sns.color_palette("tab20", num_classes))
    hues = list(sns.color_palette("hls", num_classes))
    order = np.random.default_rng(seed).permutation(num_classes)
    return [hues[i] for i in order]


def class_codes(labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique labels, (N,) index of each label among them)."""
    classes, codes = np.unique(as_numpy(labels), return_inverse=True)
    return classes, codes.reshape(-1)


def set_equal_limits(
    ax: Axes, x0: float, x1: float, y0: float, y1: float, *, ratio: float | None = None
) -> None:
    """Limits that contain the box and give equal data units on x and y.

    ``ratio`` is the Axes' height/width in inches (default: from its current position).
    The limits are widened along one axis to match, then the aspect is fixed to "equal"
    with ``adjustable="datalim"`` so a later resize keeps maps undistorted; because the
    limits already fit, matplotlib does not warn about ignoring them.
    """
    if ratio is None:
        fig = root_figure(ax)
        box = ax.get_position()
        ratio = (box.height * fig.get_figheight()) / (box.width * fig.get_figwidth())
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    width, height = max(x1 - x0, 1e-12), max(y1 - y0, 1e-12)
    if height / width < ratio:
        height = width * ratio
    else:
        width = height / ratio
    ax.set_xlim(cx - width / 2, cx + width / 2)
    ax.set_ylim(cy - height / 2, cy + height / 2)
    ax.set_aspect("equal", adjustable="datalim")

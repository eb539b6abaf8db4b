"""Figures for dmlkit: embedding maps, thumbnail maps with insets, training and results plots.

Every function builds a pyplot-free ``matplotlib.figure.Figure`` (safe under the Agg
backend and in headless papermill runs, nothing is shown) and returns it; write it with
``save_figure``, which gives byte-identical PNG/PDF files for identical figures.
"""

from dmlkit.plotting.curves import bar_density_gain, density_plot, learning_curves, metric_vs
from dmlkit.plotting.intervals import density_gain_figure, interval_plot
from dmlkit.plotting.save import save_figure
from dmlkit.plotting.scatter import scatter_by_class, scatter_by_mode
from dmlkit.plotting.thumbnails import (
    dataset_images,
    dense_regions,
    place_without_overlap,
    thumbnail_map,
)

__all__ = [
    "bar_density_gain",
    "dataset_images",
    "dense_regions",
    "density_gain_figure",
    "density_plot",
    "interval_plot",
    "learning_curves",
    "metric_vs",
    "place_without_overlap",
    "save_figure",
    "scatter_by_class",
    "scatter_by_mode",
    "thumbnail_map",
]

"""Figures for dmlkit: embedding maps, thumbnail maps with insets, retrieval galleries,
training and results plots, and the interactive explorer (Bokeh, ``explore.py``).

Every function builds a pyplot-free ``matplotlib.figure.Figure`` (safe under the Agg
backend and in headless papermill runs, nothing is shown) and returns it; write it with
``save_figure``, which gives byte-identical PNG/PDF files for identical figures.
"""

from dmlkit.plotting.curves import bar_density_gain, density_plot, learning_curves, metric_vs
from dmlkit.plotting.explore import (
    embedding_explorer,
    explorer_html,
    needed_items,
    save_explorer,
    show_explorer,
    thumbnail_uris,
)
from dmlkit.plotting.gallery import (
    TopK,
    confused_pairs,
    confused_pairs_figure,
    gallery_queries,
    retrieval_gallery,
    top_k,
)
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
    "TopK",
    "bar_density_gain",
    "confused_pairs",
    "confused_pairs_figure",
    "dataset_images",
    "dense_regions",
    "density_gain_figure",
    "density_plot",
    "embedding_explorer",
    "explorer_html",
    "gallery_queries",
    "interval_plot",
    "learning_curves",
    "metric_vs",
    "needed_items",
    "place_without_overlap",
    "retrieval_gallery",
    "save_explorer",
    "save_figure",
    "scatter_by_class",
    "scatter_by_mode",
    "show_explorer",
    "thumbnail_map",
    "thumbnail_uris",
    "top_k",
]

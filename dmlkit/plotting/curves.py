"""Training and results plots: learning curves, r_c distributions, density gains, sweeps."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from dmlkit.plotting._common import as_numpy, class_colors, figure_and_axes
from dmlkit.results import mean_interval

# Eval metrics (right panel of learning_curves), matched on the last "/"-part of a key.
_METRIC = re.compile(
    r"^(recall@\d+|r@\d+|precision@\d+|map@r|map_at_r|r_precision|r-precision|nmi|"
    r"pi_ratio|π_ratio|spectral_decay|sub_?cluster\w*)$"
)
_METRIC_PREFIXES = ("eval/", "metrics/", "test/", "val/")
# Bookkeeping, not curves.
_SKIP = re.compile(
    r"^(epoch|step|steps|iteration|iterations|time|seconds|\w*_time|lr|"
    r"learning_rate|samples|batches|images_per_s|\w*_per_s)$"
)


def learning_curves(
    history: Sequence[Mapping[str, Any]] | pd.DataFrame,
    *,
    log_loss: bool = False,
    figsize: tuple[float, float] = (11.0, 4.0),
) -> Figure:
    """Loss and its terms per epoch (left), eval metrics at the epochs they exist (right).

    Args:
        history: one dict per epoch. Tolerated keys: ``epoch`` (else 1, 2, ...),
            ``loss``, terms as ``terms/<name>`` or a nested ``terms`` dict (any nested dict
            is flattened with "/"), metrics such as ``recall@1``, ``map@r``, ``nmi`` (also
            under ``eval/`` or ``metrics/``). Missing keys, None/NaN and non-numbers are
            skipped; bookkeeping (``lr``, ``time``, ``step``) is not drawn.
        log_loss: log scale for the loss panel (terms often differ by orders of magnitude).
    Returns: the Figure: one Axes (losses) or two (losses, metrics); one line per key.
    """
    rows = history.to_dict("records") if isinstance(history, pd.DataFrame) else list(history)
    flat = [_flatten(row) for row in rows]
    epochs = [_number(row.get("epoch")) for row in flat]
    epochs = [e if e is not None else i + 1 for i, e in enumerate(epochs)]
    keys = list(dict.fromkeys(k for row in flat for k in row))
    metric_keys = [k for k in keys if _is_metric(k)]
    loss_keys = [k for k in keys if k not in metric_keys and not _SKIP.match(_leaf(k))]
    loss_keys.sort(key=lambda k: k != "loss")  # the total first, terms in logged order
    panels = [("loss", loss_keys)] + ([("metric", metric_keys)] if metric_keys else [])
    fig = Figure(figsize=(figsize[0] * len(panels) / 2, figsize[1]), layout="constrained")
    for ax, (ylabel, names) in zip(
        fig.subplots(1, len(panels), squeeze=False)[0], panels, strict=True
    ):
        for name in names:
            points = [(e, _number(row.get(name))) for e, row in zip(epochs, flat, strict=True)]
            points = [(e, v) for e, v in points if v is not None]
            if points:
                style = {"linewidth": 2.2} if name == "loss" else {"linewidth": 1.3}
                ax.plot(
                    *zip(*points, strict=True),
                    # A single point draws no line: mark it (a one-epoch smoke run).
                    marker="o" if ylabel == "metric" or len(points) == 1 else None,
                    markersize=4,
                    label=_display(name),
                    **style,
                )
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        if ylabel == "loss" and log_loss:
            ax.set_yscale("log")
        if ax.lines:
            ax.legend(fontsize=8, frameon=False)
        ax.grid(alpha=0.3)
    return fig


def density_plot(
    relative_density_by_class: Mapping[str, Any] | Any,
    *,
    ax: Axes | None = None,
    bins: int = 30,
    kde: bool = True,
    xlabel: str = "relative density $r_c$",
    figsize: tuple[float, float] = (6.0, 4.0),
) -> Figure:
    """Distribution of per-class relative density r_c, one or several runs overlaid.

    Args:
        relative_density_by_class: {run name: (C,) r_c values} or one (C,) array.
        bins: histogram bins, shared by all runs (so their shapes compare).
        kde: overlay a kernel density estimate (skipped for < 3 or constant values).
    Returns: the Figure: per run a step histogram (density-normalised), its KDE line and a
        dashed line at its median; the legend names the runs with their medians.
    """
    runs = relative_density_by_class
    if not isinstance(runs, Mapping):
        runs = {"r_c": runs}
    values = {name: _finite(v) for name, v in runs.items()}
    fig, ax = figure_and_axes(ax, figsize)
    everything = np.concatenate([v for v in values.values()] + [np.zeros(0)])
    edges = np.histogram_bin_edges(everything, bins=bins) if len(everything) else bins
    for (name, v), color in zip(values.items(), class_colors(len(values)), strict=True):
        if not len(v):
            continue
        smooth = kde and len(v) >= 3 and np.ptp(v) > 0
        sns.histplot(
            x=v,
            bins=edges,
            stat="density",
            element="step",
            alpha=0.2,
            color=color,
            kde=smooth,
            ax=ax,
            label=f"{name} (median {np.median(v):.3g})",
        )
        ax.axvline(np.median(v), color=color, linestyle="--", linewidth=1.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.legend(fontsize=8, frameon=False)
    return fig


def bar_density_gain(
    table: pd.DataFrame,
    *,
    metric: str = "recall@1",
    loss: str = "loss",
    density: str = "density",
    ax: Axes | None = None,
    annotate: bool = True,
    names: tuple[str, str] = ("without density", "with density"),
    figsize: tuple[float, float] = (7.0, 4.0),
) -> Figure:
    """Per loss, ``metric`` without vs with the density regularizer (mean ± sd over seeds).

    Args:
        table: long format, one row per run: columns ``loss``, ``density`` (bool, 0/1 or
            "true"/"false"/"on"/"off") and ``metric``; extra columns are ignored.
        annotate: write the gain (mean with − mean without) above each loss.
    Returns: the Figure: one bar per (loss, density) present, losses in first-seen order.
    """
    for column in (loss, density, metric):
        if column not in table.columns:
            raise KeyError(f"column {column!r} not in table (has {list(table.columns)})")
    frame = table[[loss, metric]].copy()
    frame["_with"] = [names[int(_flag(v))] for v in table[density]]
    order = list(dict.fromkeys(frame[loss]))
    fig, ax = figure_and_axes(ax, figsize)
    repeated = frame.groupby([loss, "_with"]).size().max() > 1
    palette = ["#9e9e9e", "#1f77b4"]
    sns.barplot(
        data=frame,
        x=loss,
        y=metric,
        hue="_with",
        hue_order=list(names),
        order=order,
        errorbar="sd" if repeated else None,
        palette=palette,
        legend=False,
        ax=ax,
    )
    if annotate:
        means = frame.groupby([loss, "_with"])[metric].mean()
        top = float(frame[metric].max())
        for x, name in enumerate(order):
            if (name, names[0]) in means and (name, names[1]) in means:
                gain = means[(name, names[1])] - means[(name, names[0])]
                ax.text(x, top * 1.04, f"{gain:+.3g}", ha="center", va="bottom", fontsize=9)
        ax.set_ylim(0, top * 1.15)
    ax.set_xlabel(loss)
    ax.set_ylabel(metric)
    handles = [Patch(facecolor=c, label=n) for c, n in zip(palette, names, strict=True)]
    ax.legend(handles=handles, frameon=False, fontsize=8, loc="lower right")
    return fig


def metric_vs(
    x: Sequence[float],
    series: Mapping[str, Any],
    *,
    xlabel: str = "λ",
    ylabel: str | None = None,
    ax: Axes | None = None,
    xscale: str = "linear",
    errors: str = "sd",
    panel_size: tuple[float, float] = (5.0, 3.8),
) -> Figure:
    """One line per series against ``x`` (e.g. Recall@1 vs λ for each target mode).

    Args:
        x: (X,) positions, e.g. λ values. series: {name: values}, values (X,) or
            (seeds, X) (drawn as the mean with error bars); or {metric: {name: values}} for
            one panel per metric (e.g. "recall@1" and "pi_ratio"), sharing x. NaN marks a
            missing point.
        errors: the error bars of (seeds, X) values: "sd" (population std over seeds) or
            "ci" (95 % Student-t interval of the mean, ``dmlkit.results.mean_interval``).
        xscale: "linear", "log", or "symlog" (linear below the smallest positive x, so
            λ = 0 fits on a log-like axis).
        ax: draw into this Axes (flat ``series`` only).
    Returns: the Figure: per panel, one Line2D per series with the means as y-data.
    """
    xs = as_numpy(x, dtype=np.float64)
    nested = all(isinstance(v, Mapping) for v in series.values())
    panels = dict(series) if nested else {ylabel or "": series}
    if nested and ax is not None:
        raise ValueError("nested series draw one panel per metric; ax= needs flat series")
    if ax is not None:
        fig, axes = figure_and_axes(ax, panel_size)[0], [ax]
    else:
        fig = Figure(figsize=(panel_size[0] * len(panels), panel_size[1]), layout="constrained")
        axes = list(fig.subplots(1, len(panels), squeeze=False)[0])
    for ax_, (panel, lines) in zip(axes, panels.items(), strict=True):
        for name, values in lines.items():
            y = as_numpy(values, dtype=np.float64)
            y = y.reshape(-1, len(xs)) if y.size else y.reshape(0, len(xs))
            with warnings.catch_warnings():  # an all-NaN column is a missing point, not news
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = np.nanmean(y, 0) if len(y) else np.full(len(xs), np.nan)
                spread = _spread(y, errors) if len(y) > 1 else None
            ax_.errorbar(
                xs, mean, yerr=spread, marker="o", markersize=4, capsize=3, label=str(name)
            )
        _x_axis(ax_, xs, xscale, xlabel)
        ax_.set_ylabel(panel)
        ax_.legend(fontsize=8, frameon=False)
        ax_.grid(alpha=0.3)
    return fig


def _x_axis(ax: Axes, xs: np.ndarray, xscale: str, xlabel: str) -> None:
    if xscale == "symlog":
        positive = xs[xs > 0]
        ax.set_xscale("symlog", linthresh=float(positive.min()) if len(positive) else 1.0)
    else:
        ax.set_xscale(xscale)
    ax.set_xticks(xs, [f"{v:g}" for v in xs])
    ax.set_xlabel(xlabel)


def _flatten(row: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _number(value: Any) -> float | None:
    """A finite float, or None for anything else (None, NaN, strings, lists, bools)."""
    if isinstance(value, bool | str) or value is None:
        return None
    try:
        number = float(value)  # Python/NumPy numbers and 0-dim tensors
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _leaf(key: str) -> str:
    return key.rsplit("/", 1)[-1].lower()


def _is_metric(key: str) -> bool:
    return bool(_METRIC.match(_leaf(key))) or key.lower().startswith(_METRIC_PREFIXES)


def _display(key: str) -> str:
    return key.split("/", 1)[1] if key.startswith(("terms/", "eval/", "metrics/")) else key


def _finite(values: Any) -> np.ndarray:
    array = as_numpy(values, dtype=np.float64).ravel()
    return array[np.isfinite(array)]


def _spread(y: np.ndarray, errors: str) -> np.ndarray:
    """(X,) or (2, X) error bars of the (seeds, X) values ``y``."""
    if errors == "sd":
        return np.nanstd(y, 0)
    if errors != "ci":
        raise ValueError(f"errors must be 'sd' or 'ci', got {errors!r}")
    bounds = np.array([mean_interval(column)[1:] for column in y.T]).T  # (2, X)
    return np.nan_to_num(np.abs(bounds - np.nanmean(y, 0)))


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in {"true", "1", "yes", "on", "with"}
    return bool(value)

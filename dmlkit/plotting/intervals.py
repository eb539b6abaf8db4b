"""Results with their intervals over seeds: density gains and variant comparisons.

Error bars are 95 % t intervals of the mean over seeds (``dmlkit.results.stats``); a
setting with one seed is drawn without one, and its number says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from dmlkit.plotting._common import figure_and_axes
from dmlkit.results import density_gain, mean_interval

_COLOURS = ("#9e9e9e", "#1f77b4")  # without, with


def density_gain_figure(
    runs: pd.DataFrame,
    *,
    metric: str = "recall@1",
    loss: str = "loss",
    density: str = "density",
    figsize: tuple[float, float] = (11.0, 4.0),
) -> Figure:
    """Left: ``metric`` per loss without and with the regularizer, mean with its 95 %
    interval over seeds. Right: the paired gain (with − without, same seed) per loss,
    with its 95 % interval, and the zero line — an interval crossing it is "no
    measurable effect".

    Args:
        runs: one row per run (``dmlkit.results.load_runs``) with ``loss``, ``density``,
            ``metric`` and ``seed`` columns.
    Returns: the Figure (losses in first-seen order).
    """
    for column in (loss, density, metric):
        if column not in runs.columns:
            raise KeyError(f"column {column!r} not in the table (has {list(runs.columns)})")
    fig = Figure(figsize=figsize)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    order = list(dict.fromkeys(runs[loss]))
    on = runs[density].map(_on)
    width = 0.38
    for side, (name, colour) in enumerate(zip(("without", "with"), _COLOURS, strict=True)):
        stats = [
            mean_interval(runs.loc[(runs[loss] == item) & (on == bool(side)), metric])
            for item in order
        ]
        x = np.arange(len(order)) + (side - 0.5) * width
        means = np.array([s[0] for s in stats])
        errors = _errors(stats)
        left.bar(x, means, width, color=colour, label=f"{name} density")
        left.errorbar(x, means, yerr=errors, fmt="none", ecolor="black", capsize=3, lw=1)
    left.set_xticks(np.arange(len(order)), order)
    left.set_ylabel(metric)
    left.set_title(f"{metric}: mean and 95 % interval over seeds", fontsize=10)
    # Head-room above the tallest bar for the legend, so it never covers a bar.
    bottom, top = left.get_ylim()
    left.set_ylim(bottom, top + 0.15 * (top - bottom))
    left.legend(frameon=False, fontsize=8, loc="upper right", ncol=2)
    gain = density_gain(runs, metric, by=(loss,)).set_index(loss).reindex(order)
    _interval_rows(
        right,
        labels=order,
        means=gain["gain"].to_numpy(),
        lows=gain["gain_ci_low"].to_numpy(),
        highs=gain["gain_ci_high"].to_numpy(),
        counts=gain["n_pairs"].to_numpy(),
    )
    right.set_xlabel(f"gain in {metric} (with − without, paired by seed)")
    right.set_title("density gain, 95 % interval", fontsize=10)
    fig.tight_layout()
    return fig


def interval_plot(
    table: pd.DataFrame,
    *,
    label: str,
    mean: str,
    low: str,
    high: str,
    count: str | None = None,
    reference: float | None = None,
    xlabel: str | None = None,
    ax: Axes | None = None,
    figsize: tuple[float, float] = (6.0, 4.0),
) -> Figure:
    """One row per entry of ``table``: its ``mean`` as a dot and [``low``, ``high``] as a
    bar, top to bottom in table order; ``reference`` draws a dashed vertical line (0 for
    differences, chance level for a measure), ``count`` prints each row's n."""
    fig, ax = figure_and_axes(ax, figsize)
    _interval_rows(
        ax,
        labels=[str(v) for v in table[label]],
        means=table[mean].to_numpy(dtype=float),
        lows=table[low].to_numpy(dtype=float),
        highs=table[high].to_numpy(dtype=float),
        counts=table[count].to_numpy() if count else None,
        reference=reference,
    )
    ax.set_xlabel(xlabel or mean)
    return fig


def _interval_rows(
    ax: Axes,
    *,
    labels: Sequence[str],
    means: np.ndarray,
    lows: np.ndarray,
    highs: np.ndarray,
    counts: np.ndarray | None = None,
    reference: float | None = 0.0,
) -> None:
    y = -np.arange(len(labels), dtype=float)
    has = ~np.isnan(lows) & ~np.isnan(highs)
    ax.hlines(y[has], lows[has], highs[has], color="#1f77b4", lw=2)
    ax.plot(means, y, "o", color="#1f77b4", ms=5)
    if reference is not None:
        ax.axvline(reference, color="black", lw=0.8, ls="--")
    names = list(labels)
    if counts is not None:
        names = [
            f"{name} (n={int(n)})" if not _missing(n) else name
            for name, n in zip(names, counts, strict=True)
        ]
    ax.set_yticks(y, names)
    ax.tick_params(axis="y", labelsize=8)


def _errors(stats: Sequence[tuple[float, float, float]]) -> np.ndarray:
    """(2, n) distances from each mean to its bounds; 0 where there is no interval."""
    lower = [m - lo if not math.isnan(lo) else 0.0 for m, lo, _ in stats]
    upper = [hi - m if not math.isnan(hi) else 0.0 for m, _, hi in stats]
    return np.nan_to_num(np.array([lower, upper]))


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _on(value: object) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in {"true", "1", "yes", "on"}
    return bool(value) and not _missing(value)

"""Read runs' ``metrics.json`` files into a table and summarize it over seeds.

``metrics.json`` (written by ``dmlkit.train.fit``) holds ``config`` (TrainConfig fields),
``metrics`` (final metric name -> float; retrieval metrics are fractions in [0, 1]),
``history`` (per-epoch dicts) and provenance (``git_commit``, ``versions``, ``device``,
``wall_time_s``, ``images_per_s``). Reading is tolerant: a missing metric is NaN, a file
that is not valid JSON is skipped with a warning naming it.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from dmlkit.results.stats import interval_text, mean_interval, paired_difference

METRICS_FILE = "metrics.json"
DEFAULT_BY = ("dataset", "loss", "density")
DEFAULT_METRICS = (
    "map@r",
    "nmi",
    "pi_ratio",
    "subcluster_preservation",
    "subcluster_purity@5",
    "subcluster_ari",
)
"""What :func:`summarize` reports after every ``recall@K`` column the table has."""
PROVENANCE = ("wall_time_s", "images_per_s", "device", "git_commit")
_BASE_COLUMNS = ("sweep", "run")
_SECTIONS = ("config", "metrics", "history")


def load_runs(
    source: str | os.PathLike | Iterable[str | os.PathLike], *, missing_ok: bool = True
) -> pd.DataFrame:
    """One row per run folder holding a ``metrics.json``.

    Args:
        source: a sweep folder (searched recursively), a run folder, a ``metrics.json``,
            a glob pattern (``"papermill_runs/*/*"``; ``**`` allowed), or several of these.
        missing_ok: with no readable ``metrics.json``, warn and return an empty table
            (True) or raise FileNotFoundError (False: what a notebook that writes a
            table from the runs wants, before it writes anything).
    Returns:
        Columns ``sweep``, ``run`` (folder names), the flattened ``config`` (nested dicts as
        ``a.b``), the flattened scalar ``metrics`` as floats (a metric whose name clashes
        with a config field becomes ``metrics.<name>``), ``epochs_run`` (history length),
        provenance (``wall_time_s``, ``images_per_s``, ``device``, ``git_commit``, and any
        other top-level scalar such as ``torch_threads``) and ``path`` (the run folder).
        Rows are sorted by path.
    """
    rows, problems = [], []
    for path in _metrics_files(source):
        row = _read_run(path, problems)
        if row is not None:
            rows.append(row)
    for problem in problems:
        warnings.warn(problem, stacklevel=2)
    if not rows:
        message = f"no readable {METRICS_FILE} under {source!r}"
        if not missing_ok:
            raise FileNotFoundError(f"{message}: is the path right, and has the sweep run?")
        warnings.warn(message, stacklevel=2)
        return pd.DataFrame(columns=[*_BASE_COLUMNS, "path"])
    frame = pd.DataFrame(rows)
    ordered = [*_BASE_COLUMNS, *(c for c in frame.columns if c not in (*_BASE_COLUMNS, "path"))]
    return frame[[*ordered, "path"]].reset_index(drop=True)


def _metrics_files(source: Any) -> list[Path]:
    if isinstance(source, (str, os.PathLike)):
        sources = [source]
    elif isinstance(source, Iterable) and not isinstance(source, (bytes, Mapping)):
        sources = list(source)
    else:
        raise ValueError(f"source must be a path, a glob pattern or a list of them, got {source!r}")
    for item in sources:
        if not isinstance(item, (str, os.PathLike)):
            raise ValueError(f"source: each item must be a path or a glob pattern, got {item!r}")
    found: set[Path] = set()
    for item in sources:
        path = Path(item)
        matches = (
            [path] if path.exists() else [Path(p) for p in glob.glob(str(item), recursive=True)]
        )
        for match in matches:
            if match.is_dir():
                found.update(match.rglob(METRICS_FILE))
            elif match.name == METRICS_FILE:
                found.add(match)
    return sorted(found)


def _read_run(path: Path, problems: list[str]) -> dict[str, Any] | None:
    """One table row from a metrics.json; None (and a line in ``problems``) if unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        problems.append(f"{path}: not valid JSON ({exc}); run skipped")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path}: expected a JSON object, got {type(data).__name__}; skipped")
        return None
    row: dict[str, Any] = {"sweep": path.parent.parent.name, "run": path.parent.name}
    row.update(_flatten(_dict(data, "config", path, problems), keep_lists=True))
    for name, value in _flatten(_dict(data, "metrics", path, problems)).items():
        number = math.nan if isinstance(value, bool) else _number(value)
        if math.isnan(number) and value is not None and not isinstance(value, float):
            # "n/a" or true would otherwise become NaN or 1.0 without a word.
            problems.append(f"{path}: metric {name!r} is {value!r}, not a number; read as NaN")
        row[f"metrics.{name}" if name in row else name] = number
    history = data.get("history")
    row["epochs_run"] = len(history) if isinstance(history, list) else math.nan
    for key in PROVENANCE:
        row[key] = _number(data.get(key)) if key.endswith("_s") else data.get(key)
    for key, value in data.items():  # other top-level facts: torch_threads, world_size, ...
        if key not in row and key not in _SECTIONS and not isinstance(value, (dict, list)):
            row[key] = value
    row["path"] = str(path.parent)
    return row


def _dict(data: dict[str, Any], key: str, path: Path, problems: list[str]) -> dict[str, Any]:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(f"{path}: '{key}' is not an object; ignored")
        return {}
    return value


def _flatten(data: Mapping[str, Any], prefix: str = "", *, keep_lists: bool = False) -> dict:
    # Config lists (eval_ks) become tuples so they can be grouped on; metric lists
    # (per-class r_c) are not one number and are left out of the table.
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}.", keep_lists=keep_lists))
        elif isinstance(value, list):
            if keep_lists:
                flat[name] = tuple(_hashable(v) for v in value)
        else:
            flat[name] = value
    return flat


def _hashable(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return value


def _number(value: Any) -> float:
    if isinstance(value, bool):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def summarize(
    df: pd.DataFrame,
    by: Sequence[str] = DEFAULT_BY,
    metrics: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Mean, sample std (ddof=1) and 95 % t interval of each metric per group, and ``n``.

    The std and the interval are NaN for a group of one run (one seed: no interval). A
    run whose value of a metric is NaN (a diverged run's metrics.json) or missing is not
    averaged: ``<metric>_n`` counts the runs each statistic is over, a warning names the
    groups where it is fewer than ``n``, and ``mean_std_table`` shows it in the cell.

    Args:
        df: from :func:`load_runs`.  by: grouping columns (those absent are dropped with a
            warning).  metrics: metric columns (absent ones give NaN); default: every
            ``recall@K`` column in ``df`` by K (at least ``recall@1``), then
            :data:`DEFAULT_METRICS`.
    Returns:
        ``by`` columns, ``n`` (runs in the group), then per metric ``<metric>_n`` (runs
        with a value), ``<metric>_mean``, ``<metric>_std``, ``<metric>_ci_low``,
        ``<metric>_ci_high`` (``dmlkit.results.stats.mean_interval``, method "t").
    """
    by = _present(df, by)
    if metrics is None:
        metrics = [*_recall_columns(df), *DEFAULT_METRICS]
    groups = _numeric(df, metrics).groupby(by or ["_all"], dropna=False, sort=True)
    out = groups.size().rename("n").to_frame()
    for metric in metrics:
        out[f"{metric}_n"] = groups[metric].count()
        _warn_on_missing(metric, out["n"], out[f"{metric}_n"])
        out[f"{metric}_mean"] = groups[metric].mean()
        out[f"{metric}_std"] = groups[metric].std(ddof=1)
        intervals = groups[metric].apply(lambda values: mean_interval(values)[1:])
        out[f"{metric}_ci_low"] = [low for low, _ in intervals]
        out[f"{metric}_ci_high"] = [high for _, high in intervals]
    return out.reset_index().drop(columns="_all", errors="ignore")


def _warn_on_missing(metric: str, runs: pd.Series, counted: pd.Series) -> None:
    short = runs[(counted > 0) & (counted < runs)]
    if len(short):
        groups = ", ".join(
            f"{'/'.join(map(str, key if isinstance(key, tuple) else (key,)))}: "
            f"{counted[key]} of {runs[key]}"
            for key in short.index
        )
        warnings.warn(
            f"{metric}: some runs have no value (NaN or missing in metrics.json) and are left "
            f"out of its statistics; runs counted per group: {groups}",
            stacklevel=3,
        )


def _recall_columns(df: pd.DataFrame) -> list[str]:
    ks = sorted(int(c[len("recall@") :]) for c in df.columns if re.fullmatch(r"recall@\d+", c))
    return [f"recall@{k}" for k in ks] or ["recall@1"]


def _numeric(df: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    # A copy with each metric as float (NaN where absent or unreadable) and an "_all"
    # column to group on when there are no grouping columns.
    frame = df.assign(_all="all")
    for metric in metrics:
        column = frame[metric] if metric in frame else math.nan
        frame[metric] = pd.to_numeric(column, errors="coerce") if metric in frame else column
    return frame


def mean_std_table(
    summary: pd.DataFrame,
    metrics: Sequence[str] | None = None,
    *,
    floatfmt: str = ".3f",
    scale: float = 1.0,
    intervals: Sequence[str] = (),
) -> pd.DataFrame:
    """A :func:`summarize` table with one ``"mean ± std"`` text column per metric.

    ``scale=100`` shows fractions as percentages; the std is left out when NaN (n = 1).
    A cell over fewer runs than its row's ``n`` says so: ``0.512 ± 0.010 (2 of 3 runs)``.
    ``intervals``: metrics that also get a ``<metric> 95% CI`` column ``[low, high]``
    (right after the metric's own column; "–" for one seed).
    """
    if metrics is None:
        metrics = [c[: -len("_mean")] for c in summary.columns if c.endswith("_mean")]
    suffixes = ("_n", "_mean", "_std", "_ci_low", "_ci_high")
    out = summary[[c for c in summary.columns if not c.endswith(suffixes)]].copy()
    for metric in metrics:
        means, stds = summary[f"{metric}_mean"] * scale, summary[f"{metric}_std"] * scale
        out[metric] = [_mean_std(m, s, floatfmt) for m, s in zip(means, stds, strict=True)]
        if f"{metric}_n" in summary and "n" in summary:
            counts = zip(summary[f"{metric}_n"], summary["n"], strict=True)
            out[metric] = [
                f"{cell} ({c} of {n} runs)" if cell and c < n else cell
                for cell, (c, n) in zip(out[metric], counts, strict=True)
            ]
        if metric in intervals:
            lows = summary[f"{metric}_ci_low"] * scale
            highs = summary[f"{metric}_ci_high"] * scale
            out[f"{metric} 95% CI"] = [
                interval_text(lo, hi, floatfmt) for lo, hi in zip(lows, highs, strict=True)
            ]
    return out


def _mean_std(mean: float, std: float, floatfmt: str) -> str:
    if pd.isna(mean):
        return ""
    return format(mean, floatfmt) if pd.isna(std) else f"{mean:{floatfmt}} ± {std:{floatfmt}}"


def density_gain(
    df: pd.DataFrame,
    metric: str = "recall@1",
    *,
    by: Sequence[str] = ("dataset", "loss"),
    density: str = "density",
    pair_on: Sequence[str] = ("seed",),
) -> pd.DataFrame:
    """Per group (default: dataset × loss), ``metric`` with density minus without, paired.

    Runs with and without the regularizer that share a seed are paired
    (``dmlkit.results.stats.paired_difference``); the gain is the mean of the per-seed
    differences, with its 95 % t interval.

    Args:
        df: from :func:`load_runs`.  metric: the metric column.
        by: grouping columns (absent ones dropped).  density: the on/off column (true/false,
            1/0, "true"/"false", or a weight where > 0 means on).  pair_on: what pairs runs.
    Returns:
        ``by`` columns, ``without``, ``with`` (means over all runs of each side), ``gain``
        (mean paired difference; NaN without a pair), ``gain_ci_low``, ``gain_ci_high``,
        ``n_pairs``, ``verdict`` ("higher", "lower", "no measurable effect" or "no
        interval (one seed)"), ``n_without``, ``n_with``.
    """
    by = _present(df, by)
    frame = _numeric(df, [metric])
    frame["_on"] = frame[density].map(_truthy).astype(bool) if density in frame else False
    pair_on = [c for c in pair_on if c in frame.columns]
    if not pair_on:  # nothing to pair on: the i-th run without is paired with the i-th with
        frame["_pair"] = frame.groupby([*by, "_on"]).cumcount()
        pair_on = ["_pair"]
    rows = []
    for keys, group in frame.groupby(by or ["_all"], dropna=False, sort=True):
        if group[metric].isna().any():
            warnings.warn(
                f"{metric}: {int(group[metric].isna().sum())} run(s) of group {keys} have no "
                "value (NaN or missing in metrics.json) and are left out; n_without and "
                "n_with count the others",
                stacklevel=2,
            )
        off = group.loc[~group["_on"], metric].dropna()
        on = group.loc[group["_on"], metric].dropna()
        pair = paired_difference(group, metric, factor="_on", by=(), pair_on=pair_on).iloc[0]
        rows.append(
            {
                **dict(zip(by, keys if isinstance(keys, tuple) else (keys,), strict=False)),
                "without": off.mean(),
                "with": on.mean(),
                "gain": pair["difference"],
                "gain_ci_low": pair["ci_low"],
                "gain_ci_high": pair["ci_high"],
                "n_pairs": int(pair["n_pairs"]),
                "verdict": pair["verdict"],
                "n_without": len(off),
                "n_with": len(on),
            }
        )
    return pd.DataFrame(rows)


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "yes", "on", "1")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return bool(value > 0) if isinstance(value, (int, float)) else bool(value)


def _present(df: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        warnings.warn(f"columns not in the table, not grouped on: {missing}", stacklevel=3)
    return [c for c in columns if c in df.columns]


def seed_note(summary: pd.DataFrame) -> str:
    """The sentence above a :func:`summarize` table: how many seeds, what the cells are."""
    counts = sorted({int(n) for n in summary["n"]}) if len(summary) else [0]
    if counts[-1] <= 1:
        return (
            "One seed per row (n = 1): no interval. One seed moves Recall@1 by about ±0.03 "
            "between machines, so differences between these rows are not evidence; the "
            "reference results over 5 seeds are in docs/results.md."
        )
    seeds = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
    return (
        f'Mean ± sample std over {seeds} seeds per row (column n); "95% CI": Student-t '
        'interval of the mean over the seeds (docs/methods.md, "Statistics over seeds").'
    )


def gain_table(gain: pd.DataFrame, *, floatfmt: str = ".3f") -> pd.DataFrame:
    """A :func:`density_gain` (or ``paired_difference``) table with text cells: the gain
    signed, its interval as ``[low, high]``, n_pairs and the verdict."""
    difference = "gain" if "gain" in gain else "difference"
    low, high = ("gain_ci_low", "gain_ci_high") if "gain_ci_low" in gain else ("ci_low", "ci_high")
    dropped = [difference, low, high, "std", "n_without", "n_with"]
    out = gain.drop(columns=dropped, errors="ignore").copy()
    out[difference] = [_signed(v, floatfmt) for v in gain[difference]]
    out["95% CI"] = [
        "–" if pd.isna(lo) or pd.isna(hi) else f"[{_signed(lo, floatfmt)}, {_signed(hi, floatfmt)}]"
        for lo, hi in zip(gain[low], gain[high], strict=True)
    ]
    order = [c for c in out.columns if c not in ("n_pairs", "verdict")] + ["n_pairs", "verdict"]
    return out[[c for c in order if c in out.columns]]


def _signed(value: float, floatfmt: str) -> str:
    return "–" if pd.isna(value) else format(value, "+" + floatfmt).replace("-", "−")


def per_run_table(
    runs: pd.DataFrame,
    by: Sequence[str] = (*DEFAULT_BY, "label"),
    metrics: Sequence[str] | None = None,
) -> pd.DataFrame:
    """One row per run — the numbers every interval rests on: ``run``, the ``by`` columns
    present, ``seed``, then the metrics (default: the :func:`summarize` ones)."""
    if metrics is None:
        metrics = [*_recall_columns(runs), *DEFAULT_METRICS]
    columns = ["run", *by, "seed", *metrics]
    present = [c for c in dict.fromkeys(columns) if c in runs.columns]
    return runs[present].sort_values([c for c in ("run",) if c in present]).reset_index(drop=True)


def variant_labels(runs: pd.DataFrame) -> pd.Series:
    """Each run's ``label`` (``TrainConfig.label``), or, where it has none, its loss name
    with " + density" when the regularizer is on — the row names of a variant table."""
    loss = runs["loss"].astype(str) if "loss" in runs else pd.Series("run", index=runs.index)
    density = runs["density"].map(_truthy) if "density" in runs else False
    derived = loss.where(~density, loss + " + density")
    label = runs["label"] if "label" in runs else pd.Series("", index=runs.index)
    given = label.fillna("").astype(str)
    return given.where(given != "", derived).rename("label")


def select_variant(
    summary: pd.DataFrame,
    *,
    candidates: Sequence[str],
    score: str,
    constraint: str,
    reference: str,
    tolerance: float,
    label: str = "label",
) -> str:
    """The candidate with the highest mean ``score`` among those whose mean ``constraint``
    is at least ``reference``'s minus ``tolerance`` (a rule fixed before the runs).

    ``summary``: from :func:`summarize` grouped by ``label``. Ties go to the candidate
    listed first. Raises ValueError when a candidate or the reference has no row.
    """
    rows = summary.set_index(label)
    missing = [c for c in (*candidates, reference) if c not in rows.index]
    if missing:
        raise ValueError(f"no runs for {missing} in the summary (has {list(rows.index)})")
    floor = rows.loc[reference, f"{constraint}_mean"] - tolerance
    allowed = [c for c in candidates if rows.loc[c, f"{constraint}_mean"] >= floor]
    return max(allowed, key=lambda c: (rows.loc[c, f"{score}_mean"], -candidates.index(c)))

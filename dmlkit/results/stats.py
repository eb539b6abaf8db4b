"""Confidence intervals over seeds, and paired differences between two settings.

A sweep repeats each setting over seeds; one seed's number moves by about ±0.03 Recall@1
between machines, so an effect is only claimed where its interval says so. Two
intervals, both for the mean over seeds (docs/methods.md, "Statistics over seeds"):

- ``t``: Student's t interval, mean ± t_{(1+c)/2, n−1} · s/√n (s the sample std);
  exact for normally distributed seed results and the default — with 5 seeds the
  bootstrap's percentiles are too narrow (they ignore that s itself is uncertain).
- ``bootstrap``: the percentile bootstrap of the mean (Efron & Tibshirani 1993, ch. 13),
  ``resamples`` draws with replacement from a generator seeded with ``seed``.

A "with vs without" comparison is *paired*: runs that share a seed share the
initialisation, the batches and the augmentation, so the difference is taken per seed
and the interval is that of the mean difference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

METHODS = ("t", "bootstrap")
CONFIDENCE = 0.95


def mean_interval(
    values: Sequence[float] | np.ndarray,
    *,
    confidence: float = CONFIDENCE,
    method: str = "t",
    resamples: int = 10_000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(mean, low, high): the ``confidence`` interval of the mean of ``values``.

    NaN values are dropped. With fewer than 2 values the bounds are NaN (no interval
    from one seed); with an empty input everything is NaN.
    """
    if method not in METHODS:
        raise ValueError(f"unknown interval method {method!r}; valid: {', '.join(METHODS)}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if len(x) < 2:
        return mean, math.nan, math.nan
    if method == "t":
        half = (
            scipy_stats.t.ppf((1 + confidence) / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
        )
        return mean, mean - float(half), mean + float(half)
    draws = np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))
    means = x[draws].mean(1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return mean, float(low), float(high)


def verdict(low: float, high: float) -> str:
    """ "higher" / "lower" when the interval of a difference excludes 0, else "no
    measurable effect" (also when there is no interval)."""
    if math.isnan(low) or math.isnan(high):
        return "no interval (one seed)"
    if low > 0:
        return "higher"
    if high < 0:
        return "lower"
    return "no measurable effect"


def paired_difference(
    df: pd.DataFrame,
    metric: str = "recall@1",
    *,
    factor: str = "density",
    treatment: Any = True,
    control: Any = False,
    by: Sequence[str] = ("dataset", "loss"),
    pair_on: Sequence[str] = ("seed",),
    confidence: float = CONFIDENCE,
    method: str = "t",
) -> pd.DataFrame:
    """Per group, ``metric`` of ``factor == treatment`` minus ``factor == control``, paired.

    Runs are matched on ``pair_on`` (default: the seed) within each ``by`` group; the
    differences of the matched pairs give the mean difference and its interval. Runs
    without a partner are counted (``unpaired``) but not used.

    Args:
        df: one row per run (``dmlkit.results.load_runs``).  factor: the column that
            differs; ``treatment``/``control`` its two values (compared with ``==`` after
            reading "true"/"false" strings as booleans).
    Returns:
        ``by`` columns, ``control`` and ``treatment`` (mean metric over the paired runs),
        ``difference`` (mean of the paired differences), ``std`` (their sample std),
        ``ci_low``, ``ci_high``, ``n_pairs``, ``unpaired`` and ``verdict``.
    Raises:
        KeyError: a missing column.  ValueError: two runs of one side share a pair key
        (add the column that tells them apart to ``by``).
    """
    for column in (metric, factor, *pair_on):
        if column not in df.columns:
            raise KeyError(f"column {column!r} not in the table (has {list(df.columns)})")
    by = [c for c in by if c in df.columns]
    frame = df.assign(
        _level=df[factor].map(_plain_value),
        _value=pd.to_numeric(df[metric], errors="coerce"),
        _all="all",
    )
    rows = []
    for keys, group in frame.groupby(by or ["_all"], dropna=False, sort=True):
        sides = {}
        for side, level in (("control", control), ("treatment", treatment)):
            part = group[group["_level"] == _plain_value(level)]
            duplicated = part.duplicated(list(pair_on), keep=False)
            if duplicated.any():
                runs = part.loc[duplicated, "run"].tolist() if "run" in part else []
                raise ValueError(
                    f"{factor}={level!r} in group {keys!r}: several runs share "
                    f"{list(pair_on)} ({runs}); add the column that differs to `by`"
                )
            sides[side] = part.set_index(list(pair_on))["_value"]
        paired = pd.concat(sides, axis=1, join="inner").dropna()
        differences = paired["treatment"] - paired["control"]
        mean, low, high = mean_interval(differences, confidence=confidence, method=method)
        unpaired = len(sides["control"]) + len(sides["treatment"]) - 2 * len(paired)
        rows.append(
            {
                **dict(zip(by, keys if isinstance(keys, tuple) else (keys,), strict=False)),
                "control": paired["control"].mean(),
                "treatment": paired["treatment"].mean(),
                "difference": mean,
                "std": differences.std(ddof=1) if len(differences) > 1 else math.nan,
                "ci_low": low,
                "ci_high": high,
                "n_pairs": len(paired),
                "unpaired": unpaired,
                "verdict": verdict(low, high),
            }
        )
    return pd.DataFrame(rows)


def interval_text(low: float, high: float, floatfmt: str = ".3f") -> str:
    """``[low, high]``, or "–" without an interval."""
    if math.isnan(low) or math.isnan(high):
        return "–"
    return f"[{low:{floatfmt}}, {high:{floatfmt}}]"


def _plain_value(value: Any) -> Any:
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    return value

"""The published numbers (docs/methods.md, "Numbers from the papers") and ours beside them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd

from .runs import density_gain

_DMLDA = (
    "Li et al., Deep Metric Learning with Density Adaptivity, IEEE TMM 22(5) 2020, "
    "arXiv 1909.03909 (abstract)"
)
_MS = "Wang et al. 2019 (Multi-Similarity), BN-Inception 512-d; context row in docs/methods.md"
_PA = "Kim et al. 2020 (Proxy-Anchor), BN-Inception 512-d; context row in docs/methods.md"


@dataclass(frozen=True)
class PaperNumber:
    """A published number: ``value`` of ``metric`` (in %) for ``method`` on ``dataset``.

    ``density`` is False/True for DML-DA's baseline/with-density pair and None for the
    context rows (methods without a density variant); ``loss`` is our matching loss name.
    """

    dataset: str
    method: str
    loss: str | None
    density: bool | None
    value: float
    source: str
    metric: str = "recall@1"


# The only published numbers available to this project (docs/methods.md, "Numbers from the papers").
PAPER_NUMBERS: tuple[PaperNumber, ...] = (
    PaperNumber("cars196", "DML-DA", None, False, 67.95, _DMLDA),
    PaperNumber("cars196", "DML-DA", None, True, 77.62, _DMLDA),
    PaperNumber("cub200", "DML-DA", None, False, 52.01, _DMLDA),
    PaperNumber("cub200", "DML-DA", None, True, 55.64, _DMLDA),
    PaperNumber("sop", "DML-DA", None, False, 68.20, _DMLDA),
    PaperNumber("sop", "DML-DA", None, True, 70.56, _DMLDA),
    PaperNumber("cub200", "Multi-Similarity", "ms", None, 65.7, _MS),
    PaperNumber("cars196", "Multi-Similarity", "ms", None, 84.1, _MS),
    PaperNumber("sop", "Multi-Similarity", "ms", None, 78.2, _MS),
    PaperNumber("cub200", "Proxy-Anchor", "proxy_anchor", None, 68.4, _PA),
    PaperNumber("cars196", "Proxy-Anchor", "proxy_anchor", None, 86.1, _PA),
    PaperNumber("sop", "Proxy-Anchor", "proxy_anchor", None, 79.1, _PA),
)


def paper_numbers() -> pd.DataFrame:
    """:data:`PAPER_NUMBERS` as a table."""
    return pd.DataFrame([asdict(p) for p in PAPER_NUMBERS])


def paper_comparison(
    df: pd.DataFrame,
    metric: str = "recall@1",
    *,
    datasets: Sequence[str] | None = None,
    scale: float = 100.0,
) -> pd.DataFrame:
    """The papers' numbers beside ours, per dataset: without / with density and the gain.

    Args:
        df: from :func:`load_runs` (needs ``dataset``, ``loss``, ``density`` columns for
            our rows).  metric: only ``recall@1`` has published numbers.
        datasets: default: the paper datasets present in ``df``, or all of them if none is.
        scale: ours are fractions; 100 puts them in the papers' percent.
    Returns:
        Rows ``dataset``, ``method`` ("DML-DA (paper)", "triplet (ours)", …), ``without``,
        ``with``, ``gain``, ``n`` (our runs without/with, e.g. "3/3"), ``source``.
    """
    papers = [p for p in PAPER_NUMBERS if p.metric == metric]
    known = list(dict.fromkeys(p.dataset for p in papers))
    ours = _ours(df, metric, scale)
    if datasets is None:
        present = [d for d in known if not ours.empty and d in set(ours["dataset"])]
        datasets = present or known
    rows = []
    for dataset in datasets:
        rows += _paper_rows([p for p in papers if p.dataset == dataset])
        if not ours.empty:
            rows += ours[ours["dataset"] == dataset].to_dict("records")
    columns = ["dataset", "method", "without", "with", "gain", "n", "source"]
    return pd.DataFrame(rows, columns=columns)


def _paper_rows(numbers: list[PaperNumber]) -> list[dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for p in numbers:
        row = rows.setdefault(
            p.method,
            {
                "dataset": p.dataset,
                "method": f"{p.method} (paper)",
                "without": math.nan,
                "with": math.nan,
                "n": "",
                "source": p.source,
            },
        )
        row["with" if p.density else "without"] = p.value
    for row in rows.values():
        row["gain"] = row["with"] - row["without"]
    return list(rows.values())


def _ours(df: pd.DataFrame, metric: str, scale: float) -> pd.DataFrame:
    if not {"dataset", "loss"} <= set(df.columns) or df.empty:
        return pd.DataFrame()
    gain = density_gain(df, metric, by=("dataset", "loss"))
    return pd.DataFrame(
        {
            "dataset": gain["dataset"],
            "method": gain["loss"].astype(str) + " (ours)",
            "without": gain["without"] * scale,
            "with": gain["with"] * scale,
            "gain": gain["gain"] * scale,
            "n": gain["n_without"].astype(str) + "/" + gain["n_with"].astype(str),
            "source": "this repository (mean over seeds)",
        }
    )

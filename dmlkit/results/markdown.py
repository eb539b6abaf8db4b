"""Markdown and CSV output for result tables, without the ``tabulate`` dependency."""

from __future__ import annotations

import math
import os
import re
import textwrap
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from ..io import atomic_write_text


def to_markdown(
    df: pd.DataFrame,
    floatfmt: str | Mapping[str, str] = ".3f",
    *,
    index: bool = False,
    na_rep: str = "–",
    note: str | None = None,
) -> str:
    """A GitHub-flavoured Markdown table (no ``tabulate`` needed).

    Args:
        floatfmt: a format spec for every float column, or column -> spec.
        index: include the index as leading column(s).  na_rep: text for NaN/None.
        note: a paragraph written above the table (what the cells are, over how many seeds),
            wrapped at 100 columns.
    Numeric columns are right-aligned; ``|`` in cells is escaped, newlines become spaces.
    """
    frame = df.reset_index() if index else df
    columns = [str(c) for c in frame.columns]
    numeric = [
        pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c])
        for c in frame.columns
    ]
    lines = [
        "| " + " | ".join(_cell(c) for c in columns) + " |",
        "|" + "|".join("---:" if num else "---" for num in numeric) + "|",
    ]
    for row in frame.itertuples(index=False):
        cells = []
        for column, value in zip(columns, row, strict=True):
            fmt = floatfmt.get(column, ".3f") if isinstance(floatfmt, Mapping) else floatfmt
            cells.append(_cell(_text(value, fmt, na_rep)))
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    return f"{_wrap(note)}\n\n{table}" if note else table


def _text(value: Any, floatfmt: str, na_rep: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return na_rep
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, float):
        return format(value, floatfmt)
    return str(value)


def _wrap(note: str) -> str:
    """Each paragraph of ``note`` filled to 100 columns (Markdown reads it the same)."""
    paragraphs = re.split(r"\n\s*\n", note.strip())
    fill = dict(width=100, break_long_words=False, break_on_hyphens=False)
    return "\n\n".join(textwrap.fill(p, **fill) for p in paragraphs)


def _cell(text: str) -> str:
    return text.replace("|", r"\|").replace("\r", " ").replace("\n", " ")


def write_markdown(df: pd.DataFrame, path: str | os.PathLike, **kwargs: Any) -> None:
    """Write :func:`to_markdown` of ``df`` atomically (kwargs as for ``to_markdown``)."""
    atomic_write_text(path, to_markdown(df, **kwargs))


def write_csv(df: pd.DataFrame, path: str | os.PathLike, *, index: bool = False) -> None:
    """Write ``df`` as CSV atomically (``\\n`` line endings, full float precision)."""
    atomic_write_text(path, df.to_csv(index=index, lineterminator="\n"))

"""Byte-reproducible figure files: no timestamps, no version strings, atomic writes."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib as mpl
from matplotlib.figure import Figure

from dmlkit.io import atomic_write_bytes

# Per-format metadata that would otherwise embed the date or the matplotlib version.
_METADATA = {
    "png": {"Software": None},
    "pdf": {"CreationDate": None, "ModDate": None, "Producer": None, "Creator": None},
    "svg": {"Date": None, "Creator": None},
    "ps": {"CreationDate": None, "Creator": None},
    "eps": {"CreationDate": None, "Creator": None},
}
_KNOWN_SUFFIXES = {"png", "pdf", "svg", "ps", "eps", "jpg", "jpeg", "tif", "tiff", "webp"}


def save_figure(
    fig: Figure,
    path: str | os.PathLike,
    *,
    formats: Sequence[str] = ("png", "pdf"),
    dpi: int = 150,
    tight: bool = True,
) -> list[Path]:
    """Write ``fig`` once per format, byte-identical for the same figure and library versions.

    Args:
        fig: the figure (any backend; rendering uses the format's own canvas).
        path: target without extension (``figures/run_tsne``); a known image suffix
            (``.png``, ``.pdf``, ...) is dropped, other dots are kept (``lambda=0.3``).
        formats: file formats, each written to ``<path>.<format>``.
        dpi: resolution of raster formats (PNG); PDF/SVG keep vectors and images as drawn.
        tight: crop to the drawn content (``bbox_inches="tight"``), insets included.
    Returns: the written paths, in ``formats`` order.

    Timestamps and software versions are stripped from the metadata, SVG ids use a fixed
    hash salt, and each file is rendered in memory and then written atomically, so a crash
    never leaves a half-written figure.
    """
    base = Path(path)
    if base.suffix.lstrip(".").lower() in _KNOWN_SUFFIXES:
        base = base.with_suffix("")
    written = []
    for fmt in formats:
        fmt = fmt.lower().lstrip(".")
        target = base.with_name(f"{base.name}.{fmt}")
        buffer = io.BytesIO()
        with mpl.rc_context({"svg.hashsalt": "dmlkit", "pdf.compression": 6}):
            fig.savefig(
                buffer,
                format=fmt,
                dpi=dpi,
                metadata=_METADATA.get(fmt),
                bbox_inches="tight" if tight else None,
                pad_inches=0.05,
            )
        atomic_write_bytes(target, buffer.getvalue())
        written.append(target)
    return written

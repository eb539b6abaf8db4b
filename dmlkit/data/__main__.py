"""``python -m dmlkit.data DATASET [--split ...] [--root ...] [--sheet PATH]``.

Prints the dataset's statistics (classes, images, images per class; for glyphs the font
families/styles and the render or cache-load time) and writes a contact sheet PNG — a grid
of a few classes × samples, drawn with Pillow only so the file is byte-reproducible.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from dmlkit.data import DATASETS, SPLITS, DatasetError, get_dataset
from dmlkit.data.fonts import font_files
from dmlkit.io import atomic_writer

CELL = 64
LABEL_WIDTH = 150
ROWS, COLUMNS = 8, 10  # the contact sheet's default size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dmlkit.data", description=__doc__.split("\n\n")[1]
    )
    parser.add_argument("dataset", choices=list(DATASETS))
    parser.add_argument("--split", choices=[*SPLITS, "both"], default="both")
    parser.add_argument("--root", help="the dataset's folder (default: $DMLKIT_DATA/...)")
    parser.add_argument("--sheet", help="PNG path (default: figures/<name>_contact_sheet.png)")
    parser.add_argument(
        "--classes",
        type=_positive,
        help=f"rows of the contact sheet (default {ROWS}, or every class if there are fewer)",
    )
    parser.add_argument(
        "--samples",
        type=_positive,
        help=f"columns of the contact sheet (default {COLUMNS}, or the largest class's images "
        "if it has fewer)",
    )
    args = parser.parse_args(argv)
    sheet = Path(args.sheet or f"figures/{args.dataset}_contact_sheet.png")
    try:
        image_format = _check_sheet_path(sheet)  # before a possibly long render
    except ValueError as error:
        parser.error(f"--sheet {sheet}: {error}")
    splits = SPLITS if args.split == "both" else (args.split,)
    loaded = []
    try:
        for split in splits:
            start = time.perf_counter()
            dataset = get_dataset(args.dataset, split, root=args.root)
            loaded.append(dataset)
            print(describe(dataset, time.perf_counter() - start))
    except DatasetError as error:  # one message, not a traceback from inside the loader
        sys.stderr.write(f"python -m dmlkit.data: {error}\n")
        return 2
    try:
        picture = contact_sheet(loaded[0], args.classes, args.samples)
    except ValueError as error:
        parser.error(str(error))
    except DatasetError as error:  # an image of the sheet cannot be decoded
        sys.stderr.write(f"python -m dmlkit.data: {error}\n")
        return 2
    with atomic_writer(sheet, "wb") as handle:
        picture.save(handle, format=image_format, optimize=False)
    print(f"contact sheet ({loaded[0].split}): {sheet}")
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _check_sheet_path(sheet: Path) -> str:
    """The Pillow format for ``sheet``'s suffix; ValueError if it cannot be written there."""
    if sheet.is_dir():
        raise ValueError("is a folder; give a file name, e.g. a .png inside it")
    existing = next(p for p in sheet.parents if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise ValueError(f"{existing} is a file, so no folder can be made under it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write in {existing} (permission denied)")
    image_format = Image.registered_extensions().get(sheet.suffix.lower())
    if image_format not in Image.SAVE:
        raise ValueError(f"unknown image type {sheet.suffix or '(no suffix)'!r}; use .png")
    return image_format


def describe(dataset, seconds: float) -> str:
    """Statistics of one split as a few lines of text."""
    per_class = np.bincount(np.searchsorted(dataset.classes, dataset.labels))
    lines = [
        f"{dataset.name} {dataset.split}: {len(dataset.classes):,} classes, "
        f"{len(dataset):,} images; images per class min {per_class.min()}, "
        f"median {np.median(per_class):g}, max {per_class.max()}",
    ]
    if getattr(dataset, "family", None) is not None:
        families = Counter(dataset.family.tolist())
        styles = Counter(dataset.style.tolist())
        lines.append("  families: " + ", ".join(f"{k} {v}" for k, v in sorted(families.items())))
        lines.append("  styles: " + ", ".join(f"{k} {v}" for k, v in sorted(styles.items())))
        how = "loaded from cache" if dataset.from_cache else "rendered (cold)"
        lines.append(f"  {how} in {seconds:.2f} s; image size {dataset.images.shape[1]} px")
    else:
        lines.append(f"  root {dataset.root}; listed and checked in {seconds:.2f} s")
    return "\n".join(lines)


def contact_sheet(dataset, classes: int | None = None, samples: int | None = None) -> Image.Image:
    """Rows: ``classes`` evenly spaced classes; columns: ``samples`` evenly spaced items.

    None: ``ROWS``/``COLUMNS``, fewer if the dataset has fewer classes / images in its
    largest class. A number must lie between 1 and those limits (more would only draw blank
    rows or columns), else ValueError.
    """
    classes, samples = _sheet_size(dataset, classes, samples)
    chosen = dataset.classes[np.linspace(0, len(dataset.classes) - 1, classes).round().astype(int)]
    sheet = Image.new("RGB", (LABEL_WIDTH + samples * CELL, len(chosen) * CELL), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.truetype(str(font_files()[3].path), 13)  # DejaVuSans.ttf
    for row, label in enumerate(np.unique(chosen).tolist()):
        items = np.flatnonzero(dataset.labels == label)
        picks = items[np.linspace(0, len(items) - 1, min(samples, len(items))).round().astype(int)]
        for column, index in enumerate(picks.tolist()):
            image = dataset.image(index)
            thumb = ImageOps.pad(image, (CELL, CELL), color="white")
            sheet.paste(thumb, (LABEL_WIDTH + column * CELL, row * CELL))
        draw.text(
            (4, row * CELL + CELL // 2),
            _row_title(dataset, label),
            fill="black",
            font=font,
            anchor="lm",
        )
    return sheet


def _sheet_size(dataset, classes: int | None, samples: int | None) -> tuple[int, int]:
    available = len(dataset.classes)
    largest = int(np.bincount(np.searchsorted(dataset.classes, dataset.labels)).max(initial=0))
    where = f"the {dataset.split} split of {dataset.name}"
    size = []
    for name, value, default, limit, what in (
        ("classes", classes, ROWS, available, "classes"),
        ("samples", samples, COLUMNS, largest, "images in its largest class"),
    ):
        if value is None:
            size.append(min(default, limit))
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name}: expected a whole number, got {value!r}")
        if not 1 <= value <= limit:
            raise ValueError(
                f"{name}={value}: must be between 1 and {limit} ({where} has {limit} {what})"
            )
        size.append(int(value))
    return size[0], size[1]


def _row_title(dataset, label: int) -> str:
    if dataset.name.startswith("glyphs"):
        return f"U+{label:04X}"
    names = dataset.class_names
    name = names[int(np.searchsorted(dataset.classes, label))] if names else ""
    return f"{label} {name}"[:22]


if __name__ == "__main__":
    sys.exit(main())

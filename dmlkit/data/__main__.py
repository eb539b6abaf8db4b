"""``python -m dmlkit.data DATASET [--split ...] [--root ...] [--sheet PATH]``.

Prints the dataset's statistics (classes, images, images per class; for glyphs the font
families/styles and the render or cache-load time) and writes a contact sheet PNG — a grid
of a few classes × samples, drawn with Pillow only so the file is byte-reproducible.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from dmlkit.data import DATASETS, SPLITS, get_dataset
from dmlkit.data.fonts import font_files

CELL = 64
LABEL_WIDTH = 150


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dmlkit.data", description=__doc__.split("\n\n")[1]
    )
    parser.add_argument("dataset", choices=list(DATASETS))
    parser.add_argument("--split", choices=[*SPLITS, "both"], default="both")
    parser.add_argument("--root", help="the dataset's folder (default: $DMLKIT_DATA/...)")
    parser.add_argument("--sheet", help="PNG path (default: figures/<name>_contact_sheet.png)")
    parser.add_argument("--classes", type=int, default=8, help="rows of the contact sheet")
    parser.add_argument("--samples", type=int, default=10, help="columns of the contact sheet")
    args = parser.parse_args(argv)
    splits = SPLITS if args.split == "both" else (args.split,)
    loaded = []
    for split in splits:
        start = time.perf_counter()
        dataset = get_dataset(args.dataset, split, root=args.root)
        loaded.append(dataset)
        print(describe(dataset, time.perf_counter() - start))
    sheet = Path(args.sheet or f"figures/{args.dataset}_contact_sheet.png")
    sheet.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(loaded[0], args.classes, args.samples).save(sheet, optimize=False)
    print(f"contact sheet ({loaded[0].split}): {sheet}")
    return 0


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


def contact_sheet(dataset, classes: int = 8, samples: int = 10) -> Image.Image:
    """Rows: ``classes`` evenly spaced classes; columns: ``samples`` evenly spaced items."""
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


def _row_title(dataset, label: int) -> str:
    if dataset.name.startswith("glyphs"):
        return f"U+{label:04X}"
    names = dataset.class_names
    name = names[int(np.searchsorted(dataset.classes, label))] if names else ""
    return f"{label} {name}"[:22]


if __name__ == "__main__":
    sys.exit(main())

"""CUB-200-2011, Stanford Online Products and ``folder`` trees; the loader of every
image-file dataset (Cars196's ``.mat`` parsing is in ``cars.py``).

Splits are class-disjoint (docs/datasets.md): CUB train = classes
1–100, test = 101–200 (``train_test_split.txt`` is the classification split and is not
read); Cars196 train = 1–98, test = 99–196; SOP = Ebay_train.txt / Ebay_test.txt.
Every parser reads untrusted text: each problem becomes a DatasetError with file and line.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence

from dmlkit.data.cars import NUM_CLASSES as CARS_CLASSES
from dmlkit.data.cars import parse_cars
from dmlkit.data.errors import DatasetError
from dmlkit.data.images import (
    ImageListDataset,
    Listing,
    check_images_exist,
    parse_integer,
    read_lines,
    safe_relative_path,
    warn_on_counts,
)

OFFICIAL_COUNTS = {
    "cub200": {"train": 5864, "test": 5924},
    "cars196": {"train": 8054, "test": 8131},
    "sop": {"train": 59551, "test": 60502},
}
# (last train class, last class)
CLASS_SPLITS = {"cub200": (100, 200), "cars196": (98, CARS_CLASSES)}
SOP_HEADER = ["image_id", "class_id", "super_class_id", "path"]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


def load_official(
    name: str,
    split: str,
    root: str,
    transform: str | Callable | None = None,
    *,
    skip_bad_images: bool = False,
    bad_images_log: str | os.PathLike | None = None,
    check_counts: bool = True,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    decoded_cache: bool | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> ImageListDataset:
    """One split of cub200 / cars196 / sop / folder under ``root`` (checked on disk).

    ``decoded_cache`` (with transform "train"/"test"): read the images decoded and resized
    once into ``cache_dir`` (default ``$DMLKIT_CACHE/decoded``) instead of decoding every
    file every epoch; None is on for cub200, cars196 and sop, off for folder trees.
    """
    if not os.path.isdir(root):
        raise DatasetError(name, "dataset root does not exist or is not a folder", file=root)
    if name == "folder":
        listing = parse_folder(root, split, extensions)
    elif name == "sop":
        listing = parse_sop(root, split)
    else:
        listing = parse_cub(root) if name == "cub200" else parse_cars(root)
        last_train, last = CLASS_SPLITS[name]
        for label, source in zip(listing.labels, listing.sources, strict=True):
            if not 1 <= label <= last:
                raise DatasetError(name, f"class id {label} in {source} is outside 1..{last}")
        listing = listing.select(
            [(label <= last_train) == (split == "train") for label in listing.labels]
        )
    if not listing.relpaths:
        raise DatasetError(name, f"the {split} split has no images", file=root)
    check_images_exist(name, root, listing)
    if check_counts and name in OFFICIAL_COUNTS:
        warn_on_counts(name, split, len(listing.relpaths), OFFICIAL_COUNTS[name][split])
    return ImageListDataset(
        name,
        split,
        root,
        listing,
        transform,
        skip_bad_images=skip_bad_images,
        bad_images_log=bad_images_log,
        decoded_cache=name != "folder" if decoded_cache is None else decoded_cache,
        cache_dir=cache_dir,
    )


def parse_cub(root: str) -> Listing:
    """images.txt + image_class_labels.txt + classes.txt → every image, sorted by id."""
    images = _id_table("cub200", os.path.join(root, "images.txt"), "<image_id> <path>")
    labels = _id_table(
        "cub200", os.path.join(root, "image_class_labels.txt"), "<image_id> <class_id>"
    )
    names = _id_table("cub200", os.path.join(root, "classes.txt"), "<class_id> <name>")
    _same_ids(images, labels)
    listing = Listing([], [], [])
    for image_id in sorted(images):
        relpath, path, line = images[image_id]
        token, label_path, label_line = labels[image_id]
        label = parse_integer("cub200", token, "class id", label_path, label_line)
        if label not in names:
            raise DatasetError(
                "cub200",
                f"class id {label} is not in classes.txt",
                file=label_path,
                line=label_line,
            )
        relpath = safe_relative_path("cub200", relpath, path, line)
        listing.relpaths.append(f"images/{relpath}")
        listing.labels.append(label)
        listing.sources.append(f"images.txt line {line}")
    listing.class_names = {cid: value[0] for cid, value in names.items()}
    return listing


def parse_sop(root: str, split: str) -> Listing:
    """Ebay_<split>.txt: header, then ``image_id class_id super_class_id path`` lines."""
    path = os.path.join(root, f"Ebay_{split}.txt")
    lines = read_lines("sop", path)
    if not lines or lines[0][1].split() != SOP_HEADER:
        raise DatasetError(
            "sop",
            f"the first line must be the header {' '.join(SOP_HEADER)!r}",
            file=path,
            line=lines[0][0] if lines else 1,
        )
    listing = Listing([], [], [], extra={"super_labels": []})
    seen: dict[int, int] = {}
    for number, text in lines[1:]:
        fields = text.split()
        if len(fields) != 4:
            raise DatasetError(
                "sop",
                f"expected 4 fields '{' '.join(SOP_HEADER)}', got {len(fields)}: {text[:80]!r}",
                file=path,
                line=number,
            )
        image_id, class_id, super_id = (
            parse_integer("sop", token, what, path, number)
            for token, what in zip(fields[:3], SOP_HEADER[:3], strict=True)
        )
        if image_id in seen:
            raise DatasetError(
                "sop",
                f"duplicate image_id {image_id} (first on line {seen[image_id]})",
                file=path,
                line=number,
            )
        seen[image_id] = number
        listing.relpaths.append(safe_relative_path("sop", fields[3], path, number))
        listing.labels.append(class_id)
        listing.extra["super_labels"].append(super_id)
        listing.sources.append(f"Ebay_{split}.txt line {number}")
    return listing


def parse_folder(root: str, split: str, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> Listing:
    """``root/<class name>/<image>``: label = index of the name among all sorted names;
    train = the first ⌈n/2⌉ names, test = the rest."""
    names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if len(names) < 2:
        raise DatasetError(
            "folder", f"needs at least 2 class folders, found {len(names)}", file=root
        )
    half = (len(names) + 1) // 2
    chosen = range(half) if split == "train" else range(half, len(names))
    suffixes = tuple(ext.lower() for ext in extensions)
    listing = Listing([], [], [], class_names={})
    for label in chosen:
        folder = os.path.join(root, names[label])
        files = sorted(
            e.name for e in os.scandir(folder) if e.is_file() and e.name.lower().endswith(suffixes)
        )
        if not files:
            warnings.warn(
                f"folder: class folder {folder} has no images; skipped", UserWarning, stacklevel=3
            )
            continue
        for file_name in files:
            relpath = f"{names[label]}/{file_name}"
            _require_utf8("folder", os.path.join(root, relpath))
            listing.relpaths.append(relpath)
            listing.labels.append(label)
            listing.sources.append(f"folder {names[label]}")
        listing.class_names[label] = names[label]
    return listing


def _id_table(dataset: str, path: str, layout: str) -> dict[int, tuple[str, str, int]]:
    """``<id> <value>`` lines → {id: (value, file, line)}; ids unique."""
    table: dict[int, tuple[str, str, int]] = {}
    for number, text in read_lines(dataset, path):
        fields = text.split()
        if len(fields) != 2:
            raise DatasetError(
                dataset, f"expected '{layout}', got {text[:80]!r}", file=path, line=number
            )
        key = parse_integer(dataset, fields[0], layout.split()[0].strip("<>"), path, number)
        if key in table:
            raise DatasetError(
                dataset,
                f"duplicate id {key} (first on line {table[key][2]})",
                file=path,
                line=number,
            )
        table[key] = (fields[1], path, number)
    if not table:
        raise DatasetError(dataset, "metadata file is empty", file=path)
    return table


def _same_ids(images: dict, labels: dict) -> None:
    for key in sorted(set(images) ^ set(labels)):
        where, other = (
            (images, "image_class_labels.txt") if key in images else (labels, "images.txt")
        )
        _, path, line = where[key]
        raise DatasetError(
            "cub200", f"image id {key} has no entry in {other}", file=path, line=line
        )


def _require_utf8(dataset: str, path: str) -> None:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise DatasetError(dataset, "file name is not valid UTF-8; rename it", file=path) from None

"""Tiny datasets in the exact official on-disk formats, for tests (no downloads).

Import them anywhere: ``from tests.fixtures_datasets import make_cub``. Each builder
writes into ``root`` and returns it; images are 8×8 JPEGs whose colour encodes the item.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

CUB_CLASSES = 200
CARS_CLASSES = 196


def write_jpeg(path: str | os.PathLike, seed: int, size: int = 8) -> Path:
    """An RGB JPEG of ``size``×``size`` random pixels (seeded)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)
    return path


def write_image_modes(
    folder: str | os.PathLike, size: int = 24
) -> dict[str, tuple[Path, np.ndarray]]:
    """One file per kind of image a real dataset holds; name → (path, RGB uint8 it shows).

    Grayscale and CMYK JPEGs, palette PNG with transparency, RGBA and LA PNGs, a 16-bit
    grayscale PNG (mid-grey and a ramp), an RGB PNG and a GIF named .jpg (SOP has some).
    The expected pixels are Pillow's own conversion to RGB, except for 16-bit grayscale,
    whose 0…65535 range maps to 0…255.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    ramp = np.arange(size * size, dtype=np.uint32).reshape(size, size) * 65535 // (size * size)
    sources = {
        "gray.jpg": (Image.fromarray(rgb[..., 0], "L"), "JPEG"),
        "cmyk.jpg": (Image.fromarray(rgb).convert("CMYK"), "JPEG"),
        "palette.png": (Image.fromarray(rgb).quantize(16), "PNG"),
        "rgba.png": (Image.fromarray(np.dstack([rgb, rgb[..., :1]]), "RGBA"), "PNG"),
        "la.png": (Image.fromarray(np.dstack([rgb[..., 0], rgb[..., 1]]), "LA"), "PNG"),
        "rgb.png": (Image.fromarray(rgb), "PNG"),
        "gif-named.jpg": (Image.fromarray(rgb).quantize(32), "GIF"),
        "grey16.png": (Image.fromarray(np.full((size, size), 32768, np.uint16)), "PNG"),
        "ramp16.png": (Image.fromarray(ramp.astype(np.uint16)), "PNG"),
    }
    sources["palette.png"][0].info["transparency"] = 3
    files = {}
    for name, (image, kind) in sources.items():
        path = folder / name
        image.save(path, format=kind)
        with Image.open(path) as saved:
            if saved.mode.startswith("I"):
                wide = np.asarray(saved, dtype=np.float64)
                expected = np.repeat(np.rint(wide * 255 / 65535).astype(np.uint8)[..., None], 3, 2)
            else:
                expected = np.asarray(saved.convert("RGB"))
        files[name] = (path, expected)
    return files


def make_cub(root, images_per_class: int = 1, classes: int = CUB_CLASSES) -> Path:
    """CUB_200_2011/: images.txt, image_class_labels.txt, classes.txt, train_test_split.txt
    (a deliberately misleading classification split: every other image is 'train') and
    images/<NNN.Name>/<Name>_<k>.jpg."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    images, labels, names, split = [], [], [], []
    image_id = 0
    for class_id in range(1, classes + 1):
        folder = f"{class_id:03d}.Bird_{class_id}"
        names.append(f"{class_id} {folder}")
        for k in range(images_per_class):
            image_id += 1
            relpath = f"{folder}/Bird_{class_id}_{k:04d}_{image_id}.jpg"
            write_jpeg(root / "images" / relpath, seed=image_id)
            images.append(f"{image_id} {relpath}")
            labels.append(f"{image_id} {class_id}")
            split.append(f"{image_id} {image_id % 2}")
    for name, lines in (
        ("images.txt", images),
        ("image_class_labels.txt", labels),
        ("classes.txt", names),
        ("train_test_split.txt", split),
    ):
        (root / name).write_text("\n".join(lines) + "\n")
    return root


def make_cars(
    root, layout: str = "A", images_per_class: int = 1, test_annos_in_devkit: bool = False
) -> Path:
    """Cars196 in layout "A" (car_ims/ + cars_annos.mat) or "B" (devkit). The ``test`` flag
    marks every other image, unrelated to the class-id split the loader must use."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    class_names = np.array([f"Maker Model {c} 20{c % 13:02d}" for c in range(1, 197)], dtype=object)
    entries = []  # (class_id, test flag, index)
    for class_id in range(1, CARS_CLASSES + 1):
        for _ in range(images_per_class):
            entries.append((class_id, len(entries) % 2, len(entries) + 1))
    if layout == "A":
        rows = []
        for class_id, test, index in entries:
            relpath = f"car_ims/{index:06d}.jpg"
            write_jpeg(root / relpath, seed=index)
            rows.append((relpath, *_bbox(index), np.uint8(class_id), np.uint8(test)))
        fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
        scipy.io.savemat(
            root / "cars_annos.mat",
            {"annotations": _struct(fields, rows), "class_names": class_names[None, :]},
        )
    elif layout == "B":
        (root / "devkit").mkdir(exist_ok=True)
        for test_flag, folder, mat in (
            (0, "cars_train", root / "devkit" / "cars_train_annos.mat"),
            (
                1,
                "cars_test",
                (root / "devkit" if test_annos_in_devkit else root)
                / "cars_test_annos_withlabels.mat",
            ),
        ):
            rows = []
            for class_id, test, index in entries:
                if test == test_flag:
                    fname = f"{index:05d}.jpg"
                    write_jpeg(root / folder / fname, seed=index)
                    rows.append((*_bbox(index), np.uint8(class_id), fname))
            fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
            scipy.io.savemat(mat, {"annotations": _struct(fields, rows)})
        scipy.io.savemat(root / "devkit" / "cars_meta.mat", {"class_names": class_names[None, :]})
    else:
        raise ValueError(f"layout must be 'A' or 'B', got {layout!r}")
    return root


def make_sop(
    root,
    classes_per_split: int = 6,
    images_per_class: int = 2,
    super_classes: tuple[str, ...] = ("bicycle", "chair", "mug"),
) -> Path:
    """Stanford_Online_Products/: Ebay_train.txt, Ebay_test.txt (header + one line per
    image), images <super>_final/<class>_<k>.JPG; train classes 1..n, test n+1..2n."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    image_id = 0
    for split, first in (("train", 1), ("test", classes_per_split + 1)):
        lines = ["image_id class_id super_class_id path"]
        for class_id in range(first, first + classes_per_split):
            super_id = class_id % len(super_classes) + 1
            for k in range(images_per_class):
                image_id += 1
                relpath = f"{super_classes[super_id - 1]}_final/{class_id}_{k}.JPG"
                write_jpeg(root / relpath, seed=image_id)
                lines.append(f"{image_id} {class_id} {super_id} {relpath}")
        (root / f"Ebay_{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def make_folder(
    root, class_names=("ant", "bee", "cat", "dog", "eel"), images_per_class: int = 2
) -> Path:
    """root/<class name>/<k>.jpg for each name."""
    root = Path(root)
    for c, name in enumerate(class_names):
        for k in range(images_per_class):
            write_jpeg(root / name / f"{k}.jpg", seed=100 * c + k)
    return root


def _bbox(index: int) -> tuple:
    return (np.uint16(1), np.uint16(1), np.uint16(7 + index % 3), np.uint16(7))


def _struct(fields: list[str], rows: list[tuple]) -> np.ndarray:
    """A 1×N MATLAB struct array (what the published .mat files hold)."""
    records = np.empty((1, len(rows)), dtype=[(f, object) for f in fields])
    for j, row in enumerate(rows):
        records[0, j] = row
    return records


_GLYPH_CACHES: dict[int, Path] = {}


def glyph_cache_dir(tmp_path_factory) -> Path:
    """A cache folder with the glyph class analysis done (~5 s, once per test process).

    Use it as ``DMLKIT_CACHE`` / ``cache_dir=``; wrap it in a fixture of your test module:
    ``cache = pytest.fixture(scope="session")(lambda tmp_path_factory: glyph_cache_dir(...))``.
    """
    from dmlkit.data.glyphs import load_charset

    key = id(tmp_path_factory)
    if key not in _GLYPH_CACHES:
        cache = tmp_path_factory.mktemp("dmlkit-cache")
        load_charset(cache)
        _GLYPH_CACHES[key] = cache
    return _GLYPH_CACHES[key]

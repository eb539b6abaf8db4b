"""One API for every dataset: ``get_dataset(name, split, root=None, transform=None, **options)``.

Every dataset returns ``(image, label)`` and carries ``labels`` ((N,) int64, the
dataset's own class ids: CUB test labels are 101..200, glyph labels are code points),
``classes`` (sorted unique ids), ``paths`` (list of str; None for glyphs) and
``class_names`` (aligned with ``classes``; None for SOP). See docs/datasets.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from dmlkit.data.errors import DatasetError
from dmlkit.data.transforms import PROTOCOLS, GlyphTransform, transforms

DATASETS: dict[str, str] = {
    "glyphs": "all usable characters of matplotlib's 18 font files, class-disjoint halves "
    "(embedded, rendered on first use)",
    "glyphs-mini": "100 train + 100 test glyph classes, >= 16 images each (demo and tests)",
    "cub200": "CUB-200-2011 birds: train classes 1-100 (5,864 images), test 101-200 (5,924)",
    "cars196": "Stanford Cars: train classes 1-98 (8,054 images), test 99-196 (8,131)",
    "sop": "Stanford Online Products: Ebay_train.txt (59,551 images, 11,318 classes), "
    "Ebay_test.txt (60,502, 11,316)",
    "folder": "any root/<class name>/<image> tree: first half of the sorted class names "
    "train, second half test",
}
SPLITS = ("train", "test")
DATA_FOLDERS = {"cub200": "CUB_200_2011", "cars196": "cars196", "sop": "Stanford_Online_Products"}
_IMAGE_OPTIONS = ("skip_bad_images", "bad_images_log", "decoded_cache", "cache_dir")
OFFICIAL_OPTIONS = (*_IMAGE_OPTIONS, "check_counts")
FOLDER_OPTIONS = (*_IMAGE_OPTIONS, "extensions")

__all__ = [
    "DATASETS",
    "SPLITS",
    "PROTOCOLS",
    "DatasetError",
    "GlyphTransform",
    "get_dataset",
    "options_of",
    "transforms",
]


def get_dataset(
    name: str,
    split: str,
    root: str | os.PathLike | None = None,
    transform: str | Callable | None = None,
    **options: Any,
) -> torch.utils.data.Dataset:
    """One split of a dataset.

    Args:
        name: one of DATASETS.  split: "train" or "test" (class-disjoint).
        root: the dataset's own folder; None → ``$DMLKIT_DATA/<CUB_200_2011 | cars196 |
            Stanford_Online_Products>``. Ignored by glyphs (see ``cache_dir``).
        transform: None → PIL RGB image; "train"/"test" → the protocol's tensors
            ("glyphs" for glyphs, "imagenet" otherwise); or any callable on PIL RGB. A
            ``GlyphTransform`` (e.g. ``transforms("glyphs", True)``) given
            to glyphs runs on the uint8 pixels directly, like "train"/"test".
        options: see ``options_of(name)``; glyphs: size, seed, cache_dir and the jitter
            knobs of ``dmlkit.data.augment.GlyphJitter``; cub200/cars196/sop:
            skip_bad_images=False, bad_images_log=None (a file every process appends each
            skipped path to), decoded_cache=None (on; see ``load_official``),
            cache_dir=None, check_counts=True; folder: the same (decoded_cache off), and
            extensions.
    Raises:
        ValueError: unknown name/split/transform.  TypeError: unknown option.
        DatasetError: missing or malformed data.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    if not (transform is None or transform in ("train", "test") or callable(transform)):
        raise ValueError(
            f"transform must be None, 'train', 'test' or a callable, got {transform!r}"
        )
    unknown = sorted(set(options) - set(options_of(name)))
    if unknown:
        raise TypeError(
            f"get_dataset({name!r}): unknown option(s) {', '.join(unknown)}; "
            f"valid: {', '.join(options_of(name))}"
        )
    if name.startswith("glyphs"):
        from dmlkit.data.glyphs import load_glyphs

        return load_glyphs(name, split, transform, **options)
    from dmlkit.data.official import load_official

    return load_official(name, split, _resolve_root(name, root), transform, **options)


def options_of(name: str) -> tuple[str, ...]:
    """The keyword options ``get_dataset(name, ...)`` accepts."""
    if name.startswith("glyphs"):
        from dmlkit.data.glyphs import GLYPH_OPTIONS

        return GLYPH_OPTIONS
    return FOLDER_OPTIONS if name == "folder" else OFFICIAL_OPTIONS


def _resolve_root(name: str, root: str | os.PathLike | None) -> str:
    if root is not None:
        return os.fspath(root)
    base = os.environ.get("DMLKIT_DATA")
    if name == "folder" or not base:
        hint = (
            ""
            if name == "folder"
            else f" or set DMLKIT_DATA (looked for $DMLKIT_DATA/{DATA_FOLDERS[name]})"
        )
        raise DatasetError(name, f"no dataset root given: pass root=...{hint}")
    return os.path.join(base, DATA_FOLDERS[name])

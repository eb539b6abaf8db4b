"""The embedded default dataset: characters rendered from matplotlib's fonts.

A class is a character (label = its Unicode code point), a sample is that character
drawn by one font file with seeded jitter (``augment.py``), ``renders_per_font`` times per
font. Classes come from ``charset.analyse_characters``; the split is class-disjoint: the
usable code points are shuffled with ``seed``, the first half trains, the second tests.
``glyphs-mini`` takes the first 100 classes of each half (so its classes are a subset of
``glyphs``' and its images identical to theirs: every sample's generator is seeded from
(seed, code point, font, rendering) alone).

Cache (``$DMLKIT_CACHE`` or ``~/.cache/dmlkit``, under ``glyphs/``): the class analysis as
JSON and each rendered split as ``images.npy`` (memory-mapped on load) + ``meta.npz``,
in a folder named by a hash of every option, the Pillow/FreeType/matplotlib/numpy/scipy
versions and FORMAT_VERSION. Writes are atomic; ``meta.npz`` is written last and marks a
complete entry. Concurrent first loads render twice and write identical bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import numbers
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dmlkit.data.augment import GlyphJitter, jitter_glyph
from dmlkit.data.charset import ANALYSIS_SIZE, Charset, analyse_characters
from dmlkit.data.fonts import FontFile, font_files, render_clean
from dmlkit.data.transforms import GlyphTransform
from dmlkit.io import atomic_writer, cache_root, write_json
from dmlkit.samplers import SampleKey, sample_key

FORMAT_VERSION = 1
MINI_CLASSES_PER_SPLIT = 100
GLYPH_OPTIONS = ("size", "seed", "cache_dir", *(f.name for f in dataclasses.fields(GlyphJitter)))
_LOG = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    return cache_root()


def library_fingerprint() -> dict[str, str]:
    """Versions that can change rendered pixels (FreeType hinting, RNG streams, EDT)."""
    import matplotlib
    import PIL
    import scipy
    from PIL import features

    return {
        "format": str(FORMAT_VERSION),
        "pillow": PIL.__version__,
        "freetype": str(features.version("freetype2")),
        "matplotlib": matplotlib.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
    }


def load_charset(cache_dir: Path, log: Callable[[str], None] = _LOG.info) -> Charset:
    """The usable classes, from the cache or analysed (~5 s) and cached."""
    key = {"analysis_size": ANALYSIS_SIZE, **library_fingerprint()}
    path = cache_dir / "glyphs" / f"charset-{_digest(key)}.json"
    try:
        data = json.loads(path.read_text())
        return Charset(
            codepoints=data["codepoints"],
            fonts={int(k): v for k, v in data["fonts"].items()},
            candidates=data["candidates"],
            blank=data["blank"],
            homoglyphs={int(k): v for k, v in data["homoglyphs"].items()},
        )
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, AttributeError) as error:
        _LOG.warning("glyphs: unreadable class list %s (%s); analysing again", path, error)
    charset = analyse_characters(font_files(), log=log)
    try:
        write_json(path, {"key": key, **dataclasses.asdict(charset)})
    except OSError as error:
        _LOG.warning("glyphs: cannot write the cache %s (%s); not cached", path, error)
    return charset


def split_classes(codepoints: list[int], preset: str, seed: int) -> dict[str, list[int]]:
    """{"train": [...], "test": [...]} sorted code points of a preset (class-disjoint)."""
    order = np.random.default_rng(seed).permutation(len(codepoints))
    shuffled = [codepoints[i] for i in order]
    half = len(shuffled) // 2
    train, test = shuffled[:half], shuffled[half:]
    if preset == "glyphs-mini":
        train, test = train[:MINI_CLASSES_PER_SPLIT], test[:MINI_CLASSES_PER_SPLIT]
    return {"train": sorted(train), "test": sorted(test)}


def render_glyphs(
    codepoints: list[int],
    charset: Charset,
    fonts: list[FontFile],
    *,
    size: int,
    seed: int,
    jitter: GlyphJitter,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render every (class, font, rendering) sample, in that order.

    Returns: images (N, size, size) uint8, labels (N,) int64 code points, fonts (N,) int16
    indices into ``fonts``. Cost: O(N) renders at ~0.2 ms each.
    """
    jobs = [(cp, f) for cp in codepoints for f in charset.fonts[cp]]
    count = len(jobs) * jitter.renders_per_font
    images = np.empty((count, size, size), np.uint8)
    labels = np.empty(count, np.int64)
    font_index = np.empty(count, np.int16)
    item = 0
    for cp, f in jobs:
        clean = render_clean(fonts[f], cp, 2 * size)
        for k in range(jitter.renders_per_font):
            rng = np.random.default_rng([seed, cp, f, k])
            images[item] = jitter_glyph(clean, size, jitter, rng)
            labels[item], font_index[item] = cp, f
            item += 1
    return images, labels, font_index


class GlyphDataset(torch.utils.data.Dataset):
    """``(image, label)`` pairs of one glyphs split; built by ``load_glyphs``.

    Attributes:
        labels: (N,) int64 code points.  classes: sorted unique labels.  paths: None.
        family, style, font: (N,) str arrays (font family, style, font file name).
        font_index: (N,) int16 index of each item's font in ``font_files()``.
        class_names: the characters, aligned with ``classes``.
        images: (N, S, S) uint8, dark ink on light paper (memory-mapped when cached).
        load_seconds: wall time of the load (render or cache read); from_cache: which.
        cache_key: every option and library version the pixels depend on.
    """

    accepts_sample_keys = True  # see dmlkit.samplers.SampleKey

    def __init__(self, images, labels, font_index, fonts, transform, *, name, split):
        self.images, self.labels = images, labels
        self._pixels = np.asarray(images)  # plain view: np.memmap indexing costs ~10 µs/item
        self.classes = np.unique(labels)
        self.class_names = [chr(cp) for cp in self.classes]
        self.paths = None
        self.font_index, self._fonts = font_index, fonts
        self._describe_fonts()
        self.name, self.split = name, split
        self.transform = transform
        self._tensor_transform = None
        if isinstance(transform, GlyphTransform):  # e.g. transforms("glyphs", True)
            self._tensor_transform = transform
        elif transform in ("train", "test"):
            self._tensor_transform = GlyphTransform(transform == "train")
        self.images_path: Path | None = None
        self.cache_key: dict | None = None
        self.load_seconds, self.from_cache = 0.0, False

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: int | SampleKey) -> tuple[Any, int]:
        index, rng = sample_key(key)
        label = int(self.labels[index])
        if self._tensor_transform is not None:  # (S, S) uint8 → (3, S, S)
            return self._tensor_transform(self._pixels[index], rng), label
        image = self.image(index)
        return (self.transform(image) if self.transform is not None else image), label

    def image(self, index: int) -> Image.Image:
        """Item ``index`` as a PIL RGB image, whatever the transform."""
        return Image.fromarray(self._pixels[index], "L").convert("RGB")

    def _describe_fonts(self) -> None:
        fonts, index = self._fonts, self.font_index
        self.font = np.array([f.name for f in fonts])[index]
        self.family = np.array([f.family for f in fonts])[index]
        self.style = np.array([f.style for f in fonts])[index]

    def __getstate__(self) -> dict:
        # DataLoader workers under spawn pickle the dataset: send the file name, not the
        # memory-mapped pixels, and font indices, not three arrays of strings.
        state = self.__dict__.copy()
        for derived in ("font", "family", "style", "_pixels"):
            del state[derived]
        if self.images_path is not None:
            state["images"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._describe_fonts()
        if self.images is None:
            self.images = np.load(self.images_path, mmap_mode="r")
        self._pixels = np.asarray(self.images)

    def __repr__(self) -> str:
        return (
            f"GlyphDataset({self.name!r}, split={self.split!r}, images={len(self)}, "
            f"classes={len(self.classes)})"
        )


def load_glyphs(
    preset: str,
    split: str,
    transform: str | Callable | None = None,
    *,
    size: int = 64,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] = _LOG.info,
    **jitter_options: Any,
) -> GlyphDataset:
    """One split of ``glyphs``/``glyphs-mini``: from the cache, or rendered and cached."""
    jitter = GlyphJitter(**jitter_options)
    _validate(size, seed, jitter)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    start = time.perf_counter()
    key = {
        "preset": preset,
        "split": split,
        "size": size,
        "seed": seed,
        **dataclasses.asdict(jitter),
        **library_fingerprint(),
    }
    folder = cache / "glyphs" / f"{preset}-{split}-{_digest(key)}"
    fonts = font_files()
    entry = _read_entry(folder)
    from_cache = entry is not None
    if entry is None:
        charset = load_charset(cache, log)
        codepoints = split_classes(charset.codepoints, preset, seed)[split]
        rendered = render_glyphs(codepoints, charset, fonts, size=size, seed=seed, jitter=jitter)
        entry = _write_entry(folder, key, *rendered)
    images, labels, font_index = entry
    dataset = GlyphDataset(images, labels, font_index, fonts, transform, name=preset, split=split)
    if isinstance(images, np.memmap):
        dataset.images_path = folder / "images.npy"
    dataset.cache_key = key  # what the pixels are a function of (dmlkit.data.identity)
    dataset.from_cache, dataset.load_seconds = from_cache, time.perf_counter() - start
    log(
        f"{preset}/{split}: {len(labels)} images, {len(dataset.classes)} classes, "
        f"{'cached' if from_cache else 'rendered'} in {dataset.load_seconds:.2f} s"
    )
    return dataset


def _read_entry(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The cached split (images memory-mapped), or None when absent or unreadable."""
    if not (folder / "meta.npz").exists():
        return None
    try:
        with np.load(folder / "meta.npz") as meta:
            labels, font_index = meta["labels"], meta["fonts"]
        images = np.load(folder / "images.npy", mmap_mode="r")
    except Exception as error:  # torn or foreign files: BadZipFile, ValueError, OSError...
        _LOG.warning("glyphs: unreadable cache entry %s (%s); rendering again", folder, error)
        return None
    if len(images) != len(labels):
        return None
    return images, labels, font_index


def _write_entry(folder: Path, key: dict, images, labels, font_index) -> tuple:
    """Cache the split; on a read-only or full disk keep it in memory and say so."""
    try:
        write_json(folder / "key.json", key)
        with atomic_writer(folder / "images.npy") as handle:
            np.save(handle, images)
        with atomic_writer(folder / "meta.npz") as handle:
            np.savez(handle, labels=labels, fonts=font_index)
    except OSError as error:
        _LOG.warning("glyphs: cannot write the cache %s (%s); not cached", folder, error)
        return images, labels, font_index
    return np.load(folder / "images.npy", mmap_mode="r"), labels, font_index


def _validate(size: int, seed: int, jitter: GlyphJitter) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ValueError(f"glyphs: size must be an int >= 8, got {size!r}")
    # Checked here, not by numpy after the charset analysis: one clear message, early.
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"glyphs: seed must be an int >= 0, got {seed!r}")


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

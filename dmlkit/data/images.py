"""Image-file datasets: the shared Dataset class, safe metadata reading, decode handling."""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import torch
from PIL import Image

from dmlkit.data.errors import DatasetError
from dmlkit.data.transforms import ImagenetTransform, transforms
from dmlkit.samplers import SampleKey, sample_key

_LOG = logging.getLogger(__name__)
_INTEGER = re.compile(r"[0-9]+")
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass
class Listing:
    """What a metadata parser found: one entry per image, paths relative to the root.

    ``sources`` says where each entry was listed ("images.txt line 3") for messages.
    """

    relpaths: list[str]
    labels: list[int]
    sources: list[str]
    class_names: dict[int, str] | None = None
    extra: dict[str, list] = field(default_factory=dict)

    def select(self, keep: Sequence[bool]) -> Listing:
        pick = [i for i, k in enumerate(keep) if k]
        return Listing(
            [self.relpaths[i] for i in pick],
            [self.labels[i] for i in pick],
            [self.sources[i] for i in pick],
            self.class_names,
            {key: [values[i] for i in pick] for key, values in self.extra.items()},
        )


class ImageListDataset(torch.utils.data.Dataset):
    """``(image, label)`` from image files (CUB, Cars196, SOP, folder).

    With ``transform`` "train"/"test" (the ImageNet protocol) and ``decoded_cache``, items
    are cut from the decoded cache (``dmlkit.data.decoded``); otherwise PIL decodes the
    file for every item. An item fetched with a ``SampleKey`` (``fit``'s and ``embed``'s
    loaders) draws its augmentation from the key's generator and, from the cache, is a
    uint8 ``Crop`` that the device finishes (``dmlkit.data.crops``); ``dataset[i]`` is the
    finished tensor.

    Attributes:
        labels: (N,) int64 class ids.  classes: sorted unique ids.  paths: absolute paths.
        class_names: names aligned with ``classes`` (None when the dataset has none).
        decoded: the ``DecodedImages`` in use, or None.
        bad_images: paths that failed to decode (``skip_bad_images=True``), in the order
            met — per process: DataLoader workers keep their own lists. With
            ``bad_images_log`` set, every process also appends each path it skips to that
            file (see ``append_bad_image``), so a trainer can count them across workers.
        substitute_bad_images: with ``skip_bad_images``, what a bad image becomes: the next
            decodable image of its class (True: training keeps its P×K batches) or a 1×1
            black placeholder (False: for evaluation, which leaves the item out — a copy of
            another test image would be a guaranteed hit).
    """

    accepts_sample_keys = True  # see dmlkit.samplers.SampleKey

    def __init__(
        self,
        name: str,
        split: str,
        root: str,
        listing: Listing,
        transform: str | Callable | None,
        *,
        skip_bad_images: bool = False,
        bad_images_log: str | os.PathLike | None = None,
        decoded_cache: bool = False,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        self.name, self.split, self.root = name, split, root
        self.paths = [os.path.join(root, rel) for rel in listing.relpaths]
        self.labels = np.asarray(listing.labels, dtype=np.int64)
        self.classes = np.unique(self.labels)
        names = listing.class_names
        self.class_names = [names[c] for c in self.classes.tolist()] if names else None
        for key, values in listing.extra.items():
            setattr(self, key, np.asarray(values))
        self.transform = transform
        if transform in ("train", "test"):
            self.transform = transforms("imagenet", train=transform == "train")
        self.skip_bad_images = skip_bad_images
        self.bad_images_log = os.fspath(bad_images_log) if bad_images_log is not None else None
        self.bad_images: list[str] = []
        self.substitute_bad_images = True
        self.decoded = None
        if decoded_cache and isinstance(self.transform, ImagenetTransform):
            from dmlkit.data.decoded import decoded_images

            self.decoded = decoded_images(
                name,
                split,
                self.paths,
                functools.partial(decode_image, name),
                self.transform.resize,
                f"Resize({self.transform.resize_to})",
                cache_dir=cache_dir,
            )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: int | SampleKey) -> tuple[Any, int]:
        index, rng = sample_key(key)
        label = int(self.labels[index])
        if self.decoded is not None:
            crop = self.transform.crop(self._pixels(index), rng)
            return (crop if isinstance(key, SampleKey) else crop.finish()), label
        image = self.image(index)
        if isinstance(self.transform, ImagenetTransform):
            return self.transform(image, rng), label
        return (self.transform(image) if self.transform is not None else image), label

    def image(self, index: int) -> Image.Image:
        """Item ``index`` as a PIL RGB image (or its substitute), whatever the transform."""
        return self._load(index, lambda i: decode_image(self.name, self.paths[i]), (1, 1))

    def _pixels(self, index: int) -> np.ndarray:
        """Item ``index``'s resized uint8 pixels (H, W, 3) from the decoded cache."""

        def cached(i: int) -> np.ndarray:
            pixels = self.decoded[i]
            if pixels is None:
                raise DatasetError(
                    self.name,
                    "cannot decode image (found building the decoded cache)",
                    file=self.paths[i],
                )
            return pixels

        return self._load(index, cached, None)

    def _load(self, index: int, load: Callable[[int], Any], placeholder: Any) -> Any:
        """``load(index)``, or with ``skip_bad_images`` what a bad image becomes."""
        try:
            return load(index)
        except DatasetError:
            if not self.skip_bad_images:
                raise
            self._record_bad(self.paths[index])
        if not self.substitute_bad_images:
            if placeholder is None:  # a black crop of the output size
                return np.zeros((self.transform.crop_size,) * 2 + (3,), np.uint8)
            return Image.new("RGB", placeholder)
        # The next decodable image of the same class (cyclically): deterministic, and the
        # batch keeps its P×K class structure.
        same = np.flatnonzero(self.labels == self.labels[index])
        start = int(np.searchsorted(same, index))
        for other in np.roll(same, -start)[1:].tolist():
            if self.paths[other] in self.bad_images:
                continue
            try:
                return load(other)
            except DatasetError:
                self._record_bad(self.paths[other])
        raise DatasetError(
            self.name,
            f"no image of class {int(self.labels[index])} can be decoded",
            file=self.paths[index],
        )

    def _record_bad(self, path: str) -> None:
        if path not in self.bad_images:
            self.bad_images.append(path)
            _LOG.warning("%s: skipping undecodable image %s", self.name, path)
            if self.bad_images_log is not None:
                append_bad_image(self.bad_images_log, path)

    def __repr__(self) -> str:
        return (
            f"ImageListDataset({self.name!r}, split={self.split!r}, images={len(self)}, "
            f"classes={len(self.classes)}, root={self.root!r})"
        )


def decode_image(dataset: str, path: str) -> Image.Image:
    """The image at ``path`` as PIL RGB, fully decoded; DatasetError if it cannot be.

    Any mode Pillow reads (grayscale, palette, alpha, CMYK; a GIF named .jpg) is converted
    by Pillow, except 16-bit grayscale ("I;16…", "I"), which Pillow's conversion clips to
    255 (a mid-grey 32768 would turn white): its 0…65535 range is scaled to 0…255.
    """
    try:
        with Image.open(path) as image:
            if image.mode.startswith("I"):
                wide = np.asarray(image, dtype=np.float64).clip(0, 65535)
                narrow = np.rint(wide * (255 / 65535)).astype(np.uint8)
                return Image.fromarray(narrow, "L").convert("RGB")
            return image.convert("RGB")
    except Exception as error:  # decoders raise OSError, SyntaxError, ValueError, EOFError...
        raise DatasetError(
            dataset, f"cannot decode image ({type(error).__name__}: {error})", file=path
        ) from error


def append_bad_image(log: str | os.PathLike, path: str) -> None:
    """Append ``path`` to ``log`` as one JSON string per line (any process may call it).

    One ``write`` on an ``O_APPEND`` descriptor: lines from DataLoader workers and ranks
    writing at once land whole and never overwrite each other. JSON keeps names with
    newlines or non-UTF-8 bytes (surrogate escapes) on one line, and reversible.
    """
    line = (json.dumps(path) + "\n").encode("ascii")
    try:
        # The folder may not exist yet: a run folder is created with its first checkpoint.
        os.makedirs(os.path.dirname(os.path.abspath(log)), exist_ok=True)
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
    except OSError as error:
        raise OSError(
            error.errno, f"cannot record the undecodable image {path} in {log}: {error}"
        ) from error


def read_bad_images(log: str | os.PathLike) -> list[str]:
    """The distinct paths in a ``bad_images_log``, sorted; ``[]`` when it does not exist.

    A line that is not a JSON string (torn by a crash mid-write) is skipped.
    """
    try:
        with open(log, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        return []
    paths = set()
    for line in raw.splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, str):
            paths.add(value)
    return sorted(paths)


def read_lines(dataset: str, path: str) -> list[tuple[int, str]]:
    """Non-empty lines of a UTF-8 text file as (line number, stripped text)."""
    if not os.path.isfile(path):
        raise DatasetError(dataset, "metadata file is missing", file=path)
    with open(path, "rb") as handle:
        raw = handle.read()
    lines = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            text = line.decode("utf-8").strip()
        except UnicodeDecodeError as error:
            raise DatasetError(
                dataset,
                f"not UTF-8 text ({error.reason} at byte {error.start})",
                file=path,
                line=number,
            ) from None
        if text:
            lines.append((number, text))
    return lines


def parse_integer(dataset: str, token: str, what: str, path: str, line: int) -> int:
    if not _INTEGER.fullmatch(token):
        raise DatasetError(
            dataset, f"{what} must be a non-negative integer, got {token!r}", file=path, line=line
        )
    return int(token)


def safe_relative_path(dataset: str, relpath: str, path: str, line: int | None) -> str:
    """``relpath`` if it names a file inside the dataset root; DatasetError otherwise.

    Rejects absolute paths, drive letters, ``..`` components and control characters:
    metadata is untrusted input and must not make the loader read outside the root.
    """
    parts = PurePosixPath(relpath.replace("\\", "/")).parts
    if (
        not relpath
        or relpath.startswith(("/", "\\"))
        or _WINDOWS_DRIVE.match(relpath)
        or ".." in parts
        or any(ord(ch) < 32 for ch in relpath)
    ):
        raise DatasetError(
            dataset,
            f"image path {relpath!r} is not inside the dataset root "
            "(absolute, '..' or control characters)",
            file=path,
            line=line,
        )
    return relpath


def check_images_exist(dataset: str, root: str, listing: Listing) -> None:
    """DatasetError for the first listed image that is not a file under ``root``."""
    for relpath, source in zip(listing.relpaths, listing.sources, strict=True):
        full = os.path.join(root, relpath)
        if not os.path.isfile(full):
            raise DatasetError(dataset, f"image listed in {source} is not on disk", file=full)


def warn_on_counts(dataset: str, split: str, count: int, official: int) -> None:
    if count != official:
        warnings.warn(
            f"{dataset} {split}: {count:,} images, the official split has {official:,} — a "
            "subset or modified copy (fine for experiments; numbers are not comparable "
            "with the papers')",
            UserWarning,
            stacklevel=4,
        )

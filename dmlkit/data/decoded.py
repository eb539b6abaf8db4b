"""Decoded images on disk: every image of a split decoded and resized once, memory-mapped.

The ImageNet protocol's first step is ``Resize(256)``, which depends on the file alone;
storing its uint8 result turns a training epoch's JPEG decoding into a memory read
(docs/methods.md#input-pipeline). An entry lives in
``$DMLKIT_CACHE/decoded/<dataset>-<split>-<digest>/``: ``pixels.u8`` (the images, HWC
RGB, back to back) and ``index.npy`` ((N, 3) int64 offset, height, width; height 0 marks
an image that could not be decoded). The digest covers each file's absolute path, size
and modification time, the resize and Pillow's version, so an edited or replaced image,
or another Pillow, makes a new entry. An entry is built in a temporary folder by a pool
of processes and renamed into place whole, under a lock: a killed build leaves nothing
that a later run would read.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import PIL
from tqdm import tqdm

from dmlkit.data.errors import DatasetError
from dmlkit.io import cache_root, exclusive_lock


def default_cache_dir() -> Path:
    return cache_root() / "decoded"


class DecodedImages:
    """The decoded images of one entry; ``images[i]`` is (H, W, 3) uint8 or None (bad).

    Pickles as its folder (DataLoader workers map the file again instead of copying it).
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.index = np.load(self.folder / "index.npy")  # (N, 3) offset, height, width
        expected = int((self.index[:, 1] * self.index[:, 2]).sum()) * 3
        size = os.path.getsize(self.folder / "pixels.u8")
        if size != expected:  # truncated or replaced after it was built
            raise DatasetError(
                "decoded cache",
                f"pixels.u8 holds {size:,} bytes where its index needs {expected:,}: the entry "
                f"was damaged after it was built; delete {self.folder} and it is built again",
                file=str(self.folder / "pixels.u8"),
            )
        self._pixels = np.memmap(self.folder / "pixels.u8", np.uint8, "r") if size else None

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> np.ndarray | None:
        offset, height, width = self.index[i].tolist()
        if height == 0:
            return None
        return self._pixels[offset : offset + height * width * 3].reshape(height, width, 3)

    def bad(self) -> np.ndarray:
        """Indices of the images that could not be decoded."""
        return np.flatnonzero(self.index[:, 1] == 0)

    def __getstate__(self) -> dict:
        return {"folder": self.folder}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["folder"])


def decoded_images(
    dataset: str,
    split: str,
    paths: Sequence[str],
    decode: Callable,
    resize: Callable,
    resize_name: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    processes: int | None = None,
    progress: bool = True,
) -> DecodedImages:
    """The cache entry of ``paths``, each read by ``decode`` (path → PIL RGB image; a
    DatasetError marks the file undecodable) and ``resize`` (PIL → PIL), built if missing.

    ``resize_name`` identifies ``resize`` in the key (e.g. "Resize(256)"); both callables
    must pickle (a process pool runs them).
    """
    paths = [os.path.abspath(p) for p in paths]
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = folder / f"{dataset}-{split}-{_digest(paths, resize_name)}"
    if (folder / "index.npy").is_file():
        return DecodedImages(folder)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(f"{folder}.lock", f"the decoded-image cache {folder}", wait=True):
            if not (folder / "index.npy").is_file():  # another process may have built it
                _build(folder, dataset, split, paths, decode, resize, processes, progress)
    except OSError as error:  # a full disk, a read-only cache folder
        raise OSError(
            error.errno,
            f"cannot build the decoded-image cache in {folder.parent} ({error.strerror or error}):"
            " free space there, point DMLKIT_CACHE (or the dataset option cache_dir) elsewhere,"
            " or read the files directly with decoded_cache=False",
        ) from error
    return DecodedImages(folder)


def _build(folder: Path, dataset, split, paths, decode, resize, processes, progress) -> None:
    temporary = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        index = np.zeros((len(paths), 3), np.int64)
        offset = 0
        processes = max(1, min(processes or os.cpu_count() or 1, len(paths) // 64 or 1))
        jobs = [(decode, path, resize) for path in paths]
        with open(temporary / "pixels.u8", "wb") as out, _pool(processes) as pool:
            results = pool.imap(_decode, jobs, chunksize=16)
            bar = tqdm(
                results,
                total=len(paths),
                desc=f"decoding {dataset} {split} (once)",
                unit="img",
                disable=not progress,
            )
            for i, pixels in enumerate(bar):
                if pixels is not None:
                    out.write(pixels.tobytes())
                    index[i] = offset, *pixels.shape[:2]
                    offset += pixels.size
        np.save(temporary / "index.npy", index)
        (temporary / "key.json").write_text(json.dumps({"dataset": dataset, "images": len(paths)}))
        os.replace(temporary, folder)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


class _pool:
    """A process pool, or the calling process itself for one process (no start-up cost)."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self._pool = None

    def __enter__(self):
        if self.processes > 1:
            self._pool = multiprocessing.get_context("spawn").Pool(self.processes)
            return self._pool
        return self

    def imap(self, function, jobs, chunksize=1):
        return map(function, jobs)

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.terminate()


def _decode(job) -> np.ndarray | None:
    decode, path, resize = job
    try:
        return np.asarray(resize(decode(path)), np.uint8)
    except DatasetError:
        return None


def _digest(paths: list[str], resize_name: str) -> str:
    files = []
    for path in paths:
        try:
            stat = os.stat(path)
            files.append((path, stat.st_size, stat.st_mtime_ns))
        except OSError:
            files.append((path, -1, -1))
    key = {"files": files, "resize": resize_name, "pillow": PIL.__version__}
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]

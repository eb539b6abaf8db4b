"""Image transforms per protocol (METHODS.md, "Protocols").

- ``"imagenet"``: train = resize 256 → RandomResizedCrop 224 → horizontal flip; test =
  resize 256 → center crop 224; both ImageNet mean/std. torchvision draws the random
  crops from torch's global generator, which DataLoader seeds per worker from its own
  ``generator`` — pass one to the DataLoader for reproducible epochs.
- ``"glyphs"``: the heavy distortions are baked in at render time (``augment.py``), so
  the train transform is a light, cheap random shift (and optional small scale) done on
  tensors, never through PIL: ~10–20 µs per 64 px item. It owns a
  ``numpy.random.Generator`` seeded from ``(seed, epoch, DataLoader worker id)``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PROTOCOLS = ("imagenet", "glyphs")


def transforms(protocol: str, train: bool, **kw) -> Callable:
    """The transform of ``protocol`` (one of PROTOCOLS): a callable PIL image → tensor.

    ``kw`` go to ``imagenet_transform`` or ``GlyphTransform`` (e.g. ``crop=299``,
    ``max_shift=0.1``); an unknown one raises TypeError.
    """
    if protocol == "imagenet":
        return imagenet_transform(train, **kw)
    if protocol == "glyphs":
        return GlyphTransform(train, **kw)
    raise ValueError(f"unknown transform protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")


def imagenet_transform(
    train: bool,
    *,
    resize: int = 256,
    crop: int = 224,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> Callable:
    """PIL RGB → (3, crop, crop) float tensor; the DML "resize 256, crop 224" protocol."""
    from torchvision import transforms as T  # torchvision import is slow; only when used

    if train:
        steps = [
            T.Resize(resize),
            T.RandomResizedCrop(crop, scale=crop_scale),
            T.RandomHorizontalFlip(),
        ]
    else:
        steps = [T.Resize(resize), T.CenterCrop(crop)]
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


class GlyphTransform:
    """Grey glyph image → normalized (3, S, S) float32 tensor; train adds a random shift.

    Args:
        train: random shift by up to ``max_shift`` · S px per axis (edge-replicating the
            paper) and a scale in ``scale``; test is deterministic.
        size: output side; None keeps the input's.
        seed: the generator is seeded from (seed, epoch, worker id) on first use in each
            process (``set_epoch`` changes the epoch), so DataLoader workers differ and a
            resumed run redraws the same shifts.
    Accepts a PIL image (any mode), a (H, W) uint8 array or a (H, W, 3) uint8 array.
    """

    def __init__(
        self,
        train: bool,
        *,
        max_shift: float = 0.0625,
        scale: tuple[float, float] = (1.0, 1.0),
        size: int | None = None,
        seed: int = 0,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        self.train, self.max_shift, self.scale, self.size = train, max_shift, scale, size
        self.seed, self.epoch = seed, 0
        std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self._gain = 1.0 / (255.0 * std_t)  # (3, 1, 1): uint8 → normalized in one addcmul
        self._bias = -torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1) / std_t
        self._rng: np.random.Generator | None = None
        self._rng_key: tuple | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, image: Image.Image | np.ndarray) -> torch.Tensor:
        if isinstance(image, Image.Image):
            image = np.asarray(image.convert("L"))
        elif image.ndim == 3:
            image = image[..., 0]
        if self.train:
            image = self._jitter(image)
        pixels = torch.from_numpy(np.array(image, np.float32))  # (H, W), a private copy
        if self.size is not None and pixels.shape[-1] != self.size:
            pixels = F.interpolate(
                pixels[None, None],
                size=(self.size, self.size),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )[0, 0]
        return torch.addcmul(self._bias, pixels.unsqueeze(0), self._gain)  # (3, H, W)

    def _jitter(self, image: np.ndarray) -> np.ndarray:
        # One gather with clamped indices = shift + nearest-neighbour scale, with the
        # border (paper) replicated; ~10 µs where F.pad + F.interpolate cost ~60–100 µs.
        height, width = image.shape
        rng = self._generator()
        limit = round(self.max_shift * width)
        dy, dx = (rng.random(2) * (2 * limit + 1)).astype(np.intp) - limit  # uniform ints
        if self.scale == (1.0, 1.0):
            rows, cols = _shift_index(height, limit)[dy], _shift_index(width, limit)[dx]
        else:
            zoom = rng.uniform(*self.scale)
            rows, cols = _resample_index(height, zoom, dy), _resample_index(width, zoom, dx)
        return np.take(np.take(image, rows, 0), cols, 1)

    def _generator(self) -> np.random.Generator:
        info = torch.utils.data.get_worker_info()
        key = (os.getpid(), info.id if info is not None else -1, self.epoch)
        if key != self._rng_key:
            self._rng = np.random.default_rng([self.seed, self.epoch, key[1] + 1])
            self._rng_key = key
        return self._rng

    def __repr__(self) -> str:
        return (
            f"GlyphTransform(train={self.train}, max_shift={self.max_shift}, "
            f"scale={self.scale}, size={self.size}, seed={self.seed})"
        )


@functools.lru_cache(maxsize=16)
def _shift_index(length: int, limit: int) -> np.ndarray:
    """(2·limit + 1, length) source indices; row ``offset`` (negative from the end) shifts
    by ``offset`` px with the border replicated."""
    table = np.stack([_resample_index(length, 1.0, offset) for offset in range(limit + 1)])
    negative = np.stack([_resample_index(length, 1.0, offset) for offset in range(-limit, 0)])
    return np.concatenate([table, negative]) if limit else table


def _resample_index(length: int, zoom: float, offset: int) -> np.ndarray:
    """Source index of each output pixel for a zoom about the centre, then a shift."""
    if zoom == 1.0:
        return np.clip(np.arange(-offset, length - offset), 0, length - 1)
    centre = (length - 1) / 2.0
    source = (np.arange(length) - centre) / zoom + centre - offset
    return np.clip(np.rint(source), 0, length - 1).astype(np.intp)

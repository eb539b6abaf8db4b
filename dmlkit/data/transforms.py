"""Image transforms per protocol (docs/datasets.md#transforms-transformsprotocol-train-kw).

- ``"imagenet"``: train = resize 256 → RandomResizedCrop 224 → horizontal flip; test =
  resize 256 → center crop 224; both ImageNet mean/std (``ImagenetTransform``). Its
  ``crop`` is the host half of the fast path (``dmlkit.data.crops``); calling it on a PIL
  image is the PIL path, the reference, with the same boxes.
- ``"glyphs"``: the heavy distortions are baked in at render time (``augment.py``), so
  the train transform is a light, cheap random shift (and optional small scale) done on
  tensors, never through PIL: ~10–20 µs per 64 px item.

Random draws come from the ``rng`` a dataset passes: the sample's own generator, seeded
from (seed, epoch, position) by ``dmlkit.samplers.SampleKey``, so DataLoader workers that
live across epochs and a resumed run draw the same augmentations. Without one (a dataset
indexed by hand) they come from torch's global generator, as torchvision's do.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dmlkit.data.crops import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Box,
    Crop,
    center_box,
    finish_image,
    random_resized_box,
)

PROTOCOLS = ("imagenet", "glyphs")


def transforms(protocol: str, train: bool, **kw) -> Callable:
    """The transform of ``protocol`` (one of PROTOCOLS): a callable PIL image → tensor.

    ``kw`` go to ``ImagenetTransform`` or ``GlyphTransform`` (e.g. ``crop=299``,
    ``max_shift=0.1``); an unknown one raises TypeError.
    """
    if protocol == "imagenet":
        return ImagenetTransform(train, **kw)
    if protocol == "glyphs":
        return GlyphTransform(train, **kw)
    raise ValueError(f"unknown transform protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")


def sample_generator() -> np.random.Generator:
    """A generator drawn from torch's global one: for items fetched without a SampleKey."""
    return np.random.default_rng(int(torch.randint(0, 2**62, ())))


class ImagenetTransform:
    """PIL RGB → (3, crop, crop) float tensor; the DML "resize 256, crop 224" protocol.

    ``resize`` (shorter side, bilinear) is the step the decoded cache stores; ``crop``
    cuts a resized uint8 image for the device to finish; ``__call__`` does it all in PIL.
    """

    def __init__(
        self,
        train: bool,
        *,
        resize: int = 256,
        crop: int = 224,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        if not train and crop > resize:
            raise ValueError(f"a center crop of {crop} px needs resize >= crop, got {resize}")
        self.train, self.resize_to, self.crop_size = train, resize, crop
        self.crop_scale, self.mean, self.std = tuple(crop_scale), tuple(mean), tuple(std)

    def resize(self, image: Image.Image) -> Image.Image:
        """``Resize(resize)``: the shorter side to ``resize`` px, bilinear with antialias."""
        from torchvision.transforms import functional as TF  # slow import; only when used

        return TF.resize(image, self.resize_to, antialias=True)

    def draw(self, height: int, width: int, rng: np.random.Generator | None) -> tuple[Box, bool]:
        """The crop box and flip of one sample of a (height, width) resized image."""
        if not self.train:
            return center_box(height, width, self.crop_size), False
        rng = rng if rng is not None else sample_generator()
        box = random_resized_box(height, width, rng, self.crop_scale)
        return box, bool(rng.random() < 0.5)

    def crop(self, pixels: np.ndarray, rng: np.random.Generator | None = None) -> Crop:
        """A resized (H, W, 3) uint8 image → its ``Crop`` (resized and normalised later)."""
        box, flip = self.draw(pixels.shape[0], pixels.shape[1], rng)
        region = pixels[box.top : box.top + box.height, box.left : box.left + box.width]
        return Crop(region, flip, self.crop_size, self.mean, self.std)

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        image = self.resize(image)
        box, flip = self.draw(image.height, image.width, rng)
        image = image.crop((box.left, box.top, box.left + box.width, box.top + box.height))
        return finish_image(image, Crop(None, flip, self.crop_size, self.mean, self.std))

    def __repr__(self) -> str:
        return (
            f"ImagenetTransform(train={self.train}, resize={self.resize_to}, "
            f"crop={self.crop_size}, crop_scale={self.crop_scale})"
        )


class GlyphTransform:
    """Grey glyph image → normalized (3, S, S) float32 tensor; train adds a random shift.

    Args:
        train: random shift by up to ``max_shift`` · S px per axis (edge-replicating the
            paper) and a scale in ``scale``; test is deterministic.
        size: output side; None keeps the input's.
    Accepts a PIL image (any mode), a (H, W) uint8 array or a (H, W, 3) uint8 array, and
    the sample's generator (module docstring).
    """

    def __init__(
        self,
        train: bool,
        *,
        max_shift: float = 0.0625,
        scale: tuple[float, float] = (1.0, 1.0),
        size: int | None = None,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        self.train, self.max_shift, self.scale, self.size = train, max_shift, scale, size
        std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self._gain = 1.0 / (255.0 * std_t)  # (3, 1, 1): uint8 → normalized in one addcmul
        self._bias = -torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1) / std_t

    def __call__(
        self, image: Image.Image | np.ndarray, rng: np.random.Generator | None = None
    ) -> torch.Tensor:
        if isinstance(image, Image.Image):
            image = np.asarray(image.convert("L"))
        elif image.ndim == 3:
            image = image[..., 0]
        if self.train:
            image = self._jitter(image, rng if rng is not None else sample_generator())
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

    def _jitter(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        # One gather with clamped indices = shift + nearest-neighbour scale, with the
        # border (paper) replicated; ~10 µs where F.pad + F.interpolate cost ~60–100 µs.
        height, width = image.shape
        limit = round(self.max_shift * width)
        dy, dx = (rng.random(2) * (2 * limit + 1)).astype(np.intp) - limit  # uniform ints
        if self.scale == (1.0, 1.0):
            rows, cols = _shift_index(height, limit)[dy], _shift_index(width, limit)[dx]
        else:
            zoom = rng.uniform(*self.scale)
            rows, cols = _resample_index(height, zoom, dy), _resample_index(width, zoom, dx)
        return np.take(np.take(image, rows, 0), cols, 1)

    def __repr__(self) -> str:
        return (
            f"GlyphTransform(train={self.train}, max_shift={self.max_shift}, "
            f"scale={self.scale}, size={self.size})"
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

"""The ImageNet-protocol crop, split between host and device (docs/methods.md#input-pipeline).

The host draws the crop box and the flip (``random_resized_box``, the distribution of
torchvision's ``RandomResizedCrop.get_params``) and cuts the box out of the decoded,
``Resize(256)``-ed uint8 image: a ``Crop``. ``collate`` pads a batch of crops into one
uint8 tensor (a ``CropBatch``); ``CropBatch.to(device)`` resizes every crop to the output
size, flips and normalises on the device in two batched matmuls with Pillow's bilinear
(antialiased) weights, so no worker process ever touches a float pixel. On a CPU run the
crops are finished by Pillow in the workers instead (``collate(finish=True)``).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import default_collate

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Box(NamedTuple):
    """A crop box in pixels: top row, left column, height, width."""

    top: int
    left: int
    height: int
    width: int


def random_resized_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Box:
    """A box of ``RandomResizedCrop``'s distribution (torchvision's ``get_params``).

    Up to ten tries: area fraction ~ U(scale), log aspect ratio ~ U(log ratio), the box
    placed uniformly where it fits; then the whole image with its ratio clamped to
    ``ratio``, centred. Drawn from ``rng`` instead of torch's global generator.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
            return Box(int(top), int(left), h, w)
    aspect = width / height
    if aspect < min(ratio):
        w, h = width, round(width / min(ratio))
    elif aspect > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return Box((height - h) // 2, (width - w) // 2, h, w)


def center_box(height: int, width: int, size: int) -> Box:
    """``CenterCrop(size)``'s box (torchvision's rounding); the image must be ≥ size."""
    return Box(round((height - size) / 2), round((width - size) / 2), size, size)


class Crop(NamedTuple):
    """One sample on the host: the uint8 pixels of its box, and what the device does."""

    pixels: np.ndarray  # (h, w, 3) uint8
    flip: bool
    size: int  # output side
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def finish(self) -> Tensor:
        """The (3, size, size) float image, finished on the host by Pillow: exactly the PIL
        path's result (``finish_image``), for training and evaluation on the CPU."""
        return finish_image(Image.fromarray(np.ascontiguousarray(self.pixels)), self)


class CropBatch:
    """A batch of crops: uint8 pixels padded to the largest crop, and each crop's size.

    ``pin_memory`` and ``to`` follow the DataLoader's and tensors' conventions, so a loop
    handles a CropBatch like a tensor of images; ``to`` returns the (B, 3, S, S) float
    images, resized, flipped and normalised on the device.
    """

    def __init__(self, pixels: Tensor, sizes: Tensor, flips: Tensor, crop: Crop) -> None:
        self.pixels, self.sizes, self.flips = pixels, sizes, flips  # (B, H, W, 3), (B, 2), (B,)
        self.size, self.mean, self.std = crop.size, crop.mean, crop.std

    def __len__(self) -> int:
        return len(self.pixels)

    def pin_memory(self) -> CropBatch:
        self.pixels = self.pixels.pin_memory()
        return self

    def to(self, device: torch.device | str, memory_format=torch.contiguous_format) -> Tensor:
        pixels = self.pixels.to(device, non_blocking=True)
        sizes, flips = self.sizes.to(device), self.flips.to(device)
        images = resize_crops(pixels, sizes, flips, self.size, self.mean, self.std)
        return images.contiguous(memory_format=memory_format)


def finish_image(image: Image.Image, crop: Crop) -> Tensor:
    """The PIL path's last steps: a cropped PIL image → resized (bilinear), flipped and
    normalised (3, size, size) float32 tensor."""
    image = image.resize((crop.size, crop.size), Image.BILINEAR)
    if crop.flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.array(image, np.float32)).permute(2, 0, 1)  # (3, S, S)
    mean, std = torch.tensor(crop.mean).view(-1, 1, 1), torch.tensor(crop.std).view(-1, 1, 1)
    return pixels / (255.0 * std) - mean / std


def collate(samples: list[Any], finish: bool = False) -> Any:
    """``default_collate``, except that ``Crop`` images become one ``CropBatch``.

    ``finish`` (a CPU run): each crop is finished here by Pillow instead (``Crop.finish``),
    in the DataLoader workers — on a CPU that is ~10× cheaper than the batched matmuls,
    which pay on a GPU only.
    """
    first = samples[0][0] if isinstance(samples[0], (tuple, list)) else None
    if not isinstance(first, Crop):
        return default_collate(samples)
    if finish:
        return default_collate([(sample[0].finish(), *sample[1:]) for sample in samples])
    crops = [sample[0] for sample in samples]
    height = max(c.pixels.shape[0] for c in crops)
    width = max(c.pixels.shape[1] for c in crops)
    pixels = np.zeros((len(crops), height, width, 3), np.uint8)
    for out, crop in zip(pixels, crops, strict=True):
        out[: crop.pixels.shape[0], : crop.pixels.shape[1]] = crop.pixels
    sizes = torch.tensor([c.pixels.shape[:2] for c in crops], dtype=torch.int64)
    flips = torch.tensor([c.flip for c in crops], dtype=torch.bool)
    batch = CropBatch(torch.from_numpy(pixels), sizes, flips, crops[0])
    rest = default_collate([tuple(sample[1:]) for sample in samples])
    return [batch, *rest]


def to_device(
    images: Tensor | CropBatch, device: torch.device, memory_format=torch.contiguous_format
) -> Tensor:
    """Images of a batch on ``device``: a tensor copied, a CropBatch resized there."""
    if isinstance(images, CropBatch):
        return images.to(device, memory_format)
    return images.to(device, non_blocking=True, memory_format=memory_format)


def resize_crops(
    pixels: Tensor,
    sizes: Tensor,
    flips: Tensor,
    size: int,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> Tensor:
    """Padded uint8 crops (B, H, W, 3) → normalised (B, 3, size, size) float32.

    out = Wy · crop · Wxᵀ per channel, with Pillow's bilinear weights (``resize_weights``)
    for each crop's own height and width; a flip reverses the rows of Wx. In float32
    throughout, also under autocast: Pillow's result differs by its uint8 rounding only.
    """
    with torch.autocast(pixels.device.type, enabled=False):
        images = pixels.permute(0, 3, 1, 2).float()  # (B, 3, H, W)
        rows = resize_weights(sizes[:, 0], pixels.shape[1], size)  # (B, size, H)
        cols = resize_weights(sizes[:, 1], pixels.shape[2], size)  # (B, size, W)
        cols = torch.where(flips[:, None, None], cols.flip(1), cols)
        images = rows[:, None] @ images @ cols.transpose(1, 2)[:, None]  # (B, 3, size, size)
        std_t = torch.tensor(std, device=pixels.device).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, device=pixels.device).view(1, -1, 1, 1)
        return images / (255.0 * std_t) - mean_t / std_t


def resize_weights(lengths: Tensor, padded: int, size: int) -> Tensor:
    """(B, size, padded) weights resizing each length-``lengths[b]`` row to ``size`` pixels.

    Pillow's bilinear filter: output pixel o samples the input around its centre
    c = (o + ½)·s, s = length / size, with the triangle 1 − |x + ½ − c| / max(s, 1) over
    input pixels x < length, normalised to sum 1 (an antialiasing filter when s > 1).
    """
    lengths = lengths.to(torch.float32)[:, None, None]  # (B, 1, 1)
    scale = lengths / size
    support = scale.clamp(min=1.0)
    centres = (torch.arange(size, device=lengths.device) + 0.5)[None, :, None] * scale  # (B, S, 1)
    positions = torch.arange(padded, device=lengths.device, dtype=torch.float32)  # (P,)
    weights = (1 - ((positions + 0.5 - centres) / support).abs()).clamp(min=0)  # (B, S, P)
    weights = weights * (positions < lengths)
    return weights / weights.sum(-1, keepdim=True)

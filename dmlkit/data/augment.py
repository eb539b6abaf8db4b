"""Render-time jitter of the ``glyphs`` dataset: one seeded, substantial distortion per sample.

The heavy augmentation happens once, when the dataset is rendered and cached, so the
training-time transform stays a cheap tensor shift (``dmlkit.data.transforms``). The
defaults are deliberately substantial — one clean rendering per font with light jitter made
retrieval nearly trivial (Recall@1 0.91 for a small CNN), leaving no room to compare
losses. With these defaults ``python -m dmlkit.train`` (glyphnet, triplet, P×K = 32×4,
Adam 1e-3) reached Recall@1 0.57 after 4 epochs and 0.71 after 8 on glyphs-mini; a
stronger setting (scale 0.7–1.2, rotation 20°, occlusion 0.5, ...) gave only 0.16 / 0.26
(docs/datasets.md). Every knob is a ``get_dataset("glyphs", ..., **options)`` option.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
from PIL import Image, ImageFilter


@dataclass(frozen=True)
class GlyphJitter:
    """Distribution of the per-sample distortions (all uniform unless said otherwise)."""

    renders_per_font: int = 2
    """Jittered renderings per (character, font); ≥ 2 gives ≥ 16 images per class."""
    scale: tuple[float, float] = (0.8, 1.15)
    """Isotropic scale factor range."""
    aspect: float = 1.15
    """Max anisotropic stretch: x/y scale ratio log-uniform in [1/aspect, aspect]."""
    rotation: float = 12.0
    """Max rotation, degrees (±)."""
    shear: float = 0.2
    """Max horizontal shear, as a tangent (±)."""
    shift: float = 0.08
    """Max translation per axis, fraction of the image side (±)."""
    thickness: tuple[int, int] = (-1, 1)
    """Stroke dilation (+) / erosion (−) steps, integer range inclusive; 1 step = ½ px."""
    blur: tuple[float, float] = (0.0, 1.0)
    """Gaussian blur radius range, px at the output size."""
    noise: float = 0.1
    """Max std of additive Gaussian pixel noise (its std is drawn from [0, noise])."""
    occlusion: float = 0.3
    """Probability of one occluding rectangle of a random grey level."""
    occlusion_size: tuple[float, float] = (0.15, 0.3)
    """Side length range of the occluder, fraction of the image side."""
    paper: tuple[float, float] = (0.8, 1.0)
    """Background grey level range (1 = white)."""
    ink: tuple[float, float] = (0.0, 0.3)
    """Ink grey level range (0 = black)."""

    def __post_init__(self) -> None:
        # Canonical types (JSON lists → tuples, 12 → 12.0): equal options, equal cache key.
        for item in fields(self):
            value, name = getattr(self, item.name), item.name
            try:
                if name in ("renders_per_font", "thickness"):
                    value = _integers(value)
                else:
                    value = _floats(value)
            except (TypeError, ValueError):
                raise ValueError(f"glyphs: {name} must be {item.type}, got {value!r}") from None
            wanted = item.type + (" (low <= high)" if "tuple" in item.type else "")
            ranged = isinstance(value, tuple)
            if ranged != ("tuple" in item.type) or (
                ranged and (len(value) != 2 or value[0] > value[1])
            ):
                raise ValueError(f"glyphs: {name} must be {wanted}, got {value!r}")
            object.__setattr__(self, name, value)
        if self.renders_per_font < 1:
            raise ValueError(f"glyphs: renders_per_font must be >= 1, got {self.renders_per_font}")


def _integers(value):
    if isinstance(value, (list, tuple)):
        return tuple(_integers(v) for v in value)
    if isinstance(value, bool) or float(value) != int(value):
        raise ValueError(value)
    return int(value)


def _floats(value):
    if isinstance(value, (list, tuple)):
        return tuple(_floats(v) for v in value)
    if isinstance(value, bool) or not np.isfinite(float(value)):
        raise ValueError(value)
    return float(value)


def jitter_glyph(
    clean: np.ndarray, size: int, jitter: GlyphJitter, rng: np.random.Generator
) -> np.ndarray:
    """One distorted sample from a clean rendering.

    Args:
        clean: (2·size, 2·size) uint8, ink 255 on 0 — rendered at twice the output size
            so that the affine warp and the ½-px stroke steps are anti-aliased.
        rng: consumed in a fixed order, so the same generator state gives the same pixels.
    Returns: (size, size) uint8, dark ink on light paper.
    """
    steps = int(rng.integers(jitter.thickness[0], jitter.thickness[1] + 1))
    image = Image.fromarray(_stroke(clean, steps))
    matrix = _inverse_affine(image.width, jitter, rng)
    image = image.transform(
        image.size, Image.Transform.AFFINE, matrix, resample=Image.Resampling.BILINEAR
    ).reduce(2)
    radius = rng.uniform(*jitter.blur)
    if radius > 0.05:
        image = image.filter(ImageFilter.GaussianBlur(radius))
    coverage = np.asarray(image, np.float32) / 255.0  # (size, size) ink in [0, 1]
    paper, ink = rng.uniform(*jitter.paper), rng.uniform(*jitter.ink)
    pixels = paper + (ink - paper) * coverage
    _occlude(pixels, jitter, rng)
    pixels += rng.normal(0.0, rng.uniform(0.0, jitter.noise), pixels.shape).astype(np.float32)
    return np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)


def _stroke(ink: np.ndarray, steps: int) -> np.ndarray:
    """3×3 grey dilation (steps > 0) or erosion (< 0), ``|steps|`` times, as separable
    max/min of shifted copies (PIL's rank filter is ~30× slower at this size)."""
    reduce = np.maximum if steps > 0 else np.minimum
    out = ink
    for _ in range(abs(steps)):
        padded = np.pad(out, 1, mode="edge")  # (H + 2, W + 2)
        rows = reduce(reduce(padded[:-2], padded[1:-1]), padded[2:])  # (H, W + 2)
        out = reduce(reduce(rows[:, :-2], rows[:, 1:-1]), rows[:, 2:])  # (H, W)
    return out


def _inverse_affine(side: int, jitter: GlyphJitter, rng: np.random.Generator) -> tuple:
    """PIL's AFFINE data (output → input): scale/stretch, shear, rotate, shift about the centre."""
    scale = rng.uniform(*jitter.scale)
    stretch = math.exp(rng.uniform(-1.0, 1.0) * math.log(jitter.aspect))
    angle = math.radians(rng.uniform(-jitter.rotation, jitter.rotation))
    shear = rng.uniform(-jitter.shear, jitter.shear)
    shift = rng.uniform(-jitter.shift, jitter.shift, size=2) * side
    cos, sin = math.cos(angle), math.sin(angle)
    rotate = np.array([[cos, -sin], [sin, cos]])
    forward = (
        rotate
        @ np.array([[1.0, shear], [0.0, 1.0]])
        @ np.diag([scale * math.sqrt(stretch), scale / math.sqrt(stretch)])
    )
    inverse = np.linalg.inv(forward)
    centre = np.full(2, side / 2.0)
    offset = centre - inverse @ (centre + shift)
    return (*inverse[0], offset[0], *inverse[1], offset[1])


def _occlude(pixels: np.ndarray, jitter: GlyphJitter, rng: np.random.Generator) -> None:
    # Draw every number even when no occluder is placed: the stream stays aligned, so
    # changing `occlusion` alone does not reshuffle the rest of a sample's jitter.
    place = rng.random() < jitter.occlusion
    side = pixels.shape[0]
    height, width = (rng.uniform(*jitter.occlusion_size, size=2) * side).round().astype(int)
    top, left = rng.integers(0, side - height + 1), rng.integers(0, side - width + 1)
    grey = rng.uniform(0.0, 1.0)
    if place:
        pixels[top : top + height, left : left + width] = grey

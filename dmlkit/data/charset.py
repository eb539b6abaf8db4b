"""Which characters become ``glyphs`` classes: coverage, blank and homoglyph filtering.

Rules (docs/datasets.md, "glyphs"), all on clean renderings at ANALYSIS_SIZE px:

1. candidates: printable, non-space, non-mark code points that the cmaps of at least
   ``min_fonts`` of the font files map to a real glyph, across at least ``min_families``
   families;
2. a (character, font) rendering with less than ``min_ink`` pixels of ink (a 3×3 dot) is
   blank: that font does not count as drawing the character; rule 1 is applied again;
3. homoglyphs: two characters whose renderings match in *every* font that draws both are
   one class. "Match" = after the best alignment by at most ``max_shift`` px, the
   symmetric Hausdorff distance between the 50 %-ink masks is ≤ ``tolerance_px`` — every
   edge of one lies within a pixel of an edge of the other, which is the rasteriser's own
   rounding; the render-time jitter is an order of magnitude larger. Matches are merged
   transitively and the lowest code point of each group is kept.

Cost: ~35k clean renderings (~2 s) plus a bounding-box prefilter, an exact check on the
few thousand surviving pairs; the result is cached by ``dmlkit.data.glyphs``.
"""

from __future__ import annotations

import logging
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from dmlkit.data.fonts import FontFile, character_map, render_clean

ANALYSIS_SIZE = 64
_LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Charset:
    """The usable classes.

    Attributes:
        codepoints: sorted usable code points (the class ids).
        fonts: code point → sorted indices (into the font list) of the fonts drawing it.
        candidates: number of code points passing rule 1.
        blank: code points dropped because too few fonts draw them non-blank.
        homoglyphs: dropped code point → the kept code point it duplicates.
    """

    codepoints: list[int]
    fonts: dict[int, list[int]]
    candidates: int
    blank: list[int] = field(default_factory=list)
    homoglyphs: dict[int, int] = field(default_factory=dict)


def is_candidate_character(codepoint: int) -> bool:
    """Printable, not whitespace, not a combining/enclosing/spacing mark (category M*)."""
    char = chr(codepoint)
    return (
        char.isprintable()
        and not char.isspace()
        and not unicodedata.category(char).startswith("M")
        and unicodedata.combining(char) == 0
    )


def analyse_characters(
    fonts: Sequence[FontFile],
    *,
    min_fonts: int = 8,
    min_families: int = 3,
    min_ink: float = 9.0,
    tolerance_px: float = 1.0,
    max_shift: int = 1,
    log: Callable[[str], None] = _LOG.info,
) -> Charset:
    """Apply rules 1–3 of the module docstring to ``fonts``; deterministic."""
    families = [font.family for font in fonts]
    cmaps = [character_map(font) for font in fonts]
    covered = _covered(cmaps, families, min_fonts, min_families, is_candidate_character)
    log(f"glyphs: {len(covered)} candidate characters in {len(fonts)} font files")
    renders: dict[tuple[int, int], np.ndarray] = {}
    drawn: dict[int, list[int]] = {}
    for cp in covered:
        for index, cmap in enumerate(cmaps):
            if cp in cmap:
                image = render_clean(fonts[index], cp, ANALYSIS_SIZE)
                if image.sum() >= min_ink * 255:
                    renders[(index, cp)] = image >= 128
                    drawn.setdefault(cp, []).append(index)
    kept = [
        cp
        for cp in covered
        if len(drawn.get(cp, [])) >= min_fonts
        and len({families[i] for i in drawn[cp]}) >= min_families
    ]
    blank = sorted(set(covered) - set(kept))
    duplicates = _homoglyphs(kept, drawn, renders, len(fonts), tolerance_px, max_shift)
    usable = [cp for cp in kept if cp not in duplicates]
    log(f"glyphs: {len(blank)} blank, {len(duplicates)} homoglyphs → {len(usable)} classes")
    return Charset(
        codepoints=usable,
        fonts={cp: drawn[cp] for cp in usable},
        candidates=len(covered),
        blank=blank,
        homoglyphs=duplicates,
    )


def _covered(cmaps, families, min_fonts, min_families, accept) -> list[int]:
    counts: dict[int, list[int]] = {}
    for index, cmap in enumerate(cmaps):
        for cp in cmap:
            counts.setdefault(cp, []).append(index)
    return sorted(
        cp
        for cp, where in counts.items()
        if len(where) >= min_fonts
        and len({families[i] for i in where}) >= min_families
        and accept(cp)
    )


def _homoglyphs(codepoints, drawn, renders, num_fonts, tolerance_px, max_shift) -> dict[int, int]:
    """dropped code point → kept (lowest) code point of its group of matching characters."""
    pairs = _bbox_compatible_pairs(codepoints, drawn, renders, num_fonts, tolerance_px + max_shift)
    transforms: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    parent = {cp: cp for cp in codepoints}

    def root(cp: int) -> int:
        while parent[cp] != cp:
            cp = parent[cp]
        return cp

    for a, b in pairs:
        shared = sorted(set(drawn[a]) & set(drawn[b]))
        if all(
            _aligned_hausdorff(
                _points_and_distance(transforms, renders, (f, a)),
                _points_and_distance(transforms, renders, (f, b)),
                max_shift,
            )
            <= tolerance_px
            for f in shared
        ):
            ra, rb = root(a), root(b)
            parent[max(ra, rb)] = min(ra, rb)
    return {cp: root(cp) for cp in codepoints if root(cp) != cp}


def _bbox_compatible_pairs(codepoints, drawn, renders, num_fonts, slack) -> list[tuple[int, int]]:
    """Pairs (a < b) sharing a font whose mask boxes differ by ≤ ``slack`` px in every
    shared font — a necessary condition for an aligned Hausdorff match. O(F·C²) compares."""
    n = len(codepoints)
    boxes = np.zeros((num_fonts, n, 4), np.int16)
    present = np.zeros((num_fonts, n), bool)
    for j, cp in enumerate(codepoints):
        for f in drawn[cp]:
            rows, cols = (
                np.nonzero(renders[(f, cp)].any(1))[0],
                np.nonzero(renders[(f, cp)].any(0))[0],
            )
            if len(rows):
                boxes[f, j] = rows[0], rows[-1], cols[0], cols[-1]
                present[f, j] = True
    compatible = np.ones((n, n), bool)
    shares = np.zeros((n, n), bool)
    for f in range(num_fonts):
        both = present[f][:, None] & present[f][None, :]  # (C, C)
        close = np.ones((n, n), bool)
        for k in range(4):
            close &= np.abs(boxes[f, :, None, k] - boxes[f, None, :, k]) <= slack
        compatible &= close | ~both
        shares |= both
    a, b = np.nonzero(np.triu(compatible & shares, 1))
    return [(codepoints[i], codepoints[j]) for i, j in zip(a.tolist(), b.tolist(), strict=True)]


def _points_and_distance(cache, renders, key):
    # Ink coordinates in a frame padded by the shift, and the *squared* distance to the
    # nearest ink pixel (an integer: uint16 keeps ~10k of them in ~90 MB instead of 350):
    # one EDT per rendering, reused by every pair it takes part in.
    if key not in cache:
        mask = np.pad(renders[key], 2)
        squared = np.square(ndimage.distance_transform_edt(~mask)).round().astype(np.uint16)
        cache[key] = (np.stack(np.nonzero(mask)), squared)
    return cache[key]


def _aligned_hausdorff(first, second, max_shift: int) -> float:
    """min over integer shifts |s| ≤ max_shift of the symmetric Hausdorff distance (px)."""
    (points_a, dist_a), (points_b, dist_b) = first, second
    steps = np.arange(-max_shift, max_shift + 1)
    shifts = np.stack(np.meshgrid(steps, steps, indexing="ij")).reshape(2, -1, 1)  # (2, S, 1)
    a_to_b = dist_b[points_a[0] + shifts[0], points_a[1] + shifts[1]].max(1)  # (S,) squared
    b_to_a = dist_a[points_b[0] - shifts[0], points_b[1] - shifts[1]].max(1)  # (S,) squared
    return float(np.sqrt(np.maximum(a_to_b, b_to_a).min()))

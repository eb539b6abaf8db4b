"""The typefaces behind the ``glyphs`` dataset and the one clean rendering of a character.

matplotlib ships 18 usable TrueType files (DejaVu Sans, Sans Mono, Serif, STIX General,
each in regular/bold/italic/bold-italic, plus two "Display" cuts); we skip the TeX
Computer Modern files, the STIX size variants/non-Unicode files and LastResort.

Layout of a clean rendering on a ``size`` × ``size`` canvas (ink = 255 on 0): the em is
``EM_FRACTION · size`` pixels and the baseline sits at ``BASELINE_FRACTION · size`` —
characters keep their vertical position relative to the baseline (so ``,`` and ``'`` or
``.`` and ``·`` stay distinct), and are centred horizontally by their ink box. The rare
glyph that does not fit (wide arrows, large operators) is shrunk into the canvas.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.ft2font import FT2Font
from PIL import Image, ImageDraw, ImageFont

EM_FRACTION = 0.6875  # 44 px em on a 64 px canvas: 99.9 % of candidate glyphs fit unscaled
BASELINE_FRACTION = 0.75
_SKIPPED_PREFIXES = ("cm", "STIXSiz", "STIXNonUni", "LastResort")
FAMILIES = ("DejaVu Sans", "DejaVu Sans Mono", "DejaVu Serif", "STIX General")
STYLES = ("regular", "bold", "italic", "bold-italic")


@dataclass(frozen=True)
class FontFile:
    """One TrueType file: ``path``, its ``family`` (one of FAMILIES), ``style`` (STYLES)."""

    path: Path
    family: str
    style: str

    @property
    def name(self) -> str:
        return self.path.name


def font_folder() -> Path:
    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def font_files(folder: str | Path | None = None) -> list[FontFile]:
    """The glyph fonts in ``folder`` (default: matplotlib's), sorted by file name."""
    folder = Path(folder) if folder is not None else font_folder()
    names = sorted(p.name for p in folder.glob("*.ttf") if not p.name.startswith(_SKIPPED_PREFIXES))
    return [FontFile(folder / n, *family_and_style(n)) for n in names]


def family_and_style(file_name: str) -> tuple[str, str]:
    """``("DejaVu Serif", "bold-italic")`` for ``DejaVuSerif-BoldItalic.ttf``.

    Oblique counts as italic; the "Display" cuts are regular. STIX abbreviates
    (``STIXGeneralBolIta.ttf``).
    """
    stem = Path(file_name).stem
    if stem.startswith("STIXGeneral"):
        family, suffix = "STIX General", stem[len("STIXGeneral") :]
    elif stem.startswith("DejaVuSansMono"):
        family, suffix = "DejaVu Sans Mono", stem[len("DejaVuSansMono") :]
    elif stem.startswith("DejaVuSans"):
        family, suffix = "DejaVu Sans", stem[len("DejaVuSans") :]
    elif stem.startswith("DejaVuSerif"):
        family, suffix = "DejaVu Serif", stem[len("DejaVuSerif") :]
    else:
        raise ValueError(f"not a glyph font: {file_name}")
    bold = "Bol" in suffix
    italic = any(tag in suffix for tag in ("Ita", "Oblique"))
    style = {(False, False): "regular", (True, False): "bold", (False, True): "italic"}.get(
        (bold, italic), "bold-italic"
    )
    return family, style


def character_map(font: FontFile) -> frozenset[int]:
    """Code points the font's cmap maps to a real glyph (glyph index 0 is .notdef)."""
    cmap = FT2Font(str(font.path)).get_charmap()
    return frozenset(cp for cp, glyph in cmap.items() if glyph != 0)


@functools.lru_cache(maxsize=64)
def _truetype(path: str, em_px: int) -> ImageFont.FreeTypeFont:
    # BASIC layout: one code point → the cmap's glyph, no shaping; identical on every
    # machine whether or not libraqm is installed.
    return ImageFont.truetype(path, size=em_px, layout_engine=ImageFont.Layout.BASIC)


def render_clean(font: FontFile, codepoint: int, size: int) -> np.ndarray:
    """The character drawn by ``font`` without jitter.

    Returns: (size, size) uint8, ink 255 on background 0; all zeros for an empty glyph.
    """
    face = _truetype(str(font.path), round(size * EM_FRACTION))
    char = chr(codepoint)
    x0, y0, x1, y1 = face.getbbox(char, anchor="ls")
    canvas = Image.new("L", (size, size), 0)
    if x1 <= x0 or y1 <= y0:
        return np.asarray(canvas)
    margin = max(1, size // 32)
    baseline = round(size * BASELINE_FRACTION)
    fits = (
        x1 - x0 <= size - 2 * margin and baseline + y0 >= margin and baseline + y1 <= size - margin
    )
    if fits:
        left = (size - (x1 - x0)) // 2 - x0
        ImageDraw.Draw(canvas).text((left, baseline), char, font=face, fill=255, anchor="ls")
        return np.asarray(canvas)
    tight = Image.new("L", (x1 - x0, y1 - y0), 0)
    ImageDraw.Draw(tight).text((-x0, -y0), char, font=face, fill=255, anchor="ls")
    box = size - 2 * margin
    factor = min(box / tight.width, box / tight.height)
    width, height = max(1, round(tight.width * factor)), max(1, round(tight.height * factor))
    shrunk = tight.resize((width, height), Image.Resampling.LANCZOS)
    canvas.paste(shrunk, ((size - width) // 2, (size - height) // 2))
    return np.asarray(canvas)

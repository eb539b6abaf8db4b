"""An interactive t-SNE map of a run's test set (Bokeh): hover for the image, click a query
for its top-k retrievals, lasso or box-select for a grid of the selected images.

Everything the view needs (thumbnails as WebP data URIs, neighbours, distances) is inside
the Bokeh document and the interactions are ``CustomJS``, so the view needs no kernel round
trip: one standalone HTML page (BokehJS inlined, no CDN), written to the run folder and
shown in the notebook in an iframe, that opens without a kernel or a network.
docs/explore.md says why Bokeh and what the page costs at SOP's size.
"""

from __future__ import annotations

import base64
import html
import io
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dmlkit.io import atomic_write_bytes
from dmlkit.plotting._common import as_coordinates, as_numpy, class_codes, class_colors
from dmlkit.plotting.gallery import HIT_COLOR, MISS_COLOR, TopK

MAX_GRID = 120  # images a lasso/box selection shows (the count says how many are selected)


def thumbnail_uris(images: Mapping[int, Any], *, quality: int = 80) -> dict[int, str]:
    """index → ``data:image/webp;base64,...`` of each H×W(×3) uint8 image (same bytes each time).

    The page's size is mostly these images: lossy WebP at ``quality`` 80 takes ~300 B for a
    32-px glyph and ~370 B for a 32-px photo crop, where PNG takes ~800 B and ~2,100 B
    (docs/explore.md); every browser of the last five years decodes it.
    """
    uris = {}
    for index, image in images.items():
        buffer = io.BytesIO()
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(
            buffer, format="WEBP", quality=quality
        )
        uris[int(index)] = "data:image/webp;base64," + base64.b64encode(buffer.getvalue()).decode()
    return uris


def needed_items(points: Sequence[int], found: TopK) -> np.ndarray:
    """The items whose thumbnails the view needs: the points shown and their neighbours."""
    points = np.asarray(points, dtype=np.int64)
    return np.union1d(points, found.indices[points].reshape(-1))


def embedding_explorer(
    coords: Any,
    points: Sequence[int],
    labels: Any,
    found: TopK,
    thumbnails: Mapping[int, str],
    *,
    families: Any | None = None,
    class_names: Mapping[Any, str] | None = None,
    title: str = "t-SNE of the test set",
    note: str = "",
    size: int = 560,
    thumb_px: int = 64,
) -> Any:
    """The interactive map as a Bokeh layout (show it, or write it with ``save_explorer``).

    Args:
        coords: (P, 2) map coordinates of the shown points.
        points: (P,) their indices among the N test items.
        labels: (N,) classes. found: ``top_k`` of all N items (gallery and correctness).
        thumbnails: index → image URI for every item of ``needed_items(points, found)``.
        families: optional (N,) font family (glyphs): a third colouring.
        class_names: optional class → name for the tooltip and the gallery.
        title: the map's title. note: a line above the map (say there when ``points`` is
            a subsample of the test set).
        size: the map's side in pixels; thumb_px: side of an image in the gallery/grid.
    Returns: a Bokeh ``column``: the colour selector, the map (pan, wheel zoom, tap, box
        and lasso select, hover) and the two panels the selections fill, named
        "colour", "map", "gallery" and "grid" (``document.get_model_by_name``).
    """
    from bokeh.layouts import column, row
    from bokeh.models import ColumnDataSource, CustomJS, Div, HoverTool, Select
    from bokeh.plotting import figure

    xy = as_coordinates(coords)
    points = np.asarray(points, dtype=np.int64)
    labels = as_numpy(labels)
    names = [_name(label, class_names) for label in labels]
    # Neighbours are positions in the points, then in ``others``: no image is stored twice.
    others = np.setdiff1d(needed_items(points, found), points)
    position = {int(item): p for p, item in enumerate([*points, *others])}
    colorings = _colorings(labels[points], found.hits[points, 0], families, points)
    nearest = found.indices[points, 0]
    source = ColumnDataSource(
        {
            "x": xy[:, 0],
            "y": xy[:, 1],
            "index": points,
            "name": [names[i] for i in points],
            "thumb": [thumbnails[int(i)] for i in points],
            "first": [
                "hit" if hit else f"miss ({names[j]})"
                for hit, j in zip(found.hits[points, 0], nearest, strict=True)
            ],  # fmt: skip
            "color": colorings[next(iter(colorings))],
            **{f"color:{mode}": colors for mode, colors in colorings.items()},
            "nn": [[position[int(j)] for j in row_] for row_ in found.indices[points]],
            "nn_dist": [[round(float(d), 4) for d in row_] for row_ in found.distances[points]],
            "nn_hit": found.hits[points].tolist(),
        }
    )
    images = ColumnDataSource(
        {"uri": [thumbnails[int(i)] for i in others], "name": [names[i] for i in others]}
    )
    plot = figure(
        name="map",
        title=title,
        width=size,
        height=size,
        match_aspect=True,
        output_backend="webgl",
        tools="pan,wheel_zoom,box_select,lasso_select,tap,reset",
        active_scroll="wheel_zoom",
    )
    plot.axis.visible = False
    plot.grid.visible = False
    dots = plot.scatter("x", "y", source=source, size=6, fill_color="color", line_color=None)
    plot.add_tools(HoverTool(renderers=[dots], tooltips=_TOOLTIP.replace("PX", str(thumb_px))))
    side = max(420, found.indices.shape[1] * (thumb_px + 16))
    gallery = Div(name="gallery", text=_HELP, width=side)
    grid = Div(name="grid", text="", width=size + side)
    selector = Select(
        name="colour", title="colour by", value=next(iter(colorings)), options=list(colorings)
    )
    selector.js_on_change("value", CustomJS(args={"source": source}, code=_RECOLOR))
    args = {"source": source, "images": images, "gallery": gallery, "grid": grid,
            "px": thumb_px, "hit": HIT_COLOR, "miss": MISS_COLOR, "cap": MAX_GRID}  # fmt: skip
    source.selected.js_on_change("indices", CustomJS(args=args, code=_PANELS + _ON_SELECT))
    # A click on overlapping points selects them all: it still shows a gallery (the first's).
    plot.js_on_event("selectiongeometry", CustomJS(args=args, code=_PANELS + _ON_TAP))
    return column(row(selector, Div(text=note, width=size)), row(plot, gallery), grid)


def explorer_html(layout: Any, *, title: str = "dmlkit explorer") -> str:
    """A standalone HTML page of ``layout``, BokehJS inlined: no server, kernel or network.

    Bokeh gives the page random ids (document, root element) and its models ids from a
    per-process counter; both are renumbered in order of appearance, so the same view
    gives the same bytes in any process.
    """
    from bokeh.embed import file_html
    from bokeh.resources import INLINE

    html = file_html(layout, INLINE, title=title)
    uuids: dict[str, str] = {}
    html = _UUID.sub(lambda m: uuids.setdefault(m[0], f"{len(uuids):08x}{_UUID_TAIL}"), html)
    ids = {
        f'"{old}"': f'"p{1000 + n}"' for n, old in enumerate(dict.fromkeys(_MODEL_ID.findall(html)))
    }
    return re.sub(r'"p\d+"', lambda m: ids.get(m[0], m[0]), html)


def save_explorer(layout: Any, path: str | os.PathLike, *, title: str = "dmlkit explorer") -> Path:
    """Write ``explorer_html(layout)`` to ``path`` atomically; returns the path."""
    path = Path(path)
    atomic_write_bytes(path, explorer_html(layout, title=title).encode())
    return path


def show_explorer(page: str | os.PathLike, *, height: int = 760) -> Any:
    """A page written by ``save_explorer``, for a notebook: in an ``<iframe srcdoc>``.

    The page is self-contained (BokehJS inlined), so it draws whenever JupyterLab attaches
    the output. Bokeh's own notebook output (``show``) is two JavaScript outputs and an
    HTML one, and a notebook opened later can run the script before JupyterLab has put
    the HTML in the page ("could not find #… HTML tag"): the view stays blank.
    ``height``: the frame's, in pixels (the map and its selector; the grid of a selection
    scrolls inside). Returns: an ``IPython.display.HTML`` (the cell's last expression, or
    ``display`` it).
    """
    from IPython.display import HTML

    text = html.escape(Path(page).read_text(), quote=True)
    return HTML(  # in a <div>: IPython would suggest its IFrame, which takes a URL, not a page
        f'<div><iframe class="dmlkit-explorer" srcdoc="{text}" '
        f'style="width: 100%; height: {height}px; border: 0"></iframe></div>'
    )


def _colorings(labels, first_hit, families, points) -> dict[str, list[str]]:
    classes, codes = class_codes(labels)
    palette = [_hex(c) for c in class_colors(len(classes))]
    out = {
        "class": [palette[c] for c in codes],
        "first neighbour": [HIT_COLOR if hit else MISS_COLOR for hit in first_hit],
    }
    if families is not None:
        values, family_codes = class_codes(as_numpy(families)[points])
        family_palette = [_hex(c) for c in class_colors(len(values))]
        out["font family"] = [family_palette[c] for c in family_codes]
    return out


def _hex(rgb: Sequence[float]) -> str:
    return "#" + "".join(f"{round(255 * v):02x}" for v in rgb[:3])


def _name(label: Any, class_names: Mapping[Any, str] | None) -> str:
    label = label.item() if hasattr(label, "item") else label
    return str(class_names.get(label, label)) if class_names else str(label)


_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_UUID_TAIL = "-0000-4000-8000-000000000000"
_MODEL_ID = re.compile(r'"id":"(p\d+)"')  # Bokeh's simple ids, where a model is defined
_HELP = (
    "<p style='color:#555'>Hover a point to see its image; click one to see what the model "
    "retrieves for it; box- or lasso-select (toolbar) to see a group of images.</p>"
)
_TOOLTIP = """
<div class="dmlkit-tooltip">
  <img src="@thumb" width="PX" height="PX" style="image-rendering: pixelated; object-fit: contain">
  <div><b>@name</b> (item @index)</div>
  <div>first neighbour: @first</div>
</div>
"""
_RECOLOR = "source.data.color = source.data['color:' + this.value]; source.change.emit();"
_PANELS = """
const d = source.data;
const shown = d.thumb.length;
const uri = (pos) => pos < shown ? d.thumb[pos] : images.data.uri[pos - shown];
const label = (pos) => pos < shown ? d.name[pos] : images.data.name[pos - shown];
const figure = (pos, color, caption) =>
  `<figure style="display:inline-block;margin:3px;text-align:center;font-size:11px">` +
  `<img src="${uri(pos)}" width="${px}" height="${px}" ` +
  `style="border:3px solid ${color};image-rendering:pixelated;object-fit:contain">` +
  `<figcaption>${caption}</figcaption></figure>`;
const show_gallery = (i) => {
  let html = `<div class="dmlkit-gallery"><div><b>query: ${d.name[i]}</b> (item ${d.index[i]})` +
    `</div><img src="${d.thumb[i]}" width="${2 * px}" height="${2 * px}" ` +
    `style="border:3px solid #222;image-rendering:pixelated;object-fit:contain"><div>`;
  d.nn[i].forEach((pos, r) => {
    const ok = d.nn_hit[i][r];
    html += figure(pos, ok ? hit : miss,
      `${r + 1}. ${ok ? 'hit' : 'miss'}<br>${label(pos)}<br>d = ${d.nn_dist[i][r]}`);
  });
  gallery.text = html + '</div></div>';
};
const show_grid = (picked) => {
  let html = `<div class="dmlkit-grid"><b>${picked.length} selected</b>` +
    (picked.length > cap ? ` (the first ${cap} shown)` : '') + '<br>';
  for (const i of picked.slice(0, cap)) {
    html += `<img src="${d.thumb[i]}" width="${px}" height="${px}" title="${d.name[i]}" ` +
      `style="margin:1px;image-rendering:pixelated;object-fit:contain">`;
  }
  grid.text = html + '</div>';
};
"""
_ON_SELECT = """
const picked = source.selected.indices;
if (picked.length === 1) {
  show_gallery(picked[0]);
} else if (picked.length > 1) {
  show_grid(picked);
}
"""
_ON_TAP = """
const picked = source.selected.indices;
if (cb_obj.geometry.type === 'point' && picked.length > 1) {
  show_gallery(picked[0]);
}
"""

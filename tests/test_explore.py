"""The retrieval gallery, the confused class pairs and the interactive explorer (issue 24)."""

from __future__ import annotations

import base64
import html
import io
import json
import re

import numpy as np
import pytest
from bokeh.models import ColumnDataSource, GlyphRenderer
from matplotlib.colors import to_rgba
from PIL import Image

from dmlkit import notebook
from dmlkit.plotting import (
    confused_pairs,
    confused_pairs_figure,
    embedding_explorer,
    explorer_html,
    gallery_queries,
    needed_items,
    retrieval_gallery,
    save_explorer,
    save_figure,
    show_explorer,
    thumbnail_uris,
    top_k,
)
from dmlkit.plotting.gallery import HIT_COLOR, MISS_COLOR, TopK


def _data(n: int = 60, classes: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    embeddings = rng.normal(size=(n, 4)) * 0.6 + np.eye(classes, 4)[labels] * 2
    images = {i: rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for i in range(n)}
    return embeddings.astype(np.float32), labels, images


def test_top_k_is_a_brute_force_search_without_the_query():
    embeddings, labels, _ = _data()
    found = top_k(embeddings, labels, k=3)
    dist = np.linalg.norm(embeddings[:, None].astype(np.float64) - embeddings[None], axis=-1)
    np.fill_diagonal(dist, np.inf)
    expected = np.argsort(dist, axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(found.indices, expected)
    np.testing.assert_allclose(
        found.distances, np.take_along_axis(dist, expected, 1), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_array_equal(found.hits, labels[expected] == labels[:, None])


def _hand_made() -> tuple[np.ndarray, TopK]:
    """Six items, classes 0 0 1 1 2 2; items 1, 2, 3 and 4 retrieve another class first,
    item 3 also second."""
    labels = np.array([0, 0, 1, 1, 2, 2])
    indices = np.array([[1, 2], [2, 0], [0, 3], [4, 0], [3, 5], [4, 0]])
    distances = np.array([[0.1, 0.5], [0.3, 0.4], [0.2, 0.6], [0.5, 0.7], [0.4, 0.5], [0.1, 0.2]])
    return labels, TopK(indices, distances, labels[indices] == labels[:, None])


def test_confused_pairs_counts_first_neighbour_mistakes_per_unordered_pair():
    labels, found = _hand_made()
    table = confused_pairs(labels, found)
    # 1 → 2 (0→1), 2 → 0 (1→0): pair {0, 1} twice, once each way; 3 → 4 and 4 → 3: {1, 2}.
    assert table[["class_a", "class_b", "count", "a_to_b", "b_to_a"]].values.tolist() == [
        [0, 1, 2, 1, 1],
        [1, 2, 2, 1, 1],
    ]
    assert table["share"].tolist() == [2 / 6, 2 / 6]
    assert table[["query", "neighbour"]].values.tolist() == [[1, 2], [3, 4]]
    assert len(confused_pairs(labels, found, top=1)) == 1
    perfect = TopK(found.indices, found.distances, np.ones_like(found.hits))
    assert confused_pairs(labels[[0, 0, 0, 0, 0, 0]], perfect).empty


def test_gallery_queries_puts_the_most_confident_mistakes_first_and_seeds_the_sample():
    labels, found = _hand_made()
    sample, hardest = gallery_queries(found, num_random=2, num_failures=3, seed=0)
    # Failures 1, 2, 3, 4: item 3 misses twice; the others once, nearest first: 2 (0.2), 1, 4.
    assert hardest.tolist() == [3, 2, 1]
    assert not set(sample) & set(hardest) and len(sample) == 2
    again, _ = gallery_queries(found, num_random=2, num_failures=3, seed=0)
    assert sample.tolist() == again.tolist()


def test_retrieval_gallery_frames_hits_green_and_misses_red(tmp_path):
    labels, found = _hand_made()
    images = {i: np.full((8, 8, 3), 40 * i, dtype=np.uint8) for i in range(6)}
    fig = retrieval_gallery([0, 3], found, images, labels=labels, row_titles=["random", "failure"])
    axes = fig.axes
    assert len(axes) == 2 * 3
    frames = [ax.spines["top"].get_edgecolor() for ax in axes]
    # row 0: query 0 → 1 (hit), 2 (miss); row 1: query 3 → 4 (miss), 0 (miss)
    expected = [HIT_COLOR, MISS_COLOR, MISS_COLOR, MISS_COLOR]
    assert frames[1:3] + frames[4:6] == [to_rgba(c) for c in expected]
    assert axes[1].get_xlabel() == "0.100" and axes[2].get_xlabel() == "0.500\n1"
    first = save_figure(fig, tmp_path / "a")
    second = save_figure(
        retrieval_gallery([0, 3], found, images, labels=labels, row_titles=["random", "failure"]),
        tmp_path / "b",
    )
    for a, b in zip(first, second, strict=True):
        assert a.read_bytes() == b.read_bytes()
    table = confused_pairs(labels, found)
    pairs = confused_pairs_figure(table, images, class_names={0: "zero", 1: "one", 2: "two"})
    assert "zero ↔ one: 2×" in " ".join(t.get_text() for ax in pairs.axes for t in ax.texts)


def test_thumbnail_uris_are_webp_of_the_image_and_the_same_each_time():
    image = np.zeros((8, 12, 3), dtype=np.uint8)
    image[:, 6:] = (200, 40, 40)
    uris = thumbnail_uris({3: image})
    assert list(uris) == [3] and uris[3].startswith("data:image/webp;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(uris[3].split(",", 1)[1])))
    assert decoded.format == "WEBP" and decoded.size == (12, 8)
    error = np.abs(np.asarray(decoded.convert("RGB"), dtype=float) - image)  # lossy, colour
    assert error.mean() < 6 and error[:, [0, 1, -2, -1]].max() < 10  # blurred at the edge only
    assert thumbnail_uris({3: image}) == uris


def _explorer(points=None, families=None):
    embeddings, labels, images = _data()
    found = top_k(embeddings, labels, k=4)
    points = np.arange(0, len(labels), 2) if points is None else points
    coords = embeddings[points, :2]
    uris = thumbnail_uris({i: images[i] for i in needed_items(points, found)})
    layout = embedding_explorer(
        coords, points, labels, found, uris, families=families, note="30 of 60 test images"
    )
    return layout, found, points, uris


def test_the_explorer_holds_every_image_once_and_neighbours_point_at_them():
    layout, found, points, uris = _explorer(families=np.arange(60) % 3)
    doc_json = json.loads(re.search(r'<script type="application/json"[^>]*>\s*(.*?)\s*</script>',
                                     explorer_html(layout), re.S)[1])  # fmt: skip
    text = json.dumps(doc_json)
    for uri in uris.values():
        assert text.count(uri) == 1
    source = next(
        r.data_source for r in layout.select({"type": GlyphRenderer}) if "nn" in r.data_source.data
    )
    data = source.data
    others = next(m for m in layout.select({"type": ColumnDataSource}) if "uri" in m.data).data[
        "uri"
    ]
    table = [*data["thumb"], *others]  # the page's lookup: the points, then the others
    for row, item in enumerate(points):
        assert [table[p] for p in data["nn"][row]] == [uris[int(j)] for j in found.indices[item]]
    assert {"color:class", "color:first neighbour", "color:font family"} <= set(data)
    assert data["color"] == data["color:class"]
    assert set(data["color:first neighbour"]) <= {HIT_COLOR, MISS_COLOR}


def test_the_standalone_page_inlines_bokehjs_and_is_byte_identical():
    first = explorer_html(_explorer()[0])
    second = explorer_html(_explorer()[0])  # a second view: new uuids, higher model ids
    assert first == second
    assert "cdn.bokeh.org" not in first and not re.search(r"<script[^>]+src=", first)
    assert "Bokeh.embed" in first or "embed_items" in first


def test_save_explorer_writes_the_page(tmp_path):
    path = save_explorer(_explorer()[0], tmp_path / "run" / "explore.html")
    assert path.read_text().startswith("<!DOCTYPE html>")


@pytest.mark.parametrize("names", [["a", "b"], {7: "a", 9: "b"}, None])
def test_class_names_of_a_dataset(names):
    dataset = type("D", (), {"classes": np.array([7, 9]), "class_names": names})()
    assert notebook.class_names(dataset) == (None if names is None else {7: "a", 9: "b"})


def test_show_explorer_puts_the_written_page_into_an_iframe(tmp_path):
    path = save_explorer(_explorer()[0], tmp_path / "explore.html")
    shown = show_explorer(path).data
    srcdoc = re.search(r'<iframe class="dmlkit-explorer" srcdoc="([^"]*)"', shown)[1]
    assert html.unescape(srcdoc) == path.read_text()

"""dmlkit.plotting: what each function draws, and byte-reproducible figure files."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.collections import PathCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.image import AxesImage  # noqa: E402
from PIL import Image  # noqa: E402

from dmlkit import plotting  # noqa: E402
from dmlkit.plotting import (  # noqa: E402
    bar_density_gain,
    dataset_images,
    dense_regions,
    density_plot,
    learning_curves,
    metric_vs,
    place_without_overlap,
    save_figure,
    scatter_by_class,
    scatter_by_mode,
    thumbnail_map,
)


def _clusters(sizes=(60, 30, 10), seed=0):
    """Blobs of the given sizes at (0,0), (10,0), (0,10): the first is the densest."""
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return centres[labels] + rng.normal(scale=0.7, size=(len(labels), 2)), labels


def _images(count, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(8, 12, 3), dtype=np.uint8) for _ in range(count)]


def _main_images(ax):
    return [child for child in ax.get_children() if isinstance(child, AxesImage)]


# ----------------------------------------------------------------------------- save_figure

_RENDER = textwrap.dedent(
    """
    import sys
    import matplotlib
    matplotlib.use("Agg")
    import numpy as np
    from dmlkit.plotting import save_figure, scatter_by_class, thumbnail_map
    rng = np.random.default_rng(0)
    xy = rng.normal(size=(80, 2))
    labels = np.arange(80) % 4
    images = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(80)]
    save_figure(scatter_by_class(xy, labels), sys.argv[1] + "/scatter")
    save_figure(thumbnail_map(xy, images, labels=labels, num_insets=2), sys.argv[1] + "/map")
    """
)


def test_png_and_pdf_are_byte_identical_across_fresh_processes(tmp_path):
    outputs = []
    for run in ("a", "b"):
        folder = tmp_path / run
        folder.mkdir()
        subprocess.run([sys.executable, "-c", _RENDER, str(folder)], check=True, timeout=120)
        outputs.append({p.name: p.read_bytes() for p in sorted(folder.iterdir())})
    assert sorted(outputs[0]) == ["map.pdf", "map.png", "scatter.pdf", "scatter.png"]
    for name, data in outputs[0].items():
        assert data == outputs[1][name], f"{name} differs between two renders"
    pdf, png = outputs[0]["map.pdf"], outputs[0]["map.png"]
    assert pdf.startswith(b"%PDF") and png.startswith(b"\x89PNG")
    for field in (b"CreationDate", b"ModDate", b"Producer", b"/Creator"):
        assert field not in pdf
    assert b"Software" not in png and b"matplotlib" not in png.lower()


def test_save_figure_paths_formats_and_no_leftovers(tmp_path):
    fig = Figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    written = save_figure(fig, tmp_path / "sub" / "lambda=0.3_tsne", formats=("png", "svg"))
    assert [p.name for p in written] == ["lambda=0.3_tsne.png", "lambda=0.3_tsne.svg"]
    assert all(p.exists() for p in written)
    again = save_figure(fig, tmp_path / "x.png", formats=("pdf",))
    assert [p.name for p in again] == ["x.pdf"]
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == [p.name for p in written]
    svg_first = written[1].read_bytes()
    save_figure(fig, tmp_path / "sub" / "lambda=0.3_tsne", formats=("svg",))
    assert written[1].read_bytes() == svg_first, "SVG ids use a fixed hash salt"


# ------------------------------------------------------------------------- scatter plots


def test_scatter_by_class_draws_every_point_with_one_colour_per_class():
    xy, labels = _clusters()
    fig = scatter_by_class(torch.from_numpy(xy), labels)
    ax = fig.axes[0]
    (points,) = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert len(points.get_offsets()) == len(xy)
    np.testing.assert_allclose(points.get_offsets(), xy)  # data order kept
    assert len(np.unique(points.get_facecolors()[:, :3], axis=0)) == 3
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["0", "1", "2"]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("t-SNE 1", "t-SNE 2")


def test_scatter_by_class_many_classes_get_distinct_colours_and_no_legend():
    rng = np.random.default_rng(0)
    labels = np.arange(300) % 40
    fig = scatter_by_class(rng.normal(size=(300, 2)), labels, max_legend=20)
    ax = fig.axes[0]
    assert ax.get_legend() is None
    colours = ax.collections[0].get_facecolors()[:, :3]
    assert len(np.unique(colours.round(6), axis=0)) == 40


def test_scatter_by_class_draws_into_a_given_axes():
    fig = Figure()
    ax = fig.add_subplot(1, 2, 2)
    assert scatter_by_class(np.zeros((4, 2)) + np.arange(4)[:, None], [0, 1, 0, 1], ax=ax) is fig
    assert len(ax.collections) == 1


def test_scatter_by_mode_one_panel_per_class_marker_per_class_colour_per_mode():
    rng = np.random.default_rng(0)
    labels = np.repeat([5, 6, 7, 8], 30)
    modes = np.tile(np.repeat(["sans", "serif", "mono"], 10), 4)
    modes[labels == 8] = "sans"  # class 8 has one mode only: not chosen by default
    xy = rng.normal(size=(120, 2)) + labels[:, None]
    fig = scatter_by_mode(xy, labels, modes, num_classes=3, mode_names={"mono": "DejaVu Mono"})
    assert [ax.get_title() for ax in fig.axes] == ["class 5", "class 6", "class 7"]
    first_markers = []
    for ax in fig.axes:
        context, *per_mode = ax.collections
        assert len(context.get_offsets()) == 120  # the whole map, grey
        assert len(per_mode) == 3 and sum(len(c.get_offsets()) for c in per_mode) == 30
        first_markers.append(per_mode[0].get_paths()[0].vertices.round(6).tobytes())
    assert len(set(first_markers)) == 3, "each class has its own marker"
    legend_texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend_texts == ["DejaVu Mono", "sans", "serif"]


def test_scatter_by_mode_explicit_classes_and_grid():
    xy, labels = _clusters()
    fig = scatter_by_mode(
        xy, labels, labels % 2, classes=[2, 0], ncols=1, class_names={2: "B"}, mode_title="font"
    )
    assert [ax.get_title() for ax in fig.axes] == ["B (class 2)", "class 0"]
    assert fig.legends[0].get_title().get_text() == "font"
    for ax, cls in zip(fig.axes, [2, 0], strict=True):
        x0, x1 = ax.get_xlim()
        own = xy[labels == cls]
        assert x0 <= own[:, 0].min() and own[:, 0].max() <= x1  # zoomed to its class ...
        assert x1 - x0 < np.ptp(xy[:, 0])  # ... not the whole map


# ----------------------------------------------------------------------- thumbnail maps


def test_dense_regions_finds_the_blobs_densest_first_without_overlap():
    xy, _ = _clusters()
    regions = dense_regions(xy, 3, size=0.2)
    assert len(regions) == 3
    centres = np.array([[(x0 + x1) / 2, (y0 + y1) / 2] for x0, x1, y0, y1 in regions])
    expected = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    np.testing.assert_allclose(centres, expected, atol=1.5)
    for i in range(3):
        for j in range(i):
            assert np.abs(centres[i] - centres[j]).max() >= regions[0][1] - regions[0][0]
    assert dense_regions(xy, 3, size=0.2) == regions


def test_place_without_overlap_is_greedy_and_respects_spacing():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 10, size=(400, 2))
    order = rng.permutation(400)
    kept = place_without_overlap(xy, order, 1.0, limit=10_000)
    chosen = xy[kept]
    gaps = np.abs(chosen[:, None] - chosen[None]).max(-1) + np.eye(len(kept)) * 99
    assert gaps.min() >= 1.0
    rejected = np.setdiff1d(np.arange(400), kept)
    assert (np.abs(xy[rejected][:, None] - chosen[None]).max(-1).min(1) < 1.0).all()
    assert kept == [int(i) for i in order if i in set(kept)]  # tried in the given order
    assert len(place_without_overlap(xy, order, 1.0, limit=5)) == 5


def test_thumbnail_map_draws_thumbnails_insets_and_connectors():
    xy, labels = _clusters()
    images = _images(len(xy))
    images[0] = None  # drawn as a dot only
    fig = thumbnail_map(
        xy, images, labels=labels, num_insets=3, thumb_size=0.05, max_thumbnails=25, overlap=0.0
    )
    ax = fig.axes[0]
    assert len(ax.child_axes) == 3
    shown = _main_images(ax)
    assert 0 < len(shown) <= 25
    extents = np.array([im.get_extent() for im in shown])  # (x0, x1, y0, y1)
    centres = np.stack([extents[:, :2].mean(1), extents[:, 2:].mean(1)], 1)
    side = 0.05 * np.ptp(xy, axis=0).max()
    np.testing.assert_allclose(extents[:, 1] - extents[:, 0], side)  # 12 px wide: longer side
    np.testing.assert_allclose(extents[:, 3] - extents[:, 2], side * 8 / 12)
    gaps = np.abs(centres[:, None] - centres[None]).max(-1) + np.eye(len(shown)) * 99
    assert gaps.min() >= side * (1 - 1e-9), "overlap=0: no two thumbnails overlap"
    assert not np.any(np.all(np.isclose(centres, xy[0]), axis=1)), "no thumbnail for None"
    assert len(ax.collections[0].get_offsets()) == len(xy)
    for inset in ax.child_axes:
        assert _main_images(inset), "each inset shows thumbnails of its region"
        assert inset.get_title()[:2] in ("A:", "B:", "C:")
    indicators = [c for c in ax.get_children() if type(c).__name__ == "InsetIndicator"]
    if indicators:  # matplotlib >= 3.10
        assert len(indicators) == 3
        assert all(len(ind.connectors) == 4 for ind in indicators)


def test_thumbnail_map_explicit_regions_seed_and_determinism():
    xy, labels = _clusters()
    images = _images(len(xy))
    region = (-2.0, 2.0, -2.0, 2.0)
    fig = thumbnail_map(xy, images, zoom_regions=[region], seed=1)
    (inset,) = fig.axes[0].child_axes
    x0, x1 = inset.get_xlim()
    y0, y1 = inset.get_ylim()
    assert x0 <= -2.0 and x1 >= 2.0 and y0 <= -2.0 and y1 >= 2.0
    assert max(x1 - x0, y1 - y0) == pytest.approx(4.0, rel=0.05)

    def positions(fig):
        return [tuple(im.get_extent()) for im in _main_images(fig.axes[0])]

    same = thumbnail_map(xy, images, zoom_regions=[region], seed=1)
    other = thumbnail_map(xy, images, zoom_regions=[region], seed=2)
    assert positions(fig) == positions(same)
    assert positions(fig) != positions(other)


def test_thumbnail_map_rejects_misaligned_images():
    with pytest.raises(ValueError, match="images for"):
        thumbnail_map(np.zeros((3, 2)), _images(2))


class _FakeDataset:
    """Items like get_dataset(..., transform=None): (PIL image, label)."""

    def __init__(self, tensors: bool = False):
        self.tensors = tensors

    def __len__(self):
        return 5

    def __getitem__(self, index):
        if self.tensors:
            return torch.zeros(3, 8, 8), index
        image = Image.new("L", (40, 20), color=10 * index)  # wide, greyscale
        return image, index


def test_dataset_images_reads_resizes_and_converts_to_rgb():
    thumbs = dataset_images(_FakeDataset(), np.array([4, 1]), size=32)
    assert [t.shape for t in thumbs] == [(16, 32, 3), (16, 32, 3)]
    assert all(t.dtype == np.uint8 for t in thumbs)
    assert thumbs[0][0, 0].tolist() == [40, 40, 40] and thumbs[1][0, 0].tolist() == [10, 10, 10]


def test_dataset_images_refuses_transformed_items():
    with pytest.raises(TypeError, match="transform=None"):
        dataset_images(_FakeDataset(tensors=True), [0])


# ----------------------------------------------------------------------- training curves


def test_learning_curves_tolerates_key_layouts_and_sparse_metrics():
    history = [
        {
            "epoch": 1,
            "loss": 1.0,
            "terms": {"pull": 0.6, "push": 0.4},
            "lr": 1e-3,
            "images_per_s": 9e2,
        },
        {
            "epoch": 2,
            "loss": 0.8,
            "terms/pull": 0.5,
            "terms/push": 0.3,
            "recall@1": 0.4,
            "eval": {"map@r": 0.1},
            "time": 3.0,
        },
        {
            "epoch": 3,
            "loss": torch.tensor(0.5),
            "terms": {"pull": None, "push": 0.2},
            "note": "text",
        },
        {"epoch": 4, "loss": float("nan"), "recall@1": 0.6, "eval": {"map@r": 0.2}},
    ]
    fig = learning_curves(history)
    loss_ax, metric_ax = fig.axes
    lines = {line.get_label(): line for line in loss_ax.lines}
    assert list(lines) == ["loss", "pull", "push"]
    assert lines["loss"].get_xdata().tolist() == [1, 2, 3]  # NaN at epoch 4 skipped
    assert lines["loss"].get_ydata().tolist() == [1.0, 0.8, 0.5]
    assert lines["pull"].get_xdata().tolist() == [1, 2]
    metrics = {line.get_label(): line for line in metric_ax.lines}
    assert set(metrics) == {"recall@1", "map@r"}
    assert metrics["recall@1"].get_xdata().tolist() == [2, 4]
    assert metrics["map@r"].get_ydata().tolist() == [0.1, 0.2]
    assert (loss_ax.get_xlabel(), loss_ax.get_ylabel()) == ("epoch", "loss")
    assert metric_ax.get_ylabel() == "metric"


def test_learning_curves_loss_only_and_dataframe_input():
    fig = learning_curves(pd.DataFrame({"loss": [3.0, 2.0, 1.0]}), log_loss=True)
    (ax,) = fig.axes
    assert ax.get_yscale() == "log"
    assert ax.lines[0].get_xdata().tolist() == [1, 2, 3]  # no epoch key: 1, 2, ...
    assert ax.lines[0].get_marker() in ("None", None, "")  # a line needs no markers


def test_learning_curves_mark_a_single_epoch_so_it_is_visible():
    (ax,) = learning_curves([{"epoch": 1, "loss": 0.2, "loss/base": 0.2}]).axes
    assert [line.get_marker() for line in ax.lines] == ["o", "o"]


def test_density_plot_overlays_runs_with_median_lines():
    rng = np.random.default_rng(0)
    runs = {"triplet": rng.gamma(2, 0.1, 80), "triplet+density": rng.gamma(4, 0.1, 80)}
    fig = density_plot(runs)
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert [t.split(" (")[0] for t in texts] == list(runs)
    medians = [line.get_xdata()[0] for line in ax.lines if line.get_linestyle() == "--"]
    np.testing.assert_allclose(medians, [np.median(v) for v in runs.values()])
    assert ax.get_xlabel() == "relative density $r_c$"
    single = density_plot(np.full(5, 0.3))  # one run, constant: no KDE, no crash
    assert len(single.axes[0].lines) == 1


def test_bar_density_gain_bars_are_group_means_with_gain_labels():
    rows = [
        {
            "loss": loss,
            "density": density,
            "seed": seed,
            "recall@1": base + 0.1 * (density == "on") + 0.01 * seed,
        }
        for loss, base in [("triplet", 0.5), ("contrastive", 0.4)]
        for density in ["off", "on"]
        for seed in range(3)
    ]
    fig = bar_density_gain(pd.DataFrame(rows))
    ax = fig.axes[0]
    without, with_density = ax.containers
    np.testing.assert_allclose([b.get_height() for b in without], [0.51, 0.41])
    np.testing.assert_allclose([b.get_height() for b in with_density], [0.61, 0.51])
    assert [t.get_text() for t in ax.texts] == ["+0.1", "+0.1"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["triplet", "contrastive"]
    assert len(ax.lines) == 4, "sd error bars when there are several seeds"
    with pytest.raises(KeyError, match="map@r"):
        bar_density_gain(pd.DataFrame(rows), metric="map@r")


def test_metric_vs_flat_and_nested_series():
    lam = [0, 0.1, 0.3, 1, 3]
    fig = metric_vs(
        lam,
        {"ema": [0.5, 0.52, 0.55, 0.56, 0.5], "fixed": [0.4] * 5},
        ylabel="recall@1",
        xscale="symlog",
    )
    (ax,) = fig.axes
    assert ax.get_xscale() == "symlog" and ax.get_ylabel() == "recall@1"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["ema", "fixed"]
    ys = [line.get_ydata().tolist() for line in ax.lines]
    assert [0.5, 0.52, 0.55, 0.56, 0.5] in ys and [0.4] * 5 in ys
    seeds = np.array([[0.1, 0.2, 0.3, 0.4, np.nan], [0.3, 0.4, 0.5, 0.6, np.nan]])
    nested = metric_vs(lam, {"recall@1": {"ema": seeds}, "pi_ratio": {"ema": [1, 2, 3, 4, 5]}})
    assert [a.get_ylabel() for a in nested.axes] == ["recall@1", "pi_ratio"]
    means = nested.axes[0].lines[0].get_ydata()
    np.testing.assert_allclose(means[:4], [0.2, 0.3, 0.4, 0.5])
    assert np.isnan(means[4])
    with pytest.raises(ValueError, match="nested"):
        metric_vs(lam, {"a": {"b": [1] * 5}}, ax=Figure().add_subplot())


def test_every_public_function_is_exported():
    for name in plotting.__all__:
        assert callable(getattr(plotting, name))

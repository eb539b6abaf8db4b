"""dmlkit.tsne: deterministic Barnes-Hut t-SNE, its cache, and seeded subsampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dmlkit import tsne
from dmlkit.tsne import subsample, tsne_coordinates


def _blobs(n_per_class: int = 40, classes: int = 4, dim: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 6
    labels = np.repeat(np.arange(classes), n_per_class)
    return centres[labels] + rng.normal(size=(len(labels), dim)), labels


@pytest.fixture
def counted(monkeypatch):
    """Count real openTSNE runs (the function is still the real one)."""
    calls = []
    real = tsne._run_open_tsne

    def run(data, params):
        calls.append(params)
        return real(data, params)

    monkeypatch.setattr(tsne, "_run_open_tsne", run)
    return calls


@pytest.fixture
def fake(monkeypatch):
    """Replace openTSNE by an instant fake (coordinates = first two columns)."""
    calls = []

    def run(data, params):
        calls.append(params)
        return np.array(data[:, :2], dtype=np.float64)

    monkeypatch.setattr(tsne, "_run_open_tsne", run)
    return calls


def test_same_seed_gives_identical_coordinates_and_separates_blobs():
    data, labels = _blobs()
    first = tsne_coordinates(data, perplexity=15, random_state=3)
    second = tsne_coordinates(data, perplexity=15, random_state=3)
    assert first.shape == (len(data), 2) and first.dtype == np.float64
    assert np.isfinite(first).all()
    np.testing.assert_array_equal(first, second)
    other_seed = tsne_coordinates(data, perplexity=15, random_state=4, n_iter=50)
    assert not np.array_equal(first, other_seed)
    # A real t-SNE keeps well-separated blobs apart: each point's nearest map neighbour
    # is of its own blob.
    dist = np.linalg.norm(first[:, None] - first[None], axis=-1)
    np.fill_diagonal(dist, np.inf)
    assert (labels[dist.argmin(1)] == labels).mean() > 0.97


def test_openTSNE_is_called_with_barnes_hut_pca_seed_and_jobs(monkeypatch):
    import openTSNE

    seen = {}

    class Recorder:
        def __init__(self, **kwargs):
            seen.update(kwargs)

        def fit(self, data):
            return np.zeros((len(data), 2))

    monkeypatch.setattr(openTSNE, "TSNE", Recorder)
    tsne_coordinates(np.random.default_rng(0).normal(size=(10, 3)), random_state=7, n_jobs=2)
    assert seen["negative_gradient_method"] == "bh"
    assert seen["initialization"] == "pca"
    assert seen["random_state"] == 7 and seen["n_jobs"] == 2
    assert seen["n_components"] == 2


@pytest.mark.parametrize("cache_name", ["coords.npz", "cache_folder"])
def test_cache_hit_is_identical_and_does_not_recompute(tmp_path, counted, cache_name):
    data, _ = _blobs(n_per_class=20)
    cache = tmp_path / cache_name
    first = tsne_coordinates(data, perplexity=10, n_iter=100, cache_path=cache)
    assert len(counted) == 1
    second = tsne_coordinates(data, perplexity=10, n_iter=100, cache_path=cache)
    assert len(counted) == 1, "a cache hit must not run t-SNE again"
    np.testing.assert_array_equal(first, second)
    files = [cache] if cache.suffix == ".npz" else list(cache.glob("tsne-*.npz"))
    assert len(files) == 1 and files[0].stat().st_size > 0
    assert not list(tmp_path.rglob("*.tmp")), "atomic write leaves no temporary file"


def test_changed_input_invalidates_single_file_cache(tmp_path, counted):
    data, _ = _blobs(n_per_class=20)
    cache = tmp_path / "coords.npz"
    original = tsne_coordinates(data, perplexity=10, n_iter=100, cache_path=cache)
    changed = data.copy()
    changed[0, 0] += 1e-6  # one value, barely: still a different input
    moved = tsne_coordinates(changed, perplexity=10, n_iter=100, cache_path=cache)
    assert len(counted) == 2
    assert not np.array_equal(original, moved)
    # The file now holds the new result; the old input is recomputed, identically.
    again = tsne_coordinates(data, perplexity=10, n_iter=100, cache_path=cache)
    assert len(counted) == 3
    np.testing.assert_array_equal(original, again)


def test_folder_cache_keeps_one_file_per_input(tmp_path, fake):
    data, _ = _blobs(n_per_class=5)
    for perplexity in (5, 10, 5, 10):
        tsne_coordinates(data, perplexity=perplexity, cache_path=tmp_path)
    assert len(fake) == 2
    assert len(list(tmp_path.glob("tsne-*.npz"))) == 2


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("perplexity", 12.0),
        ("random_state", 1),
        ("n_jobs", 2),
        ("n_iter", 400),
        ("early_exaggeration_iter", 200),
        ("theta", 0.3),
        ("metric", "cosine"),
        ("neighbors", "annoy"),
    ],
)
def test_every_parameter_is_part_of_the_cache_key(tmp_path, fake, name, value):
    data, _ = _blobs(n_per_class=5)
    cache = tmp_path / "coords.npz"
    tsne_coordinates(data, cache_path=cache)
    tsne_coordinates(data, cache_path=cache)
    assert len(fake) == 1
    tsne_coordinates(data, cache_path=cache, **{name: value})
    assert len(fake) == 2, f"changing {name} must recompute"


def test_torch_input_hits_the_cache_of_the_same_numpy_values(tmp_path, fake):
    data = np.random.default_rng(0).normal(size=(30, 8)).astype(np.float32)
    cache = tmp_path / "coords.npz"
    from_numpy = tsne_coordinates(data, cache_path=cache)
    from_torch = tsne_coordinates(torch.from_numpy(data), cache_path=cache)
    assert len(fake) == 1
    np.testing.assert_array_equal(from_numpy, from_torch)


def test_unreadable_cache_is_recomputed_and_replaced(tmp_path, fake):
    data, _ = _blobs(n_per_class=5)
    cache = tmp_path / "coords.npz"
    cache.write_bytes(b"not a zip file")
    tsne_coordinates(data, cache_path=cache)
    assert len(fake) == 1
    tsne_coordinates(data, cache_path=cache)
    assert len(fake) == 1, "the rewritten cache is valid"


def test_non_finite_or_too_small_input_is_refused():
    with pytest.raises(ValueError, match="NaN or inf"):
        tsne_coordinates(np.array([[0.0, np.nan]] * 10))
    with pytest.raises(ValueError, match="N >= 4"):
        tsne_coordinates(np.zeros((3, 2)))


def test_subsample_returns_everything_when_small_enough():
    np.testing.assert_array_equal(subsample(5, 10), np.arange(5))
    np.testing.assert_array_equal(subsample(5, 5, labels=[0, 0, 1, 1, 2]), np.arange(5))


@pytest.mark.parametrize("labels", [None, np.arange(1000) % 7])
def test_subsample_is_seeded_sorted_and_unique(labels):
    first = subsample(1000, 100, seed=1, labels=labels)
    assert first.dtype == np.int64 and len(first) == 100
    assert np.all(np.diff(first) > 0) and first.min() >= 0 and first.max() < 1000
    np.testing.assert_array_equal(first, subsample(1000, 100, seed=1, labels=labels))
    assert not np.array_equal(first, subsample(1000, 100, seed=2, labels=labels))


def test_stratified_subsample_keeps_small_classes_whole():
    # 990 points of one class, 3 small classes of 2, 3 and 5 points.
    labels = np.array(["big"] * 990 + ["a"] * 2 + ["b"] * 3 + ["c"] * 5)
    chosen = subsample(len(labels), 40, seed=0, labels=labels)
    picked = labels[chosen]
    assert (picked == "a").sum() == 2 and (picked == "b").sum() == 3
    assert (picked == "c").sum() == 5 and (picked == "big").sum() == 30
    # Without stratification the small classes would almost surely vanish.
    assert np.isin(labels[subsample(len(labels), 40, seed=0)], ["a", "b", "c"]).sum() <= 2


def test_stratified_subsample_with_more_classes_than_points_takes_one_each():
    labels = np.arange(50).repeat(3)
    chosen = subsample(len(labels), 20, seed=0, labels=labels)
    assert len(chosen) == 20
    assert len(np.unique(labels[chosen])) == 20


def test_subsample_rejects_bad_arguments():
    with pytest.raises(ValueError):
        subsample(10, 5, labels=np.zeros(9))
    with pytest.raises(ValueError):
        subsample(-1, 5)


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(1, 40), min_size=1, max_size=12),
    fraction=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_stratified_quota_is_exact_and_balanced(counts, fraction, seed):
    labels = np.repeat(np.arange(len(counts)), counts)
    np.random.default_rng(seed).shuffle(labels)
    target = int(fraction * len(labels))
    chosen = subsample(len(labels), target, seed=seed, labels=labels)
    assert len(chosen) == target
    assert len(np.unique(chosen)) == target
    got = np.bincount(labels[chosen], minlength=len(counts))
    assert np.all(got <= np.array(counts))
    # Classes not taken whole all got an equal share (±1), at least as much as any other.
    partial = got[got < np.array(counts)]
    if len(partial):
        assert partial.max() - partial.min() <= 1
        assert partial.min() >= got.max() - 1

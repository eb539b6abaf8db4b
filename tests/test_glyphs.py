"""glyphs / glyphs-mini: fonts, class analysis, rendering, determinism, cache, transforms."""

from __future__ import annotations

import pickle
import time
import unicodedata

import numpy as np
import pytest
import torch
from PIL import Image

import dmlkit.data as data
from dmlkit.data import glyphs
from dmlkit.data.augment import GlyphJitter, jitter_glyph
from dmlkit.data.charset import _aligned_hausdorff, is_candidate_character
from dmlkit.data.fonts import FAMILIES, STYLES, family_and_style, font_files, render_clean
from dmlkit.data.transforms import IMAGENET_MEAN, IMAGENET_STD, GlyphTransform
from dmlkit.samplers import SampleKey
from tests.fixtures_datasets import glyph_cache_dir


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    return glyph_cache_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def charset(cache):
    return glyphs.load_charset(cache)


@pytest.fixture(scope="module")
def mini(cache):
    return {split: data.get_dataset("glyphs-mini", split, cache_dir=cache) for split in data.SPLITS}


def test_the_18_font_files_and_their_families():
    fonts = font_files()
    assert len(fonts) == 18
    assert {f.family for f in fonts} == set(FAMILIES)
    assert {f.style for f in fonts} == set(STYLES)
    by_name = {f.name: (f.family, f.style) for f in fonts}
    assert by_name["DejaVuSansDisplay.ttf"] == ("DejaVu Sans", "regular")
    assert by_name["STIXGeneralBolIta.ttf"] == ("STIX General", "bold-italic")
    assert sum(f.family == "STIX General" for f in fonts) == 4
    assert not any(f.name.startswith(("cm", "STIXSiz", "STIXNonUni", "LastResort")) for f in fonts)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("DejaVuSans.ttf", ("DejaVu Sans", "regular")),
        ("DejaVuSans-Oblique.ttf", ("DejaVu Sans", "italic")),
        ("DejaVuSansMono-BoldOblique.ttf", ("DejaVu Sans Mono", "bold-italic")),
        ("DejaVuSerif-Italic.ttf", ("DejaVu Serif", "italic")),
        ("DejaVuSerifDisplay.ttf", ("DejaVu Serif", "regular")),
        ("STIXGeneralBol.ttf", ("STIX General", "bold")),
        ("STIXGeneralItalic.ttf", ("STIX General", "italic")),
    ],
)
def test_family_and_style_from_file_name(name, expected):
    assert family_and_style(name) == expected


@pytest.mark.parametrize(
    ("char", "expected"),
    [
        ("A", True),
        ("€", True),
        (" ", False),
        ("\u00a0", False),
        ("\u0301", False),
        ("\u20dd", False),
        ("\u200b", False),
        ("\n", False),
        ("\ue000", False),
    ],
)
def test_candidate_characters(char, expected):
    assert is_candidate_character(ord(char)) is expected


def test_render_clean_keeps_baseline_position():
    font = font_files()[3]  # DejaVuSans.ttf
    assert font.name == "DejaVuSans.ttf"
    comma, quote = render_clean(font, ord(","), 64), render_clean(font, ord("'"), 64)
    assert comma.shape == (64, 64) and comma.dtype == np.uint8
    assert np.nonzero(comma.any(1))[0].mean() > np.nonzero(quote.any(1))[0].mean() + 20
    assert render_clean(font, ord(" "), 64).sum() == 0


def test_aligned_hausdorff_on_hand_made_masks():
    def prepared(mask):
        from scipy import ndimage

        padded = np.pad(mask, 2)
        return np.stack(np.nonzero(padded)), np.square(ndimage.distance_transform_edt(~padded))

    square = np.zeros((16, 16), bool)
    square[4:10, 4:10] = True
    shifted = np.roll(square, 1, axis=1)
    blob = square.copy()
    blob[4, 12] = True  # 3 px right of the square's last column (9)
    assert _aligned_hausdorff(prepared(square), prepared(square), 1) == 0.0
    assert _aligned_hausdorff(prepared(square), prepared(shifted), 0) == 1.0
    assert _aligned_hausdorff(prepared(square), prepared(shifted), 1) == 0.0
    assert _aligned_hausdorff(prepared(square), prepared(blob), 0) == 3.0


def test_charset_rules(charset):
    fonts = font_files()
    assert len(charset.codepoints) >= 2000
    assert charset.codepoints == sorted(charset.codepoints)
    for cp in charset.codepoints:
        char = chr(cp)
        assert char.isprintable() and not char.isspace()
        assert not unicodedata.category(char).startswith("M")
        drawn = charset.fonts[cp]
        assert len(drawn) >= 8 and len({fonts[i].family for i in drawn}) >= 3


@pytest.mark.parametrize(
    ("dropped", "kept"),
    [("Α", "A"), ("А", "A"), ("Ο", "O"), ("о", "o"), ("Κ", "K"), ("\u2010", "-")],
)
def test_homoglyphs_keep_the_lowest_code_point(charset, dropped, kept):
    assert charset.homoglyphs[ord(dropped)] == ord(kept)
    assert ord(dropped) not in charset.codepoints and ord(kept) in charset.codepoints


@pytest.mark.parametrize("pair", ["O0", "Il", "oO", ",'", "Ŏǒ", "ĔĚ", "-−"])
def test_look_alikes_that_differ_stay_separate_classes(charset, pair):
    assert all(ord(c) in charset.codepoints for c in pair)


def test_mini_split_is_class_disjoint_with_16_images_per_class(mini):
    train, test = mini["train"], mini["test"]
    assert len(train.classes) == len(test.classes) == glyphs.MINI_CLASSES_PER_SPLIT
    assert not set(train.classes) & set(test.classes)
    for ds in (train, test):
        assert ds.labels.dtype == np.int64 and ds.labels.ndim == 1
        assert ds.classes.dtype == np.int64
        np.testing.assert_array_equal(ds.classes, np.unique(ds.labels))
        assert np.bincount(np.searchsorted(ds.classes, ds.labels)).min() >= 16
        assert ds.paths is None
        assert len(ds.family) == len(ds.style) == len(ds.font) == len(ds)
        assert set(ds.family) <= set(FAMILIES) and set(ds.style) <= set(STYLES)
        assert ds.class_names == [chr(c) for c in ds.classes]


def test_mini_classes_are_a_subset_of_the_full_split(charset):
    full = glyphs.split_classes(charset.codepoints, "glyphs", seed=0)
    mini = glyphs.split_classes(charset.codepoints, "glyphs-mini", seed=0)
    for split in data.SPLITS:
        assert set(mini[split]) <= set(full[split])
    assert not set(full["train"]) & set(full["test"])
    assert len(full["train"]) + len(full["test"]) == len(charset.codepoints)
    other = glyphs.split_classes(charset.codepoints, "glyphs-mini", seed=1)
    assert other["train"] != mini["train"]


def test_items_are_rgb_images_or_tensors(mini, cache):
    image, label = mini["train"][0]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (64, 64)
    assert label == mini["train"].labels[0] and isinstance(label, int)
    for transform in ("train", "test"):
        ds = data.get_dataset("glyphs-mini", "test", transform=transform, cache_dir=cache)
        tensor, _ = ds[5]
        assert tensor.shape == (3, 64, 64) and tensor.dtype == torch.float32
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=8)))
    assert batch[0].shape == (8, 3, 64, 64) and batch[1].dtype == torch.int64


def test_rendering_is_deterministic_and_seeded(charset):
    fonts = font_files()
    cps = charset.codepoints[:3]
    first = glyphs.render_glyphs(cps, charset, fonts, size=32, seed=7, jitter=GlyphJitter())
    again = glyphs.render_glyphs(cps, charset, fonts, size=32, seed=7, jitter=GlyphJitter())
    other = glyphs.render_glyphs(cps, charset, fonts, size=32, seed=8, jitter=GlyphJitter())
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert first[0].shape == (len(first[1]), 32, 32)
    assert not np.array_equal(first[0], other[0])
    np.testing.assert_array_equal(first[1], other[1])


def test_jitter_knobs_change_the_pixels():
    clean = render_clean(font_files()[0], ord("R"), 64)
    quiet = GlyphJitter(
        scale=(1, 1),
        aspect=1.0,
        rotation=0,
        shear=0,
        shift=0,
        thickness=(0, 0),
        blur=(0, 0),
        noise=0,
        occlusion=0,
        paper=(1, 1),
        ink=(0, 0),
    )
    plain = jitter_glyph(clean, 32, quiet, np.random.default_rng(0))
    expected = 255 - np.asarray(Image.fromarray(clean).reduce(2), np.float64)
    np.testing.assert_allclose(plain, expected, atol=1)
    noisy = jitter_glyph(clean, 32, GlyphJitter(), np.random.default_rng(0))
    assert np.abs(noisy.astype(int) - plain).mean() > 10


def test_second_load_comes_from_the_cache(mini, cache):
    start = time.perf_counter()
    again = data.get_dataset("glyphs-mini", "train", cache_dir=cache)
    assert time.perf_counter() - start < 1.0
    assert again.from_cache
    np.testing.assert_array_equal(np.asarray(again.images), np.asarray(mini["train"].images))
    np.testing.assert_array_equal(again.font, mini["train"].font)


def test_cache_key_covers_every_option(cache):
    folders_before = set((cache / "glyphs").iterdir())
    ds = data.get_dataset("glyphs-mini", "train", cache_dir=cache, size=16, renders_per_font=1)
    new = set((cache / "glyphs").iterdir()) - folders_before
    assert len(new) == 1 and not ds.from_cache
    assert ds.images.shape[1:] == (16, 16)
    assert np.bincount(np.searchsorted(ds.classes, ds.labels)).min() >= 8


def test_incomplete_cache_entry_is_rendered_again(cache):
    ds = data.get_dataset("glyphs-mini", "test", cache_dir=cache, size=16, noise=0.0)
    (ds.images_path.parent / "meta.npz").unlink()  # as if killed before the last write
    again = data.get_dataset("glyphs-mini", "test", cache_dir=cache, size=16, noise=0.0)
    assert not again.from_cache
    np.testing.assert_array_equal(np.asarray(again.images), np.asarray(ds.images))


def test_dataset_pickles_by_file_name(mini):
    blob = pickle.dumps(mini["test"])
    assert len(blob) < 100_000  # the pixels are re-mapped, not copied
    clone = pickle.loads(blob)
    np.testing.assert_array_equal(np.asarray(clone[3][0]), np.asarray(mini["test"][3][0]))
    np.testing.assert_array_equal(clone.family, mini["test"].family)


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"colour": 1}, TypeError),
        ({"size": 4}, ValueError),
        ({"renders_per_font": 0}, ValueError),
        ({"blur": (2.0, 1.0)}, ValueError),
        ({"scale": 1.0}, ValueError),
        ({"rotation": (1, 2)}, ValueError),
        ({"thickness": (0.5, 1)}, ValueError),
        ({"noise": "loud"}, ValueError),
    ],
)
def test_bad_options(options, error, cache):
    with pytest.raises(error, match=next(iter(options))):
        data.get_dataset("glyphs-mini", "train", cache_dir=cache, **options)


@pytest.mark.parametrize(("name", "split"), [("glyph", "train"), ("glyphs", "val")])
def test_unknown_name_or_split_lists_the_valid_ones(name, split):
    with pytest.raises(
        ValueError, match="valid: .*glyphs-mini" if name == "glyph" else "train, test"
    ):
        data.get_dataset(name, split)


def test_glyph_test_transform_is_imagenet_normalization():
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    out = GlyphTransform(train=False)(pixels)
    expected = (pixels[None].astype(np.float64) / 255 - np.array(IMAGENET_MEAN)[:, None, None]) / (
        np.array(IMAGENET_STD)[:, None, None]
    )
    torch.testing.assert_close(out, torch.from_numpy(expected).float())
    rgb = Image.fromarray(pixels).convert("RGB")
    torch.testing.assert_close(GlyphTransform(train=False)(rgb), out)


def test_glyph_train_transform_shifts_with_replicated_border():
    pixels = np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8)
    transform = GlyphTransform(train=True, max_shift=4 / 64, mean=(0, 0, 0), std=(1, 1, 1))
    for _ in range(5):
        out = (transform(pixels)[0] * 255).round().to(torch.uint8).numpy()
        padded = np.pad(pixels, 4, mode="edge")
        matches = [
            (dy, dx)
            for dy in range(9)
            for dx in range(9)
            if np.array_equal(padded[dy : dy + 64, dx : dx + 64], out)
        ]
        assert len(matches) == 1


def test_glyph_train_shift_comes_from_the_samples_generator():
    pixels = np.random.default_rng(2).integers(0, 256, (64, 64), dtype=np.uint8)
    transform = GlyphTransform(True)
    keys = [SampleKey(0, 3, epoch, position) for epoch in (0, 1) for position in range(6)]
    first = torch.stack([transform(pixels, key.rng()) for key in keys])
    again = torch.stack([GlyphTransform(True)(pixels, key.rng()) for key in keys])
    torch.testing.assert_close(first, again)  # (seed, epoch, position) alone decide
    assert not torch.equal(first[:6], first[6:])  # another epoch, other shifts


def test_corrupt_cache_entry_is_rendered_again(cache):
    ds = data.get_dataset("glyphs-mini", "test", cache_dir=cache, size=16, blur=(0.0, 0.5))
    (ds.images_path.parent / "meta.npz").write_bytes(b"PK\x03\x04 torn")
    again = data.get_dataset("glyphs-mini", "test", cache_dir=cache, size=16, blur=(0.0, 0.5))
    assert not again.from_cache
    np.testing.assert_array_equal(np.asarray(again.images), np.asarray(ds.images))


def test_full_disk_keeps_the_render_in_memory(cache, monkeypatch, caplog):
    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(glyphs, "atomic_writer", no_space)
    ds = data.get_dataset("glyphs-mini", "test", cache_dir=cache, size=16, shear=0.0)
    assert ds.images_path is None and not isinstance(ds.images, np.memmap)
    assert "not cached" in caplog.text
    assert len(pickle.loads(pickle.dumps(ds))) == len(ds)


def test_corrupt_class_list_is_analysed_again(tmp_path, monkeypatch, caplog):
    fake = glyphs.Charset(codepoints=[65, 66], fonts={65: [0], 66: [1]}, candidates=2)
    monkeypatch.setattr(glyphs, "analyse_characters", lambda fonts, log: fake)
    first = glyphs.load_charset(tmp_path)
    (path,) = (tmp_path / "glyphs").glob("charset-*.json")
    assert first == fake and glyphs.load_charset(tmp_path) == fake
    path.write_text('{"codepoints": [1, 2')
    assert glyphs.load_charset(tmp_path) == fake
    assert "analysing again" in caplog.text


def test_equal_options_share_a_cache_entry(cache):
    first = data.get_dataset("glyphs-mini", "test", cache_dir=cache, size=16, scale=(0.8, 1.1))
    again = data.get_dataset(
        "glyphs-mini", "test", cache_dir=cache, size=16, scale=[0.8, 1.1], rotation=12
    )  # a JSON list and an int: the same options
    assert not first.from_cache and again.from_cache
    assert again.images_path == first.images_path


def test_glyphs_ignore_root(mini, cache):
    ds = data.get_dataset("glyphs-mini", "test", root="/no/such/folder", cache_dir=cache)
    np.testing.assert_array_equal(ds.labels, mini["test"].labels)


def test_a_glyph_transform_object_takes_the_fast_path(mini, cache):
    shifted = data.transforms("glyphs", True, max_shift=0.1)
    ds = data.get_dataset("glyphs-mini", "test", transform=shifted, cache_dir=cache)
    key = SampleKey(3, 7, 0, 0)
    expected = data.transforms("glyphs", True, max_shift=0.1)(mini["test"].images[3], key.rng())
    torch.testing.assert_close(ds[key][0], expected)
    default = data.get_dataset("glyphs-mini", "test", transform="train", cache_dir=cache)
    assert not torch.equal(default[key][0], ds[key][0])

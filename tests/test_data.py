"""cub200 / cars196 / sop / folder on tiny fixtures in the official formats; errors; CLI."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

import dmlkit.data as data
from dmlkit.data import DatasetError, get_dataset
from dmlkit.data.__main__ import main as cli_main
from tests.fixtures_datasets import (
    glyph_cache_dir,
    make_cars,
    make_cub,
    make_folder,
    make_sop,
    write_image_modes,
    write_jpeg,
)

URLS = {
    "cub200": "https://www.vision.caltech.edu/datasets/cub_200_2011/",
    "cars196": "https://ai.stanford.edu/~jkrause/cars/car_dataset.html",
    "sop": "https://cvgl.stanford.edu/projects/lifted_struct/",
}


@pytest.fixture(scope="module")
def cub(tmp_path_factory):
    return make_cub(tmp_path_factory.mktemp("data") / "CUB_200_2011")


@pytest.fixture(scope="module")
def sop(tmp_path_factory):
    return make_sop(tmp_path_factory.mktemp("data") / "Stanford_Online_Products")


def load(name, split, root, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the small-fixture count warning
        return get_dataset(name, split, root=root, **options)


@pytest.mark.parametrize(("split", "first", "last"), [("train", 1, 100), ("test", 101, 200)])
def test_cub_splits_by_class_id(cub, split, first, last):
    ds = load("cub200", split, cub)
    np.testing.assert_array_equal(ds.classes, np.arange(first, last + 1))
    assert ds.labels.dtype == np.int64 and len(ds) == 100
    assert ds.class_names[0] == f"{first:03d}.Bird_{first}"
    assert all(os.path.isfile(p) and p.startswith(str(cub)) for p in ds.paths)
    # The image's folder carries its class: labels follow image_class_labels.txt.
    assert all(
        Path(p).parent.name.startswith(f"{label:03d}.")
        for p, label in zip(ds.paths, ds.labels, strict=True)
    )


def test_cub_item_is_rgb_and_transforms_apply(cub):
    image, label = load("cub200", "test", cub)[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and label == 101
    tensor, _ = load("cub200", "test", cub, transform="test")[0]
    assert tensor.shape == (3, 224, 224) and tensor.dtype == torch.float32
    tensor, _ = load("cub200", "train", cub, transform="train")[0]
    assert tensor.shape == (3, 224, 224)
    size, _ = load("cub200", "train", cub, transform=lambda im: im.size)[0]
    assert size == (8, 8)


def test_count_warning_says_official_and_can_be_disabled(cub):
    with pytest.warns(UserWarning, match="official split has 5,864"):
        get_dataset("cub200", "train", root=cub)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_dataset("cub200", "train", root=cub, check_counts=False)


def test_root_falls_back_to_dmlkit_data(cub, monkeypatch):
    monkeypatch.setenv("DMLKIT_DATA", str(cub.parent))
    assert len(load("cub200", "test", None)) == 100
    monkeypatch.delenv("DMLKIT_DATA")
    with pytest.raises(DatasetError, match="DMLKIT_DATA"):
        get_dataset("cub200", "test")


@pytest.mark.parametrize(("layout", "in_devkit"), [("A", False), ("B", False), ("B", True)])
def test_cars_both_layouts_split_by_class_id_not_test_flag(tmp_path, layout, in_devkit):
    root = make_cars(tmp_path / "cars196", layout, test_annos_in_devkit=in_devkit)
    train, test = load("cars196", "train", root), load("cars196", "test", root)
    np.testing.assert_array_equal(train.classes, np.arange(1, 99))
    np.testing.assert_array_equal(test.classes, np.arange(99, 197))
    assert len(train) == 98 and len(test) == 98
    assert test.class_names[0] == "Maker Model 99 2008"
    assert all(os.path.isfile(p) for p in train.paths + test.paths)
    folders = {Path(p).parent.name for p in test.paths}
    assert folders == ({"car_ims"} if layout == "A" else {"cars_train", "cars_test"})


def test_sop_reads_the_ebay_files(sop):
    train, test = load("sop", "train", sop), load("sop", "test", sop)
    np.testing.assert_array_equal(train.classes, np.arange(1, 7))
    np.testing.assert_array_equal(test.classes, np.arange(7, 13))
    assert len(train) == 12 and train.class_names is None
    np.testing.assert_array_equal(train.super_labels, train.labels % 3 + 1)
    assert Path(train.paths[0]).relative_to(sop).as_posix() == "chair_final/1_0.JPG"


def test_folder_labels_are_sorted_name_indices(tmp_path):
    root = make_folder(tmp_path / "tree", ["eel", "ant", "dog", "bee", "cat"])
    train, test = load("folder", "train", root), load("folder", "test", root)
    assert train.class_names == ["ant", "bee", "cat"] and test.class_names == ["dog", "eel"]
    np.testing.assert_array_equal(train.classes, [0, 1, 2])
    np.testing.assert_array_equal(test.classes, [3, 4])
    assert Path(test.paths[0]).parent.name == "dog" and test.labels[0] == 3


def test_folder_rejects_non_utf8_file_names(tmp_path):
    root = make_folder(tmp_path / "tree")
    bad = os.path.join(os.fsencode(root / "ant"), b"caf\xe9.jpg")
    write_jpeg(os.fsdecode(bad), seed=0)
    with pytest.raises(DatasetError, match="not valid UTF-8"):
        load("folder", "train", root)


def test_folder_warns_about_an_empty_class(tmp_path):
    root = make_folder(tmp_path / "tree")
    (root / "bee" / "0.jpg").unlink()
    (root / "bee" / "1.jpg").unlink()
    with pytest.warns(UserWarning, match="no images"):
        ds = get_dataset("folder", "train", root=root)
    assert ds.class_names == ["ant", "cat"]


@pytest.mark.parametrize("name", ["cub200", "cars196", "sop"])
def test_missing_root_names_layout_and_url(tmp_path, name):
    with pytest.raises(DatasetError) as info:
        get_dataset(name, "train", root=tmp_path / "nowhere")
    message = str(info.value)
    assert str(tmp_path / "nowhere") in message
    assert URLS[name] in message and "expected layout" in message


@pytest.mark.parametrize("missing", ["images.txt", "image_class_labels.txt", "classes.txt"])
def test_missing_cub_metadata_file(tmp_path, missing):
    root = make_cub(tmp_path / "CUB_200_2011", classes=4)
    (root / missing).unlink()
    with pytest.raises(DatasetError, match=missing):
        load("cub200", "train", root)


def test_listed_image_not_on_disk(tmp_path):
    root = make_cub(tmp_path / "CUB", classes=3)
    second = (root / "images.txt").read_text().splitlines()[1].split()[1]
    victim = root / "images" / second
    victim.unlink()
    with pytest.raises(
        DatasetError, match="image listed in images.txt line 2 is not on disk"
    ) as info:
        load("cub200", "train", root)
    assert str(victim) in str(info.value)


def corrupt_lines(path: Path, edit) -> None:
    lines = path.read_text().splitlines()
    path.write_text("\n".join(edit(lines)) + "\n")


@pytest.mark.parametrize(
    ("file", "edit", "match"),
    [
        ("images.txt", lambda ls: ls[:-1], "image id 4 has no entry in images.txt"),
        ("images.txt", lambda ls: [*ls, ls[0]], "duplicate id 1"),
        ("images.txt", lambda ls: [ls[0][:1], *ls[1:]], "line 1: expected '<image_id> <path>'"),
        (
            "images.txt",
            lambda ls: ["x " + ls[0].split()[1], *ls[1:]],
            "must be a non-negative integer",
        ),
        ("images.txt", lambda ls: ["1 ../../etc/passwd", *ls[1:]], "not inside the dataset root"),
        ("images.txt", lambda ls: ["1 /etc/passwd", *ls[1:]], "not inside the dataset root"),
        ("image_class_labels.txt", lambda ls: [*ls[:-1], "4 999"], "class id 999 is not in"),
        ("image_class_labels.txt", lambda ls: [*ls[:-1], "77 2"], "image id 4 has no entry"),
        ("classes.txt", lambda ls: [], "empty"),
    ],
)
def test_malformed_cub_metadata(tmp_path, file, edit, match):
    root = make_cub(tmp_path / "CUB_200_2011", classes=4)
    corrupt_lines(root / file, edit)
    with pytest.raises(DatasetError, match=match) as info:
        load("cub200", "train", root)
    assert file in str(info.value) or "images.txt" in str(info.value)
    assert URLS["cub200"] in str(info.value)


def test_non_utf8_metadata_names_file_and_line(tmp_path):
    root = make_cub(tmp_path / "CUB_200_2011", classes=4)
    raw = (root / "images.txt").read_bytes().split(b"\n")
    raw[2] = b"3 caf\xe9/x.jpg"
    (root / "images.txt").write_bytes(b"\n".join(raw))
    with pytest.raises(DatasetError, match=r"images.txt, line 3: not UTF-8"):
        load("cub200", "train", root)


def test_class_outside_the_official_range(tmp_path):
    root = make_cub(tmp_path / "CUB_200_2011", classes=4)
    corrupt_lines(root / "classes.txt", lambda ls: [*ls, "201 extra"])
    corrupt_lines(root / "image_class_labels.txt", lambda ls: [*ls[:-1], "4 201"])
    with pytest.raises(DatasetError, match="outside 1..200"):
        load("cub200", "train", root)


def test_empty_split(tmp_path):
    root = make_cub(tmp_path / "CUB_200_2011", classes=4)  # classes 1..4: no test class
    with pytest.raises(DatasetError, match="test split has no images"):
        load("cub200", "test", root)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda ls: ls[1:], "header"),
        (lambda ls: [*ls, ls[1]], r"line 14: duplicate image_id 1 \(first on line 2\)"),
        (lambda ls: [*ls, "99 1 1"], "expected 4 fields"),
        (lambda ls: [*ls, "99 1 1 ../outside.JPG"], "not inside the dataset root"),
        (lambda ls: [*ls, "99 one 1 a.JPG"], "class_id must be"),
    ],
)
def test_malformed_sop_metadata(tmp_path, edit, match):
    root = make_sop(tmp_path / "Stanford_Online_Products")
    corrupt_lines(root / "Ebay_train.txt", edit)
    with pytest.raises(DatasetError, match=match):
        load("sop", "train", root)


@pytest.mark.parametrize(
    ("variables", "match"),
    [
        ({"class_names": None}, "class_names"),
        ({"annotations": "no struct"}, "field"),
        ({"annotations": "drop class"}, "field.*class"),
        ({"annotations": "bad path"}, "not inside the dataset root"),
        ({"annotations": "text class"}, "'class' must be a number"),
        ({"annotations": "duplicate"}, "listed twice"),
    ],
)
def test_malformed_cars_mat(tmp_path, variables, match):
    root = make_cars(tmp_path / "cars196", "A")
    mat = scipy.io.loadmat(root / "cars_annos.mat")
    annotations = mat["annotations"]
    change = variables.get("annotations")
    if "class_names" in variables:
        del mat["class_names"]
    elif change == "no struct":
        mat["annotations"] = np.arange(3)
    elif change == "drop class":
        fields = [f for f in annotations.dtype.names if f != "class"]
        slim = np.empty(annotations.shape, dtype=[(f, object) for f in fields])
        for f in fields:
            slim[f] = annotations[f]
        mat["annotations"] = slim
    elif change == "bad path":
        annotations[0, 3]["relative_im_path"] = np.array(["/etc/passwd"])
    elif change == "text class":
        annotations[0, 3]["class"] = np.array(["seven"])
    elif change == "duplicate":
        annotations[0, 3] = annotations[0, 2]
    scipy.io.savemat(
        root / "cars_annos.mat", {k: v for k, v in mat.items() if not k.startswith("__")}
    )
    with pytest.raises(DatasetError, match=match) as info:
        load("cars196", "train", root)
    assert "cars_annos.mat" in str(info.value) and URLS["cars196"] in str(info.value)


@pytest.mark.parametrize(
    ("layout", "names", "first_unnamed"),
    [
        ("A", 150, "class id 151 in cars_annos.mat annotation 151"),
        ("A", 1, "class id 2 in cars_annos.mat annotation 2"),
        # Layout B lists the odd classes (test flag 0) first, from the train file.
        ("B", 150, "class id 151 in cars_train_annos.mat annotation 76"),
        ("B", 1, "class id 3 in cars_train_annos.mat annotation 2"),
    ],
)
@pytest.mark.parametrize("split", ["train", "test"])
def test_malformed_cars_class_names_too_short(tmp_path, layout, names, first_unnamed, split):
    root = make_cars(tmp_path / "cars196", layout)
    names_file = "cars_annos.mat" if layout == "A" else "devkit/cars_meta.mat"
    mat = scipy.io.loadmat(root / names_file)
    mat["class_names"] = mat["class_names"][:, :names]
    scipy.io.savemat(root / names_file, {k: v for k, v in mat.items() if not k.startswith("__")})
    with pytest.raises(
        DatasetError, match=rf"{first_unnamed} has no name: 'class_names' has {names} entries"
    ) as info:
        load("cars196", split, root)
    assert info.value.file == str(root / names_file) and URLS["cars196"] in str(info.value)


def test_unreadable_mat_file(tmp_path):
    root = make_cars(tmp_path / "cars196", "A")
    (root / "cars_annos.mat").write_bytes(b"MATLAB 5.0 MAT-file, truncated")
    with pytest.raises(DatasetError, match="cannot read the .mat file"):
        load("cars196", "train", root)


def test_cars_without_either_layout(tmp_path):
    (tmp_path / "cars196").mkdir()
    with pytest.raises(DatasetError, match="neither cars_annos.mat"):
        load("cars196", "train", tmp_path / "cars196")


def break_image(path: str) -> None:
    Path(path).write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")


def test_undecodable_image_names_the_file(tmp_path):
    root = make_cub(tmp_path / "CUB_200_2011", classes=3, images_per_class=3)
    ds = load("cub200", "train", root)
    break_image(ds.paths[4])
    with pytest.raises(DatasetError, match="cannot decode image") as info:
        ds[4]
    assert ds.paths[4] in str(info.value)
    ds[3]  # the others still load


def test_skip_bad_images_substitutes_the_next_image_of_the_class(tmp_path, caplog):
    root = make_cub(tmp_path / "CUB_200_2011", classes=3, images_per_class=3)
    ds = load("cub200", "train", root, skip_bad_images=True)
    break_image(ds.paths[4])
    with caplog.at_level(logging.WARNING):
        image, label = ds[4]
    assert label == 2 and ds.bad_images == [ds.paths[4]]
    np.testing.assert_array_equal(np.asarray(image), np.asarray(ds[5][0]))
    assert ds.paths[4] in caplog.text
    ds[4]
    assert ds.bad_images == [ds.paths[4]]  # counted once
    for path in (ds.paths[3], ds.paths[5]):
        break_image(path)
    with pytest.raises(DatasetError, match="no image of class 2 can be decoded"):
        ds[4]


@pytest.mark.parametrize("name", ["cub200", "folder"])
def test_unknown_option_is_a_type_error(cub, name):
    with pytest.raises(TypeError, match="size"):
        get_dataset(name, "train", root=cub, size=64)


def test_bad_transform_value(cub):
    with pytest.raises(ValueError, match="transform"):
        get_dataset("cub200", "train", root=cub, transform="val")


def test_datasets_registry():
    assert set(data.DATASETS) == {"glyphs", "glyphs-mini", "cub200", "cars196", "sop", "folder"}
    assert all(isinstance(v, str) and v for v in data.DATASETS.values())


def test_imagenet_transforms():
    image = Image.fromarray(
        np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    )
    test = data.transforms("imagenet", train=False)(image)
    assert test.shape == (3, 224, 224)
    torch.testing.assert_close(data.transforms("imagenet", train=False)(image), test)
    assert data.transforms("imagenet", train=True)(image).shape == (3, 224, 224)
    with pytest.raises(ValueError, match="imagenet, glyphs"):
        data.transforms("coco", train=True)


def test_cli_prints_statistics_and_writes_a_reproducible_sheet(cub, tmp_path, capsys):
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert cli_main(["cub200", "--root", str(cub), "--sheet", str(first)]) == 0
        assert (
            cli_main(["cub200", "--root", str(cub), "--sheet", str(second), "--split", "train"])
            == 0
        )
    out = capsys.readouterr().out
    assert "cub200 train: 100 classes, 100 images; images per class min 1, median 1, max 1" in out
    assert "cub200 test: 100 classes" in out and f"contact sheet (train): {first}" in out
    assert first.read_bytes() == second.read_bytes()
    # 8 rows; one column, not 10: every class has a single image (no blank columns).
    assert Image.open(first).size == (150 + 1 * 64, 8 * 64)


def test_cli_on_glyphs_mini_in_a_subprocess(tmp_path, tmp_path_factory):
    sheet = tmp_path / "sheet.png"
    cache = tmp_path / "cache"
    shutil.copytree(
        glyph_cache_dir(tmp_path_factory) / "glyphs",
        cache / "glyphs",
        ignore=shutil.ignore_patterns("glyphs-*"),
    )
    env = {**os.environ, "DMLKIT_CACHE": str(cache)}
    runs = [
        subprocess.run(
            [
                sys.executable,
                "-m",
                "dmlkit.data",
                "glyphs-mini",
                "--split",
                "test",
                "--sheet",
                str(sheet),
            ],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        for _ in range(2)
    ]
    assert "glyphs-mini test: 100 classes" in runs[0].stdout
    assert "rendered (cold)" in runs[0].stdout and "loaded from cache" in runs[1].stdout
    assert "families: DejaVu Sans" in runs[0].stdout and str(sheet) in runs[0].stdout
    assert sheet.stat().st_size > 10_000


def test_cli_default_sheet_path(cub, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        cli_main(["cub200", "--root", str(cub), "--split", "test", "--classes", "3"])
    assert (tmp_path / "figures" / "cub200_contact_sheet.png").is_file()
    assert "contact sheet (test): figures/cub200_contact_sheet.png" in capsys.readouterr().out


def test_every_image_mode_decodes_to_rgb_and_16_bit_grey_is_scaled_not_clipped(tmp_path):
    from dmlkit.data.images import decode_image

    files = write_image_modes(tmp_path)
    for name, (path, expected) in files.items():
        image = decode_image("folder", str(path))
        assert image.mode == "RGB" and image.size == (24, 24), name
        np.testing.assert_array_equal(np.asarray(image), expected, err_msg=name)
    assert (np.asarray(decode_image("folder", str(files["grey16.png"][0]))) == 128).all()
    ramp = np.asarray(decode_image("folder", str(files["ramp16.png"][0])))[..., 0]
    assert ramp.min() == 0 and ramp.max() >= 250 and len(np.unique(ramp)) > 200


def test_data_cli_with_an_undecodable_image_is_one_message_and_draws_nothing(tmp_path, capsys):
    root = make_folder(tmp_path / "tree", ["ant", "bee", "cat", "dog"], images_per_class=2)
    (root / "ant" / "0.jpg").write_bytes(b"not an image")
    sheet = tmp_path / "sheet.png"
    assert cli_main(["folder", "--root", str(root), "--sheet", str(sheet)]) == 2
    err = capsys.readouterr().err
    assert f"{root / 'ant' / '0.jpg'}: cannot decode image" in err and "Traceback" not in err
    assert not sheet.exists()

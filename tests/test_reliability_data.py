"""Reliability, datasets and images: undecodable images, malformed metadata, ``python -m
dmlkit.data``, the sampler.

Every case is listed in docs/reliability.md; the tiny real-JPEG runs and helpers are in
``tests/reliability_fixtures.py``.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import pickle
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from torch.utils.data import DataLoader

from dmlkit.data import DatasetError, get_dataset
from dmlkit.train import fit, load_checkpoint
from tests.fixtures_datasets import make_cars, make_cub, make_folder, make_sop
from tests.reliability_fixtures import (
    break_jpeg,
    tiny,
)

# ---------------------------------------------------------------- undecodable images


def test_dataset_error_keeps_its_type_through_dataloader_workers_and_pickle(tmp_path, tree):
    root = shutil.copytree(tree, tmp_path / "tree")
    ds = get_dataset("folder", "train", root=root, transform="test")
    break_jpeg(ds.paths[4])
    batches = iter(DataLoader(ds, batch_size=15, num_workers=1))
    # Before the fix DataLoader re-raised it as a bare RuntimeError (the constructor
    # needed two arguments), which `except DatasetError` does not catch.
    with pytest.raises(DatasetError, match="cannot decode image") as info:
        next(batches)
    batches._shutdown_workers()  # now, not in a later test's garbage collection
    assert ds.paths[4] in str(info.value) and "worker process" in str(info.value)
    clone = pickle.loads(pickle.dumps(DatasetError("folder", "broken", file=ds.paths[4])))
    assert isinstance(clone, DatasetError) and ds.paths[4] in str(clone)


@pytest.mark.parametrize("workers", [0, 2])
def test_undecodable_image_stops_training_naming_it_and_keeps_the_last_checkpoint(
    tmp_path, tree, workers
):
    root = shutil.copytree(tree, tmp_path / "tree")
    victim = root / "class01" / "1.jpg"  # a training image, seen by every step
    cfg = tiny(root, tmp_path / "run", num_workers=workers)

    def break_after_epoch_1(epoch, step):
        if (epoch, step) == (0, cfg.num_batches - 1):  # epoch 2's loader reads it again
            break_jpeg(victim)

    with pytest.raises(DatasetError, match="cannot decode image") as info:
        fit(cfg, on_step=break_after_epoch_1)
    assert str(victim) in str(info.value)
    # The workers are stopped with the error, not left to a later garbage collection
    # (whose DataLoader finaliser then stalled ~5 s per worker).
    assert multiprocessing.active_children() == []
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["epoch"] == 1
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint.pt"]


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_bad_images_finishes_and_metrics_json_counts_them(tmp_path, tree, workers):
    root = shutil.copytree(tree, tmp_path / "tree")
    bad = sorted([str(root / "class02" / "0.jpg"), str(root / "class07" / "2.jpg")])  # train, test
    for path in bad:
        break_jpeg(path)
    cfg = tiny(
        root, tmp_path / "run", num_workers=workers, dataset_options={"skip_bad_images": True}
    )
    result = fit(cfg)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # With workers, the main process's datasets never decode a training image: only the
    # shared log sees what the worker processes skipped.
    assert (saved["num_bad_images"], saved["bad_images"]) == (2, bad)
    assert result.bad_images == bad
    # The broken test image is left out of the evaluation: a substitute, a copy of another
    # test image of its class, would be a guaranteed hit.
    assert saved["metrics"]["num_queries"] == 14
    with np.load(tmp_path / "run" / "embeddings.npz") as arrays:
        assert len(arrays["embeddings"]) == len(arrays["labels"]) == 14


def test_skipped_images_count_once_across_a_resume_and_not_from_an_old_run(tmp_path, tree):
    root = shutil.copytree(tree, tmp_path / "tree")
    break_jpeg(root / "class03" / "2.jpg")
    cfg = tiny(root, tmp_path / "run", dataset_options={"skip_bad_images": True})
    log = tmp_path / "run" / "bad_images.jsonl"
    log.parent.mkdir()
    log.write_text(json.dumps(str(root / "class00" / "0.jpg")) + "\n{torn")  # an old run's

    def crash(epoch, step):
        if (epoch, step) == (1, 1):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(cfg, on_step=crash)
    victim = json.dumps(str(root / "class03" / "2.jpg"))
    assert log.read_text().splitlines() == [victim]  # the fresh start dropped the old log
    resumed = fit(dataclasses.replace(cfg, resume=True))
    assert log.read_text().splitlines() == [victim, victim]  # each session logs it
    assert resumed.bad_images == [str(root / "class03" / "2.jpg")]
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["num_bad_images"] == 1


def test_skip_bad_images_without_out_dir_still_counts_across_workers(tmp_path, tree):
    root = shutil.copytree(tree, tmp_path / "tree")
    break_jpeg(root / "class04" / "1.jpg")
    cfg = tiny(root, num_workers=2, epochs=1, dataset_options={"skip_bad_images": True})
    assert fit(cfg).bad_images == [str(root / "class04" / "1.jpg")]


# ---------------------------------------------------------------- untrusted metadata


def _edit(path: Path, edit) -> None:
    lines = path.read_bytes().rstrip(b"\n").split(b"\n")
    path.write_bytes(b"\n".join(edit(lines)) + b"\n")


def _cars_b_fname(root: Path, value: str) -> None:
    import scipy.io

    path = root / "devkit" / "cars_train_annos.mat"
    annotations = scipy.io.loadmat(path)["annotations"]
    annotations[0, 0]["fname"] = np.array([value])
    scipy.io.savemat(path, {"annotations": annotations})


def _cars_a_mat(root: Path, change: str) -> None:
    import scipy.io

    mat = scipy.io.loadmat(root / "cars_annos.mat")
    variables = {k: v for k, v in mat.items() if not k.startswith("__")}
    if change == "no annotations":
        del variables["annotations"]
    else:
        variables["annotations"][0, 0]["class"] = np.array([[197]], dtype=np.uint8)
    scipy.io.savemat(root / "cars_annos.mat", variables)


def _load(name: str, split: str, root: Path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the small-fixture count warning
        return get_dataset(name, split, root=root)


def _one_dataset_error(name: str, split: str, root: Path, message: str) -> None:
    with pytest.raises(DatasetError, match=message) as info:
        _load(name, split, root)
    assert "expected layout" in str(info.value) and "published at" in str(info.value)


# Cases beyond tests/test_data.py (CUB truncated/garbled/duplicate/missing ids, '..' and
# absolute paths; SOP header, duplicates, '..'; Cars missing fields, bad paths, duplicates;
# non-UTF-8 metadata and file names) and tests/test_data_fuzz.py (random corruption).
OUTSIDE = "not inside the dataset root"


@pytest.mark.parametrize(
    ("split", "edit", "message"),
    [
        ("train", lambda ls: [*ls, b"99 1 1 /etc/passwd"], OUTSIDE),
        ("train", lambda ls: [*ls, b"99 1 1 ..\\..\\etc\\passwd"], OUTSIDE),
        ("train", lambda ls: [*ls, b"99 1 1 C:/Windows/win.ini"], OUTSIDE),
        ("train", lambda ls: [*ls, b"99 1 1 mug_final/\x01.JPG"], OUTSIDE),
        ("train", lambda ls: [*ls, b"-5 1 1 mug_final/x.JPG"], "image_id must be a non-negative"),
        ("train", lambda ls: ls[:1], "the train split has no images"),
        ("test", lambda ls: [*ls[:3], ls[3][:7], *ls[4:]], "test.txt, line 4: expected 4 fields"),
        ("test", lambda ls: [*ls[:2], b"\xff\xfe\x00", *ls[2:]], "test.txt, line 3: not UTF-8"),
    ],
    ids=["absolute", "backslash-dotdot", "drive", "control", "negative", "empty", "cut", "bytes"],
)
def test_malformed_sop_metadata_is_one_dataset_error(tmp_path, split, edit, message):
    root = make_sop(tmp_path / "Stanford_Online_Products")
    _edit(root / f"Ebay_{split}.txt", edit)
    _one_dataset_error("sop", split, root, message)


@pytest.mark.parametrize(
    ("file", "edit", "message"),
    [
        ("images.txt", lambda ls: [], "images.txt: metadata file is empty"),
        ("image_class_labels.txt", lambda ls: [*ls, ls[0]], "duplicate id 1"),
        ("classes.txt", lambda ls: [*ls, ls[1]], "classes.txt, line 5: duplicate id 2"),
        ("images.txt", lambda ls: [*ls[:-1], ls[-1].split()[0]], "expected '<image_id> <path>'"),
        ("images.txt", lambda ls: [*ls[:-1], b"9 " + ls[-1].split()[1]], "has no entry in"),
    ],
    ids=["empty", "duplicate-label", "duplicate-class", "no-path", "id-mismatch"],
)
def test_malformed_cub_metadata_is_one_dataset_error(tmp_path, file, edit, message):
    root = make_cub(tmp_path / "CUB_200_2011", classes=4)
    _edit(root / file, edit)
    _one_dataset_error("cub200", "train", root, message)


@pytest.mark.parametrize(
    ("layout", "split", "change", "message"),
    [
        ("B", "train", "../../etc/passwd", OUTSIDE),
        ("B", "test", "/etc/passwd", OUTSIDE),
        ("A", "train", "no annotations", "no variable 'annotations'"),
        ("A", "test", "class 197", "outside 1..196"),
    ],
)
def test_malformed_cars_mat_is_one_dataset_error(tmp_path, layout, split, change, message):
    root = make_cars(tmp_path / "cars196", layout)
    if layout == "B":
        _cars_b_fname(root, change)
    else:
        _cars_a_mat(root, change)
    _one_dataset_error("cars196", split, root, message)


def test_folder_dataset_with_too_few_classes_is_a_dataset_error(tmp_path):
    root = make_folder(tmp_path / "tree", ["only"])
    with pytest.raises(DatasetError, match="needs at least 2 class folders, found 1"):
        get_dataset("folder", "train", root=root)


# ---------------------------------------------------------------- python -m dmlkit.data


DATA_CLI_ERRORS = {
    "--classes 0": (["--classes", "0"], "argument --classes: must be >= 1, got 0"),
    "--samples -1": (["--samples", "-1"], "argument --samples: must be >= 1, got -1"),
    "--classes x": (["--classes", "x"], "argument --classes: expected a whole number >= 1"),
    "--classes above": (
        ["--classes", "100000"],  # drew a 6.4-million-pixel-high blank sheet
        r"classes=100000: must be between 1 and 5 \(the train split of folder has 5 classes\)",
    ),
    "--samples above": (["--samples", "4"], "samples=4: must be between 1 and 3 .* largest"),
    "--sheet a folder": (["--sheet", "{tmp}"], "is a folder; give a file name"),
    "--sheet under a file": (["--sheet", "{tmp}/taken/s.png"], "taken is a file, so no folder"),
    "--sheet not an image": (["--sheet", "{tmp}/s.txt"], "unknown image type '.txt'; use .png"),
}


@pytest.mark.parametrize(("args", "message"), DATA_CLI_ERRORS.values(), ids=list(DATA_CLI_ERRORS))
def test_data_cli_bad_arguments_are_one_usage_error(
    tmp_path, tree, capsys, monkeypatch, args, message
):
    from dmlkit.data.__main__ import main as data_main

    monkeypatch.chdir(tmp_path)  # the default sheet path is relative
    (tmp_path / "taken").write_text("a file")
    args = [arg.format(tmp=tmp_path) for arg in args]
    started = time.perf_counter()
    with pytest.raises(SystemExit) as stopped:
        data_main(["folder", "--root", str(tree), "--split", "train", *args])
    assert stopped.value.code == 2 and time.perf_counter() - started < 60
    assert re.search(message, capsys.readouterr().err)
    assert list(tmp_path.rglob("*.png")) == [] and (tmp_path / "taken").read_text() == "a file"


def test_data_cli_draws_at_most_what_the_dataset_has_and_names_a_missing_root(
    tmp_path, tree, capsys
):
    from PIL import Image

    from dmlkit.data.__main__ import main as data_main

    sheet = tmp_path / "sheets" / "s.png"
    args = ["folder", "--root", str(tree), "--split", "train", "--sheet", str(sheet)]
    assert data_main(args) == 0
    assert Image.open(sheet).size == (150 + 3 * 64, 5 * 64)  # defaults 8 × 10 → 5 × 3, no blanks
    assert data_main(["folder", "--root", str(tmp_path / "none"), "--sheet", str(sheet)]) == 2
    err = capsys.readouterr().err
    assert "dataset root does not exist" in err and "Traceback" not in err


# ---------------------------------------------------------------- further probes (issue 14)


SAMPLER_ERRORS = {
    "p float": ({"p": 2.5}, "p must be a whole number, got 2.5"),
    "k float (failed only in __iter__)": ({"k": 2.0}, "k must be a whole number, got 2.0"),
    "p True (passed as 1)": ({"p": True}, "p must be a whole number, got True"),
    "num_batches 0": ({"num_batches": 0}, "num_batches must be >= 1 or None, got 0"),
    "seed -1 (failed only in __iter__)": ({"seed": -1}, "seed must be >= 0, got -1"),
    "labels (5, 3) (were flattened)": ({"labels": np.zeros((5, 3), int)}, r"1-D .* \(5, 3\)"),
}


@pytest.mark.parametrize(("change", "message"), SAMPLER_ERRORS.values(), ids=list(SAMPLER_ERRORS))
def test_pk_sampler_refuses_what_it_cannot_honour_when_built(change, message):
    from dmlkit.samplers import PKBatchSampler

    arguments = {"labels": np.repeat(np.arange(5), 3), "p": 2, "k": 2, **change}
    with pytest.raises(ValueError, match=message):
        PKBatchSampler(**arguments)

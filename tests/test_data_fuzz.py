"""Property-based fuzzing of the three metadata parsers (CUB text, SOP text, Cars .mat).

Random corruption — truncated lines, garbage bytes (invalid UTF-8, separators, ``..``),
swapped fields, removed and duplicated lines/records, a truncated .mat — must give either
a correct dataset (every path a file inside the root, labels in the split's class range)
or a DatasetError; never any other exception.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmlkit.data import DatasetError, get_dataset
from tests.fixtures_datasets import make_cars, make_cub, make_sop

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ANY_LINE = st.integers(0, 10_000)
GARBAGE = st.sampled_from(
    [
        b"\xff\xfe",
        b"\x00",
        b" ",
        b"\t",
        b"/",
        b"..",
        b"../",
        b"-1",
        b"9" * 12,
        b"\xc3",
        b"\r",
        "é".encode(),
    ]
) | st.binary(min_size=1, max_size=6)
LINE_EDITS = st.lists(
    st.one_of(
        st.tuples(st.just("truncate"), ANY_LINE, st.integers(0, 60)),
        st.tuples(st.just("garbage"), ANY_LINE, st.integers(0, 60), GARBAGE),
        st.tuples(st.just("swap"), ANY_LINE, st.integers(0, 3), st.integers(0, 3)),
        st.tuples(st.just("remove"), ANY_LINE),
        st.tuples(st.just("duplicate"), ANY_LINE),
    ),
    min_size=1,
    max_size=4,
)


def edit_lines(raw: bytes, edits) -> bytes:
    lines = raw.rstrip(b"\n").split(b"\n")
    for op, index, *args in edits:
        if not lines:
            break
        i = index % len(lines)
        if op == "truncate":
            lines[i] = lines[i][: args[0]]
        elif op == "garbage":
            lines[i] = lines[i][: args[0]] + args[1] + lines[i][args[0] :]
        elif op == "swap":
            fields = lines[i].split(b" ")
            a, b = args[0] % len(fields), args[1] % len(fields)
            fields[a], fields[b] = fields[b], fields[a]
            lines[i] = b" ".join(fields)
        elif op == "remove":
            del lines[i]
        else:
            lines.insert(i, lines[i])
    return b"\n".join(lines) + b"\n"


def load_or_error(name, split, root):
    """The dataset, or None for a DatasetError; any other exception fails the test."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return get_dataset(name, split, root=root)
    except DatasetError as error:
        assert str(error)  # the message renders (no encoding error on odd bytes)
        return None


def assert_correct(ds, root: Path, first: int, last: int) -> None:
    assert len(ds.labels) == len(ds.paths) > 0
    assert ds.labels.dtype == np.int64
    assert ((ds.labels >= first) & (ds.labels <= last)).all()
    for path in ds.paths:
        assert os.path.isfile(path)
        assert os.path.normpath(path).startswith(str(root) + os.sep)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzz-bases")
    return {
        "cub": make_cub(base / "cub"),
        "sop": make_sop(base / "sop"),
        "cars": make_cars(base / "cars", "A"),
    }


def sandbox(base: Path, images: str) -> tuple[tempfile.TemporaryDirectory, Path]:
    """A fresh root whose image folder is a link to the base's (metadata is copied per case)."""
    holder = tempfile.TemporaryDirectory()
    root = Path(holder.name) / "root"
    root.mkdir()
    os.symlink(base / images, root / images)
    return holder, root


@FUZZ
@given(
    file=st.sampled_from(["images.txt", "image_class_labels.txt", "classes.txt"]),
    edits=LINE_EDITS,
    split=st.sampled_from(["train", "test"]),
)
def test_cub_parser_fuzz(bases, file, edits, split):
    holder, root = sandbox(bases["cub"], "images")
    with holder:
        for name in ("images.txt", "image_class_labels.txt", "classes.txt"):
            raw = (bases["cub"] / name).read_bytes()
            (root / name).write_bytes(edit_lines(raw, edits) if name == file else raw)
        ds = load_or_error("cub200", split, root)
        if ds is not None:
            assert_correct(ds, root, *((1, 100) if split == "train" else (101, 200)))


@FUZZ
@given(edits=LINE_EDITS)
def test_sop_parser_fuzz(bases, edits):
    holder, root = sandbox(bases["sop"], "chair_final")
    with holder:
        for folder in ("bicycle_final", "mug_final"):
            os.symlink(bases["sop"] / folder, root / folder)
        raw = (bases["sop"] / "Ebay_train.txt").read_bytes()
        (root / "Ebay_train.txt").write_bytes(edit_lines(raw, edits))
        ds = load_or_error("sop", "train", root)
        if ds is not None:
            assert_correct(ds, root, 0, 10**12)
            assert len(ds.super_labels) == len(ds)


MAT_VALUES = st.one_of(
    st.integers(-3, 400).map(np.int64),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["../../etc/passwd", "/etc/passwd", "car_ims/000001.jpg", "", "car_ims"]),
    st.just(np.zeros((0,))),
    st.just(np.arange(3)),
)
MAT_EDITS = st.lists(
    st.one_of(
        st.tuples(
            st.just("set"), ANY_LINE, st.sampled_from(["relative_im_path", "class"]), MAT_VALUES
        ),
        st.tuples(st.just("remove"), ANY_LINE),
        st.tuples(st.just("duplicate"), ANY_LINE),
        st.tuples(st.just("drop_field"), st.sampled_from(["relative_im_path", "class", "test"])),
        st.tuples(st.just("drop_names")),
        st.tuples(st.just("truncate_file"), st.integers(0, 5000)),
    ),
    min_size=1,
    max_size=3,
)


def edited_mat(path: Path, out: Path, edits) -> None:
    mat = scipy.io.loadmat(path)
    records = list(mat["annotations"][0])
    fields = list(mat["annotations"].dtype.names)
    names = mat["class_names"]
    truncate = None
    for op, *args in edits:
        if op == "set" and records:
            record = records[args[0] % len(records)].copy()
            record[args[1]] = args[2]
            records[args[0] % len(records)] = record
        elif op in ("remove", "duplicate") and records:
            i = args[0] % len(records)
            records[i : i + 1] = [] if op == "remove" else [records[i], records[i]]
        elif op == "drop_field" and args[0] in fields:
            fields.remove(args[0])
        elif op == "drop_names":
            names = None
        elif op == "truncate_file":
            truncate = args[0]
    table = np.empty((1, len(records)), dtype=[(f, object) for f in fields])
    for j, record in enumerate(records):
        table[0, j] = tuple(record[f] for f in fields)
    variables = {"annotations": table} | ({"class_names": names} if names is not None else {})
    scipy.io.savemat(out, variables)
    if truncate is not None:
        out.write_bytes(out.read_bytes()[:truncate])


@FUZZ
@given(edits=MAT_EDITS, split=st.sampled_from(["train", "test"]))
def test_cars_parser_fuzz(bases, edits, split):
    holder, root = sandbox(bases["cars"], "car_ims")
    with holder:
        edited_mat(bases["cars"] / "cars_annos.mat", root / "cars_annos.mat", edits)
        ds = load_or_error("cars196", split, root)
        if ds is not None:
            assert_correct(ds, root, *((1, 98) if split == "train" else (99, 196)))

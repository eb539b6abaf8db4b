"""Cars196 metadata from MATLAB files, in either published layout.

Layout A: ``cars_annos.mat`` (struct ``annotations``: relative_im_path, bbox_x1..y2, class,
test; ``class_names``) with ``car_ims/``. Layout B, the devkit:
``devkit/cars_train_annos.mat`` and ``cars_test_annos_withlabels.mat`` (at the root or in
``devkit/``; struct ``annotations``: bbox_*, class, fname), ``devkit/cars_meta.mat``
(``class_names``), images in ``cars_train/`` and ``cars_test/``. Both give all 16,185
images; the ``test`` flag is ignored — the DML split is by class id.
"""

from __future__ import annotations

import os

import numpy as np
import scipy.io

from dmlkit.data.errors import DatasetError
from dmlkit.data.images import Listing, safe_relative_path

_NAME = "cars196"
NUM_CLASSES = 196  # class ids 1..196; official.py splits them 1..98 / 99..196


def parse_cars(root: str) -> Listing:
    """Every annotated image of either layout (A preferred when both are present)."""
    if os.path.isfile(os.path.join(root, "cars_annos.mat")):
        return _layout_a(root)
    if os.path.isdir(os.path.join(root, "devkit")):
        return _layout_b(root)
    raise DatasetError(
        _NAME, "found neither cars_annos.mat (layout A) nor devkit/ (layout B)", file=root
    )


def _layout_a(root: str) -> Listing:
    path = os.path.join(root, "cars_annos.mat")
    mat = load_mat(path)
    records = struct_records(mat, path, "annotations", ("relative_im_path", "class"))
    listing = _records_to_listing(records, path, "relative_im_path", prefix="")
    listing.class_names = _class_names(mat, path, listing)
    return listing


def _layout_b(root: str) -> Listing:
    train_path = os.path.join(root, "devkit", "cars_train_annos.mat")
    test_path = os.path.join(root, "cars_test_annos_withlabels.mat")
    if not os.path.isfile(test_path):
        test_path = os.path.join(root, "devkit", "cars_test_annos_withlabels.mat")
    meta_path = os.path.join(root, "devkit", "cars_meta.mat")
    listing = Listing([], [], [])
    for path, prefix in ((train_path, "cars_train/"), (test_path, "cars_test/")):
        records = struct_records(load_mat(path), path, "annotations", ("fname", "class"))
        part = _records_to_listing(records, path, "fname", prefix=prefix)
        listing.relpaths += part.relpaths
        listing.labels += part.labels
        listing.sources += part.sources
    _no_duplicates(listing)
    listing.class_names = _class_names(load_mat(meta_path), meta_path, listing)
    return listing


def load_mat(path: str) -> dict:
    """``scipy.io.loadmat`` with DatasetError for a missing or unreadable file."""
    if not os.path.isfile(path):
        raise DatasetError(_NAME, "metadata file is missing", file=path)
    try:
        return scipy.io.loadmat(path, squeeze_me=True)
    except Exception as error:  # scipy raises ValueError, TypeError, OSError, ...
        raise DatasetError(
            _NAME, f"cannot read the .mat file ({type(error).__name__}: {error})", file=path
        ) from error


def struct_records(mat: dict, path: str, key: str, fields: tuple[str, ...]) -> np.ndarray:
    """The 1-D struct array ``mat[key]``, checked to have ``fields``."""
    if key not in mat:
        raise DatasetError(_NAME, f"no variable {key!r} in the .mat file", file=path)
    records = np.atleast_1d(mat[key])
    names = records.dtype.names or ()
    missing = [f for f in fields if f not in names]
    if missing:
        raise DatasetError(
            _NAME, f"{key!r} is not a struct array with field(s) {', '.join(missing)}", file=path
        )
    return records


def _records_to_listing(records: np.ndarray, path: str, path_field: str, prefix: str) -> Listing:
    listing = Listing([], [], [])
    name = os.path.basename(path)
    for index, record in enumerate(records):
        where = f"{name} annotation {index + 1}"
        relpath = _scalar_str(record[path_field], path_field, path, where)
        label = _scalar_int(record["class"], "class", path, where)
        listing.relpaths.append(prefix + safe_relative_path(_NAME, relpath, path, None))
        listing.labels.append(label)
        listing.sources.append(where)
    _no_duplicates(listing)
    return listing


def _class_names(mat: dict, path: str, listing: Listing) -> dict[int, str]:
    """``class_names`` as {class id: name}, checked to name every class id in ``listing``."""
    if "class_names" not in mat:
        raise DatasetError(_NAME, "no variable 'class_names' in the .mat file", file=path)
    names = np.atleast_1d(mat["class_names"])
    if names.dtype.kind not in "UO":
        raise DatasetError(_NAME, "'class_names' is not an array of strings", file=path)
    by_id = {
        i + 1: _scalar_str(n, "class_names", path, f"entry {i + 1}") for i, n in enumerate(names)
    }
    # Checked here, not when the dataset looks names up: a short list would otherwise
    # surface as a bare KeyError far from the file that is wrong. Ids outside 1..196 are
    # left to the caller's range check, whose message says what is wrong with them.
    for label, source in zip(listing.labels, listing.sources, strict=True):
        if 1 <= label <= NUM_CLASSES and label not in by_id:
            raise DatasetError(
                _NAME,
                f"class id {label} in {source} has no name: 'class_names' has "
                f"{len(by_id)} entries, one per class id from 1",
                file=path,
            )
    return by_id


def _scalar_str(value, field: str, path: str, where: str) -> str:
    value = np.asarray(value)
    if value.dtype.kind != "U" or value.size != 1:
        raise DatasetError(
            _NAME, f"{where}: {field!r} must be a string, got {value!r:.80}", file=path
        )
    return str(value.reshape(()))


def _scalar_int(value, field: str, path: str, where: str) -> int:
    value = np.asarray(value)
    if value.size != 1 or value.dtype.kind not in "iuf":
        raise DatasetError(
            _NAME, f"{where}: {field!r} must be a number, got {value!r:.80}", file=path
        )
    number = value.reshape(()).item()
    if not float(number).is_integer():
        raise DatasetError(_NAME, f"{where}: {field!r} must be an integer, got {number}", file=path)
    return int(number)


def _no_duplicates(listing: Listing) -> None:
    first: dict[str, str] = {}
    for relpath, source in zip(listing.relpaths, listing.sources, strict=True):
        if relpath in first:
            raise DatasetError(
                _NAME, f"image {relpath!r} is listed twice: {first[relpath]} and {source}"
            )
        first[relpath] = source

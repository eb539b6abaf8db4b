"""What a dataset split holds, as a short digest: checkpoints record it, so that a run is
never resumed on other data (another ``data_root``, other classes, another rendering)."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np

from dmlkit.data.subset import ClassSubset


def describe(dataset: Any) -> dict[str, Any]:
    """``{"fingerprint": 16 hex digits, "images": N, "classes": C}`` of a dataset split.

    The fingerprint covers the dataset's name and split, its labels in order, its image
    paths relative to its root (so a moved dataset keeps its fingerprint), the cache key
    of rendered data (glyphs: every option and library version that shapes the pixels),
    and the rows of a class subset. File contents are not read: an image replaced under
    the same name keeps the fingerprint.
    """
    digest = hashlib.sha256()
    _feed(digest, dataset)
    labels = np.asarray(dataset.labels)
    return {
        "fingerprint": digest.hexdigest()[:16],
        "images": len(labels),
        "classes": len(np.unique(labels)),
    }


def _feed(digest: Any, dataset: Any) -> None:
    if isinstance(dataset, ClassSubset):
        _feed(digest, dataset.dataset)
        digest.update(np.asarray(dataset.indices, dtype="<i8").tobytes())
        return
    header = [getattr(dataset, "name", None), getattr(dataset, "split", None)]
    digest.update(json.dumps(header).encode())
    digest.update(np.asarray(dataset.labels, dtype="<i8").tobytes())
    key = getattr(dataset, "cache_key", None)
    if key is not None:
        digest.update(json.dumps(key, sort_keys=True, default=str).encode())
    root, paths = getattr(dataset, "root", None), getattr(dataset, "paths", None)
    for path in paths or ():
        relative = os.path.relpath(path, root) if root else path
        digest.update(relative.replace(os.sep, "/").encode("utf-8", "surrogateescape") + b"\0")

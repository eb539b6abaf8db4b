"""Class subsets of a dataset, and the validation split of the training classes.

Model selection (a loss variant, a weight λ) must never look at the test classes. The
validation split holds out a seeded fraction of the *training* classes: the variant is
trained on the rest and chosen by its retrieval on the held-out classes, which are
class-disjoint from both the classes it trained on and the test classes — the same
zero-shot setting as the test split. The split depends only on the class list and
``seed``, not on the run's seed, so every variant and every run seed sees the same
validation classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from dmlkit.samplers import SampleKey

__all__ = ["ClassSubset", "validation_classes"]


class ClassSubset(torch.utils.data.Dataset):
    """The items of ``dataset`` whose class is in ``keep``, in their original order.

    Keeps the dataset contract (``labels``, ``classes``, ``paths``, ``class_names``,
    ``image(i)``, ``SampleKey`` items) and subsets every per-item array attribute of the
    parent (glyphs' ``family``, ``style``, ``font``, ``font_index``; SOP's
    ``super_class_id``), so the evaluation sees the same metadata as on a full split.

    Attributes:
        dataset: the parent.  indices: (n,) int64 rows of the parent, ascending.
    """

    @property
    def accepts_sample_keys(self) -> bool:
        return getattr(self.dataset, "accepts_sample_keys", False)

    def __init__(self, dataset: Any, keep: Sequence[int] | np.ndarray) -> None:
        keep = np.unique(np.asarray(keep, dtype=np.int64))
        labels = np.asarray(dataset.labels)
        unknown = np.setdiff1d(keep, labels)
        if len(unknown):
            raise ValueError(f"classes {unknown[:5].tolist()} are not in {dataset!r}")
        self.dataset = dataset
        self.indices = np.flatnonzero(np.isin(labels, keep))
        self.labels = labels[self.indices]
        self.classes = keep
        names = getattr(dataset, "class_names", None)
        if names is not None:
            position = {int(c): i for i, c in enumerate(np.asarray(dataset.classes))}
            names = [names[position[int(c)]] for c in keep]
        self.class_names = names
        paths = getattr(dataset, "paths", None)
        self.paths = None if paths is None else [paths[i] for i in self.indices]
        for name, value in vars(dataset).items():
            per_item = isinstance(value, np.ndarray) and value.shape[:1] == labels.shape
            if per_item and not name.startswith("_") and not hasattr(self, name):
                setattr(self, name, value[self.indices])

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | SampleKey) -> Any:
        if isinstance(key, SampleKey):
            return self.dataset[key._replace(index=int(self.indices[key.index]))]
        return self.dataset[int(self.indices[key])]

    def image(self, index: int) -> Any:
        """Item ``index`` as a PIL RGB image (the parent's ``image``)."""
        return self.dataset.image(int(self.indices[index]))

    def __repr__(self) -> str:
        return f"ClassSubset({self.dataset!r}, images={len(self)}, classes={len(self.classes)})"


def validation_classes(
    classes: Sequence[int] | np.ndarray, fraction: float, seed: int
) -> np.ndarray:
    """The held-out classes: ``round(fraction · C)`` of ``classes`` (at least 2, leaving at
    least 2), drawn by ``numpy.random.default_rng(seed)`` from the sorted class list.

    Raises ValueError when ``fraction`` is not in (0, 1) or there are fewer than 4 classes.
    """
    classes = np.unique(np.asarray(classes, dtype=np.int64))
    if not 0 < fraction < 1:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    if len(classes) < 4:
        raise ValueError(
            f"a validation split needs at least 4 training classes (2 + 2), got {len(classes)}"
        )
    count = min(max(round(fraction * len(classes)), 2), len(classes) - 2)
    chosen = np.random.default_rng(seed).permutation(len(classes))[:count]
    return np.sort(classes[chosen])

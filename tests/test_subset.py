"""Class subsets and the validation split of the training classes."""

from __future__ import annotations

import numpy as np
import pytest

from dmlkit.data import get_dataset
from dmlkit.data.subset import ClassSubset, validation_classes
from dmlkit.train import TrainConfig
from dmlkit.train.build import build_datasets


def test_validation_classes_are_seeded_disjoint_and_sized():
    classes = np.arange(100, 200)
    held = validation_classes(classes, 0.2, seed=0)
    assert len(held) == 20 and np.all(np.isin(held, classes)) and np.all(np.diff(held) > 0)
    assert np.array_equal(held, validation_classes(classes[::-1], 0.2, seed=0))
    assert not np.array_equal(held, validation_classes(classes, 0.2, seed=1))
    assert len(validation_classes(np.arange(4), 0.01, seed=0)) == 2  # at least 2 ...
    assert len(validation_classes(np.arange(4), 0.99, seed=0)) == 2  # ... leaving 2


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_validation_fraction_outside_the_open_interval_is_refused(fraction):
    with pytest.raises(ValueError, match="must be in \\(0, 1\\)"):
        validation_classes(np.arange(10), fraction, seed=0)


def test_validation_split_needs_four_classes():
    with pytest.raises(ValueError, match="at least 4 training classes"):
        validation_classes(np.arange(3), 0.5, seed=0)


def test_class_subset_keeps_items_metadata_and_images():
    parent = get_dataset("glyphs-mini", "train", transform="test")
    keep = parent.classes[[3, 10, 42]]
    subset = ClassSubset(parent, keep)
    rows = np.flatnonzero(np.isin(parent.labels, keep))
    assert len(subset) == len(rows) and np.array_equal(subset.labels, parent.labels[rows])
    assert np.array_equal(subset.classes, np.sort(keep))
    assert np.array_equal(subset.family, parent.family[rows])
    assert np.array_equal(subset.style, parent.style[rows])
    assert subset.class_names == [chr(c) for c in np.sort(keep)]
    image, label = subset[1]
    expected_image, expected_label = parent[int(rows[1])]
    assert label == expected_label and (image == expected_image).all()
    assert subset.image(0).size == parent.image(int(rows[0])).size
    with pytest.raises(ValueError, match="not in"):
        ClassSubset(parent, [-5])


def test_eval_split_validation_trains_and_evaluates_on_disjoint_training_classes():
    cfg = TrainConfig(dataset="glyphs-mini", eval_split="validation", validation_fraction=0.25)
    train_set, val_set = build_datasets(cfg)
    full_train = get_dataset("glyphs-mini", "train")
    test_classes = get_dataset("glyphs-mini", "test").classes
    assert len(val_set.classes) == 25 and len(train_set.classes) == 75
    assert not set(train_set.classes) & set(val_set.classes)
    assert set(train_set.classes) | set(val_set.classes) == set(full_train.classes)
    assert not set(val_set.classes) & set(test_classes)
    assert len(train_set) + len(val_set) == len(full_train)
    # the training part keeps the training transform (augmentation), the other the test one
    assert train_set.dataset._tensor_transform.train and not val_set.dataset._tensor_transform.train


def test_eval_split_is_validated():
    with pytest.raises(ValueError, match="eval_split: unknown value 'val'"):
        TrainConfig(eval_split="val")
    with pytest.raises(ValueError, match="validation_fraction: must be in"):
        TrainConfig(validation_fraction=1.5)


def test_daal_trains_with_a_validation_split_and_initialises_on_its_training_classes():
    from dmlkit.train import fit

    cfg = TrainConfig(
        dataset="glyphs-mini", loss="daal", eval_split="validation", epochs=1, num_batches=2,
        embedding_dim=8, progress=False,
    )  # fmt: skip
    result = fit(cfg)
    train_set, val_set = build_datasets(cfg)
    assert set(result.loss.classes.tolist()) == set(train_set.classes)
    assert not set(result.loss.classes.tolist()) & set(val_set.classes)
    assert 0 <= result.metrics["recall@1"] <= 1

import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from dmlkit.samplers import PKBatchSampler


def _labels(sizes):
    return np.repeat(np.arange(len(sizes)), sizes)


def _plan(sampler, epoch=0):
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize(("p", "k"), [(4, 2), (8, 4), (3, 5), (10, 2)])
def test_every_batch_is_p_distinct_classes_times_k(p, k):
    labels = _labels([5, 7, 9, 12, 6, 6, 8, 10, 5, 11, 13, 6])
    sampler = PKBatchSampler(labels, p, k, seed=3, num_batches=15)
    batches = _plan(sampler)
    assert len(batches) == 15
    for batch in batches:
        assert len(batch) == p * k
        per_class = Counter(labels[batch].tolist())
        assert len(per_class) == p
        assert set(per_class.values()) == {k}


def test_npair_batches_are_p_classes_times_two():
    labels = _labels([2, 3, 4, 2, 5, 2, 3, 2])
    for batch in _plan(PKBatchSampler(labels, p=8, k=2, num_batches=6)):
        assert sorted(Counter(labels[batch].tolist()).values()) == [2] * 8


@pytest.mark.parametrize(("num_batches", "world_size"), [(None, 1), (7, 1), (7, 2), (9, 3)])
def test_len_equals_number_of_batches_yielded(num_batches, world_size):
    labels = _labels([8] * 20)
    for rank in range(world_size):
        sampler = PKBatchSampler(
            labels, 4, 2, num_batches=num_batches, rank=rank, world_size=world_size
        )
        assert len(sampler) == len(list(sampler))
    assert len(PKBatchSampler(labels, 4, 2)) == len(labels) // 8


def test_same_seed_and_epoch_give_same_batches_and_epochs_differ():
    labels = _labels([6, 9, 4, 12, 8, 5, 7, 10])
    a = PKBatchSampler(labels, 4, 3, seed=11)
    b = PKBatchSampler(labels, 4, 3, seed=11)
    assert _plan(a, 2) == _plan(b, 2)
    assert _plan(a, 2) == _plan(a, 2)  # iterating again does not advance anything
    assert _plan(a, 3) != _plan(a, 2)
    assert _plan(PKBatchSampler(labels, 4, 3, seed=12), 2) != _plan(a, 2)


def test_an_epoch_covers_at_least_95_percent_of_items():
    rng = np.random.default_rng(0)
    labels = _labels(4 * rng.integers(1, 6, size=300))  # every class has ≥ k items
    sampler = PKBatchSampler(labels, 16, 4, seed=5)
    for epoch in range(3):
        seen = np.unique(np.concatenate(_plan(sampler, epoch)))
        assert len(seen) / len(labels) >= 0.95


def test_rank_shards_are_disjoint_equal_length_and_cover_the_plan():
    labels = _labels([8] * 30)  # sizes multiple of k: no sample is placed twice
    world_size = 3
    full = _plan(PKBatchSampler(labels, 5, 4, seed=1, num_batches=12))
    shards = [
        _plan(PKBatchSampler(labels, 5, 4, seed=1, num_batches=12, rank=r, world_size=3))
        for r in range(world_size)
    ]
    assert {len(s) for s in shards} == {4}
    items = [set(np.concatenate(s).tolist()) for s in shards]
    assert all(items[i].isdisjoint(items[j]) for i in range(3) for j in range(i + 1, 3))
    assert sorted(map(tuple, sum(shards, []))) == sorted(map(tuple, full))


def test_uneven_plan_gives_every_rank_the_same_count():
    labels = _labels([6] * 20)
    counts = [
        len(list(PKBatchSampler(labels, 4, 3, num_batches=10, rank=r, world_size=4)))
        for r in range(4)
    ]
    assert counts == [2, 2, 2, 2]


def test_small_classes_are_drawn_with_replacement_and_warned_once():
    labels = _labels([1, 2, 6, 6, 6])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sampler = PKBatchSampler(labels, 5, 3, num_batches=4)
        batches = _plan(sampler)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "2 of 5 classes" in messages[0]
    for batch in batches:
        members = [i for i in batch if labels[i] == 0]
        assert members == [0, 0, 0]  # the singleton class fills its k slots with itself
        assert set(i for i in batch if labels[i] == 1) == {1, 2}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"p": 7, "k": 2}, "p=7.*only 5 classes"),
        ({"p": 0, "k": 2}, "p=0"),
        ({"p": 2, "k": 0}, "k=0"),
        ({"p": 2, "k": 2, "rank": 2, "world_size": 2}, "rank=2, world_size=2"),
        ({"p": 2, "k": 2, "world_size": 0}, "world_size=0"),
        ({"p": 2, "k": 2, "num_batches": 1, "world_size": 2}, "num_batches=1"),
    ],
)
def test_impossible_requests_raise_with_the_numbers(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PKBatchSampler(_labels([4] * 5), **kwargs)


def test_float_labels_are_rejected():
    with pytest.raises(ValueError, match="integers"):
        PKBatchSampler([0.5, 1.5, 2.5], 1, 1)


def test_state_dict_restores_the_epoch():
    labels = _labels([6] * 12)
    a = PKBatchSampler(labels, 3, 2, seed=4)
    a.set_epoch(7)
    b = PKBatchSampler(labels, 3, 2, seed=0)
    b.load_state_dict(a.state_dict())
    assert b.epoch == 7 and list(b) == list(a)


def test_works_as_dataloader_batch_sampler():
    labels = _labels([4] * 10)
    dataset = TensorDataset(torch.arange(len(labels)), torch.as_tensor(labels))
    loader = DataLoader(dataset, batch_sampler=PKBatchSampler(labels, 5, 2, num_batches=3))
    batches = list(loader)
    assert len(batches) == 3
    for index, label in batches:
        assert index.shape == (10,)
        torch.testing.assert_close(label, torch.as_tensor(labels)[index])

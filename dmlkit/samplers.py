"""Batch samplers: P classes × K samples per batch, seeded per epoch, shardable for DDP.

Use with ``DataLoader(dataset, batch_sampler=PKBatchSampler(labels, p=32, k=4))``.
N-pair batches (Sohn 2016) are ``PKBatchSampler(labels, p=N, k=2)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np


class SampleKey(NamedTuple):
    """A dataset index and the random stream of its draw: sample ``position`` of the
    epoch's plan (counted over every rank) of the run seeded ``seed``.

    A dataset given a SampleKey draws its augmentation from ``rng()``, so the images of
    an epoch depend on (seed, epoch, position) alone: not on which DataLoader worker
    fetches them, how long that worker has lived, or whether the run was resumed.
    """

    index: int
    seed: int
    epoch: int
    position: int

    def rng(self) -> np.random.Generator:
        # The trailing 1 keeps these streams apart from the plan's default_rng([seed, epoch]).
        return np.random.default_rng([self.seed, self.epoch, self.position, 1])


def sample_key(key: int | SampleKey) -> tuple[int, np.random.Generator | None]:
    """(index, the sample's generator or None) of what a dataset's ``__getitem__`` got."""
    if isinstance(key, SampleKey):
        return key.index, key.rng()
    return int(key), None


class PKBatchSampler:
    """Batches of ``p`` distinct classes × ``k`` samples each (P×K sampling).

    The epoch plan is drawn from a ``numpy.random.Generator`` seeded with ``(seed, epoch)``
    only, so the same (seed, epoch) always gives the same batches, on every rank.

    Plan of one epoch: every class's indices are shuffled and cut into groups of ``k``
    (the last group topped up with other samples of the class, so every sample has a
    place); a class with fewer than ``k`` samples gives one group of all its samples
    topped up *with replacement*. Each batch then takes one group from each of ``p``
    distinct classes, drawn without replacement with probability proportional to the
    class's samples not yet placed this epoch, so classes drain evenly, topped-up groups
    come last, and an epoch of the default length sees nearly every sample once (all of
    them but a remainder < p·k when class sizes are multiples of k). Exhausted classes are
    reshuffled only when fewer than ``p`` classes have samples left.

    Args:
        labels: (N,) integer class of every dataset index.
        p: classes per batch. k: samples per class in a batch.
        seed: seed of the plan (combined with the epoch).
        num_batches: batches in the epoch plan (all ranks together); default
            ``N // (p·k)`` (at least 1), i.e. about one pass over the data.
        rank, world_size: DDP sharding; rank r yields plan batches r, r + world_size, ...
            and every rank yields ``num_batches // world_size`` batches.
        keys: yield ``SampleKey``s instead of plain indices (``fit`` does).
    Raises:
        ValueError: labels not 1-D integers; p, k, seed, num_batches, rank or world_size
            not a whole number; p or k < 1, seed < 0, num_batches < 1, p > number of
            classes, invalid rank/world_size, or a plan too short to give every rank a batch.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray | Any,
        p: int,
        k: int,
        *,
        seed: int = 0,
        num_batches: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        keys: bool = False,
    ) -> None:
        labels = np.asarray(labels)
        if labels.ndim != 1:
            raise ValueError(
                f"labels must be 1-D (one per dataset index), got shape {labels.shape}"
            )
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
        _check_whole(p=p, k=k, seed=seed, rank=rank, world_size=world_size)
        if num_batches is not None:
            _check_whole(num_batches=num_batches)
            if num_batches < 1:
                raise ValueError(f"num_batches must be >= 1 or None, got {num_batches}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if p < 1 or k < 1:
            raise ValueError(f"p and k must be >= 1, got p={p}, k={k}")
        classes, inverse = np.unique(labels, return_inverse=True)
        if p > len(classes):
            raise ValueError(
                f"p={p} classes per batch but the labels hold only {len(classes)} classes"
            )
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need world_size >= 1 and 0 <= rank < world_size, got "
                f"rank={rank}, world_size={world_size}"
            )
        if num_batches is None:
            num_batches = max(1, len(labels) // (p * k))
        if num_batches < world_size:
            raise ValueError(
                f"num_batches={num_batches} is smaller than world_size={world_size}: "
                "some rank would get no batch"
            )
        self.p, self.k, self.seed = p, k, seed
        self.num_batches, self.rank, self.world_size = num_batches, rank, world_size
        self.epoch, self.keys = 0, keys
        order = np.argsort(inverse, kind="stable")
        starts = np.searchsorted(inverse[order], np.arange(len(classes) + 1))
        # members[c]: dataset indices of class c, in index order (the plan shuffles them).
        self._members = [order[starts[c] : starts[c + 1]] for c in range(len(classes))]
        small = sum(len(m) < k for m in self._members)
        if small:
            warnings.warn(
                f"{small} of {len(classes)} classes have fewer than k={k} samples; "
                "their batch slots are drawn with replacement",
                stacklevel=2,
            )

    def __len__(self) -> int:
        return self.num_batches // self.world_size

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose plan ``__iter__`` yields (call before every epoch)."""
        self.epoch = int(epoch)

    def state_dict(self) -> dict[str, int]:
        """What a checkpoint needs to resume the same sequence of plans."""
        return {"epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.seed = int(state["seed"])

    def __iter__(self) -> Iterator[list[int]] | Iterator[list[SampleKey]]:
        plan = self._epoch_plan()
        for number in range(self.rank, len(self) * self.world_size, self.world_size):
            batch = plan[number]
            if self.keys:
                first = number * self.p * self.k
                batch = [
                    SampleKey(index, self.seed, self.epoch, first + offset)
                    for offset, index in enumerate(batch)
                ]
            yield batch

    def _epoch_plan(self) -> list[list[int]]:
        """All ``num_batches`` batches of the current epoch (identical on every rank)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        groups = [self._class_groups(m, rng) for m in self._members]  # per class: (G_c, k)
        used = np.zeros(len(groups), dtype=np.int64)
        # Samples of each class not yet placed in this epoch; drawing classes in proportion
        # to it spends topped-up (partly repeated) groups last, which maximises coverage.
        fresh = np.array([len(m) for m in self._members], dtype=np.float64)
        plan = []
        for _ in range(self.num_batches):
            if np.count_nonzero(fresh) < self.p:
                self._refill(groups, used, fresh, rng)
            chosen = _weighted_sample_without_replacement(fresh, self.p, rng)
            plan.append(np.concatenate([groups[c][used[c]] for c in chosen]).tolist())
            used[chosen] += 1
            fresh[chosen] = np.maximum(fresh[chosen] - self.k, 0)
        return plan

    def _class_groups(self, members: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One class's samples shuffled into groups of k, shape (ceil(n/k), k)."""
        k = self.k
        if len(members) < k:
            extra = rng.choice(members, size=k - len(members), replace=True)
            return rng.permutation(np.concatenate([members, extra]))[None, :]
        shuffled = rng.permutation(members)
        full, rest = divmod(len(shuffled), k)
        groups = shuffled[: full * k].reshape(full, k)
        if rest:
            # Top the leftover up with distinct other samples of the class.
            fill = rng.choice(shuffled[: full * k], size=k - rest, replace=False)
            groups = np.concatenate([groups, np.concatenate([shuffled[full * k :], fill])[None]])
        return groups

    def _refill(self, groups, used, fresh, rng) -> None:
        """Reshuffle every exhausted class (its samples are then seen a second time)."""
        for c in np.flatnonzero(fresh == 0):
            groups[c] = self._class_groups(self._members[c], rng)
            used[c] = 0
            fresh[c] = len(self._members[c])


def _check_whole(**values: Any) -> None:
    """ValueError naming each value that is not a whole number (bool is not one either)."""
    for name, value in values.items():
        # A float k would fail only later, inside __iter__; True would pass for 1.
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be a whole number, got {value!r}")


def _weighted_sample_without_replacement(
    weights: np.ndarray, count: int, rng: np.random.Generator
) -> np.ndarray:
    """``count`` distinct indices, P(i) ∝ weights[i] (Efraimidis–Spirakis keys), O(C)."""
    keys = np.full(len(weights), np.inf)
    positive = weights > 0
    keys[positive] = rng.exponential(size=int(positive.sum())) / weights[positive]
    chosen = np.argpartition(keys, count - 1)[:count]
    return chosen[np.argsort(keys[chosen], kind="stable")]

"""Sub-cluster measures (family purity@k, per-class k-means ARI/NMI) and grouped k-means."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from dmlkit.evaluate import subcluster_agreement, subcluster_preservation
from dmlkit.grouped import grouped_kmeans


def test_purity_at_k_hand_computed():
    # Class 0 at 0, 1, 2, 10 with modes a a b b. k = 2 nearest same-class neighbours:
    #   0 → 1 (a), 2 (b): 1/2;  1 → 0, 2 (tie 0 vs 2 at distance 1: lower index first): a, b → 1/2
    #   2 → 1 (a), 0 (a): 0;    10 → 2 (b), 1 (a): 1/2.   Class 1 (two items, modes a b):
    #   k is capped at n_c − 1 = 1: each sees the other → 0, 0.
    x = torch.tensor([[0.0], [1.0], [2.0], [10.0], [50.0], [51.0]])
    y = torch.tensor([0, 0, 0, 0, 1, 1])
    modes = ["a", "a", "b", "b", "a", "b"]
    m = subcluster_preservation(x, y, modes, k=2)
    assert m["num_queries"] == 6
    assert m["preservation"] == pytest.approx((0.5 + 0.5 + 0 + 0.5 + 0 + 0) / 6)
    assert m["chance"] == pytest.approx((4 * (1 / 3) + 0 + 0) / 6)


def test_purity_at_one_is_the_nearest_neighbour_measure():
    g = torch.Generator().manual_seed(1)
    z, y = torch.randn(120, 5, generator=g), torch.randint(0, 6, (120,), generator=g)
    modes = torch.randint(0, 3, (120,), generator=g)
    assert subcluster_preservation(z, y, modes) == subcluster_preservation(z, y, modes, k=1)
    with pytest.raises(ValueError, match="k must be >= 1"):
        subcluster_preservation(z, y, modes, k=0)


def two_mode_classes(separation: float, seed: int = 0):
    """6 classes × 2 modes × 10 items; the modes are `separation` apart inside each class."""
    g = torch.Generator().manual_seed(seed)
    centres = 20 * torch.randn(6, 1, 4, generator=g)
    offsets = separation * torch.randn(6, 2, 4, generator=g)
    z = (centres + offsets).repeat_interleave(10, 1) + 0.1 * torch.randn(6, 20, 4, generator=g)
    labels = torch.arange(6).repeat_interleave(20)
    modes = torch.arange(2).repeat_interleave(10).repeat(6)
    return z.reshape(-1, 4), labels, modes


def test_agreement_is_one_for_separated_modes_and_near_zero_for_mixed_ones():
    separated = subcluster_agreement(*two_mode_classes(separation=5.0))
    assert separated == {"ari": 1.0, "nmi": 1.0, "num_classes": 6}
    z, labels, modes = two_mode_classes(separation=0.0)
    mixed = subcluster_agreement(z, labels, modes)
    assert abs(mixed["ari"]) < 0.2 and mixed["num_classes"] == 6


def test_agreement_is_the_mean_of_per_class_ari():
    z, labels, modes = two_mode_classes(separation=0.3, seed=2)
    result = subcluster_agreement(z, labels, modes)
    from sklearn.cluster import KMeans

    expected = []
    for c in range(6):
        rows = (labels == c).numpy()
        clusters = KMeans(2, n_init=10, random_state=0).fit_predict(z[rows].numpy())
        expected.append(adjusted_rand_score(modes[rows].numpy(), clusters))
    assert result["ari"] == pytest.approx(np.mean(expected))


def test_agreement_skips_classes_with_one_mode():
    z, labels, modes = two_mode_classes(separation=5.0)
    modes = torch.where(labels < 3, 0, modes)  # classes 0-2 have a single mode
    assert subcluster_agreement(z, labels, modes)["num_classes"] == 3


def test_grouped_kmeans_matches_a_plain_loop_per_group():
    g = torch.Generator().manual_seed(0)
    points = torch.randn(90, 3, generator=g, dtype=torch.float64)
    groups = torch.randint(0, 5, (90,), generator=g)
    centres, assignment, present = grouped_kmeans(points, groups, 6, 3, iterations=15)
    assert present.tolist() == [True] * 5 + [False]
    for group in range(5):
        x = points[groups == group]
        # the same algorithm, one group at a time
        chosen = [int(((x - x.mean(0)) ** 2).sum(1).argmax())]
        gap = ((x - x[chosen[0]]) ** 2).sum(1)
        for _ in range(2):
            chosen.append(int(gap.argmax()))
            gap = torch.minimum(gap, ((x - x[chosen[-1]]) ** 2).sum(1))
        ref = x[chosen].clone()
        for _ in range(15):
            near = torch.cdist(x, ref).argmin(1)
            ref = torch.stack(
                [x[near == j].mean(0) if (near == j).any() else ref[j] for j in range(3)]
            )
        torch.testing.assert_close(centres[group], ref)
        torch.testing.assert_close(assignment[groups == group], torch.cdist(x, ref).argmin(1))


def test_grouped_kmeans_with_fewer_points_than_centres_keeps_finite_centres():
    points = torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]])
    centres, assignment, _ = grouped_kmeans(points, torch.tensor([0, 0, 1]), 2, 3)
    assert torch.isfinite(centres).all()
    assert assignment.tolist()[2] == 0

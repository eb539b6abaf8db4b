"""dmlkit.toy: 2-D toy embeddings, gradient fields, point-wise gradient descent, small multiples."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Polygon  # noqa: E402
from matplotlib.quiver import Quiver  # noqa: E402
from torch.testing import assert_close  # noqa: E402

from dmlkit import toy  # noqa: E402


def pull_loss(embeddings, labels):
    """Mean squared distance of each point to its class mean (differentiable means)."""
    total = embeddings.new_zeros(())
    for cls in torch.unique(labels):
        own = embeddings[labels == cls]
        total = total + ((own - own.mean(0)) ** 2).sum()
    return total / len(embeddings)


def pull_reference(points, labels):
    """−∂L/∂z_i of pull_loss in float64 by hand: (2/N)(μ_{y_i} − z_i) (deviations sum to 0)."""
    z = points.double().numpy()
    y = labels.numpy()
    means = {c: z[y == c].mean(0) for c in np.unique(y)}
    return torch.from_numpy(
        np.stack([2 / len(z) * (means[c] - p) for p, c in zip(z, y, strict=True)])
    )


@pytest.mark.parametrize("on_circle", [True, False])
def test_make_toy_shapes_determinism_and_layout(on_circle):
    points, labels, modes = toy.make_toy(3, 2, 10, seed=1, on_circle=on_circle)
    assert points.shape == (60, 2) and points.dtype == torch.float32
    assert labels.tolist() == [c for c in range(3) for _ in range(20)]
    assert modes.tolist() == [m for _ in range(3) for m in range(2) for _ in range(10)]
    again = toy.make_toy(3, 2, 10, seed=1, on_circle=on_circle)
    assert_close(points, again[0], rtol=0, atol=0)
    assert not torch.equal(points, toy.make_toy(3, 2, 10, seed=2, on_circle=on_circle)[0])
    norms = points.norm(dim=1)
    if on_circle:
        assert_close(norms, torch.ones(60), rtol=0, atol=1e-6)
    else:
        assert (norms - 1).abs().max() > 1e-3
    # Each mode sits where the docstring says: class c's sector, modes 0.6 sector apart.
    sector = 2 * math.pi / 3
    for c in range(3):
        for m, offset in enumerate((-0.3, 0.3)):
            mean = points[(labels == c) & (modes == m)].double().mean(0)
            angle = math.atan2(mean[1], mean[0])
            expected = sector * c + offset * sector
            assert abs(math.remainder(angle - expected, 2 * math.pi)) < 0.15


def test_make_toy_classes_differ_in_spread():
    points, labels, modes = toy.make_toy(3, 2, 200, seed=0)
    angles = torch.atan2(points[:, 1], points[:, 0]).double()
    spreads = []
    for c in range(3):
        own = (labels == c) & (modes == 0)
        centred = torch.remainder(angles[own] - angles[own][0] + math.pi, 2 * math.pi)
        spreads.append(float(centred.std()))
    assert spreads[0] < spreads[1] < spreads[2]
    assert spreads[2] / spreads[0] == pytest.approx(3.0, rel=0.25)  # 0.5× to 1.5× mode_std


def test_gradient_of_a_pull_loss_points_to_the_class_mean_in_the_plane():
    points, labels, _ = toy.make_toy(3, 2, 5, on_circle=False)
    field = toy.gradient_field(pull_loss, points, labels, on_circle=False)
    assert_close(field.double(), pull_reference(points, labels), rtol=1e-5, atol=1e-7)
    to_mean = pull_reference(points, labels)
    cosine = torch.nn.functional.cosine_similarity(field.double(), to_mean, dim=1)
    assert (cosine > 0.999).all()


def test_gradient_on_the_circle_is_the_tangent_part_toward_the_mean():
    points, labels, _ = toy.make_toy(3, 2, 5)
    field = toy.gradient_field(pull_loss, points, labels).double()
    z = points.double()
    tangent = torch.stack([-z[:, 1], z[:, 0]], 1)  # unit tangent (counter-clockwise)
    reference = pull_reference(points, labels)
    assert_close((field * z).sum(1), torch.zeros(len(z), dtype=torch.float64), atol=1e-6, rtol=0)
    expected = (reference * tangent).sum(1, keepdim=True) * tangent
    assert_close(field, expected, rtol=1e-4, atol=1e-6)
    # The sign: each point moves along the circle toward its class mean's side.
    moving = (reference * tangent).sum(1).abs() > 1e-4
    assert torch.equal(
        torch.sign((field * tangent).sum(1))[moving],
        torch.sign((reference * tangent).sum(1))[moving],
    )


def test_gradient_field_of_a_loss_that_ignores_the_points_is_zero():
    points, labels, _ = toy.make_toy()
    constant = toy.gradient_field(lambda z, y: torch.tensor(1.0), points, labels)
    assert torch.equal(constant, torch.zeros_like(points))
    detached = toy.gradient_field(lambda z, y: z.sum() * 0, points, labels)
    assert torch.equal(detached, torch.zeros_like(points))


def test_optimise_plain_step_matches_the_formula_in_the_plane():
    points, labels, _ = toy.make_toy(2, 2, 4, on_circle=False)
    (start, after_one) = toy.optimise(
        pull_loss, points, labels, steps=1, lr=0.3, on_circle=False, num_snapshots=2
    )
    assert (start.step, after_one.step) == (0, 1)
    expected = points.double() + 0.3 * pull_reference(points, labels)
    assert_close(after_one.points.double(), expected, rtol=1e-5, atol=1e-6)
    assert_close(start.gradient.double(), pull_reference(points, labels), rtol=1e-5, atol=1e-7)
    assert start.loss == pytest.approx(float(pull_loss(points, labels)))


def test_optimise_on_the_circle_descends_and_stays_on_the_circle():
    points, labels, _ = toy.make_toy()
    snapshots = toy.optimise(pull_loss, points, labels, steps=30, lr=2.0, num_snapshots=4)
    assert [s.step for s in snapshots] == [0, 10, 20, 30]
    losses = [s.loss for s in snapshots]
    assert all(later < earlier for earlier, later in zip(losses, losses[1:], strict=False))
    for snap in snapshots:
        assert_close(snap.points.norm(dim=1), torch.ones(len(points)), rtol=0, atol=1e-5)
    assert torch.equal(snapshots[0].points, points)  # the input is not modified
    again = toy.optimise(pull_loss, points, labels, steps=30, lr=2.0, num_snapshots=4)
    assert all(torch.equal(a.points, b.points) for a, b in zip(snapshots, again, strict=True))


def test_plot_toy_runs_small_multiples_arrows_and_segments():
    points, labels, modes = toy.make_toy(3, 2, 4)
    runs = {
        "pull": toy.optimise(pull_loss, points, labels, steps=6, lr=1.0, num_snapshots=3),
        "short": toy.optimise(pull_loss, points, labels, steps=2, lr=1.0, num_snapshots=2),
    }
    a = torch.tensor([[1.0, 0.0], [-0.5, 0.8], [-0.5, -0.8]], requires_grad=True)
    b = a.detach() * 0.6
    rho = torch.tensor([0.1, 0.2, 0.3])
    fig = toy.plot_toy_runs(runs, labels, modes, segments={"pull": (a, b, rho)})
    assert len(fig.axes) == 5  # 2 rows × 3 columns, one cell unused and removed
    for ax in fig.axes:
        (quiver,) = [c for c in ax.collections if isinstance(c, Quiver)]
        assert quiver.N == len(points)
        assert ax.get_title().startswith("step ")
    pull_axes = fig.axes[:3]
    for ax in pull_axes:
        tubes = [p for p in ax.patches if isinstance(p, Polygon)]
        assert len(tubes) == 3 and len(ax.lines) == 3
    assert not [p for p in fig.axes[3].patches if isinstance(p, Polygon)]
    assert [fig.axes[0].get_ylabel(), fig.axes[3].get_ylabel()] == ["pull", "short"]


def test_stadium_outline_is_at_distance_rho_from_the_segment():
    a, b = np.array([0.2, -0.1]), np.array([0.9, 0.4])
    outline = toy._stadium(a, b, 0.25)
    direction = b - a
    t = np.clip((outline - a) @ direction / (direction @ direction), 0, 1)
    distance = np.linalg.norm(outline - (a + t[:, None] * direction), axis=1)
    np.testing.assert_allclose(distance, 0.25, rtol=1e-9)

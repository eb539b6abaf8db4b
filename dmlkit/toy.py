"""2-D teaching toys: what a DML loss does to a handful of embeddings (``losses_2d.ipynb``).

The toy embeddings live on the unit circle by default, the 2-D analogue of the unit
hypersphere every dmlkit model head projects onto: margins (0.2, 0.5), N-pair's scale and
DAAL's tube radii are all calibrated for unit-norm embeddings, so on the circle each loss
behaves as it does in training. Gradients are therefore shown and followed along the
circle's tangent, which is exactly the gradient that reaches the features through an
L2-normalize head (its Jacobian removes the radial component). ``on_circle=False`` gives
the same toy in the plane for unnormalized losses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Circle, Polygon
from torch import Tensor

from dmlkit.plotting._common import as_numpy, class_colors

LossFn = Callable[[Tensor, Tensor], Tensor]
_MODE_MARKERS = ("o", "^", "s", "D", "v", "P")


class Snapshot(NamedTuple):
    """The state of a toy optimisation at one step."""

    step: int
    points: Tensor  # (N, 2) positions
    gradient: Tensor  # (N, 2) negative gradient (tangent on the circle) at ``points``
    loss: float


def make_toy(
    num_classes: int = 3,
    modes_per_class: int = 2,
    points_per_mode: int = 8,
    seed: int = 0,
    *,
    on_circle: bool = True,
    mode_gap: float = 0.6,
    mode_std: float = 0.12,
) -> tuple[Tensor, Tensor, Tensor]:
    """A few classes with several separated modes each, around the unit circle.

    Class c owns the sector centred at angle 2πc/C; its K mode centres are spread evenly
    over ``mode_gap`` × the sector's width, so each class is two (or K) clusters with an
    empty gap between them, and neighbouring classes are closer than a class's own outer
    modes are to each other. A pull-to-centroid loss merges such modes; DAAL's line
    segments are meant to keep them. Class c's spread is ``mode_std`` · (0.5 + c/(C−1)), so
    classes differ in density and the density regularizer has something to act on.

    Args:
        on_circle: points on the unit circle (angular noise); else in the plane (isotropic
            noise of the same size around the same centres).
        mode_gap: angular distance between a class's outer mode centres, as a fraction of
            its sector (2π/C).
        mode_std: angular (radians) or planar standard deviation of the middle class.
    Returns: points (N, 2) float32, labels (N,) int64, modes (N,) int64 (mode index within
        its class), N = num_classes · modes_per_class · points_per_mode, grouped by class.
    """
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(modes_per_class * points_per_mode)
    modes = torch.arange(modes_per_class).repeat_interleave(points_per_mode).repeat(num_classes)
    sector = 2 * math.pi / num_classes
    offsets = torch.linspace(-0.5, 0.5, modes_per_class, dtype=torch.float64)
    if modes_per_class == 1:
        offsets = torch.zeros(1, dtype=torch.float64)
    centre = sector * labels.double() + mode_gap * sector * offsets[modes]  # (N,) angles
    std = mode_std * (0.5 + labels.double() / max(num_classes - 1, 1))  # (N,)
    noise = torch.randn(len(labels), 2, generator=generator, dtype=torch.float64)
    if on_circle:
        angle = centre + std * noise[:, 0]
        points = torch.stack([angle.cos(), angle.sin()], 1)
    else:
        points = torch.stack([centre.cos(), centre.sin()], 1) + std[:, None] * noise
    return points.float(), labels, modes


def gradient_field(
    loss_fn: LossFn, points: Tensor, labels: Tensor, *, on_circle: bool = True
) -> Tensor:
    """The negative gradient −∂L/∂z_i of ``loss_fn(points, labels)`` for every point.

    Args:
        loss_fn: any ``(embeddings (N, D), labels (N,)) -> 0-dim tensor`` (a pure loss or
            a loss module; a module's running statistics update as in a training step).
        points: (N, 2). labels: (N,).
        on_circle: keep only the tangent component (what moves a point along the circle).
    Returns: (N, 2) detached, same dtype/device as ``points``; zeros where the loss does
        not depend on a point.
    """
    z = points.detach()
    return _loss_and_direction(loss_fn, z, labels.to(z.device), on_circle)[1]


def optimise(
    loss_fn: LossFn,
    points: Tensor,
    labels: Tensor,
    *,
    steps: int = 40,
    lr: float = 0.5,
    on_circle: bool = True,
    num_snapshots: int = 4,
) -> list[Snapshot]:
    """Plain gradient descent on the points themselves, re-projected onto the circle.

    Each step: z ← z + lr · g with g = ``gradient_field`` (tangent on the circle), then
    z ← z / ||z|| when ``on_circle``. Only the points move; a loss module's parameters
    (e.g. DAAL's vertices) stay as they are.

    Args:
        points: (N, 2) start. labels: (N,). steps: updates to make.
        lr: step size. Batch-mean losses give per-point gradients of order 1/N, so on the
            default toy (48 points) 0.5 lets contrastive/triplet converge in ~40 steps.
        num_snapshots: snapshots at evenly spaced steps, the start and the end included.
    Returns: ``Snapshot``s in step order, each with the points, the arrows to draw there
        and the loss value.
    """
    wanted = set(np.linspace(0, steps, max(num_snapshots, 1)).round().astype(int).tolist())
    labels = labels.to(points.device)
    z = points.detach().clone()
    snapshots = []
    for step in range(steps + 1):
        value, direction = _loss_and_direction(loss_fn, z, labels, on_circle)
        if step in wanted:
            snapshots.append(Snapshot(step, z.clone(), direction, value))
        if step == steps:
            break
        z = z + lr * direction
        if on_circle:
            z = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return snapshots


def _loss_and_direction(
    loss_fn: LossFn, z: Tensor, labels: Tensor, on_circle: bool
) -> tuple[float, Tensor]:
    """The loss at ``z`` and −∇L (its tangent part on the circle), both detached."""
    variable = z.clone().requires_grad_(True)
    loss = loss_fn(variable, labels)
    grad = None
    if loss.requires_grad:  # a loss that ignores the points has no graph to differentiate
        (grad,) = torch.autograd.grad(loss, variable, allow_unused=True)
    direction = -grad if grad is not None else torch.zeros_like(z)
    if on_circle:
        radial = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
        direction = direction - (direction * radial).sum(1, keepdim=True) * radial
    return float(loss.detach()), direction.detach()


Segments = tuple[Tensor, Tensor, Tensor | None]  # a (C, 2), b (C, 2), rho (C,) or None


def plot_toy_runs(
    runs: Mapping[str, Sequence[Snapshot]],
    labels: Tensor,
    modes: Tensor | None = None,
    *,
    segments: Mapping[str, Segments] | None = None,
    arrows: bool = True,
    on_circle: bool = True,
    panel_size: float = 2.6,
) -> Figure:
    """Small multiples: one row per loss, one column per snapshot, gradient arrows drawn.

    Args:
        runs: {loss name: snapshots from ``optimise``}; rows in the mapping's order.
        labels: (N,) classes (colour). modes: optional (N,) modes (marker).
        segments: optional {loss name: (a, b, rho)} to draw DAAL's per-class segments a_c–b_c
            (row c of a/b is class c, the c-th smallest label) and, when rho is given, the
            tube of radius rho_c around each — e.g. a DAAL module's vertex tensors and radii.
        arrows: draw each snapshot's negative gradient; arrows share one scale per row
            (the row's longest arrow is 0.3 units long) so their lengths compare across steps.
    Returns: the Figure with rows × columns Axes (unused cells removed).
    """
    names = list(runs)
    columns = max((len(runs[n]) for n in names), default=0)
    if not names or columns == 0:
        raise ValueError("runs must hold at least one non-empty list of snapshots")
    classes, codes = np.unique(as_numpy(labels), return_inverse=True)
    colors = np.array([(*c, 1.0) for c in class_colors(len(classes))])[codes]  # (N, 4)
    markers = np.zeros(len(codes), int) if modes is None else as_numpy(modes).astype(int)
    fig = Figure(figsize=(panel_size * columns, panel_size * len(names)), layout="constrained")
    axes = fig.subplots(len(names), columns, squeeze=False)
    for row, name in enumerate(names):
        snapshots = runs[name]
        longest = max(float(s.gradient.norm(dim=1).max()) for s in snapshots)
        for col, ax in enumerate(axes[row]):
            if col >= len(snapshots):
                fig.delaxes(ax)
                continue
            snap = snapshots[col]
            _toy_panel(ax, snap, colors, markers, on_circle, arrows, longest)
            if segments is not None and name in segments:
                _draw_segments(ax, *segments[name], class_colors(len(classes)))
            ax.set_title(f"step {snap.step}, L = {snap.loss:.3g}", fontsize=8)
        axes[row][0].set_ylabel(name)
    return fig


def _toy_panel(ax: Axes, snap: Snapshot, colors, markers, on_circle, arrows, longest) -> None:
    xy = as_numpy(snap.points, dtype=np.float64)
    if on_circle:
        ax.add_patch(Circle((0, 0), 1.0, fill=False, color="0.8", linewidth=0.8, zorder=0))
    for mode in np.unique(markers):
        pick = markers == mode
        ax.scatter(
            *xy[pick].T,
            s=14,
            c=colors[pick],
            linewidth=0,
            zorder=2,
            marker=_MODE_MARKERS[mode % len(_MODE_MARKERS)],
        )
    if arrows and longest > 0:
        grad = as_numpy(snap.gradient, dtype=np.float64)
        ax.quiver(
            *xy.T,
            *grad.T,
            color=colors,
            angles="xy",
            scale_units="xy",
            scale=longest / 0.3,
            width=0.006,
            zorder=3,
        )
    limit = 1.35 if on_circle else float(np.abs(xy).max()) * 1.15 + 0.1
    ax.set_xlim(-limit, limit)
    ax.set_ylim(-limit, limit)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def _draw_segments(ax: Axes, a: Tensor, b: Tensor, rho: Tensor | None, palette) -> None:
    """Segment a_c–b_c per class, with its tube {z : dist(z, segment) ≤ rho_c} if given."""
    a, b = as_numpy(a, dtype=np.float64), as_numpy(b, dtype=np.float64)  # (C, 2)
    radii = None if rho is None else as_numpy(rho, dtype=np.float64).reshape(-1)
    for c in range(len(a)):
        color = palette[c % len(palette)]
        ax.plot(
            *np.stack([a[c], b[c]]).T, color=color, linewidth=2.0, zorder=4, solid_capstyle="round"
        )
        if radii is not None:
            ax.add_patch(
                Polygon(
                    _stadium(a[c], b[c], radii[c]),
                    closed=True,
                    color=color,
                    alpha=0.15,
                    linewidth=0,
                    zorder=1,
                )
            )


def _stadium(a: np.ndarray, b: np.ndarray, radius: float, arc_points: int = 24) -> np.ndarray:
    """Outline of the set of points within ``radius`` of segment a–b: (2·arc_points, 2)."""
    direction = b - a
    length = float(np.linalg.norm(direction))
    u = direction / length if length > 0 else np.array([1.0, 0.0])
    n = np.array([-u[1], u[0]])
    theta = np.linspace(-np.pi / 2, np.pi / 2, arc_points)[:, None]
    around_b = b + radius * (np.cos(theta) * u + np.sin(theta) * n)
    around_a = a + radius * (-np.cos(theta) * u - np.sin(theta) * n)
    return np.concatenate([around_b, around_a])

"""DAAL (density-aware adaptive line-margin loss) against float64 Python-loop references."""

import math

import pytest
import torch
from torch.testing import assert_close

from dmlkit.losses import triplet_margin_loss
from dmlkit.losses.daal import DAALLoss, class_medians, daal_terms, segment_geometry, two_means

F64 = torch.float64


def ref_project(z, a, b):
    """(t, D) of one point onto one segment, by the textbook formula."""
    direction = b - a
    t = torch.clamp(torch.dot(z - a, direction) / torch.dot(direction, direction), 0, 1)
    return t, torch.linalg.norm(z - (a + t * direction))


def ref_daal(z, rows, vertices, radii, margin=0.1, gamma=16.0, v_min=1 / 24, l_max=1.0):
    n, count = len(z), len(vertices)
    geometry = [[ref_project(z[i], vertices[c, 0], vertices[c, 1]) for c in range(count)]
                for i in range(n)]  # fmt: skip
    pull = sum(torch.relu(geometry[i][rows[i]][1] - radii[rows[i]]) for i in range(n)) / n
    push = 0
    for i in range(n):
        inner = sum(
            torch.exp(gamma * (radii[c] + margin - geometry[i][c][1]))
            for c in range(count)
            if c != rows[i]
        )
        push = push + torch.log(1 + inner) / gamma
    push = push / n
    shortfalls = []
    for c in range(count):
        ts = [geometry[i][c][0] for i in range(n) if rows[i] == c]
        if len(ts) >= 2:
            mean = sum(ts) / len(ts)
            variance = sum((t - mean) ** 2 for t in ts) / len(ts)
            shortfalls.append(torch.relu(v_min - variance))
    spread = sum(shortfalls) / len(shortfalls) if shortfalls else torch.zeros((), dtype=F64)
    length = (
        sum(
            torch.relu(torch.linalg.norm(vertices[c, 1] - vertices[c, 0]) - l_max)
            for c in range(count)
        )
        / count
    )
    return {"pull": pull, "push": push, "spread": spread, "length": length}


def _setup(seed, n=9, count=4, dim=3):
    g = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(n, dim, generator=g, dtype=F64), dim=1)
    rows = torch.arange(n) % (count - 1)  # the last class has no sample in the batch
    vertices = 0.8 * torch.randn(count, 2, dim, generator=g, dtype=F64)
    radii = 0.05 + 0.45 * torch.rand(count, generator=g, dtype=F64)
    return z, rows, vertices, radii


def _module(vertices, radii, classes=None, **kwargs):
    count, _, dim = vertices.shape
    module = DAALLoss(count, dim, classes=classes, **kwargs).double().eval()
    with torch.no_grad():
        module.vertices.copy_(vertices)
        module.radii.copy_(radii)
    return module


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_segment_geometry_matches_projection_loop(seed):
    z, _, vertices, _ = _setup(seed)
    z = z.clone().requires_grad_(True)
    vertices = vertices.clone().requires_grad_(True)
    dist, t, length = segment_geometry(z, vertices)
    ref = [[ref_project(z[i], v[0], v[1]) for v in vertices] for i in range(len(z))]
    ref_t = torch.stack([torch.stack([p[0] for p in row]) for row in ref])
    ref_d = torch.stack([torch.stack([p[1] for p in row]) for row in ref])
    assert_close(t, ref_t.detach())
    assert_close(dist, ref_d.detach())
    assert_close(length, (vertices[:, 1] - vertices[:, 0]).norm(dim=1).detach())
    weights = torch.randn(dist.shape, generator=torch.Generator().manual_seed(9), dtype=F64)
    grads = torch.autograd.grad((dist * weights).sum() + t.sum(), (z, vertices))
    ref_grads = torch.autograd.grad((ref_d * weights).sum() + ref_t.sum(), (z, vertices))
    assert_close(grads[0], ref_grads[0])
    assert_close(grads[1], ref_grads[1])


def test_projection_clamps_at_both_ends():
    start, end = torch.tensor([[0.0, 0.0]], dtype=F64), torch.tensor([[1.0, 0.0]], dtype=F64)
    points = torch.tensor([[-0.5, 0.3], [1.5, -0.2], [0.25, 0.1], [1.0, 0.0]], dtype=F64)
    dist, t, length = segment_geometry(points, torch.stack([start, end], 1))
    assert length.tolist() == pytest.approx([1.0])
    assert t[:, 0].tolist() == pytest.approx([0.0, 1.0, 0.25, 1.0])
    expected = [math.hypot(0.5, 0.3), math.hypot(0.5, 0.2), 0.1, 0.0]
    assert dist[:, 0].tolist() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "kwargs", [{}, {"margin": 0.3, "gamma": 4.0, "min_spread": 0.2, "max_length": 0.5}]
)
def test_daal_matches_loop_reference(seed, kwargs):
    z, rows, vertices, radii = _setup(seed)
    module = _module(vertices, radii, **kwargs)
    z = z.clone().requires_grad_(True)
    total = module(z, rows)
    grads = torch.autograd.grad(total, (z, module.vertices))

    ref_vertices = vertices.clone().requires_grad_(True)
    names = {"margin": "margin", "gamma": "gamma", "min_spread": "v_min", "max_length": "l_max"}
    ref = ref_daal(z, rows, ref_vertices, radii, **{names[k]: v for k, v in kwargs.items()})
    ref_total = ref["pull"] + ref["push"] + 0.1 * ref["spread"] + 0.1 * ref["length"]
    ref_grads = torch.autograd.grad(ref_total, (z, ref_vertices))
    assert_close(total.detach(), ref_total.detach())
    for key in ("pull", "push", "spread", "length"):
        assert_close(module.last_terms[key], ref[key].detach(), msg=key)
    assert_close(grads[0], ref_grads[0])
    assert_close(grads[1], ref_grads[1])


def test_hand_placed_2d_terms():
    # Class 0: segment (0,0)–(1,0), tube 0.2; class 1: segment (0,2)–(1,2), tube 0.3.
    vertices = torch.tensor([[[0.0, 0.0], [1.0, 0.0]], [[0.0, 2.0], [1.0, 2.0]]], dtype=F64)
    radii = torch.tensor([0.2, 0.3], dtype=F64)
    z = torch.tensor([[0.5, 0.1], [0.5, 0.5], [0.0, 1.9]], dtype=F64)
    rows = torch.tensor([0, 0, 1])
    module = _module(vertices, radii, gamma=1.0)
    module(z, rows)
    terms = module.last_terms
    # pull: sample 1 is 0.5 from its line, 0.3 outside the tube; the others are inside.
    assert terms["pull"].item() == pytest.approx(0.3 / 3)
    # push: D to the other line = 1.9, 1.5 (class 1) and 1.9 (class 0); γ = 1, δ = 0.1.
    push = [math.log1p(math.exp(0.4 - 1.9)), math.log1p(math.exp(0.4 - 1.5))]
    push.append(math.log1p(math.exp(0.3 - 1.9)))
    assert terms["push"].item() == pytest.approx(sum(push) / 3)
    # spread: class 0 has t = (0.5, 0.5): variance 0 → 1/24; class 1 has one sample.
    assert terms["spread"].item() == pytest.approx(1 / 24)
    assert terms["length"].item() == 0  # both segments have length 1 = ℓ_max


def test_pull_is_exactly_zero_inside_the_tube():
    start = torch.tensor([[0.0, 0.0, 0.0], [0.0, 5.0, 0.0]], dtype=F64)
    end = torch.tensor([[0.6, 0.0, 0.0], [0.0, 6.0, 0.0]], dtype=F64)
    radii = torch.tensor([0.3, 0.3], dtype=F64)
    inside = torch.tensor(
        [[-0.2, 0.1, 0.0], [0.3, -0.29, 0.0], [0.8, 0.0, 0.1], [0.1, 0.0, 0.0]], dtype=F64
    ).requires_grad_(True)
    rows = torch.zeros(4, dtype=torch.long)
    terms = daal_terms(*segment_geometry(inside, torch.stack([start, end], 1))[:2], rows, radii,
                       (end - start).norm(dim=1))  # fmt: skip
    assert terms["pull"].item() == 0
    (grad,) = torch.autograd.grad(terms["pull"], inside)
    assert torch.equal(grad, torch.zeros_like(grad))  # inside, the distribution is left as is
    module = _module(torch.stack([start, end], 1), radii)
    module(inside, rows)
    assert module.last_terms["pull"].item() == 0


def test_tube_radius_ema_update():
    vertices = torch.tensor([[[0.0, 0.0], [1.0, 0.0]], [[0.0, 5.0], [1.0, 5.0]]], dtype=F64)
    module = _module(vertices, torch.full((2,), 0.5, dtype=F64), momentum=0.9).train()
    module.radius_seen.zero_()

    def batch(distances):  # points of class 0 at these distances above its segment
        return torch.tensor([[0.5, d] for d in distances], dtype=F64)

    rows = torch.zeros(4, dtype=torch.long)
    module(batch([0.1, 0.2, 0.3, 0.6]), rows)  # first sight: the median itself
    assert module.radii.tolist() == pytest.approx([0.25, 0.5])  # class 1 absent: unchanged
    assert module.radius_seen.tolist() == [True, False]
    assert module.last_terms["mean_rho"].item() == pytest.approx(0.25)
    module(batch([0.4, 0.45, 0.5]), rows[:3])  # odd count: the middle value
    assert module.radii[0].item() == pytest.approx(0.9 * 0.25 + 0.1 * 0.45)
    for _ in range(60):  # the EMA converges to the median, clipped to ρ_max
        module(batch([0.9, 1.0, 1.1]), rows[:3])
    assert module.radii[0].item() == pytest.approx(0.5)
    module.radius_seen.zero_()
    module(batch([0.001, 0.002]), rows[:2])
    assert module.radii[0].item() == pytest.approx(0.05)  # clipped to ρ_min
    module.eval()
    module(batch([0.4, 0.4]), rows[:2])
    assert module.radii[0].item() == pytest.approx(0.05)  # no update outside training


def test_class_medians_without_loops():
    values = torch.tensor([5.0, 1.0, 3.0, 2.0, 9.0, 4.0, 7.0])
    rows = torch.tensor([2, 0, 2, 0, 2, 0, 0])
    medians, present = class_medians(values, rows, 4)
    assert present.tolist() == [True, False, True, False]
    assert medians.tolist() == pytest.approx([(2.0 + 4.0) / 2, 0.0, 5.0, 0.0])


def test_init_from_embeddings_uses_two_means_per_class():
    g = torch.Generator().manual_seed(0)
    left = torch.tensor([-1.0, 0.0]) + 0.01 * torch.randn(5, 2, generator=g)
    right = torch.tensor([1.0, 0.0]) + 0.01 * torch.randn(5, 2, generator=g)
    z = torch.cat([left, right, torch.tensor([[0.0, 3.0]])])
    labels = torch.tensor([10] * 10 + [30])
    module = DAALLoss(None, 2, classes=[10, 20, 30])
    before = module.vertices.detach().clone()
    module.init_from_embeddings(z, labels)
    found = module.vertices.detach()[0]
    ends = sorted(found.tolist())
    assert_close(torch.tensor(ends), torch.stack([left.mean(0), right.mean(0)]))
    assert torch.equal(module.vertices[1], before[1])  # class 20 absent: random init kept
    single = module.vertices.detach()[2]  # one sample: short segment through it
    assert_close(single.mean(0), torch.tensor([0.0, 3.0]))
    assert (single[1] - single[0]).norm().item() == pytest.approx(0.1, rel=1e-5)
    centres, present = two_means(z, torch.tensor([0] * 10 + [2]), 3)
    assert present.tolist() == [True, False, True]


def test_any_labels_unknown_label_and_state_dict():
    classes = [0x4E00, 0x41, 101]
    module = DAALLoss(None, 4, classes=classes, seed=1)
    plain = DAALLoss(3, 4, seed=1)
    z = torch.nn.functional.normalize(torch.randn(6, 4, generator=torch.Generator()), dim=1)
    rows = torch.tensor([0, 1, 2, 0, 1, 2])
    labels = torch.tensor(sorted(classes))[rows]
    assert_close(module(z, labels), plain(z, rows))
    assert {"vertices", "radii", "radius_seen", "classes"} <= set(module.state_dict())
    with pytest.raises(ValueError, match="7"):
        module(z, torch.tensor([0x41, 7, 101, 101, 101, 0x41]))

    resumed = DAALLoss(None, 4, classes=classes, seed=99)
    resumed.load_state_dict(module.state_dict())
    assert torch.equal(resumed(z, labels), module(z, labels))
    assert torch.equal(resumed.radii, module.radii)


def test_base_pair_loss_on_top_and_half_inputs():
    z = torch.nn.functional.normalize(torch.randn(8, 5, generator=torch.Generator()), dim=1)
    y = torch.arange(8) % 3
    alone = DAALLoss(3, 5).eval()
    combined = DAALLoss(3, 5, base="triplet").eval()
    expected = alone(z, y) + triplet_margin_loss(z, y)
    assert_close(combined(z, y), expected)
    assert_close(combined.last_terms["pair"], triplet_margin_loss(z, y))
    with pytest.raises(ValueError, match="proxy"):
        DAALLoss(3, 5, base="proxy_anchor")
    for dtype in (torch.float16, torch.bfloat16):
        half = z.to(dtype).requires_grad_(True)
        value = alone(half, y)
        value.backward()
        assert value.dtype == torch.float32 and torch.isfinite(half.grad.float()).all()


def test_empty_batch_gives_zero_terms_and_leaves_the_radii():
    z, rows, vertices, radii = _setup(3)
    vertices = 3 * vertices  # long segments: the length hinge is active
    empty = torch.zeros(0, 3, dtype=F64, requires_grad=True)
    no_rows = torch.zeros(0, dtype=torch.long)
    terms = daal_terms(*segment_geometry(empty, vertices)[:2], no_rows, radii,
                       (vertices[:, 1] - vertices[:, 0]).norm(dim=1))  # fmt: skip
    assert {key: term.item() for key, term in terms.items()} == dict.fromkeys(terms, 0.0)
    module = _module(vertices, radii, base="triplet").train()
    module(z, rows)
    assert module.last_terms["length"].item() > 0
    radii_before, seen_before = module.radii.clone(), module.radius_seen.clone()
    total = module(empty, no_rows)
    assert total.item() == 0 and module.last_terms["pair"].item() == 0
    (grad,) = torch.autograd.grad(total, module.vertices)
    assert torch.equal(grad, torch.zeros_like(grad))
    assert torch.equal(module.radii, radii_before)
    assert torch.equal(module.radius_seen, seen_before)


def test_float_and_bool_labels_are_rejected():
    module = DAALLoss(None, 4, classes=[1, 2, 3]).eval()  # fixed radii: calls comparable
    z = torch.nn.functional.normalize(torch.randn(3, 4, generator=torch.Generator()), dim=1)
    for labels in (torch.tensor([1.5, 2.0, 3.0]), torch.tensor([True, False, True])):
        with pytest.raises(ValueError, match="integer class ids"):
            module(z, labels)
    with pytest.raises(ValueError, match="integer class ids"):
        module.init_from_embeddings(z, torch.tensor([1.0, 2.0, 3.0]))
    assert_close(
        module(z, torch.tensor([1, 2, 3], dtype=torch.uint8)), module(z, torch.tensor([1, 2, 3]))
    )

"""The alternatives of the DAAL reconstruction (``dmlkit.losses.daal_variants``) against
float64 loop references, and with every alternative off, exactly ``DAALLoss``."""

import math

import pytest
import torch
from torch.testing import assert_close

from dmlkit.losses import build_loss
from dmlkit.losses.daal import DAALLoss, segment_geometry
from dmlkit.losses.daal_variants import DAALVariants, daal_variant_terms
from tests.test_daal import F64, _setup, ref_project


@pytest.mark.parametrize("seed", [0, 1])
def test_with_every_alternative_off_the_variants_are_daal_bit_for_bit(seed):
    z, rows, _, _ = _setup(seed, n=12, count=3)
    z = z.float()
    plain, variants = DAALLoss(3, 3, seed=seed), DAALVariants(3, 3, seed=seed)
    assert isinstance(build_loss("daal", num_classes=3, embedding_dim=3), DAALVariants)
    plain.init_from_embeddings(z, rows)
    variants.init_from_embeddings(z, rows)
    for step in range(3):
        shifted = (z + 0.1 * step).requires_grad_(True)
        other = shifted.detach().clone().requires_grad_(True)
        loss, loss_v = plain(shifted, rows), variants(other, rows)
        loss.backward()
        loss_v.backward()
        assert torch.equal(loss, loss_v) and torch.equal(shifted.grad, other.grad)
        assert torch.equal(plain.vertices.grad, variants.vertices.grad)
        assert torch.equal(plain.radii, variants.radii)
        assert plain.last_terms.keys() == variants.last_terms.keys()
    assert plain.state_dict().keys() == variants.state_dict().keys()


def ref_daal_segments(z, rows, vertices, radii, segments, margin=0.1, gamma=16.0, v_min=1 / 24):
    """The S-segment terms by loops: a sample's own segment is its class's nearest one."""
    n, groups = len(z), len(vertices)
    count = groups // segments
    proj = [[ref_project(z[i], vertices[g, 0], vertices[g, 1]) for g in range(groups)]
            for i in range(n)]  # fmt: skip
    own = []
    for i in range(n):
        candidates = [rows[i] * segments + s for s in range(segments)]
        own.append(min(candidates, key=lambda g: (proj[i][g][1].item(), g)))
    pull = sum(torch.relu(proj[i][own[i]][1] - radii[own[i]]) for i in range(n)) / n
    push = 0
    for i in range(n):
        inner = 0
        for c in range(count):
            if c == rows[i]:
                continue
            g = min(
                range(c * segments, (c + 1) * segments), key=lambda g: (proj[i][g][1].item(), g)
            )
            inner = inner + torch.exp(gamma * (radii[g] + margin - proj[i][g][1]))
        push = push + torch.log(1 + inner) / gamma
    shortfalls = []
    for g in range(groups):
        ts = [proj[i][g][0] for i in range(n) if own[i] == g]
        if len(ts) >= 2:
            mean = sum(ts) / len(ts)
            shortfalls.append(torch.relu(v_min - sum((t - mean) ** 2 for t in ts) / len(ts)))
    spread = sum(shortfalls) / len(shortfalls) if shortfalls else torch.zeros((), dtype=F64)
    return {"pull": pull, "push": push / n, "spread": spread}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_several_segments_match_the_loop_reference_in_value_and_gradient(seed):
    g = torch.Generator().manual_seed(seed)
    segments, count, n, dim = 3, 4, 10, 3
    z = torch.nn.functional.normalize(torch.randn(n, dim, generator=g, dtype=F64), dim=1)
    z.requires_grad_(True)
    rows = torch.arange(n) % count
    vertices = (
        0.8 * torch.randn(count * segments, 2, dim, generator=g, dtype=F64)
    ).requires_grad_()
    radii = 0.05 + 0.45 * torch.rand(count * segments, generator=g, dtype=F64)
    dist, t, lengths = segment_geometry(z, vertices)
    terms = daal_variant_terms(dist, t, rows, radii, lengths, segments=segments)
    ref = ref_daal_segments(z, rows, vertices, radii, segments)
    for key in ("pull", "push", "spread"):
        assert_close(terms[key], ref[key])
        got = torch.autograd.grad(terms[key], (z, vertices), allow_unused=True, retain_graph=True)
        want = torch.autograd.grad(ref[key], (z, vertices), allow_unused=True, retain_graph=True)
        for a, b in zip(got, want, strict=True):
            if b is None:
                assert a is None or not a.any()
            else:
                assert_close(a, b)


def test_soft_assignment_pulls_towards_the_soft_minimum_of_the_own_segments():
    z = torch.tensor([[1.0, 0.0]], dtype=F64)
    vertices = torch.tensor(  # class 0: segments at distance 0.3 and 0.6 from z; class 1 far
        [[[0.7, -1], [0.7, 1]], [[0.4, -1], [0.4, 1]], [[-5, 0], [-5, 1]], [[-6, 0], [-6, 1]]],
        dtype=F64,
    )
    radii = torch.full((4,), 0.05, dtype=F64)
    dist, t, lengths = segment_geometry(z, vertices)
    terms = daal_variant_terms(
        dist, t, torch.tensor([0]), radii, lengths, segments=2, assign="soft", temperature=0.1
    )
    softmin = -0.1 * math.log(math.exp(-0.3 / 0.1) + math.exp(-0.6 / 0.1))
    assert terms["pull"].item() == pytest.approx(softmin - 0.05)


def test_init_puts_one_segment_in_each_sub_cluster():
    g = torch.Generator().manual_seed(0)
    modes = torch.tensor([[2.0, 0.0, 0.0], [-2.0, 0.0, 0.0]], dtype=F64)
    z = modes.repeat_interleave(20, 0) + 0.1 * torch.randn(40, 3, generator=g, dtype=F64)
    module = DAALVariants(1, 3, segments=2).double()
    module.init_from_embeddings(z, torch.zeros(40, dtype=torch.long))
    middles = module.vertices.detach().mean(1)  # (2, 3)
    assert sorted(middles[:, 0].sign().tolist()) == [-1.0, 1.0]
    assert (middles[:, 0].abs() - 2).abs().max() < 0.1


def test_a_fixed_radius_is_not_adapted_and_quantile_radii_follow_their_quantile():
    z, rows, vertices, _ = _setup(3, n=12, count=3)
    fixed = DAALVariants(3, 3, radius=0.2).double().train()
    with torch.no_grad():
        fixed.vertices.copy_(vertices)
    fixed(z, rows)
    assert fixed.radii.tolist() == pytest.approx([0.2] * 3)  # stored as float32 0.2
    upper = DAALVariants(3, 3, radius_quantile=0.9, rho_max=5.0).double().train()
    with torch.no_grad():
        upper.vertices.copy_(vertices)
    upper(z, rows)
    dist = segment_geometry(z, vertices).distance.gather(1, rows[:, None]).squeeze(1)
    for c in range(2):  # class 2 has no sample in the batch: it keeps rho_max
        expected = max(float(torch.quantile(dist[rows == c], 0.9)), 0.05)
        assert upper.radii[c].item() == pytest.approx(expected)
    assert upper.radii[2].item() == 5.0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"segments": 0}, "segments must be an int >= 1"),
        ({"assign": "any"}, "unknown assign 'any'"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"radius_quantile": 1.5}, "radius_quantile must be in"),
        ({"radius": -1.0}, "radius must be > 0"),
    ],
)
def test_bad_segment_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        DAALVariants(3, 4, **options)

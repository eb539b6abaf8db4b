"""DensityAdaptive and the density regularizer against float64 Python-loop references."""

import math

import pytest
import torch
from torch.testing import assert_close

from dmlkit.losses import PairLoss, contrastive_loss, npair_loss, triplet_margin_loss
from dmlkit.losses.density import DensityAdaptive, density_regularizer
from tests.test_losses import ref_contrastive, ref_npair, ref_triplet

F64 = torch.float64


def ref_relative_densities(z, y, eps=1e-8, detach_separation=True):
    """r_c for every class with ≥ 2 samples (and another class present), by loops."""
    classes = sorted(set(y.tolist()))
    members = {c: [i for i in range(len(z)) if y[i] == c] for c in classes}
    centroid = {c: sum(z[i] for i in members[c]) / len(members[c]) for c in classes}
    out = []
    for c in classes:
        others = [torch.linalg.norm(centroid[c] - centroid[o]) for o in classes if o != c]
        if len(members[c]) < 2 or not others:
            continue
        spread = sum(torch.linalg.norm(z[i] - centroid[c]) for i in members[c]) / len(members[c])
        separation = min(others, key=lambda d: d.item())
        if detach_separation:
            separation = separation.detach()
        out.append(spread / (separation + eps))
    return out


def ref_regularizer(z, y, tau, detach_separation=True):
    r = ref_relative_densities(z, y, detach_separation=detach_separation)
    if not r:
        return torch.zeros((), dtype=F64)
    return sum(torch.relu(tau - r_c) for r_c in r) / len(r)


def _batch(seed, n=12, dim=4, classes=3):
    g = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(n, dim, generator=g, dtype=F64), dim=1)
    return z, torch.arange(n) % classes


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tau", [0.5, 1.5, 3.0])
@pytest.mark.parametrize("detach_separation", [True, False])
def test_regularizer_matches_loop_reference(seed, tau, detach_separation):
    z, y = _batch(seed)
    y = torch.where(y == 2, 1000, y)  # any label values; plus a singleton class below
    y[0] = 77
    z = z.clone().requires_grad_(True)
    value = density_regularizer(z, y, tau=tau, detach_separation=detach_separation)
    (grad,) = torch.autograd.grad(value, z)
    ref = ref_regularizer(z, y, tau, detach_separation)
    (ref_grad,) = torch.autograd.grad(ref, z) if ref.requires_grad else (torch.zeros_like(z),)
    assert_close(value, ref.detach())
    assert_close(grad, ref_grad)


BASES = [
    ("contrastive", contrastive_loss, ref_contrastive),
    ("triplet", triplet_margin_loss, ref_triplet),
    ("npair", npair_loss, ref_npair),
]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("target", ["fixed", "batch", "ema"])
@pytest.mark.parametrize(("name", "fn", "ref"), BASES, ids=[b[0] for b in BASES])
def test_density_adaptive_over_base_losses_matches_reference(seed, target, name, fn, ref):
    z, y = _batch(seed, n=10)
    module = DensityAdaptive(PairLoss(fn), weight=0.7, target=target, tau=2.0, alpha=1.3)
    module.double()
    z = z.clone().requires_grad_(True)
    value = module(z, y)
    (grad,) = torch.autograd.grad(value, z)

    r = ref_relative_densities(z, y)
    mean_r = (sum(r) / len(r)).detach()
    # "ema" on its first batch takes the batch mean as is, like "batch"; both detached.
    tau = 2.0 if target == "fixed" else 1.3 * mean_r
    expected = ref(z, y) + 0.7 * ref_regularizer(z, y, tau)
    (ref_grad,) = torch.autograd.grad(expected, z)
    assert_close(value, expected.detach())
    assert_close(grad, ref_grad)
    assert_close(module.last_terms["mean_r"], mean_r)
    assert_close(module.last_terms["tau"], torch.as_tensor(tau, dtype=F64))


def test_hand_placed_two_classes():
    # Class 0: two points ±0.1 around (0, 0); class 1: two points ±0.3 around (1, 0).
    z = torch.tensor([[0.0, 0.1], [0.0, -0.1], [1.0, 0.3], [1.0, -0.3]], dtype=F64)
    y = torch.tensor([0, 0, 1, 1])
    # s_0 = 0.1, s_1 = 0.3, δ = 1 for both: r = (0.1, 0.3); τ = 0.2 → R = mean(0.1, 0) = 0.05.
    value = density_regularizer(z, y, tau=0.2)
    assert value.item() == pytest.approx(0.05, abs=1e-7)
    assert density_regularizer(z, y, tau=0.0999).item() == 0  # both r_c ≥ τ (r_0 ≈ 0.1)


def test_zero_when_every_class_is_at_or_above_tau():
    z, y = _batch(3, n=12)
    z = z.clone().requires_grad_(True)
    smallest = min(r.item() for r in ref_relative_densities(z, y))
    module = DensityAdaptive(PairLoss(contrastive_loss), target="fixed", tau=smallest * 0.999)
    total = module(z, y)
    assert module.last_terms["R"].item() == 0
    (grad,) = torch.autograd.grad(total, z)
    assert_close(grad, torch.autograd.grad(contrastive_loss(z, y), z)[0])


@pytest.mark.parametrize("detach_separation", [False, True])
def test_gradient_spreads_an_over_dense_class(detach_separation):
    # 2-class toy: class 0 packed tightly around (0, 0), class 1 spread around (2, 0).
    g = torch.Generator().manual_seed(0)
    tight = 0.01 * torch.randn(5, 2, generator=g, dtype=F64)
    loose = torch.tensor([2.0, 0.0], dtype=F64) + 0.8 * torch.randn(5, 2, generator=g, dtype=F64)
    z = torch.cat([tight, loose]).requires_grad_(True)
    y = torch.tensor([0] * 5 + [1] * 5)
    module = DensityAdaptive(
        lambda e, l: e.sum() * 0, target="fixed", tau=0.2, detach_separation=detach_separation
    )
    value = module(z, y)
    assert value.item() > 0
    (grad,) = torch.autograd.grad(value, z)
    centroid = tight.mean(0)
    outward = ((-grad[:5]) * (tight - centroid)).sum(1)
    assert (outward > 0).all()  # descent moves every tight sample away from its centroid
    if detach_separation:
        assert_close(grad[5:], torch.zeros_like(grad[5:]))  # the spread class is left alone
    else:
        # Through δ_0 the spread class only translates (same gradient on every sample),
        # towards class 0: descent shrinks δ_0 (why detaching δ is the default).
        assert_close(grad[5:], grad[5:6].expand(5, 2))
        assert grad[5, 0] > 0

    def spread(points):
        return (points - points.mean(0)).norm(dim=1).mean()

    stepped = z.detach() - 1e-3 * grad
    assert spread(stepped[:5]) > spread(tight)


def test_ema_target_updates_buffer_and_state_dict_round_trips():
    module = DensityAdaptive(PairLoss(triplet_margin_loss), target="ema", alpha=1.5, momentum=0.9)
    assert {"running_r", "num_batches_tracked"} <= set(module.state_dict())
    means = []
    for seed in range(3):
        z, y = _batch(seed)
        module(z.float(), y)
        means.append(module.last_terms["mean_r"].item())
        if seed == 0:
            assert module.running_r.item() == pytest.approx(means[0], rel=1e-6)
            snapshot = {k: v.clone() for k, v in module.state_dict().items()}
    expected = means[0]
    for m in means[1:]:
        expected = 0.9 * expected + 0.1 * m
    assert module.running_r.item() == pytest.approx(expected, rel=1e-6)
    assert module.last_terms["tau"].item() == pytest.approx(1.5 * expected, rel=1e-6)
    assert module.num_batches_tracked.item() == 3

    resumed = DensityAdaptive(PairLoss(triplet_margin_loss), target="ema", alpha=1.5)
    resumed.load_state_dict(snapshot)
    fresh_start = DensityAdaptive(PairLoss(triplet_margin_loss), target="ema", alpha=1.5)
    fresh_start.load_state_dict(snapshot)
    z, y = _batch(1)
    assert torch.equal(resumed(z.float(), y), fresh_start(z.float(), y))
    assert resumed.running_r.item() == pytest.approx(0.9 * means[0] + 0.1 * means[1], rel=1e-6)

    module.eval()  # evaluation reads the EMA but does not move it
    before = module.running_r.clone()
    module(*_batch(5))
    assert torch.equal(module.running_r, before)


def test_ema_skips_batches_without_a_valid_class():
    module = DensityAdaptive(PairLoss(contrastive_loss))
    z = torch.randn(4, 3)
    module(z, torch.tensor([1, 2, 3, 4]))  # singletons only: no r_c
    assert module.num_batches_tracked.item() == 0 and module.running_r.item() == 0
    assert module.last_terms["R"].item() == 0


def test_batch_target_tau_carries_no_gradient():
    z, y = _batch(4)
    z = z.clone().requires_grad_(True)
    module = DensityAdaptive(lambda e, l: e.sum() * 0, target="batch", alpha=1.2)
    (grad,) = torch.autograd.grad(module(z, y), z)
    tau = module.last_terms["tau"]
    assert tau.item() == pytest.approx(1.2 * module.last_terms["mean_r"].item())
    (expected,) = torch.autograd.grad(density_regularizer(z, y, tau=tau), z)
    assert_close(grad, expected)


def test_learned_target_trains_tau_with_its_log_barrier():
    z, y = _batch(6)
    module = DensityAdaptive(
        lambda e, l: e.sum() * 0, target="learned", tau=0.3, beta=0.05, weight=2.0
    ).double()
    assert module.last_terms == {}
    assert "theta" in dict(module.named_parameters())
    assert module.high_lr_parameters() == []  # τ takes the head learning rate
    total = module(z, y)
    tau = module.last_terms["tau"]
    assert tau.item() == pytest.approx(0.3, rel=1e-6)  # θ is a float32 parameter
    (grad_theta,) = torch.autograd.grad(total, module.theta)
    r = [r_c.item() for r_c in ref_relative_densities(z, y)]
    d_total_d_tau = 2.0 * sum(r_c < 0.3 for r_c in r) / len(r) - 0.05 / 0.3
    sigmoid = 1 / (1 + math.exp(-module.theta.item()))  # d softplus / dθ
    assert grad_theta.item() == pytest.approx(d_total_d_tau * sigmoid, rel=1e-6)
    expected = 2.0 * ref_regularizer(z, y, 0.3) - 0.05 * math.log(0.3)
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)


def test_module_base_passes_terms_parameters_and_init_through():
    from dmlkit.losses.daal import DAALLoss

    daal = DAALLoss(3, 4)
    wrapped = DensityAdaptive(daal)
    assert wrapped.high_lr_parameters() == [daal.vertices]
    assert hasattr(wrapped, "init_from_embeddings")
    assert not hasattr(DensityAdaptive(PairLoss(npair_loss)), "init_from_embeddings")
    z, y = _batch(0)
    wrapped.init_from_embeddings(z.float(), y)
    wrapped(z.float(), y)
    assert {"pull", "push", "spread", "length", "mean_rho", "base", "R", "mean_r", "tau"} <= set(
        wrapped.last_terms
    )
    assert "vertices" in "".join(wrapped.state_dict())


def test_unknown_target_is_rejected():
    with pytest.raises(ValueError, match="ema.*batch.*fixed.*learned"):
        DensityAdaptive(contrastive_loss, target="median")


@pytest.mark.parametrize(("name", "fn"), [b[:2] for b in BASES], ids=[b[0] for b in BASES])
def test_no_valid_tuple_and_no_valid_class_gives_connected_zero(name, fn):
    z = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3]) if name != "contrastive" else torch.tensor([9])
    z_used = z[: len(labels)]
    module = DensityAdaptive(PairLoss(fn))
    total = module(z_used, labels)
    assert total.requires_grad and total.item() == 0 and module.last_terms["R"].item() == 0
    total.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


def test_deepcopy_keeps_the_forwarded_init():
    import copy

    from dmlkit.losses.daal import DAALLoss

    wrapped = DensityAdaptive(DAALLoss(3, 4))
    clone = copy.deepcopy(wrapped)
    z, y = _batch(1)
    clone.init_from_embeddings(z.float(), y)
    assert not torch.equal(clone.base_loss.vertices, wrapped.base_loss.vertices)
    assert torch.equal(clone.high_lr_parameters()[0], clone.base_loss.vertices)


@pytest.mark.parametrize("target", ["ema", "batch", "fixed", "learned"])
def test_empty_batch_adds_nothing_and_keeps_the_ema(target):
    module = DensityAdaptive(PairLoss(triplet_margin_loss), target=target).double().train()
    module(*_batch(2))
    before = {key: buffer.clone() for key, buffer in module.named_buffers()}
    empty = torch.zeros(0, 4, dtype=F64, requires_grad=True)
    total = module(empty, torch.zeros(0, dtype=torch.long))
    assert total.item() == 0 and module.last_terms["R"].item() == 0  # no log-barrier either
    total.backward()
    for key, buffer in module.named_buffers():
        assert torch.equal(buffer, before[key]), key


def test_float_labels_are_rejected_even_with_a_base_that_ignores_labels():
    module = DensityAdaptive(lambda e, l: e.sum() * 0)
    z, y = _batch(3)
    with pytest.raises(ValueError, match="integer class ids.*float64"):
        module(z, y.double())
    assert module.num_batches_tracked.item() == 0

"""dmlkit.losses against float64 Python-loop references (value and gradient)."""

import math

import pytest
import torch
from torch.testing import assert_close

from dmlkit import losses
from dmlkit.losses import (
    LOSSES,
    ProxyAnchorLoss,
    build_loss,
    contrastive_loss,
    multi_similarity_loss,
    npair_loss,
    pairwise_distance,
    proxy_anchor_loss,
    triplet_margin_loss,
)
from dmlkit.numerics import safe_sqrt

F64 = torch.float64


def _zero() -> torch.Tensor:
    return torch.zeros((), dtype=F64)


def _active_mean(terms):
    active = [t for t in terms if t > 0]
    return sum(active) / len(active) if active else _zero()


def _dist(z, i, j):
    return torch.linalg.norm(z[i] - z[j])


def ref_contrastive(z, y, margin=0.5, pos_margin=0.0, squared=True):
    power = 2 if squared else 1
    pos, neg = [], []
    for i in range(len(z)):
        for j in range(i + 1, len(z)):
            d = _dist(z, i, j)
            if y[i] == y[j]:
                pos.append(torch.relu(d - pos_margin) ** power)
            else:
                neg.append(torch.relu(margin - d) ** power)
    return _active_mean(pos) + _active_mean(neg)


def ref_triplet(z, y, margin=0.2, mining="all"):
    n = len(z)
    terms = []
    for a in range(n):
        positives = [p for p in range(n) if p != a and y[p] == y[a]]
        negatives = [k for k in range(n) if y[k] != y[a]]
        if not positives or not negatives:
            continue
        if mining == "hard":
            p = max(positives, key=lambda p: _dist(z, a, p).item())
            k = min(negatives, key=lambda k: _dist(z, a, k).item())
            terms.append(torch.relu(_dist(z, a, p) - _dist(z, a, k) + margin))
            continue
        for p in positives:
            d_ap = _dist(z, a, p)
            if mining == "all":
                terms += [torch.relu(d_ap - _dist(z, a, k) + margin) for k in negatives]
                continue
            harder = [k for k in negatives if _dist(z, a, k).item() > d_ap.item()]
            k = min(harder or negatives, key=lambda k: _dist(z, a, k).item())
            terms.append(torch.relu(d_ap - _dist(z, a, k) + margin))
    return _active_mean(terms)


def ref_npair(z, y, scale=10.0, l2_reg=0.0):
    members = {}
    for i, c in enumerate(y.tolist()):
        members.setdefault(c, []).append(i)
    pairs = [(m[0], m[1]) for m in members.values() if len(m) >= 2]
    if not pairs:
        return _zero()
    total = _zero()
    for i, (a, p) in enumerate(pairs):
        s_ii = scale * torch.dot(z[a], z[p])
        inner = sum(
            torch.exp(scale * torch.dot(z[a], z[q]) - s_ii)
            for j, (_, q) in enumerate(pairs)
            if j != i
        )
        total = total + torch.log(1 + inner)
    loss = total / len(pairs)
    if l2_reg:
        used = [k for pair in pairs for k in pair]
        loss = loss + l2_reg * sum(z[k].pow(2).sum() for k in used) / len(used)
    return loss


def ref_ms(z, y, alpha=2.0, beta=50.0, base=0.5, epsilon=0.1):
    n = len(z)
    total = _zero()
    for a in range(n):
        sim = [torch.dot(z[a], z[j]) for j in range(n)]
        positives = [p for p in range(n) if p != a and y[p] == y[a]]
        negatives = [k for k in range(n) if y[k] != y[a]]
        max_neg = max((sim[k].item() for k in negatives), default=-math.inf)
        min_pos = min((sim[p].item() for p in positives), default=math.inf)
        kept_pos = [p for p in positives if sim[p].item() - epsilon < max_neg]
        kept_neg = [k for k in negatives if sim[k].item() + epsilon > min_pos]
        pos_sum = sum((torch.exp(-alpha * (sim[p] - base)) for p in kept_pos), _zero())
        neg_sum = sum((torch.exp(beta * (sim[k] - base)) for k in kept_neg), _zero())
        total = total + torch.log(1 + pos_sum) / alpha + torch.log(1 + neg_sum) / beta
    return total / n


def ref_proxy_anchor(z, rows, proxies, margin=0.1, alpha=32.0):
    pos_total, neg_total, with_pos = _zero(), _zero(), 0
    for c in range(len(proxies)):
        cos = [
            torch.dot(z[i], proxies[c]) / (z[i].norm() * proxies[c].norm()) for i in range(len(z))
        ]
        own = [i for i in range(len(z)) if rows[i] == c]
        other = [i for i in range(len(z)) if rows[i] != c]
        if own:
            with_pos += 1
            pos_total = pos_total + torch.log(
                1 + sum(torch.exp(-alpha * (cos[i] - margin)) for i in own)
            )
        neg_total = neg_total + torch.log(
            1 + sum((torch.exp(alpha * (cos[i] + margin)) for i in other), _zero())
        )
    return pos_total / max(with_pos, 1) + neg_total / len(proxies)


PAIR_CASES = [
    ("contrastive", contrastive_loss, ref_contrastive, {}),
    ("contrastive_linear", contrastive_loss, ref_contrastive, {"squared": False, "margin": 0.8}),
    ("contrastive_pos_margin", contrastive_loss, ref_contrastive, {"pos_margin": 0.3}),
    ("triplet_all", triplet_margin_loss, ref_triplet, {}),
    ("triplet_semihard", triplet_margin_loss, ref_triplet, {"mining": "semihard"}),
    ("triplet_hard", triplet_margin_loss, ref_triplet, {"mining": "hard", "margin": 0.5}),
    ("npair", npair_loss, ref_npair, {}),
    ("npair_l2", npair_loss, ref_npair, {"scale": 3.0, "l2_reg": 0.002}),
    ("ms", multi_similarity_loss, ref_ms, {}),
    ("ms_wide", multi_similarity_loss, ref_ms, {"epsilon": 0.5, "beta": 10.0}),
]


CASE_IDS = [case[0] for case in PAIR_CASES]


def _random_batch(seed, n=10, dim=5, classes=4, normalize=True):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, dim, generator=g, dtype=F64)
    if normalize:
        z = torch.nn.functional.normalize(z, dim=1)
    y = torch.randint(0, classes, (n,), generator=g)
    return z, y


def _value_and_grad(fn, z, *args, **kwargs):
    z = z.clone().requires_grad_(True)
    value = fn(z, *args, **kwargs)
    (grad,) = torch.autograd.grad(value, z)
    return value.detach(), grad


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("name", "fn", "ref", "kwargs"), PAIR_CASES, ids=CASE_IDS)
def test_pair_losses_match_float64_loop_reference(seed, name, fn, ref, kwargs):
    z, y = _random_batch(seed)
    value, grad = _value_and_grad(fn, z, y, **kwargs)
    ref_value, ref_grad = _value_and_grad(ref, z, y, **kwargs)
    assert value.dtype == F64
    assert_close(value, ref_value)
    assert_close(grad, ref_grad)


# Hand-placed 2-D points on a line: d01=.3 d02=.4 d03=1 d12=.1 d13=.7 d23=.6.
LINE = torch.tensor([[0.0, 0.0], [0.3, 0.0], [0.4, 0.0], [1.0, 0.0]], dtype=F64)
LINE_LABELS = torch.tensor([0, 0, 1, 1])


@pytest.mark.parametrize(
    ("fn", "kwargs", "expected"),
    [
        # Positives d01, d23 → (.09 + .36)/2; negatives below m = .5: d02 → .01, d12 → .16.
        (contrastive_loss, {}, (0.3**2 + 0.6**2) / 2 + (0.1**2 + 0.4**2) / 2),
        (triplet_margin_loss, {"mining": "all"}, (0.1 + 0.4 + 0.4 + 0.7 + 0.1) / 5),
        (triplet_margin_loss, {"mining": "semihard"}, (0.1 + 0.7 + 0.1) / 3),
        (triplet_margin_loss, {"mining": "hard"}, (0.1 + 0.4 + 0.7 + 0.1) / 4),
    ],
)
def test_hand_placed_line(fn, kwargs, expected):
    value, grad = _value_and_grad(fn, LINE, LINE_LABELS, **kwargs)
    assert value.item() == pytest.approx(expected, abs=1e-12)
    ref = {contrastive_loss: ref_contrastive, triplet_margin_loss: ref_triplet}[fn]
    assert_close(grad, _value_and_grad(ref, LINE, LINE_LABELS, **kwargs)[1])


@pytest.mark.parametrize("mining", ["all", "semihard"])
@pytest.mark.parametrize("classes", [2, 7])
def test_triplet_blocks_change_nothing(mining, classes):
    # Two classes in 30 samples: P = 420 positive pairs × 30 negatives, many blocks.
    z, y = _random_batch(7, n=30, dim=6, classes=classes)
    whole = _value_and_grad(triplet_margin_loss, z, y, mining=mining)
    for block_elements in (1, 29, 31, 1000):
        blocked = _value_and_grad(
            triplet_margin_loss, z, y, mining=mining, block_elements=block_elements
        )
        assert torch.equal(blocked[0], whole[0]) and torch.equal(blocked[1], whole[1])
    reference = _value_and_grad(ref_triplet, z, y, mining=mining)
    assert_close(whole[0], reference[0])
    assert_close(whole[1], reference[1])


def test_npair_hand_placed():
    # Classes 0 and 1 in order [c0, c1, c0, c1, c0 (third: ignored), c2 (single: skipped)].
    z = torch.tensor(
        [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-0.6, 0.8], [-1.0, 0.0], [0.0, -1.0]], dtype=F64
    )
    y = torch.tensor([0, 1, 0, 1, 0, 2])
    value, grad = _value_and_grad(npair_loss, z, y, scale=1.0)
    # s00 = .6, s01 = -.6, s11 = .8, s10 = .8.
    expected = (math.log(1 + math.exp(-1.2)) + math.log(2)) / 2
    assert value.item() == pytest.approx(expected, abs=1e-12)
    assert_close(grad, _value_and_grad(ref_npair, z, y, scale=1.0)[1])
    assert grad[4].abs().max() == 0 and grad[5].abs().max() == 0


@pytest.mark.parametrize("kwargs", [{}, {"epsilon": 0.05}, {"epsilon": 0.6, "base": 0.2}])
def test_ms_hand_placed_2d(kwargs):
    angles = torch.tensor([0.0, 0.3, 1.2, 1.5, 2.0, 3.0], dtype=F64)
    z = torch.stack([angles.cos(), angles.sin()], 1)
    y = torch.tensor([0, 0, 1, 1, 0, 1])
    value, grad = _value_and_grad(multi_similarity_loss, z, y, **kwargs)
    ref_value, ref_grad = _value_and_grad(ref_ms, z, y, **kwargs)
    assert_close(value, ref_value)
    assert_close(grad, ref_grad)


# alpha=64: α(1 + δ) > EXP_BOUND, the masked log-sum-exp path.
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("kwargs", [{}, {"margin": 0.3, "alpha": 8.0}, {"alpha": 64.0}])
def test_proxy_anchor_matches_reference(seed, kwargs):
    z, y = _random_batch(seed, n=9, classes=3)
    g = torch.Generator().manual_seed(100 + seed)
    proxies = torch.randn(5, 5, generator=g, dtype=F64, requires_grad=True)
    z = z.clone().requires_grad_(True)
    value = proxy_anchor_loss(z, y, proxies, **kwargs)
    grads = torch.autograd.grad(value, (z, proxies))
    ref_value = ref_proxy_anchor(z, y, proxies, **kwargs)
    ref_grads = torch.autograd.grad(ref_value, (z, proxies))
    assert_close(value, ref_value)
    assert_close(grads[0], ref_grads[0])
    assert_close(grads[1], ref_grads[1])


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_proxy_anchor_direct_and_log_sum_exp_paths_agree(monkeypatch, dtype):
    z, y = _random_batch(4, n=24, dim=8, classes=5)
    proxies = torch.randn(7, 8, generator=torch.Generator().manual_seed(5), dtype=F64)
    z, proxies = z.to(dtype), proxies.to(dtype).requires_grad_(True)
    direct = _value_and_grad(proxy_anchor_loss, z, y, proxies)
    proxies.grad = None
    monkeypatch.setattr(losses.proxy_anchor, "EXP_BOUND", 0.0)
    masked = _value_and_grad(proxy_anchor_loss, z, y, proxies)
    assert_close(direct[0], masked[0])
    assert_close(direct[1], masked[1])


def test_proxy_anchor_hand_placed_2d():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=F64)
    proxies = torch.tensor([[2.0, 0.0], [0.0, 0.5]], dtype=F64)
    rows = torch.tensor([0, 1, 1])
    value = proxy_anchor_loss(z, rows, proxies, margin=0.1, alpha=2.0)
    cos = {(0, 0): 1.0, (1, 0): 0.0, (2, 0): 0.6, (0, 1): 0.0, (1, 1): 1.0, (2, 1): 0.8}
    pos = math.log(1 + math.exp(-2 * (1.0 - 0.1))) + math.log(
        1 + math.exp(-2 * (1.0 - 0.1)) + math.exp(-2 * (0.8 - 0.1))
    )
    neg = math.log(1 + math.exp(2 * (cos[1, 0] + 0.1)) + math.exp(2 * (cos[2, 0] + 0.1)))
    neg += math.log(1 + math.exp(2 * (cos[0, 1] + 0.1)))
    assert value.item() == pytest.approx(pos / 2 + neg / 2, abs=1e-12)


def test_proxy_anchor_module_logs_its_positive_and_negative_terms():
    # The hand-placed case above: positive = pos / 2, negative = neg / 2.
    module = ProxyAnchorLoss(2, 2, margin=0.1, alpha=2.0).double()
    with torch.no_grad():
        module.proxies.copy_(torch.tensor([[2.0, 0.0], [0.0, 0.5]], dtype=F64))
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=F64)
    value = module(z, torch.tensor([0, 1, 1]))
    pos = math.log(1 + math.exp(-1.8)) + math.log(1 + math.exp(-1.8) + math.exp(-1.4))
    neg = math.log(1 + math.exp(0.2) + math.exp(1.4)) + math.log(1 + math.exp(0.2))
    terms = module.last_terms
    assert set(terms) == {"base", "positive", "negative"}
    assert terms["positive"].item() == pytest.approx(pos / 2, abs=1e-12)
    assert terms["negative"].item() == pytest.approx(neg / 2, abs=1e-12)
    assert terms["base"].item() == pytest.approx(value.item(), abs=1e-12)
    assert not any(t.requires_grad for t in terms.values())


def test_proxy_anchor_module_maps_any_labels_and_rejects_unknown():
    classes = [0x4E00, 0x41, 0x3B1, 101]  # Unicode code points, unsorted
    module = ProxyAnchorLoss(None, 6, classes=classes, seed=3)
    plain = ProxyAnchorLoss(4, 6, seed=3)
    z, _ = _random_batch(0, n=8, dim=6)
    rows = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    labels = torch.tensor(sorted(classes))[rows]
    assert_close(module(z.float(), labels), plain(z.float(), rows))
    assert module.high_lr_parameters() == [module.proxies]
    with pytest.raises(ValueError, match="19968|12345"):
        module(z.float(), torch.tensor([0x41, 12345, 101, 0x3B1, 0x41, 0x41, 101, 101]))


@pytest.mark.parametrize("seed", [0, 1])
def test_labels_need_not_be_zero_based(seed):
    z, y = _random_batch(seed, n=10)
    for fn, _, kwargs in [(c[1], c[2], c[3]) for c in PAIR_CASES]:
        shifted = fn(z, y + 101, **kwargs)
        code_points = fn(z, torch.tensor([0x4E00, 0x3B1, 0x41, 0x20AC])[y], **kwargs)
        assert_close(shifted, fn(z, y, **kwargs))
        assert_close(code_points, fn(z, y, **kwargs))


NO_TUPLE = [
    (contrastive_loss, torch.tensor([5])),  # one sample: no pair at all
    (triplet_margin_loss, torch.tensor([1, 2, 3, 4])),  # no positive
    (triplet_margin_loss, torch.tensor([7, 7, 7, 7])),  # no negative
    (npair_loss, torch.tensor([1, 2, 3, 4])),
    (multi_similarity_loss, torch.tensor([1, 2, 3, 4])),
    (multi_similarity_loss, torch.tensor([3, 3, 3])),
]


@pytest.mark.parametrize(("fn", "labels"), NO_TUPLE)
@pytest.mark.parametrize("mining", ["all", "semihard", "hard"])
def test_no_valid_tuple_gives_connected_zero(fn, labels, mining):
    kwargs = {"mining": mining} if fn is triplet_margin_loss else {}
    z = torch.randn(len(labels), 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    value = fn(z, labels, **kwargs)
    assert value.requires_grad and value.item() == 0
    value.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


def test_duplicates_and_self_distance_have_finite_gradients():
    z = torch.tensor([[0.6, 0.8], [0.6, 0.8], [1.0, 0.0], [1.0, 0.0]], requires_grad=True)
    y = torch.tensor([0, 0, 1, 0])
    dist = pairwise_distance(z)
    assert torch.equal(dist.diagonal(), torch.zeros(4))
    total = sum(fn(z, y) for fn in (contrastive_loss, triplet_margin_loss, multi_similarity_loss))
    total.backward()
    assert torch.isfinite(z.grad).all()


@pytest.mark.parametrize("kind", ["euclidean", "squared"])
def test_self_distance_matches_autograd_gram_form(kind):
    # pairwise_distance(z) has its own one-matmul backward; the autograd Gram form (with a
    # duplicated row, random weights on the entries) is the reference.
    z, _ = _random_batch(5, n=9, dim=4, normalize=False)
    z = torch.cat([z, z[:1]])  # rows 0 and 9 coincide
    weights = torch.rand(10, 10, generator=torch.Generator().manual_seed(6), dtype=F64)

    def gram_form(x):
        squared = x.pow(2).sum(1)[:, None] + x.pow(2).sum(1)[None, :] - 2 * x @ x.T
        squared = squared.clamp_min(0) * (1 - torch.eye(len(x), dtype=x.dtype))
        return squared if kind == "squared" else safe_sqrt(squared)

    def weighted(fn):
        return lambda x: (fn(x) * weights).sum()

    value, grad = _value_and_grad(weighted(lambda x: pairwise_distance(x, kind)), z)
    ref_value, ref_grad = _value_and_grad(weighted(gram_form), z)
    assert_close(value, ref_value)
    assert_close(grad, ref_grad)
    assert torch.equal(pairwise_distance(z, kind).diagonal(), torch.zeros(10, dtype=F64))
    assert pairwise_distance(z, kind)[0, 9] == 0
    distinct = z[:9].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: pairwise_distance(x, kind), (distinct,))


@pytest.mark.parametrize("kind", ["euclidean", "squared", "cosine"])
def test_pairwise_distance_against_cdist(kind):
    z, _ = _random_batch(0, n=7, normalize=False)
    other = torch.randn(3, 5, dtype=F64, generator=torch.Generator().manual_seed(1))
    expected = {
        "euclidean": torch.cdist(z, other),
        "squared": torch.cdist(z, other) ** 2,
        "cosine": 1 - torch.nn.functional.cosine_similarity(z[:, None], other[None], dim=2),
    }[kind]
    assert_close(pairwise_distance(z, kind, other), expected)
    with pytest.raises(ValueError, match="manhattan"):
        pairwise_distance(z, "manhattan")


def _all_modules(density):
    for name in LOSSES:
        yield name, build_loss(name, num_classes=4, embedding_dim=6, density=density)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("density", [False, True])
def test_half_precision_inputs_give_finite_fp32_results(dtype, density):
    z, y = _random_batch(3, n=12, dim=6)
    z32 = z.float()
    for name, module in _all_modules(density):
        module.eval()  # buffers stay put, so the fp32 and half runs see the same state
        expected = module(z32, y)
        half = z32.to(dtype).requires_grad_(True)
        value = module(half, y)
        value.backward()
        assert value.dtype == torch.float32, name
        assert torch.isfinite(value) and torch.isfinite(half.grad.float()).all(), name
        assert_close(value, expected, rtol=0.05, atol=0.02, msg=name)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under_autocast = module(z32, y)
        assert_close(under_autocast, expected, msg=f"{name} under autocast")


@pytest.mark.parametrize("density", [False, True])
def test_every_module_exposes_the_training_interface(density):
    z, y = _random_batch(4, n=12, dim=6)
    z = z.float().requires_grad_(True)
    for name, module in _all_modules(density):
        total = module(z, y)
        assert total.dim() == 0 and total.requires_grad, name
        assert module.last_terms, name
        for key, term in module.last_terms.items():
            assert isinstance(term, torch.Tensor) and term.dim() == 0, (name, key)
            assert not term.requires_grad, (name, key)
        high = module.high_lr_parameters()
        if name in ("proxy_anchor", "daal"):
            assert len(high) == 1 and high[0].requires_grad
        else:
            assert high == []
        assert hasattr(module, "init_from_embeddings") == (name == "daal"), name


def test_build_loss_passes_hyperparameters_and_classes():
    module = build_loss("triplet", num_classes=3, embedding_dim=8, classes=[4, 5, 6], margin=0.4)
    z, y = _random_batch(2, n=8)
    assert_close(module(z, y), triplet_margin_loss(z, y, margin=0.4))
    proxy = build_loss("proxy_anchor", embedding_dim=8, classes=[10, 20, 30], alpha=4.0)
    assert proxy.classes.tolist() == [10, 20, 30] and proxy.alpha == 4.0
    wrapped = build_loss("contrastive", density=True, density_weight=0.5, density_target="fixed")
    assert wrapped.weight == 0.5 and wrapped.target == "fixed"
    options = {"tau": 0.2, "alpha": 2.0, "momentum": 0.5, "beta": 0.1}
    learned = build_loss("ms", density=True, density_target="learned", density_options=options)
    assert (learned.tau, learned.alpha, learned.momentum, learned.beta) == (0.2, 2.0, 0.5, 0.1)


def test_build_loss_errors():
    assert set(LOSSES) == {"contrastive", "triplet", "npair", "ms", "proxy_anchor", "daal"}
    assert losses.LOSSES is LOSSES and type(LOSSES) is dict
    with pytest.raises(ValueError, match="contrastive.*triplet.*npair.*ms.*proxy_anchor.*daal"):
        build_loss("arcface")
    with pytest.raises(TypeError, match="marg"):
        build_loss("contrastive", marg=0.3)
    with pytest.raises(TypeError, match="gamma"):
        build_loss("proxy_anchor", num_classes=3, embedding_dim=4, gamma=2.0)
    with pytest.raises(TypeError, match="temperature"):
        build_loss("triplet", density=True, density_options={"temperature": 1.0})
    with pytest.raises(ValueError, match="embedding_dim"):
        build_loss("daal", num_classes=3)
    with pytest.raises(ValueError, match="num_classes"):
        build_loss("proxy_anchor", embedding_dim=4)
    with pytest.raises(ValueError, match="integer"):
        build_loss("proxy_anchor", embedding_dim=4, classes=[1.5, 2.0])
    with pytest.raises(ValueError, match="distinct"):
        build_loss("daal", embedding_dim=4, classes=[3, 3])
    with pytest.raises(ValueError, match="num_classes=3"):
        build_loss("proxy_anchor", num_classes=3, embedding_dim=4, classes=[1, 2])
    with pytest.raises(ValueError, match="target"):
        build_loss("triplet", density=True, density_target="median")
    with pytest.raises(ValueError, match="mining"):
        build_loss("triplet", mining="easy")  # at construction, not at the first step


@pytest.mark.parametrize(
    ("name", "fn", "kwargs"), [(c[0], c[1], c[3]) for c in PAIR_CASES], ids=CASE_IDS
)
def test_pure_pair_losses_give_connected_zero_for_an_empty_batch(name, fn, kwargs):
    z = torch.zeros(0, 5, dtype=F64, requires_grad=True)
    value = fn(z, torch.zeros(0, dtype=torch.long), **kwargs)
    assert value.dim() == 0 and value.requires_grad and value.item() == 0, name
    value.backward()
    assert z.grad.shape == (0, 5)


def test_proxy_anchor_loss_of_an_empty_batch_is_zero_and_reaches_the_proxies():
    proxies = torch.randn(3, 4, dtype=F64, requires_grad=True)
    value = proxy_anchor_loss(
        torch.zeros(0, 4, dtype=F64), torch.zeros(0, dtype=torch.long), proxies
    )
    assert value.item() == 0
    (grad,) = torch.autograd.grad(value, proxies)
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("density", [False, True])
@pytest.mark.parametrize("name", list(LOSSES))
def test_empty_batch_gives_connected_zero_and_leaves_buffers(name, density):
    module = build_loss(name, num_classes=4, embedding_dim=6, density=density).train()
    z, y = _random_batch(5, n=12, dim=6)
    module(z.float(), y)  # moves the EMA buffers away from their initial values
    before = {key: buffer.clone() for key, buffer in module.named_buffers()}
    empty = torch.zeros(0, 6, requires_grad=True)
    value = module(empty, torch.zeros(0, dtype=torch.long))
    assert value.dim() == 0 and value.requires_grad and value.item() == 0
    assert all(torch.isfinite(term) for term in module.last_terms.values())
    value.backward()
    assert empty.grad.shape == (0, 6)
    for parameter in module.parameters():
        assert parameter.grad is None or torch.equal(parameter.grad, torch.zeros_like(parameter))
    after = dict(module.named_buffers())
    assert before.keys() == after.keys()
    assert ("running_r" in "".join(before)) == density and ("radii" in "".join(before)) == (
        name == "daal"
    )
    for key, buffer in before.items():
        assert torch.equal(after[key], buffer), key


@pytest.mark.parametrize("density", [False, True])
@pytest.mark.parametrize("name", list(LOSSES))
def test_float_and_bool_labels_are_rejected_and_integer_dtypes_agree(name, density):
    module = build_loss(name, num_classes=4, embedding_dim=6, density=density).eval()
    z, y = _random_batch(6, n=12, dim=6)
    z = z.float()
    expected = module(z, y)
    for dtype in (torch.int8, torch.int16, torch.int32, torch.uint8):
        assert_close(module(z, y.to(dtype)), expected, msg=f"{name} {dtype}")
    for labels in (y + 0.5, y.double(), y.half(), y % 2 == 0):
        with pytest.raises(ValueError, match=f"integer class ids.*{labels.dtype}"):
            module(z, labels)


def test_fractional_labels_are_not_truncated_to_a_class():
    module = ProxyAnchorLoss(None, 6, classes=[1, 2, 3, 4])
    z = torch.nn.functional.normalize(torch.randn(4, 6, generator=torch.Generator()), dim=1)
    with pytest.raises(ValueError, match="torch.float32"):
        module(z, torch.tensor([1.5, 2, 3, 4]))
    for fn in (contrastive_loss, triplet_margin_loss, npair_loss, multi_similarity_loss):
        with pytest.raises(ValueError, match="integer class ids"):
            fn(z, torch.tensor([1.5, 1.5, 3.0, 3.0]))


# ---------------------------------------------------------------- CUDA (skipped without one)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("density", [False, True])
@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_on_cuda_matches_cpu_over_training_steps(name, density):
    # Three train-mode steps, so the EMA buffers (density radii, DAAL's class radii) move too.
    def build():
        torch.manual_seed(0)  # the same proxy initialisation on both devices
        return build_loss(name, num_classes=8, embedding_dim=32, density=density).train()

    cpu, gpu = build(), build().cuda()
    for step in range(3):
        z, y = _random_batch(40 + step, n=64, dim=32, classes=8)
        z_cpu = z.float().requires_grad_(True)
        z_gpu = z.float().cuda().requires_grad_(True)
        expected, value = cpu(z_cpu, y), gpu(z_gpu, y.cuda())
        expected.backward()
        value.backward()
        msg = f"{name} density={density} step {step}"
        assert value.device.type == "cuda" and value.dtype == torch.float32, msg
        assert_close(value.cpu(), expected, rtol=1e-4, atol=1e-5, msg=msg)
        assert_close(z_gpu.grad.cpu(), z_cpu.grad, rtol=1e-4, atol=1e-5, msg=msg)
        states = zip(gpu.state_dict().items(), cpu.state_dict().values(), strict=True)
        for (key, ours), theirs in states:
            assert_close(ours.cpu(), theirs, rtol=1e-4, atol=1e-5, msg=f"{msg}: {key}")
        for ours, theirs in zip(gpu.parameters(), cpu.parameters(), strict=True):
            assert_close(ours.grad.cpu(), theirs.grad, rtol=1e-4, atol=1e-5, msg=f"{msg}: grad")
    gpu.eval()  # buffers stay put
    with torch.autocast("cuda", dtype=torch.bfloat16):
        under_autocast = gpu(z_gpu.detach(), y.cuda())
    assert under_autocast.dtype == torch.float32 and torch.isfinite(under_autocast), name

import json
import logging
import math
import os
import signal

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from scipy.stats import entropy
from sklearn.metrics import normalized_mutual_info_score
from torch import nn

from dmlkit.evaluate import (
    _count_search,
    _cpu_search,
    _exact,
    density_metrics,
    embed,
    kmeans,
    knn,
    neighbours,
    normalized_mutual_info,
    retrieval_metrics,
    subcluster_preservation,
)
from dmlkit.losses.density import class_statistics

# ---------------------------------------------------------------- float64 references


def _reference_knn(queries, keys, k, exclude_self):
    """Brute force: float64 (q − k)² summed, sorted by (distance, index)."""
    q = np.asarray(queries, dtype=np.float64)
    x = q if keys is None else np.asarray(keys, dtype=np.float64)
    sq = ((q[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    if keys is None and exclude_self:
        np.fill_diagonal(sq, np.inf)
    order = np.stack([np.lexsort((np.arange(len(x)), row))[:k] for row in sq])
    return np.sqrt(np.take_along_axis(sq, order, 1)), order


def _reference_retrieval(z, y, ks):
    """Loop over queries with the reference kNN order."""
    y = np.asarray(y)
    _, order = _reference_knn(z, None, len(y) - 1, True)
    recalls = {K: [] for K in ks}
    r_prec, map_r = [], []
    for i in range(len(y)):
        rel = y[order[i]] == y[i]
        r = int((y == y[i]).sum()) - 1
        if r == 0:
            continue
        for K in ks:
            recalls[K].append(float(rel[:K].any()))
        r_prec.append(rel[:r].sum() / r)
        precision_at = np.cumsum(rel[:r]) / np.arange(1, r + 1)
        map_r.append((precision_at * rel[:r]).sum() / r)
    out = {f"recall@{K}": np.mean(v) for K, v in recalls.items()}
    out.update(r_precision=np.mean(r_prec), **{"map@r": np.mean(map_r)})
    return out, len(r_prec)


def _clusters(n, dim, num_classes, seed, noise=0.8):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    centers = torch.randn(num_classes, dim, generator=g)
    z = centers[labels] + noise * torch.randn(n, dim, generator=g)
    return nn.functional.normalize(z, dim=1), labels


def _datasets():
    g = torch.Generator().manual_seed(7)
    unit = nn.functional.normalize(torch.randn(600, 16, generator=g), dim=1)
    dups = unit.clone()
    dups[100:140] = dups[3]  # 41 copies: more than the candidates kept per query
    dups[200:205] = dups[250]
    scaled = torch.randn(500, 12, generator=g) * torch.rand(500, 1, generator=g) * 4
    lattice = torch.randint(-2, 3, (500, 6), generator=g).float()  # many exact ties
    return {"unit": unit, "duplicates": dups, "norms": scaled, "lattice": lattice}


DATA = _datasets()

# ---------------------------------------------------------------- knn


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("name", sorted(DATA))
def test_knn_matches_float64_brute_force(name, precision):
    x = DATA[name]
    distances, indices = knn(x, k=9, precision=precision, block_size=128)
    ref_d, ref_i = _reference_knn(x, None, 9, True)
    np.testing.assert_array_equal(indices.numpy(), ref_i)
    np.testing.assert_allclose(distances.numpy(), ref_d, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_knn_queries_against_separate_keys(precision):
    queries, keys = DATA["unit"][:40, :12] * 3, DATA["norms"]
    distances, indices = knn(queries, keys, k=7, precision=precision)
    ref_d, ref_i = _reference_knn(queries, keys, 7, False)
    np.testing.assert_array_equal(indices.numpy(), ref_i)
    np.testing.assert_allclose(distances.numpy(), ref_d, rtol=1e-6)


@pytest.mark.parametrize("margin", [0, 3])
def test_knn_fallbacks_stay_exact_when_few_candidates_are_kept(monkeypatch, caplog, margin):
    # With (almost) no spare candidates most queries fail the certificate and take the
    # fp32 retry and the exhaustive float64 search.
    monkeypatch.setattr(neighbours, "_candidate_count", lambda k, p, n: min(n, k + margin))
    x = DATA["duplicates"]
    with caplog.at_level(logging.DEBUG, logger="dmlkit.evaluate.neighbours"):
        _, indices = knn(x, k=6, precision="bf16")
    assert "exhaustive 0" not in caplog.text  # the last resort was exercised
    np.testing.assert_array_equal(indices.numpy(), _reference_knn(x, None, 6, True)[1])


def test_knn_certifies_most_queries_at_the_first_try(caplog):
    with caplog.at_level(logging.DEBUG, logger="dmlkit.evaluate.neighbours"):
        knn(DATA["unit"], k=5, precision="bf16")
    assert "uncertified 0," in caplog.text


def test_knn_on_worker_threads_is_exact_and_restores_the_thread_count():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _, indices = knn(DATA["duplicates"], k=9, block_size=64)  # 10 blocks, 2 workers
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    np.testing.assert_array_equal(
        indices.numpy(), _reference_knn(DATA["duplicates"], None, 9, True)[1]
    )


def test_knn_hand_computed_line_with_ties():
    # Points on a line at 0, 1, 3, 6, 2 (index 4): from 1, the points 0 and 2 tie.
    x = torch.tensor([[0.0], [1.0], [3.0], [6.0], [2.0]])
    distances, indices = knn(x, k=3)
    assert indices.tolist() == [[1, 4, 2], [0, 4, 2], [4, 1, 0], [2, 4, 1], [1, 2, 0]]
    assert distances[1].tolist() == [1.0, 1.0, 2.0]


def test_duplicates_tie_at_zero_and_self_is_excluded_only_by_index():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.5, 0.5]])
    distances, indices = knn(x, k=2)
    assert indices[:, 0].tolist() == [2, 4, 0, 0, 0]
    assert indices[0].tolist() == [2, 3] and distances[0].tolist() == [0.0, 0.0]
    _, with_self = knn(x, k=3, exclude_self=False)
    assert with_self[3].tolist() == [0, 2, 3]  # the lower-index duplicates come first


def test_negative_zero_equals_positive_zero():
    x = torch.tensor([[0.0, 1.0], [-0.0, 1.0], [3.0, 3.0], [0.0, 1.0]])
    assert _exact.duplicate_representatives(x).tolist() == [0, 0, 2, 0]


def test_knn_keeps_dtype_and_device_and_handles_half_inputs():
    x = DATA["unit"][:50]
    d64, _ = knn(x.double(), k=2)
    d16, i16 = knn(x.half(), k=2)
    assert d64.dtype == torch.float64 and d16.dtype == torch.float32
    assert i16.dtype == torch.int64 and i16.device == x.device
    assert knn(x[:0], x, k=3)[1].shape == (0, 3)


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((torch.zeros(4, 2),), {"k": 4}, "k=4 but only 3 keys"),
        ((torch.zeros(4, 2),), {"k": 0}, "k=0"),
        ((torch.zeros(4, 2), torch.zeros(3, 5)), {"k": 1}, "same width"),
        ((torch.tensor([[0.0, math.nan]]), torch.zeros(3, 2)), {"k": 1}, "NaN"),
        ((torch.zeros(4),), {"k": 1}, "2-D"),
        ((torch.zeros(4, 2),), {"k": 1, "precision": "int8"}, "precision"),
    ],
)
def test_knn_rejects_bad_inputs(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        knn(*args, **kwargs)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_candidate_score_error_stays_within_the_certified_bound(precision):
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(300, 64, generator=g) * torch.rand(300, 1, generator=g) * 3
    queries = torch.randn(50, 64, generator=g)
    index = _exact.build_key_index(keys, precision)
    operand, bound = _exact.query_operand(index, queries)
    approx = _exact.candidate_scores(index, operand, None).double()  # (50, 300)
    q, x = queries.double(), keys.double()
    exact = q @ x.T - (index.sq_norms - index.norm_offset) / 2  # σ, augmented keys
    accumulated_error = (approx - exact).abs()
    output_rounding = index.output_unit * approx.abs() / (1 - index.output_unit)
    assert (accumulated_error <= bound[:, None] + output_rounding).all()
    assert accumulated_error.max() > 0  # the check is not vacuous


def test_an_accumulation_without_a_bound_never_certifies(monkeypatch):
    # bf16 partial sums (cuBLAS' reduced-precision reduction) give n·u ≥ 1: no bound, so
    # every query must fall back rather than pass on a negative "bound".
    monkeypatch.setattr(_exact, "_hardware_units", lambda device, dtype: (0.0, 2.0**-8))
    x = nn.functional.normalize(torch.randn(20, 512), dim=1)
    index = _exact.build_key_index(x, "bf16")
    _, error = _exact.query_operand(index, x[:5])
    assert torch.isinf(error).all()
    assert not _exact.certified(
        index, x[:5].double().pow(2).sum(1), error, x[:5, 0], x[:5, 1]
    ).any()


def test_select_candidates_returns_the_top_scores():
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(20, 3001, generator=g).round(decimals=1)  # many ties
    values, columns = _exact.select_candidates(scores, 40)
    torch.testing.assert_close(values.sort(1).values, scores.topk(40).values.sort(1).values)
    torch.testing.assert_close(scores.gather(1, columns), values)
    assert (columns.sort(1).values.diff(dim=1) > 0).all()  # distinct columns


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_self_query_bounds_from_the_key_index_cover_the_score_error(precision):
    # A self-search takes ||x̃_q|| and ||δx_q|| from the key index (fp32 norms, enlarged).
    g = torch.Generator().manual_seed(3)
    keys = nn.functional.normalize(torch.randn(400, 96, generator=g), dim=1)  # no norm coords
    index = _exact.build_key_index(keys, precision)
    rows = torch.arange(50, 120)
    operand, bound = _exact.query_operand(index, keys[rows], rows)
    _, float64_bound = _exact.query_operand(index, keys[rows])  # norms in float64
    approx = _exact.candidate_scores(index, operand, None).double()  # (70, 400)
    error = (approx - keys[rows].double() @ keys.double().T).abs()
    output_rounding = index.output_unit * approx.abs() / (1 - index.output_unit)
    assert (error <= bound[:, None] + output_rounding).all()
    assert (bound >= float64_bound * (1 - 1e-12)).all()  # fp32: the same norms, rounded


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_knn_threshold_search_with_negative_scores(precision):
    # 1,500 keys (above the dense path's 512) and k = 100 (< M/8): the threshold search.
    # Keys and queries on opposite sides, so that most thresholds are below zero and the
    # selection runs on order-preserving integer keys instead of the raw float bits.
    g = torch.Generator().manual_seed(4)
    shift = torch.zeros(16)
    shift[0] = 4.0
    keys = nn.functional.normalize(torch.randn(1500, 16, generator=g) + shift, dim=1)
    queries = nn.functional.normalize(torch.randn(60, 16, generator=g) - shift, dim=1)
    distances, indices = knn(queries, keys, k=100, precision=precision)
    ref_d, ref_i = _reference_knn(queries, keys, 100, False)
    assert (ref_d[:, -1] ** 2 > 2).mean() > 0.9  # cosine of the 100th neighbour < 0
    np.testing.assert_array_equal(indices.numpy(), ref_i)
    np.testing.assert_allclose(distances.numpy(), ref_d, rtol=1e-6)


def test_sorted_rows_sorts_again_where_shortened_keys_tie():
    # One-ulp steps share a shortened integer key (the last 3 bits hold the position): the
    # reversed row must be sorted again in float64; equal values stay in position order.
    steps = 1.0 + torch.arange(6, dtype=torch.float64) * 2.0**-52
    other = torch.tensor([3.0, 1.0, 2.0, 1.0, 0.5, 4.0], dtype=torch.float64)
    sq = torch.stack([steps.flip(0), steps, other])
    values, positions = _cpu_search.sorted_rows(sq, 4)
    expected = sq.sort(dim=1, stable=True)
    assert torch.equal(positions, expected.indices[:, :4])
    assert torch.equal(values, expected.values[:, :4])


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("name", ["duplicates", "lattice"])
def test_fixed_count_search_of_the_cuda_path_matches_brute_force_on_cpu(name, precision):
    x = DATA[name]
    search = _count_search.CountSearch(
        x, precision, 9, skip_self=True, candidate_count=neighbours._candidate_count
    )
    sq, indices = search.block(x, 0)
    ref_d, ref_i = _reference_knn(x, None, 9, True)
    np.testing.assert_array_equal(indices.numpy(), ref_i)
    np.testing.assert_allclose(sq.sqrt().numpy(), ref_d, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- retrieval metrics


def test_retrieval_metrics_hand_computed():
    # 1-D points; class 9 has one item (skipped). From 1.0 the items 0.0 and 2.0 tie.
    x = torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0], [30.0]])
    y = torch.tensor([0, 1, 0, 1, 1, 9])
    m = retrieval_metrics(x, y, ks=(1, 2), nmi=False)
    # Neighbour orders: 0:[1,2,..] 1:[0,2,..] 2:[1,0,..] 3:[4,2,..] 4:[3,2,..]
    # hits@1: 0:no 1:no 2:no 3:yes 4:yes ; hits within 2: 0:yes 1:no 2:yes 3:yes 4:yes
    assert m["recall@1"] == pytest.approx(2 / 5)
    assert m["recall@2"] == pytest.approx(4 / 5)
    # R: 0:1 1:2 2:1 3:2 4:2. R-precision: 0:0 1:0/2 2:0 3:1/2 4:1/2 ... (see orders)
    # query 1 order [0, 2, 3, 4] → first 2: no hits; query 3 order [4, 2, 1]: 1/2 hit;
    # query 4 order [3, 2, 1]: 1/2 hit.
    assert m["r_precision"] == pytest.approx((0 + 0 + 0 + 0.5 + 0.5) / 5)
    assert m["map@r"] == pytest.approx((0 + 0 + 0 + 0.5 + 0.5) / 5)
    assert (m["num_queries"], m["num_skipped"]) == (5, 1)


@pytest.mark.parametrize("seed", [0, 1])
def test_retrieval_metrics_match_brute_force(seed):
    z, y = _clusters(240, 8, 25, seed)
    z[10] = z[11]  # a duplicate pair
    y[:2] = 99  # …and a class of its own …
    y[2] = 100  # …and a singleton
    m = retrieval_metrics(z, y, ks=(1, 2, 4, 8), nmi=False)
    ref, count = _reference_retrieval(z, y.numpy(), (1, 2, 4, 8))
    for key, value in ref.items():
        assert m[key] == pytest.approx(value, abs=1e-12), key
    assert (m["num_queries"], m["num_skipped"]) == (count, 1)
    assert "nmi" not in m


def test_retrieval_metrics_are_json_floats_in_unit_interval():
    z, y = _clusters(200, 8, 10, 3)
    m = retrieval_metrics(z, y, ks=(1, 4))
    json.dumps(m)
    assert all(0.0 <= v <= 1.0 for k, v in m.items() if not k.startswith("num_"))
    assert isinstance(m["nmi"], float) and isinstance(m["num_queries"], int)


def test_retrieval_metrics_reject_too_large_k():
    with pytest.raises(ValueError, match="ks="):
        retrieval_metrics(torch.zeros(5, 2), torch.arange(5), ks=(1, 5))


# ---------------------------------------------------------------- k-means and NMI


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nmi_matches_sklearn_on_kmeans_labels(seed):
    z, y = _clusters(300, 6, 12, seed, noise=1.5)
    clusters = kmeans(z, 12, seed=seed)
    expected = normalized_mutual_info_score(y.numpy(), clusters.numpy())
    assert normalized_mutual_info(y, clusters) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    ("labels", "clusters"),
    [([0, 0, 0], [5, 5, 5]), ([0, 1, 2], [0, 0, 0]), ([0, 0, 1, 1], [1, 1, 0, 0])],
)
def test_nmi_edge_cases_match_sklearn(labels, clusters):
    expected = normalized_mutual_info_score(labels, clusters)
    assert normalized_mutual_info(np.array(labels), np.array(clusters)) == pytest.approx(
        expected, abs=1e-12
    )


def test_kmeans_is_seeded_and_finds_separated_clusters():
    z, y = _clusters(400, 8, 10, 4, noise=0.05)
    a, b = kmeans(z, 10, seed=3), kmeans(z, 10, seed=3)
    torch.testing.assert_close(a, b)
    assert normalized_mutual_info(y, a) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="num_clusters=401"):
        kmeans(z, 401)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.testing.assert_close(kmeans(z, 10, seed=3), a)  # same on 2 worker threads
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- density diagnostics


def test_density_metrics_match_roth_definitions():
    z, y = _clusters(150, 5, 12, 5)
    z = z * torch.rand(150, 1) * 2  # cosine distances ignore the scale
    y[0] = 50  # a singleton class: no intra distance
    m = density_metrics(z, y)
    zn, yn = z.double().numpy(), y.numpy()
    intra = [
        cdist(zn[yn == c], zn[yn == c], "cosine").sum() / ((yn == c).sum() ** 2 - (yn == c).sum())
        for c in np.unique(yn)
        if (yn == c).sum() > 1
    ]
    means = np.stack([zn[yn == c].mean(0) for c in np.unique(yn)])
    inter_d = cdist(means, means, "cosine")
    inter = inter_d.sum() / (len(means) ** 2 - len(means))
    s = np.linalg.svd(zn, compute_uv=False)
    assert m["pi_intra"] == pytest.approx(np.mean(intra), rel=1e-9)
    assert m["pi_inter"] == pytest.approx(inter, rel=1e-9)
    assert m["pi_ratio"] == pytest.approx(np.mean(intra) / inter, rel=1e-9)
    assert m["spectral_decay"] == pytest.approx(entropy(np.ones(len(s)) / len(s), s / s.sum()))
    stats = class_statistics(z, y)
    assert set(m["relative_density"]) == {c for c in np.unique(yn) if (yn == c).sum() > 1}
    for c, r in m["relative_density"].items():
        assert r == pytest.approx(stats.relative_density[stats.classes == c].item(), rel=1e-5)
    values = list(m["relative_density"].values())
    assert m["relative_density_median"] == pytest.approx(np.median(values), rel=1e-9)
    assert m["relative_density_mean"] == pytest.approx(np.mean(values), rel=1e-9)
    json.dumps(m)


def test_spectral_decay_is_zero_for_an_isotropic_spectrum():
    assert density_metrics(torch.eye(4), torch.tensor([0, 0, 1, 1]))["spectral_decay"] == 0.0


# ---------------------------------------------------------------- sub-clusters


def test_subcluster_preservation_hand_computed():
    # Class 0: modes a a b at 0, 1, 10 → neighbours 1, 0, 1 → hits yes, yes, no.
    # Class 1: modes a b at 100, 101 → neighbours differ in mode. Class 2: singleton.
    x = torch.tensor([[0.0], [1.0], [10.0], [100.0], [101.0], [500.0]])
    y = torch.tensor([0, 0, 0, 1, 1, 2])
    modes = ["a", "a", "b", "a", "b", "a"]
    m = subcluster_preservation(x, y, modes)
    assert m["num_queries"] == 5
    assert m["preservation"] == pytest.approx(2 / 5)
    assert m["chance"] == pytest.approx((0.5 + 0.5 + 0 + 0 + 0) / 5)


def test_subcluster_preservation_matches_brute_force():
    z, y = _clusters(200, 6, 8, 6)
    modes = torch.randint(0, 3, (200,), generator=torch.Generator().manual_seed(0))
    m = subcluster_preservation(z, y, modes)
    zn, yn, mn = z.double().numpy(), y.numpy(), modes.numpy()
    hits, chance = [], []
    for i in range(len(yn)):
        same = np.flatnonzero((yn == yn[i]) & (np.arange(len(yn)) != i))
        if len(same) == 0:
            continue
        d = ((zn[same] - zn[i]) ** 2).sum(1)
        nearest = same[np.lexsort((same, d))[0]]
        hits.append(mn[nearest] == mn[i])
        chance.append(np.mean(mn[same] == mn[i]))
    assert m["preservation"] == pytest.approx(np.mean(hits))
    assert m["chance"] == pytest.approx(np.mean(chance))
    assert m["num_queries"] == len(hits)


# ---------------------------------------------------------------- embed


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.drop = nn.Dropout(0.9)

    def forward(self, x):
        assert not torch.is_grad_enabled()
        return self.drop(self.linear(x))


def test_embed_runs_in_eval_inference_mode_and_restores_training():
    torch.manual_seed(0)
    model = _Toy().train()
    images = torch.randn(10, 3)
    dataset = [(images[i], i % 3, "extra") for i in range(10)]
    embeddings, labels = embed(model, dataset, batch_size=4, progress=False)
    assert model.training
    assert embeddings.dtype == torch.float32 and labels.dtype == torch.int64
    assert embeddings.device.type == "cpu"
    with torch.no_grad():
        expected = model.linear(images)  # dropout off: eval mode was used
    torch.testing.assert_close(embeddings, expected)
    assert labels.tolist() == [i % 3 for i in range(10)]


def test_embed_restores_eval_mode_and_reraises():
    model = _Toy().eval()
    with pytest.raises(RuntimeError):
        embed(model, [(torch.randn(4), 0)], progress=False)  # wrong width
    assert not model.training
    with pytest.raises(ValueError, match="empty"):
        embed(model, [], progress=False)


# ---------------------------------------------------------------- CUDA (skipped without one)

CUDA = torch.device("cuda")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _knn_on_both(*tensors, **options):
    """knn of CPU ``tensors`` and of their CUDA copies; asserts the results agree."""
    cpu_d, cpu_i = knn(*tensors, **options)
    d, i = knn(*(t.to(CUDA) for t in tensors), **options)
    assert d.device.type == i.device.type == CUDA.type
    assert d.dtype == cpu_d.dtype and i.dtype == torch.int64
    # Exact search: the same (distance, index) order on every device, ties included.
    torch.testing.assert_close(i.cpu(), cpu_i, rtol=0, atol=0)
    torch.testing.assert_close(d.cpu(), cpu_d)


@needs_cuda
@pytest.mark.parametrize("tf32", [False, True])
@pytest.mark.parametrize("precision", ["auto", "bf16", "fp32"])
@pytest.mark.parametrize("name", sorted(DATA))
def test_knn_on_cuda_matches_cpu(name, precision, tf32):
    # TF32 rounds the fp32 candidate operands once more; the certificate must allow for it.
    # Saved by hand: monkeypatch cannot undo this flag (a __getattr__, not an attribute).
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        _knn_on_both(DATA[name], k=9, precision=precision, block_size=128)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


@needs_cuda
def test_knn_on_cuda_queries_against_separate_keys_match_cpu():
    _knn_on_both(DATA["unit"][:40, :12] * 3, DATA["norms"], k=7)


@needs_cuda
def test_knn_on_cuda_with_self_included_matches_cpu():
    _knn_on_both(DATA["duplicates"], k=45, exclude_self=False)  # all 41 copies of row 3


@needs_cuda
@pytest.mark.parametrize("name", ["clusters", "lattice"])
def test_retrieval_metrics_on_cuda_match_cpu(name):
    g = torch.Generator().manual_seed(5)
    if name == "lattice":  # many exact distance ties between different vectors
        z = DATA["lattice"]
        y = torch.randint(0, 40, (len(z),), generator=g)
    else:
        z, y = _clusters(300, 16, 30, seed=4)
        z[50:60] = z[7]  # duplicates in other classes: the tie order decides the hits
    expected = retrieval_metrics(z, y, ks=(1, 2, 4, 8), nmi=False)
    got = retrieval_metrics(z.to(CUDA), y.to(CUDA), ks=(1, 2, 4, 8), nmi=False)
    assert got == expected


def test_threaded_block_search_hands_freed_heap_back_once_done(monkeypatch):
    # The worker threads' malloc arenas would otherwise keep every freed temporary, and
    # each evaluation of a training run would start from a higher resident size.
    from dmlkit.evaluate import _exact

    calls = []
    monkeypatch.setattr(_exact, "release_free_heap", lambda: calls.append("trim"))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    seen = []
    _exact.run_blocks(seen.append, range(0, 100, 10), "cpu")
    assert sorted(seen) == list(range(0, 100, 10)) and calls == ["trim"]
    with pytest.raises(ZeroDivisionError):  # also after a failing block
        _exact.run_blocks(lambda start: 1 / 0, range(3), "cpu")
    assert calls == ["trim", "trim"]


def test_block_workers_are_started_once_and_a_small_search_keeps_its_heap(monkeypatch):
    # A fresh thread per search cost more than a whole search at N = 1,000.
    import threading

    from dmlkit.evaluate import _exact

    calls = []
    monkeypatch.setattr(_exact, "release_free_heap", lambda: calls.append("trim"))

    def names(start: int) -> None:
        seen.add(threading.current_thread().ident)

    seen: set[int] = set()
    for _ in range(3):
        _exact.run_blocks(names, range(8), "cpu", workers=2, release=False)
    assert 1 <= len(seen) <= 2 and calls == []  # the same two threads; nothing trimmed


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_block_workers_are_restarted_in_a_forked_child():
    # A child of fork has none of its parent's threads: a pool inherited as-is would hang.
    from dmlkit.evaluate import _exact

    _exact.run_blocks(lambda start: None, range(4), "cpu", workers=2)
    pid = os.fork()
    if pid == 0:  # the child: search, then leave without running pytest's teardown
        code = 1
        try:
            signal.alarm(60)  # a hang ends the child, and the test fails
            x = torch.randn(300, 8)
            knn(x, k=3, block_size=50)
            _exact.run_blocks(lambda start: None, range(4), "cpu", workers=2)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_the_matmul_of_a_one_block_search_gets_every_thread(monkeypatch):
    # Inside a search torch runs on one thread; a single block's matmul takes them all.
    from dmlkit.evaluate import _exact

    seen = []
    real_mm = torch.mm
    monkeypatch.setattr(
        torch, "mm", lambda *a, **kw: (seen.append(torch.get_num_threads()), real_mm(*a, **kw))[1]
    )
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.nn.functional.normalize(torch.randn(600, 16), dim=1)
        knn(x, k=1, precision="fp32")  # 600 × 600 scores: one block
        assert seen and seen[-1] == 2
        seen.clear()
        knn(x, k=1, precision="fp32", block_size=100)  # six blocks on two threads
        assert seen and set(seen) == {1}
        with _exact.coarse_threads(torch.device("cpu")):
            with _exact.intra_op_threads(2):
                assert torch.get_num_threads() == 2
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_release_free_heap_smoke():
    from dmlkit.runtime import _glibc, release_free_heap, settle_heap

    release_free_heap()
    release_free_heap()
    settle_heap()
    settle_heap()  # once per process; again is a no-op
    assert _glibc() is None or hasattr(_glibc(), "malloc_trim")


def test_a_small_search_is_one_block_and_a_larger_one_is_shared_by_the_threads():
    def blocks(n: int, k: int = 5, dim: int = 16, threads: int = 2) -> int:
        keys = torch.nn.functional.normalize(torch.randn(n, dim), dim=1)
        search = _cpu_search.ThresholdSearch(keys, "fp32", k, skip_self=True, max_candidates=400)
        return -(-n // search.default_block(n, threads))

    assert blocks(1000) == 1  # 10^6 scores: a second thread costs more than it saves
    assert blocks(1000, k=100, dim=128) == 2  # unless the float64 re-rank is heavy
    assert blocks(3000) % 2 == 0  # the same number of blocks for each thread

"""Reliability, losses, models and evaluation: no silent wrong result, one clear error for bad
input.

Every case is listed in docs/reliability.md; the tiny real-JPEG runs and helpers are in
``tests/reliability_fixtures.py``.
"""

from __future__ import annotations

import inspect
import math
import re

import pytest
import torch
from torch import Tensor
from torch.testing import assert_close

from dmlkit.losses import (
    build_loss,
    contrastive_loss,
    multi_similarity_loss,
    npair_loss,
    proxy_anchor_loss,
    triplet_margin_loss,
)
from dmlkit.models import build_model
from dmlkit.train import NonFiniteLossError, fit
from tests.reliability_fixtures import (
    tiny,
)

# ---------------------------------------------------------------- evaluation: the stated reason


def test_knn_says_what_is_wrong_with_k_and_answers_no_queries_with_nothing():
    from dmlkit.evaluate import knn

    points = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    for k in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=re.escape(f"k={k!r}: must be a whole number >= 1")):
            knn(points, k=k)
    with pytest.raises(ValueError, match=r"k=5 but only 4 keys per query \(each query excluding"):
        knn(points, k=5)
    with pytest.raises(ValueError, match="k=1 but only 0 keys per query: 0 keys given"):
        knn(points, torch.zeros(0, 3), k=1)
    distances, indices = knn(torch.zeros(0, 3), k=1)  # was "only -1 keys are available"
    assert distances.shape == indices.shape == (0, 1)


@pytest.mark.parametrize(
    ("labels", "ks", "message"),
    [
        (torch.arange(12).view(6, 2) % 3, (1,), r"labels must be 1-D \(N,\), got shape \(6, 2\)"),
        (torch.arange(12) % 2 == 0, (1,), "labels must be integers, got dtype torch.bool"),
        (torch.arange(12) % 3, (1.5,), r"ks must be whole numbers, got \[1.5\]"),
    ],
    ids=["labels (N/2, 2) were flattened", "bool labels were two classes", "K=1.5 was K=1"],
)
def test_retrieval_metrics_refuse_labels_and_ks_they_would_misread(labels, ks, message):
    from dmlkit.evaluate import density_metrics, retrieval_metrics

    z = torch.nn.functional.normalize(torch.randn(12, 4, generator=torch.Generator()), dim=1)
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(z, labels, ks=ks)
    if ks == (1,):
        with pytest.raises(ValueError, match=message):
            density_metrics(z, labels)


def test_density_metrics_name_non_finite_embeddings():
    from dmlkit.evaluate import density_metrics

    z = torch.full((6, 3), math.nan)
    with pytest.raises(ValueError, match="embeddings contain NaN or infinite values"):
        density_metrics(z, torch.arange(6) % 2)  # was a LinAlgError from the SVD


# ---------------------------------------------------------------- losses: no silent wrong result


LOSS_CASES = [
    ("contrastive", {}),
    ("triplet", {"mining": "all"}),
    ("triplet", {"mining": "semihard"}),
    ("triplet", {"mining": "hard"}),
    ("npair", {}),
    ("ms", {}),
    ("proxy_anchor", {}),
    ("daal", {}),
]


LOSS_IDS = [name + "".join(f"-{v}" for v in params.values()) for name, params in LOSS_CASES]


NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def make_loss(name: str, params: dict, density: bool | str, dim: int = 6) -> torch.nn.Module:
    """``build_loss`` for 4 classes; ``density`` False, True or a density target name."""
    target = density if isinstance(density, str) else "ema"
    return build_loss(
        name,
        num_classes=4,
        embedding_dim=dim,
        density=bool(density),
        density_target=target,
        **params,
    ).train()


def loss_batch(dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """12 unit vectors in 6-D and labels 0..3 (three samples per class)."""
    z = torch.randn(12, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return torch.nn.functional.normalize(z, dim=1).to(dtype), torch.arange(12) % 4


@pytest.mark.parametrize("bad", list(NON_FINITE))
@pytest.mark.parametrize("density", [False, True])
@pytest.mark.parametrize(("name", "params"), LOSS_CASES, ids=LOSS_IDS)
def test_every_loss_is_nan_for_a_nan_or_infinite_embedding(name, params, density, bad):
    loss = make_loss(name, params, density)
    z, y = loss_batch()
    one = z.clone()
    one[3, 1] = NON_FINITE[bad]  # one entry of one sample
    every = torch.full_like(z, NON_FINITE[bad])  # all-NaN contrastive was 0.25, triplet 0.2
    for embeddings in (one, every):
        value = loss(embeddings.requires_grad_(), y)
        assert value.dim() == 0 and not torch.isfinite(value), f"{value} for {bad} embeddings"


def test_the_pure_losses_are_nan_for_a_nan_embedding():
    z, y = loss_batch()
    z[5, 0] = math.nan
    proxies = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    values = [fn(z, y) for fn in (contrastive_loss, npair_loss, multi_similarity_loss)]
    values += [triplet_margin_loss(z, y, mining=mining) for mining in ("all", "semihard", "hard")]
    values.append(proxy_anchor_loss(z, y, proxies))
    assert all(torch.isnan(value) for value in values), values


@pytest.mark.parametrize(
    "fn", [contrastive_loss, triplet_margin_loss, npair_loss, multi_similarity_loss]
)
def test_the_nan_guard_leaves_a_finite_loss_and_its_gradient_bit_for_bit(fn):
    z, y = loss_batch()
    guarded = z.clone().requires_grad_()
    bare = z.clone().requires_grad_()
    value = fn(guarded, y)
    expected = inspect.unwrap(fn)(bare, y)  # the loss body, without validation or guard
    value.backward()
    expected.backward()
    assert torch.equal(value, expected) and torch.equal(guarded.grad, bare.grad)


BAD_LOSS_INPUTS = {
    "labels (B, 1)": (
        lambda z, y: (z, y[:, None]),
        r"labels must be 1-D \(B,\), got shape \(12, 1\) \(flatten them: labels.view\(-1\)\)",
    ),
    "labels (B, 2)": (lambda z, y: (z, y.repeat(2, 1).T), r"labels must be 1-D \(B,\)"),
    "1-D embeddings": (
        lambda z, y: (z[:, 0], y),
        r"embeddings must be 2-D \(B, D\) with D >= 1, got shape \(12,\); one embedding is",
    ),
    "3-D embeddings": (lambda z, y: (z[None], y), r"got shape \(1, 12, 6\)"),
    "no columns": (lambda z, y: (z[:, :0], y), r"D >= 1, got shape \(12, 0\)"),
    "shorter labels": (lambda z, y: (z, y[:10]), "embeddings have 12 rows but labels has 10"),
    "longer labels": (lambda z, y: (z[:10], y), "embeddings have 10 rows but labels has 12"),
    "integer embeddings": (lambda z, y: (z.long(), y), "must be floating .* got dtype torch.int64"),
    "complex embeddings": (lambda z, y: (z.cfloat(), y), "got dtype torch.complex64"),
    "numpy embeddings": (lambda z, y: (z.numpy(), y), "embeddings must be a torch.Tensor"),
    "list labels": (
        lambda z, y: (z, y.tolist()),
        r"labels must be a torch.Tensor \(B,\), got list",
    ),
}


@pytest.mark.parametrize("density", [False, True])
@pytest.mark.parametrize("case", list(BAD_LOSS_INPUTS))
@pytest.mark.parametrize(("name", "params"), LOSS_CASES, ids=LOSS_IDS)
def test_bad_loss_inputs_are_one_value_error_saying_what_is_wrong(name, params, density, case):
    make, message = BAD_LOSS_INPUTS[case]
    loss = make_loss(name, params, density)
    before = {key: value.clone() for key, value in loss.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        loss(*make(*loss_batch()))
    after = loss.state_dict()
    assert all(torch.equal(after[key], value) for key, value in before.items())  # no EMA step


@pytest.mark.parametrize(
    "fn", [contrastive_loss, triplet_margin_loss, npair_loss, multi_similarity_loss]
)
def test_the_pure_losses_check_their_inputs_too(fn):
    z, y = loss_batch()
    with pytest.raises(ValueError, match="embeddings have 12 rows but labels has 11"):
        fn(z, y[:11])
    with pytest.raises(ValueError, match=r"labels must be 1-D"):
        fn(z, y[:, None])


@pytest.mark.parametrize("density", [False, True])
@pytest.mark.parametrize("name", ["proxy_anchor", "daal"])
def test_a_stateful_loss_names_the_embedding_width_it_was_built_with(name, density):
    loss = make_loss(name, {}, density, dim=6)
    z, y = loss_batch()
    with pytest.raises(ValueError, match="D = 5 columns but this loss was built with embedding_d"):
        loss(z[:, :5], y)
    proxies = torch.randn(4, 6)
    with pytest.raises(ValueError, match="D = 5 columns .* embedding_dim=6"):
        proxy_anchor_loss(z[:, :5], y, proxies)


@pytest.mark.parametrize("density", [False, "ema", "learned"])
@pytest.mark.parametrize(("name", "params"), LOSS_CASES, ids=LOSS_IDS)
def test_float64_embeddings_are_accepted_by_every_loss(name, params, density):
    z, y = loss_batch(torch.float64)
    single, double = make_loss(name, params, density), make_loss(name, params, density)
    wide = z.clone().requires_grad_()
    value = double(wide, y)
    assert value.dtype == torch.float64
    assert_close(value.float(), single(z.float(), y), rtol=1e-4, atol=1e-5)
    value.backward()
    assert torch.isfinite(wide.grad).all() and wide.grad.abs().sum() > 0
    for parameter in double.parameters():  # proxies, vertices and θ stay fp32 and get a gradient
        assert parameter.dtype == torch.float32 and torch.isfinite(parameter.grad).all()


NAN_LOSSES = ["contrastive", "triplet", "npair", "ms", "proxy_anchor", "daal"]


@pytest.mark.parametrize("bad", ["nan", "inf"])
@pytest.mark.parametrize("loss", NAN_LOSSES)
def test_training_on_non_finite_embeddings_stops_with_non_finite_loss_error(
    tmp_path, tree, monkeypatch, loss, bad
):
    import dmlkit.train.loop as loop

    armed = {"on": False}

    def poisoned_model(*args, **kwargs):
        model = build_model(*args, **kwargs)

        def hook(module, inputs, output):
            if not armed["on"]:
                return output
            output = output.clone()
            output[0, 0] = NON_FINITE[bad]  # one sample's embedding, as a bad image would
            return output

        model.register_forward_hook(hook)
        return model

    def arm(epoch: int, step: int) -> None:
        armed["on"] = True  # from the second step on

    monkeypatch.setattr(loop, "build_model", poisoned_model)
    density = bad == "inf"  # every loss once without and once with the regularizer
    cfg = tiny(tree, tmp_path / "run", loss=loss, density=density, epochs=1)
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step 2/2: loss=nan"):
        fit(cfg, on_step=arm)
    assert not (tmp_path / "run" / "metrics.json").exists()


# ---------------------------------------------------------------- further probes (issue 14)


@pytest.mark.parametrize("name", ["proxy_anchor", "daal"])
@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ({"embedding_dim": -1}, "embedding_dim must be a whole number >= 1, got -1"),
        ({"embedding_dim": 8.5}, "embedding_dim must be a whole number >= 1, got 8.5"),
        ({"embedding_dim": 0}, "embedding_dim must be a whole number >= 1, got 0"),
        ({"num_classes": 2.5}, "num_classes must be a whole number >= 1, got 2.5"),  # 3 classes
    ],
)
def test_build_loss_refuses_sizes_a_stateful_loss_cannot_have(name, sizes, message):
    with pytest.raises(ValueError, match=message):
        build_loss(name, **{"num_classes": 3, "embedding_dim": 4, **sizes})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"embedding_dim": 8.5}, "embedding_dim must be a whole number >= 1, got 8.5"),
        ({"embedding_dim": True}, "embedding_dim must be a whole number >= 1, got True"),
        ({"pretrained": "no"}, "pretrained must be True or False, got 'no'"),
        ({"backbone": ["glyphnet"]}, r"unknown backbone \['glyphnet'\]"),
    ],
)
def test_build_model_says_what_is_wrong_with_its_arguments(kwargs, message):
    arguments = {"backbone": "glyphnet", **kwargs}
    with pytest.raises(ValueError, match=message):
        build_model(arguments.pop("backbone"), **arguments)


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [((2, 3, 32, 32), torch.uint8), ((2, 1, 32, 32), torch.float32), ((3, 32, 32), torch.float32)],
)
def test_the_model_names_images_it_cannot_embed(shape, dtype):
    model = build_model("glyphnet", embedding_dim=8)
    with pytest.raises(ValueError, match=r"images must be a floating \(B, 3, H, W\) tensor"):
        model(torch.zeros(shape, dtype=dtype))

"""Models: shapes and unit norm, fp32 head under autocast, frozen BN, local-only weights."""

import socket
import urllib.request
import warnings

import pytest
import torch
import torchvision
from torch import nn

from dmlkit.models import BACKBONES, build_model, pretrained_weights_path


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_every_backbone_gives_unit_norm_embeddings(backbone):
    torch.manual_seed(0)
    model = build_model(backbone, embedding_dim=16)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    for mode in (True, False):
        model.train(mode)
        embeddings = model(images)
        assert embeddings.shape == (2, 16) and embeddings.dtype == torch.float32
        torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(2))


def test_glyphnet_trains_and_backbone_head_split():
    torch.manual_seed(0)
    model = build_model("glyphnet", embedding_dim=8)
    assert isinstance(model.head, nn.Linear) and model.head.in_features == 256
    n_backbone = sum(p.numel() for p in model.backbone.parameters())
    n_head = sum(p.numel() for p in model.head.parameters())
    assert n_backbone + n_head == sum(p.numel() for p in model.parameters())
    images = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    model(images).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_head_and_normalisation_stay_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    model = build_model("glyphnet", embedding_dim=8).eval()
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        embeddings = model(images)
    assert embeddings.dtype == torch.float32
    # Exactly unit norm to fp32 precision, which a bf16 head could not give (~3 digits).
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(4), atol=1e-6, rtol=0)
    reference = model(images)
    assert (embeddings - reference).abs().max() < 0.05


def test_freeze_bn_keeps_statistics_and_affine_fixed():
    torch.manual_seed(0)
    model = build_model("glyphnet", embedding_dim=8, freeze_bn=True)
    model.train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    assert all(not p.requires_grad for m in bns for p in m.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    images = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 3 + 1
    model(images).sum().backward()
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    # Without freeze_bn the same forward does move the running statistics.
    torch.manual_seed(0)
    free = build_model("glyphnet", embedding_dim=8).train()
    free(images)
    assert not torch.equal(free.state_dict()["backbone.1.running_mean"], torch.zeros(32))


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_pretrained_missing_warns_once_and_falls_back_to_random(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert pretrained_weights_path("resnet18") == expected
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = build_model("resnet18", embedding_dim=8, pretrained=True)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1
    assert str(expected) in messages[0] and "resnet18-f37072fd.pth" in messages[0]
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 8)


@pytest.mark.parametrize("backbone", ["resnet18", "googlenet"])
def test_pretrained_loads_weights_from_the_local_cache(tmp_path, monkeypatch, no_network, backbone):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(123)
    if backbone == "googlenet":  # torchvision's file holds the auxiliary heads too
        reference = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True)
    else:
        reference = torchvision.models.resnet18(weights=None)
    path = pretrained_weights_path(backbone)
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = build_model(backbone, embedding_dim=8, pretrained=True)
    loaded = model.backbone.state_dict()
    saved = reference.state_dict()
    assert loaded and all(torch.equal(value, saved[key]) for key, value in loaded.items())
    assert not any(key.startswith(("fc.", "aux")) for key in loaded)


def test_corrupt_weights_file_is_a_clear_error(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = pretrained_weights_path("resnet18")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="resnet18-f37072fd.pth"):
        build_model("resnet18", pretrained=True)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"backbone": "alexnet"}, "valid: glyphnet"),
        ({"backbone": "glyphnet", "pretrained": True}, "pretrained=True works with"),
        ({"backbone": "glyphnet", "embedding_dim": 0}, "embedding_dim"),
    ],
)
def test_build_model_errors(kwargs, match):
    backbone = kwargs.pop("backbone")
    with pytest.raises(ValueError, match=match):
        build_model(backbone, **kwargs)

"""Backbones and the embedding head: images (B, 3, H, W) → L2-normalized embeddings (B, D).

``build_model(backbone, embedding_dim=..., pretrained=..., freeze_bn=...)`` wraps a
feature extractor (``model.backbone``, images → (B, F)) and a linear head
(``model.head``, F → D) followed by L2 normalisation. The training loop gives the two
parts different learning rates, so they are separate attributes.

ImageNet weights are read **only** from the local torchvision cache
(``$TORCH_HOME/hub/checkpoints/<file>``, see :func:`pretrained_weights_path`). dmlkit
never downloads: a missing file gives one warning naming the file and where it goes,
then the backbone keeps its random initialisation.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

logger = logging.getLogger(__name__)

BACKBONES: dict[str, str] = {
    "glyphnet": "4-block CNN for 64 px glyphs (256 features; ~17 MMAC/image at 64 px)",
    "googlenet": "torchvision GoogLeNet / Inception v1 (1024 features; DML-DA default)",
    "vgg19": "torchvision VGG-19 up to fc7 (4096 features; DAAL default)",
    "resnet18": "torchvision ResNet-18 (512 features)",
    "resnet50": "torchvision ResNet-50 (2048 features)",
}

# torchvision weight enums whose files may sit in the local cache (file name = URL basename).
_WEIGHTS = {
    "googlenet": "GoogLeNet_Weights.IMAGENET1K_V1",
    "vgg19": "VGG19_Weights.IMAGENET1K_V1",
    "resnet18": "ResNet18_Weights.IMAGENET1K_V1",
    "resnet50": "ResNet50_Weights.IMAGENET1K_V2",
}


class EmbeddingModel(nn.Module):
    """``backbone`` (images → (B, F)) → ``head`` (linear F → D) → L2-normalize.

    With ``freeze_bn`` every BatchNorm layer of the backbone stays in eval mode (running
    statistics fixed) and its affine parameters have ``requires_grad=False``, also after
    ``model.train()``.
    """

    def __init__(
        self, backbone: nn.Module, feature_dim: int, embedding_dim: int, *, freeze_bn: bool = False
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, embedding_dim)
        self.freeze_bn = freeze_bn
        if freeze_bn:
            for module in _batchnorms(self.backbone):
                module.requires_grad_(False)
        self.train()

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) floating images → (B, D) unit-norm float32 embeddings."""
        # Shape and dtype only (no host sync): uint8 or one-channel images otherwise fail
        # deep in the first convolution with a message about its weights.
        if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(
                f"images must be a floating (B, 3, H, W) tensor (the dataset transforms give "
                f"one), got shape {tuple(images.shape)} and dtype {images.dtype}"
            )
        features = self.backbone(images)  # (B, F), bf16/fp16 under autocast
        # Head and normalisation in fp32 even under autocast: a bf16 unit vector carries
        # ~3 significant digits, too few for losses that compare distances near 0.
        with torch.autocast(images.device.type, enabled=False):
            embeddings = self.head(features.float())  # (B, D)
        return F.normalize(embeddings, dim=1)

    def train(self, mode: bool = True) -> EmbeddingModel:
        super().train(mode)
        if self.freeze_bn:
            for module in _batchnorms(self.backbone):
                module.eval()
        return self


def build_model(
    backbone: str,
    *,
    embedding_dim: int = 512,
    pretrained: bool = False,
    freeze_bn: bool = False,
) -> EmbeddingModel:
    """An :class:`EmbeddingModel` with the named backbone (see ``BACKBONES``).

    Args:
        backbone: a key of ``BACKBONES``.
        embedding_dim: D, the output size of the linear head.
        pretrained: load torchvision's ImageNet weights from the local cache (never
            downloaded); a missing file warns and keeps the random initialisation.
        freeze_bn: keep BatchNorm statistics and affine parameters fixed.
    Returns: the model, in train mode, on the CPU; initialised from torch's global RNG
        (seed it, e.g. with ``dmlkit.runtime.seed_everything``, for reproducible runs).
    """
    if not isinstance(backbone, str) or backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; valid: {', '.join(BACKBONES)}")
    if isinstance(embedding_dim, bool) or not isinstance(embedding_dim, int) or embedding_dim < 1:
        raise ValueError(f"embedding_dim must be a whole number >= 1, got {embedding_dim!r}")
    for name, flag in (("pretrained", pretrained), ("freeze_bn", freeze_bn)):
        if not isinstance(flag, bool):  # "no" would be true
            raise ValueError(f"{name} must be True or False, got {flag!r}")
    if pretrained and backbone not in _WEIGHTS:
        raise ValueError(
            f"no ImageNet weights exist for {backbone!r}; pretrained=True works with: "
            f"{', '.join(_WEIGHTS)}"
        )
    features, feature_dim = _BUILDERS[backbone](pretrained)
    return EmbeddingModel(features, feature_dim, embedding_dim, freeze_bn=freeze_bn)


def pretrained_weights_path(backbone: str) -> Path:
    """Where ``pretrained=True`` looks for the ImageNet weights of ``backbone``.

    ``$TORCH_HOME/hub/checkpoints/<torchvision file name>`` (``torch.hub.get_dir()``), the
    file torchvision itself would download, e.g. ``resnet18-f37072fd.pth``.
    """
    if backbone not in _WEIGHTS:
        raise ValueError(f"no ImageNet weights for {backbone!r}; known: {', '.join(_WEIGHTS)}")
    url = torchvision.models.get_weight(_WEIGHTS[backbone]).url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def glyphnet() -> tuple[nn.Module, int]:
    """A small CNN for 64 px glyphs → (B, 256) features.

    A stride-2 stem and a max-pool bring 64 px to 16 px before the three wider blocks,
    so most of the compute runs at 16/8/4 px: about 17 MMAC per 64 px image, an
    optimizer step on 32×4 images in ~0.1–0.3 s on one CPU core.
    """
    layers: list[nn.Module] = [*_conv_bn_relu(3, 32, stride=2), nn.MaxPool2d(2)]  # 64 → 16 px
    for c_in, c_out, pool in ((32, 64, True), (64, 128, True), (128, 256, False)):
        layers += _conv_bn_relu(c_in, c_out)
        if pool:
            layers.append(nn.MaxPool2d(2))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    network = nn.Sequential(*layers)
    for module in network.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return network, 256


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
    return [conv, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def _glyphnet(pretrained: bool) -> tuple[nn.Module, int]:
    return glyphnet()


def _googlenet(pretrained: bool) -> tuple[nn.Module, int]:
    # As torchvision does for its weights: the ported TF weights expect transform_input
    # and the checkpoint holds the auxiliary heads, dropped after loading.
    model = torchvision.models.googlenet(
        weights=None, aux_logits=pretrained, transform_input=pretrained, init_weights=True
    )
    if pretrained and not _load_cached_weights(model, "googlenet"):
        model.transform_input = False  # random weights: no TF-style input conversion
    model.aux_logits, model.aux1, model.aux2 = False, None, None
    model.fc = nn.Identity()
    return model, 1024


def _vgg19(pretrained: bool) -> tuple[nn.Module, int]:
    model = torchvision.models.vgg19(weights=None)
    if pretrained:
        _load_cached_weights(model, "vgg19")
    # Up to fc7 (Linear → ReLU → Dropout): drop only the 1000-way classifier.
    model.classifier = nn.Sequential(*list(model.classifier.children())[:-1])
    return model, 4096


def _resnet(name: str, feature_dim: int) -> Callable[[bool], tuple[nn.Module, int]]:
    def build(pretrained: bool) -> tuple[nn.Module, int]:
        model = getattr(torchvision.models, name)(weights=None)
        if pretrained:
            _load_cached_weights(model, name)
        model.fc = nn.Identity()
        return model, feature_dim

    return build


_BUILDERS: dict[str, Callable[[bool], tuple[nn.Module, int]]] = {
    "glyphnet": _glyphnet,
    "googlenet": _googlenet,
    "vgg19": _vgg19,
    "resnet18": _resnet("resnet18", 512),
    "resnet50": _resnet("resnet50", 2048),
}


def _load_cached_weights(model: nn.Module, backbone: str) -> bool:
    """Load the cached ImageNet weights into ``model``; warn and return False if absent."""
    path = pretrained_weights_path(backbone)
    if not path.is_file():
        url = torchvision.models.get_weight(_WEIGHTS[backbone]).url
        warnings.warn(
            f"ImageNet weights for {backbone} not found at {path}; using random "
            f"initialisation. dmlkit never downloads: fetch {url} and save it as {path} "
            "(the folder is $TORCH_HOME/hub/checkpoints, default ~/.cache/torch/hub/checkpoints).",
            UserWarning,
            stacklevel=4,
        )
        return False
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as error:  # any unreadable/foreign file: name it, not a deep trace
        raise ValueError(
            f"cannot load ImageNet weights for {backbone} from {path} ({error}); delete or "
            f"replace the file with {torchvision.models.get_weight(_WEIGHTS[backbone]).url}"
        ) from error
    logger.info("loaded ImageNet weights for %s from %s", backbone, path)
    return True


def _batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

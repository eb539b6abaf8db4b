"""``TrainConfig``: every choice of one training run, validated before anything is built."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import os
import textwrap
import typing
from dataclasses import dataclass, field
from typing import Any

import torch

AMP_MODES = ("off", "bf16", "fp16")
OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("constant", "cosine")
EVAL_SPLITS = ("test", "validation")
# Configuration fields that may change between a run and its resumption: they do not
# affect the trained weights (or, for epochs, only extend the run; not under a cosine
# schedule, whose curve depends on the number of epochs).
RESUMABLE_CHANGES = frozenset(
    {
        "epochs",
        "eval_every",
        "eval_ks",
        "num_workers",
        "device",
        "out_dir",
        "resume",
        "overwrite",
        "progress",
        "data_root",
        "batch_size_eval",
        "compile",
        "label",
    }
)


@dataclass(frozen=True)
class TrainConfig:
    """One training run: data, model, loss, optimisation, evaluation and output.

    Defaults are the glyphs-mini demo on a CPU (a few tens of seconds on one core).
    Paper protocols (docs/methods.md, "Training protocol") are set by the notebooks' parameters.
    """

    dataset: str = "glyphs-mini"
    """Dataset name for ``dmlkit.data.get_dataset``: glyphs, glyphs-mini, cub200, cars196,
    sop or folder."""
    data_root: str | None = None
    """The dataset's own folder; None: ``$DMLKIT_DATA/<dataset folder>`` (glyphs need none)."""
    dataset_options: dict = field(default_factory=dict)
    """Extra keyword options for ``get_dataset`` (glyphs: size, seed, augmentation knobs)."""
    backbone: str = "glyphnet"
    """Backbone name (``dmlkit.models.BACKBONES``): glyphnet, googlenet, vgg19, resnet18,
    resnet50."""
    embedding_dim: int = 128
    """Size D of the L2-normalized embedding (the linear head's output)."""
    pretrained: bool = False
    """Start from torchvision ImageNet weights found in the local cache (never downloaded)."""
    freeze_bn: bool = False
    """Keep BatchNorm statistics and affine parameters fixed during training."""
    loss: str = "triplet"
    """Loss name (``dmlkit.losses.LOSSES``): contrastive, triplet, npair, ms, proxy_anchor,
    daal."""
    loss_params: dict = field(default_factory=dict)
    """Loss hyper-parameters passed to ``build_loss`` (e.g. {"margin": 0.2})."""
    density: bool = False
    """Add the density-adaptive regularizer (DML-DA) to the loss."""
    density_weight: float = 0.03
    """Weight λ of the density regularizer (0.03: the highest mean validation Recall@1 of
    the `ema` target in notebooks/sweeps/density_ablation.yaml, 5 seeds; λ = 1 collapses
    triplet training there)."""
    density_target: str = "ema"
    """Target τ of the density regularizer: ema, batch, fixed or learned."""
    density_options: dict = field(default_factory=dict)
    """Further keywords of the density regularizer (tau, alpha, momentum, beta)."""
    p: int = 32
    """Classes per batch (P of the P×K sampler; N-pair uses P pairs)."""
    k: int = 4
    """Images per class in a batch (K of the P×K sampler; 2 for N-pair)."""
    num_batches: int | None = None
    """Batches per epoch; None: the sampler's default (about one pass over the images)."""
    epochs: int = 5
    """Training epochs (0 evaluates the untrained model)."""
    optimizer: str = "adam"
    """Optimizer: adam, adamw or sgd (momentum 0.9, Nesterov)."""
    lr: float = 1e-3
    """Learning rate of the embedding head; the other groups are multiples of it."""
    lr_backbone_mult: float = 1.0
    """Backbone learning rate = lr × this (e.g. 0.1 for pretrained backbones)."""
    lr_loss_mult: float = 10.0
    """Learning rate of the loss's own parameters (proxies, DAAL vertices) = lr × this."""
    lr_schedule: str = "constant"
    """Learning-rate schedule over the epochs: constant or cosine (decay to 0, per step)."""
    weight_decay: float = 0.0
    """Weight decay of the backbone and head (loss parameters are never decayed)."""
    grad_clip: float = 0.0
    """Clip the gradient norm of the model and loss parameters to this; 0: no clipping."""
    amp: str = "off"
    """Mixed precision around the backbone: off, bf16 (CPU and CUDA) or fp16 (with a
    gradient scaler). Losses always run in fp32."""
    channels_last: bool = True
    """Channels-last memory format for the model and images: faster convolutions with
    oneDNN on CPUs (glyphnet: ~1.3x training, ~2x evaluation) and with AMP on GPUs."""
    compile: bool = False
    """Wrap the model in ``torch.compile``."""
    deterministic: bool = True
    """On CUDA: deterministic cuDNN kernels, no autotuning and PyTorch's deterministic
    algorithms (bit-reproducible runs; ``dmlkit.runtime.cuda_kernel_choice``)."""
    num_workers: int = 0
    """DataLoader worker processes (0: load in the training process)."""
    batch_size_eval: int = 256
    """Batch size when embedding the evaluation sets."""
    eval_every: int = 1
    """Evaluate on the test split every this many epochs (0: only after the last epoch)."""
    eval_ks: tuple | None = None
    """K values of Recall@K; None: (1, 10, 100, 1000) for sop and glyphs, else (1, 2, 4, 8)."""
    eval_split: str = "test"
    """What the run is evaluated on: "test" (the test classes) or "validation" (held-out
    training classes, for choosing a variant or a weight without seeing the test classes;
    the run then trains on the other training classes)."""
    validation_fraction: float = 0.2
    """Share of the training classes held out when ``eval_split`` is "validation"."""
    validation_seed: int = 0
    """Seed of the validation classes: fixed across run seeds, so variants compare on the
    same classes."""
    seed: int = 0
    """Seed of model initialisation, batch sampling and augmentation."""
    label: str = ""
    """A name for this configuration in result tables (e.g. a loss variant in a sweep);
    recorded in metrics.json, ignored by training."""
    device: str | None = None
    """Device (e.g. "cpu", "cuda:1"); None: cuda → mps → cpu. Under torchrun each rank
    uses cuda:LOCAL_RANK when CUDA is available."""
    out_dir: str | None = None
    """Run folder for metrics.json, embeddings.npz and checkpoint.pt; None: write nothing."""
    resume: bool = False
    """Continue from ``out_dir/checkpoint.pt`` when it exists (else start from scratch; a
    folder with metrics.json or embeddings.npz but no checkpoint then needs ``overwrite``)."""
    overwrite: bool = False
    """Start over in an ``out_dir`` that holds a run's files (checkpoint.pt, metrics.json,
    embeddings.npz), each replaced when the new run writes its own; without it (or resume)
    such a folder is refused, naming the files."""
    progress: bool = True
    """Show a tqdm progress bar per epoch."""

    def __post_init__(self) -> None:
        _normalise(self)
        problems = _type_problems(self) or _value_problems(self)
        if problems:
            raise ValueError("invalid TrainConfig:\n  " + "\n  ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """Plain-type dict of every field (JSON- and ``torch.load(weights_only)``-safe)."""
        return dataclasses.asdict(self)


def resolve_eval_ks(cfg: TrainConfig) -> tuple[int, ...]:
    """``cfg.eval_ks``, or the dataset's customary Recall@K values when it is None."""
    if cfg.eval_ks is not None:
        return tuple(cfg.eval_ks)
    return (1, 10, 100, 1000) if cfg.dataset in ("sop", "glyphs") else (1, 2, 4, 8)


def field_docs(cls: type = TrainConfig) -> dict[str, str]:
    """Field name → its attribute docstring (the string literal right under the field)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, following in zip(body, body[1:], strict=False):
        is_doc = isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
        if isinstance(node, ast.AnnAssign) and is_doc and isinstance(following.value.value, str):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _normalise(cfg: TrainConfig) -> None:
    # Friendly input forms (paths, lists from YAML/JSON) become the canonical plain types,
    # so configs compare equal and serialise the same way.
    for name in ("data_root", "out_dir"):
        value = getattr(cfg, name)
        if isinstance(value, os.PathLike):
            object.__setattr__(cfg, name, os.fspath(value))
    if isinstance(cfg.eval_ks, list):
        object.__setattr__(cfg, "eval_ks", tuple(cfg.eval_ks))


def _type_problems(cfg: TrainConfig) -> list[str]:
    hints = typing.get_type_hints(TrainConfig)
    problems = []
    for item in dataclasses.fields(cfg):
        value, allowed = getattr(cfg, item.name), _allowed_types(hints[item.name])
        # bool is an int subclass: True must not pass as an epoch count.
        wrong_bool = isinstance(value, bool) and bool not in allowed
        if wrong_bool or not isinstance(value, allowed):
            expected = " or ".join(t.__name__ for t in allowed)
            problems.append(f"{item.name}: expected {expected}, got {value!r}")
    return problems


def _allowed_types(hint: Any) -> tuple[type, ...]:
    args = typing.get_args(hint) or (hint,)
    allowed = tuple(typing.get_origin(a) or a for a in args)
    return (*allowed, int) if float in allowed else allowed


def _value_problems(cfg: TrainConfig) -> list[str]:
    from dmlkit.models import BACKBONES

    problems = _name_problems(cfg) + _size_problems(cfg)
    if cfg.pretrained and cfg.backbone == "glyphnet":
        problems.append(
            f"pretrained: no ImageNet weights for glyphnet; valid backbones: "
            f"{', '.join(b for b in BACKBONES if b != 'glyphnet')}"
        )
    if cfg.eval_ks is not None and (
        not cfg.eval_ks
        or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in cfg.eval_ks)
    ):
        problems.append(f"eval_ks: expected a non-empty tuple of positive ints, got {cfg.eval_ks}")
    if cfg.device is not None:
        try:
            torch.device(cfg.device)
        except RuntimeError:
            problems.append(
                f"device: {cfg.device!r} is not a torch device (cpu, cuda, cuda:0, mps)"
            )
    if cfg.out_dir is not None and not cfg.out_dir.strip():
        problems.append(
            "out_dir: an empty path would write into the working folder; None writes nothing"
        )
    if cfg.resume and cfg.out_dir is None:
        problems.append("resume: needs out_dir (the folder holding checkpoint.pt)")
    if cfg.overwrite and cfg.out_dir is None:
        problems.append("overwrite: needs out_dir (the folder whose files it replaces)")
    return problems or _loss_problems(cfg)


def _name_problems(cfg: TrainConfig) -> list[str]:
    from dmlkit.data import DATASETS
    from dmlkit.losses import LOSSES
    from dmlkit.models import BACKBONES

    choices = {
        "dataset": DATASETS,
        "backbone": BACKBONES,
        "loss": LOSSES,
        "amp": AMP_MODES,
        "optimizer": OPTIMIZERS,
        "lr_schedule": LR_SCHEDULES,
        "eval_split": EVAL_SPLITS,
    }
    return [
        f"{name}: unknown value {getattr(cfg, name)!r}; valid: {', '.join(valid)}"
        for name, valid in choices.items()
        if getattr(cfg, name) not in valid
    ]


def _size_problems(cfg: TrainConfig) -> list[str]:
    minimum = {
        "embedding_dim": 2,  # L2-normalised, a 1-D embedding is ±1: half the items tie
        "p": 2,
        "k": 1,
        "epochs": 0,
        "num_workers": 0,
        "batch_size_eval": 1,
        "eval_every": 0,
        "seed": 0,
        "validation_seed": 0,
    }
    problems = [
        f"{name}: must be >= {low}, got {getattr(cfg, name)}"
        for name, low in minimum.items()
        if getattr(cfg, name) < low
    ]
    if cfg.num_batches is not None and cfg.num_batches < 1:
        problems.append(f"num_batches: must be >= 1 or None, got {cfg.num_batches}")
    if not 0 < cfg.validation_fraction < 1:
        problems.append(f"validation_fraction: must be in (0, 1), got {cfg.validation_fraction}")
    for name in ("lr", "lr_loss_mult"):
        if not getattr(cfg, name) > 0:
            problems.append(f"{name}: must be > 0, got {getattr(cfg, name)}")
    for name in ("lr_backbone_mult", "weight_decay", "density_weight", "grad_clip"):
        if not getattr(cfg, name) >= 0:
            problems.append(f"{name}: must be >= 0, got {getattr(cfg, name)}")
    for name in ("lr", "lr_loss_mult", "lr_backbone_mult", "weight_decay", "density_weight"):
        if getattr(cfg, name) == math.inf:  # the first step would make every weight NaN
            problems.append(f"{name}: must be finite, got inf")
    return problems


def _loss_problems(cfg: TrainConfig) -> list[str]:
    # A throw-away 2-class instance checks the hyper-parameter names and values now,
    # rather than after the dataset has been rendered and the model built.
    from dmlkit.losses import build_loss

    try:
        build_loss(cfg.loss, **loss_kwargs(cfg, classes=[0, 1]))
    except (TypeError, ValueError) as error:
        return [f"loss_params/density options for {cfg.loss!r}: {error}"]
    return []


def loss_kwargs(cfg: TrainConfig, *, classes: Any) -> dict[str, Any]:
    """Keyword arguments of ``dmlkit.losses.build_loss`` for ``cfg`` and the training classes."""
    return dict(
        num_classes=len(classes),
        embedding_dim=cfg.embedding_dim,
        classes=classes,
        density=cfg.density,
        density_weight=cfg.density_weight,
        density_target=cfg.density_target,
        density_options=dict(cfg.density_options),
        **cfg.loss_params,
    )

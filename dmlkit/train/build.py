"""The pieces ``fit`` assembles: datasets, P×K loader, loss, optimizer groups, schedule."""

from __future__ import annotations

import functools
import math
import os
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from dmlkit.data.subset import ClassSubset, validation_classes
from dmlkit.models import EmbeddingModel
from dmlkit.train import distributed
from dmlkit.train.config import TrainConfig, loss_kwargs, resolve_eval_ks

if TYPE_CHECKING:
    from dmlkit.train.state import RunState


def dataset_options(
    cfg: TrainConfig, bad_images_log: str | os.PathLike | None = None
) -> dict[str, object]:
    """``cfg.dataset_options``, with the run's log of skipped images when there is one."""
    options = dict(cfg.dataset_options)
    if bad_images_log is not None:
        options["bad_images_log"] = os.fspath(bad_images_log)
    return options


def build_datasets(
    cfg: TrainConfig, *, bad_images_log: str | os.PathLike | None = None
) -> tuple[Dataset, Dataset]:
    """(train with "train" transforms, evaluation with "test" transforms); checks P×K fits.

    With ``cfg.eval_split == "validation"`` the evaluation set is the validation classes
    of the training split (``dmlkit.data.subset.validation_classes``) and the training set
    the other training classes; the test split is not read.
    ``bad_images_log``: the file every process appends skipped images to (with
    ``skip_bad_images``), so that ``fit`` can count them across DataLoader workers.
    """
    from dmlkit.data import get_dataset

    options = dataset_options(cfg, bad_images_log)
    # (split, transform) of the training and the evaluation set
    sources = [("train", "train"), ("test", "test")]
    if cfg.eval_split == "validation":
        sources[1] = ("train", "test")
    try:
        train_set, test_set = (
            get_dataset(cfg.dataset, split, root=cfg.data_root, transform=transform, **options)
            for split, transform in sources
        )
    except TypeError as error:  # an unknown dataset option
        raise ValueError(f"dataset_options for {cfg.dataset!r}: {error}") from error
    if hasattr(test_set, "substitute_bad_images"):  # evaluation leaves a bad image out
        test_set.substitute_bad_images = False
    if cfg.eval_split == "validation":
        held_out = validation_classes(
            train_set.classes, cfg.validation_fraction, cfg.validation_seed
        )
        train_set = training_part(cfg, train_set)
        test_set = ClassSubset(test_set, held_out)
    num_classes = len(np.unique(train_set.labels))
    if cfg.p > num_classes or cfg.p * cfg.k > len(train_set):
        raise ValueError(
            f"a batch of p={cfg.p} classes x k={cfg.k} images does not fit the training split "
            f"of {cfg.dataset} ({num_classes} classes, {len(train_set)} images): choose "
            f"p <= {num_classes} and p*k <= {len(train_set)}"
        )
    ks = resolve_eval_ks(cfg)
    if max(ks) > len(test_set) - 1:  # found now, not after the training it would waste
        raise ValueError(
            f"eval_ks={list(ks)}: Recall@{max(ks)} needs more than {max(ks)} images, and the "
            f"{cfg.eval_split} split of {cfg.dataset} has {len(test_set)}: choose eval_ks <= "
            f"{len(test_set) - 1}"
        )
    return train_set, test_set


def training_part(cfg: TrainConfig, train_split: Dataset) -> Dataset:
    """The classes of the training split that the run trains on: all of them, or with
    ``eval_split="validation"`` those not held out for validation."""
    if cfg.eval_split != "validation":
        return train_split
    held_out = validation_classes(train_split.classes, cfg.validation_fraction, cfg.validation_seed)
    return ClassSubset(train_split, np.setdiff1d(train_split.classes, held_out))


def build_loss_module(cfg: TrainConfig, train_labels: np.ndarray) -> nn.Module:
    """``dmlkit.losses.build_loss`` for ``cfg``, with one class per training label value."""
    from dmlkit.losses import build_loss

    return build_loss(cfg.loss, **loss_kwargs(cfg, classes=np.unique(train_labels)))


def build_loader(
    cfg: TrainConfig,
    train_set: Dataset,
    *,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    finish_in_workers: bool = False,
) -> DataLoader:
    """A DataLoader over ``train_set`` with this rank's ``PKBatchSampler`` shard.

    The sampler yields ``SampleKey``s, so each image's augmentation is drawn from
    (seed, epoch, position) alone and the workers can live across epochs
    (``persistent_workers``): the first batch of an epoch does not wait for them to start,
    and a resumed run draws the same images. ``collate`` keeps ``Crop`` items as uint8
    for the device to finish (``dmlkit.data.crops``), or with ``finish_in_workers`` (fit
    on the CPU) resizes them in the workers, off the training process.
    """
    from dmlkit.data.crops import collate
    from dmlkit.samplers import PKBatchSampler

    sampler = PKBatchSampler(
        train_set.labels,
        cfg.p,
        cfg.k,
        seed=cfg.seed,
        num_batches=cfg.num_batches,
        rank=rank,
        world_size=world_size,
        keys=getattr(train_set, "accepts_sample_keys", False),
    )
    return DataLoader(
        train_set,
        batch_sampler=sampler,
        num_workers=cfg.num_workers,
        collate_fn=functools.partial(collate, finish=finish_in_workers),
        pin_memory=pin_memory,
        persistent_workers=cfg.num_workers > 0,
        generator=torch.Generator().manual_seed(cfg.seed),
    )


def build_optimizer(
    model: EmbeddingModel, loss_fn: nn.Module, cfg: TrainConfig
) -> torch.optim.Optimizer:
    """The optimizer with groups backbone (lr·lr_backbone_mult), head (lr), loss (lr·lr_loss_mult
    for ``loss_fn.high_lr_parameters()``, lr for its other parameters, e.g. a learned τ).

    Frozen parameters (``requires_grad=False``, e.g. with ``freeze_bn``) are left out; loss
    parameters are not weight-decayed (proxies and line vertices live near the unit sphere).
    """
    high = getattr(loss_fn, "high_lr_parameters", list)()
    high_ids = {id(p) for p in high}
    groups = [
        ("backbone", list(model.backbone.parameters()), cfg.lr * cfg.lr_backbone_mult, True),
        ("head", list(model.head.parameters()), cfg.lr, True),
        ("loss", list(high), cfg.lr * cfg.lr_loss_mult, False),
        ("loss_other", [p for p in loss_fn.parameters() if id(p) not in high_ids], cfg.lr, False),
    ]
    param_groups = [
        {"name": name, "params": trainable, "lr": lr, "weight_decay": cfg.weight_decay * decay}
        for name, params, lr, decay in groups
        if (trainable := [p for p in params if p.requires_grad])
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=cfg.lr, momentum=0.9, nesterov=True)
    kind = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return kind(param_groups, lr=cfg.lr)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step learning-rate factor: 1 (constant) or cosine from 1 to 0 over all epochs."""
    total = max(1, cfg.epochs * steps_per_epoch)
    if cfg.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def wrap_model(
    model: EmbeddingModel, cfg: TrainConfig, ctx: distributed.DistributedContext
) -> nn.Module:
    """The module ``train_step`` calls: ``model`` under DDP (torchrun) and torch.compile."""
    network: nn.Module = model
    if ctx.enabled:
        device = next(model.parameters()).device
        device_ids = [device.index] if device.type == "cuda" else None
        network = DistributedDataParallel(model, device_ids=device_ids)
    return torch.compile(network) if cfg.compile else network


def initialise_loss(run: RunState) -> None:
    """Data-dependent loss initialisation before epoch 0 (DAAL: 2-means line vertices).

    Embeds the training images *without* augmentation with the untrained model, calls
    ``loss_fn.init_from_embeddings`` and copies rank 0's result to every rank.
    """
    cfg, device, amp_dtype, loss_fn = run.cfg, run.device, run.amp_dtype, run.loss_fn
    if not hasattr(loss_fn, "init_from_embeddings"):
        return
    from dmlkit.data import get_dataset
    from dmlkit.evaluate import embed

    clean = get_dataset(
        cfg.dataset,
        "train",
        root=cfg.data_root,
        transform="test",
        **dataset_options(cfg, run.bad_images_log),
    )
    clean = training_part(cfg, clean)  # never the held-out validation classes
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        embeddings, labels = embed(
            run.model,
            clean,
            batch_size=cfg.batch_size_eval,
            device=device,
            num_workers=cfg.num_workers,
            progress=cfg.progress and run.ctx.is_main,
        )
    loss_fn.init_from_embeddings(embeddings.to(device), labels.to(device))
    distributed.broadcast_module_state(loss_fn, run.ctx)


def check_device(device: torch.device) -> None:
    """ValueError when ``device`` (cuda, mps) is not available on this machine."""
    available = {
        "cuda": torch.cuda.is_available(),
        "mps": getattr(torch.backends, "mps", None) is not None
        and torch.backends.mps.is_available(),
    }
    if not available.get(device.type, True):
        raise ValueError(
            f"device {device} is not available on this machine; use device=None "
            "(cuda → mps → cpu) or 'cpu'"
        )

"""The state of one training run that the loop, checkpointing and outputs share.

``RunState`` is a plain record built once by ``fit``; the run folder's file names live
here too, so that every module reading or writing the folder takes them from one place.
Imports only the configuration and the building blocks it holds, never the modules that
use it (``loop``, ``checkpoint``, ``outputs``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dmlkit.models import EmbeddingModel
from dmlkit.train import distributed
from dmlkit.train.config import TrainConfig

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.json"
EMBEDDINGS_NAME = "embeddings.npz"
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(FloatingPointError):
    """Training diverged: the loss, a parameter or buffer of the model or loss, or an
    embedding became NaN or infinite; the message names the epoch, step and what."""


@dataclass
class RunState:
    """Everything ``fit``'s helpers share (a plain record, not a trainer object).

    Made by ``loop.fit``; read and updated by ``loop``, ``checkpoint`` and ``outputs``.
    """

    cfg: TrainConfig
    ctx: distributed.DistributedContext
    device: torch.device
    log: Callable[[str], None]
    train_set: Dataset
    test_set: Dataset
    loader: DataLoader
    model: EmbeddingModel
    network: nn.Module  # what train_step calls: the model, wrapped by DDP / torch.compile
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    bad_images_log: Path | None = None  # where every process records skipped images
    data: dict[str, Any] = field(default_factory=dict)  # {split: dmlkit.data.identity.describe}
    epoch: int = 0  # finished epochs
    history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    wall_seconds: float = 0.0  # of earlier sessions of a resumed run
    images_seen: int = 0

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return AMP_DTYPES[self.cfg.amp]

    @property
    def checkpoint_path(self) -> Path | None:
        return Path(self.cfg.out_dir) / CHECKPOINT_NAME if self.cfg.out_dir else None


def non_finite_names(run: RunState, limit: int = 5) -> str:
    """The model's and loss's parameters/buffers holding NaN or inf now, e.g.
    ``model.bn1.running_var (inf)``; at most ``limit`` named; "" when all are finite."""
    found = []
    for prefix, module in (("model", run.model), ("loss", run.loss_fn)):
        named = (*module.named_parameters(), *module.named_buffers())
        for name, tensor in named:
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                kind = "nan" if torch.isnan(tensor).any() else "inf"
                found.append(f"{prefix}.{name} ({kind})")
    more = f" and {len(found) - limit} more" if len(found) > limit else ""
    return ", ".join(found[:limit]) + more if found else ""


def kept_checkpoint(run: RunState) -> str:
    """What a run stopped by an error leaves to resume from, for its message."""
    if run.checkpoint_path is not None and run.epoch > 0:
        return f"{run.checkpoint_path} holds epoch {run.epoch}"
    return "no checkpoint had been written yet"

"""DDP plumbing for ``fit`` under ``torchrun``: process group, rank device, gathers.

``torchrun --nproc_per_node=N -m dmlkit.train ...`` sets RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT; :func:`setup` reads them. Without them (or with WORLD_SIZE=1)
everything here is a no-op and ``fit`` is a plain single-process loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in the job: ``rank`` of ``world_size``, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False
    """True when :func:`setup` created the process group (so :func:`cleanup` ends it)."""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str | None = None) -> DistributedContext:
    """Join the torchrun job described by the environment, if any.

    The backend is NCCL when the ranks use CUDA, else gloo. A process group that already
    exists (set up by the caller) is used as is.
    """
    if dist.is_available() and dist.is_initialized():
        return DistributedContext(dist.get_rank(), dist.get_world_size(), _local_rank())
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if use_cuda:
        torch.cuda.set_device(_local_rank())
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistributedContext(dist.get_rank(), dist.get_world_size(), _local_rank(), True)


@contextlib.contextmanager
def quiet_unless_main(ctx: DistributedContext) -> Iterator[None]:
    """On ranks other than 0: drop ``dmlkit.data``'s info lines and Python warnings.

    Every rank loads the same data and builds the same model, so rank 0's lines (dataset
    "cached", missing ImageNet weights) say it all; W copies only bury them. A no-op on
    rank 0 and in a single process.
    """
    if ctx.is_main:
        yield
        return
    data_logger = logging.getLogger("dmlkit.data")
    level = data_logger.level
    data_logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        data_logger.setLevel(level)


def rank_device(ctx: DistributedContext, device: str | None) -> torch.device | None:
    """cuda:LOCAL_RANK for a CUDA job (unless ``device`` names another), else None."""
    if ctx.enabled and torch.cuda.is_available() and (device is None or device == "cuda"):
        return torch.device("cuda", ctx.local_rank)
    return None


def cleanup(ctx: DistributedContext) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistributedContext) -> None:
    if ctx.enabled:
        dist.barrier()


class _GatherWithGradient(torch.autograd.Function):
    """All-gather along dim 0; the backward sums the gradients of every rank's copy of
    the global batch and returns this rank's slice.

    Every rank computes the loss on the whole gathered batch, so its local embeddings
    receive the sum over ranks of ∂L_r/∂z_local = W · ∂L/∂z_local; DDP then averages the
    parameter gradients over W ranks, giving exactly the single-process gradient of L on
    the global batch.
    """

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        ctx.rank, ctx.size = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)  # (W·B, ...)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # a gather's adjoint is a reduce-scatter; gloo lacks one
        return grad[ctx.rank * ctx.size : (ctx.rank + 1) * ctx.size]


def gather(tensor: Tensor) -> Tensor:
    """(B, ...) on each rank → (W·B, ...) in rank order; gradients flow to the local part.

    Every rank must pass the same shape (PKBatchSampler gives each rank P·K items).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    if tensor.requires_grad:
        return _GatherWithGradient.apply(tensor)
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def broadcast_module_state(module: nn.Module, ctx: DistributedContext) -> None:
    """Copy rank 0's parameters and buffers into every rank's ``module`` (in place)."""
    if not ctx.enabled:
        return
    with torch.no_grad():
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


def gather_objects(value: Any, ctx: DistributedContext) -> list[Any]:
    """Every rank's ``value`` in rank order (a one-item list without DDP)."""
    if not ctx.enabled:
        return [value]
    values: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(values, value)
    return values


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))

"""``fit`` and ``train_step``: the training loop, read top to bottom.

fit: datasets → P×K sampler → model (+DDP/compile) → loss → optimizer → epochs of
train_step → evaluation → checkpoint.pt every epoch → metrics.json + embeddings.npz.
No host sync per step: losses and loss terms stay on the device in per-epoch buffers
and are read back every ``_SYNC_EVERY`` steps and at an epoch's last step (progress bar,
NaN check). Under torchrun only rank 0 logs, warns and draws progress bars.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import get_total_norm
from tqdm import tqdm  # text bars: tqdm.auto warns in Jupyter without ipywidgets

from dmlkit.data.crops import to_device
from dmlkit.data.identity import describe
from dmlkit.data.loader import loader_batches, stop_workers
from dmlkit.models import EmbeddingModel, build_model
from dmlkit.runtime import cuda_kernel_choice, default_device, seed_everything
from dmlkit.train import distributed
from dmlkit.train.build import (
    build_datasets,
    build_loader,
    build_loss_module,
    build_optimizer,
    build_scheduler,
    check_device,
    initialise_loss,
    wrap_model,
)
from dmlkit.train.checkpoint import restore_run, resume_state, rng_untouched, save_run
from dmlkit.train.config import TrainConfig
from dmlkit.train.outputs import (
    bad_images_log,
    check_out_dir,
    curve_metrics,
    epoch_line,
    evaluate_retrieval,
    final_evaluation,
    forget_bad_images,
    lock_run_folder,
    read_bad_images,
    write_outputs,
)
from dmlkit.train.state import NonFiniteLossError, RunState, kept_checkpoint, non_finite_names

logger = logging.getLogger("dmlkit.train")

_SYNC_EVERY = 20  # steps between host reads of the running loss (progress bar, NaN check)


@dataclass
class RunResult:
    """What ``fit`` returns. ``metrics`` and files exist on rank 0 only under DDP."""

    config: TrainConfig
    history: list[dict[str, Any]]
    """One dict per epoch: epoch, loss, loss/<term>, lr, seconds, images_per_s and, when
    evaluated, the retrieval metrics."""
    metrics: dict[str, Any]
    """Final test metrics: retrieval, density diagnostics, sub-cluster preservation."""
    model: EmbeddingModel
    loss: nn.Module
    out_dir: Path | None
    bad_images: list[str] = field(default_factory=list)
    """Images skipped as undecodable (``dataset_options={"skip_bad_images": True}``), by
    every process and session of the run; also in metrics.json."""


def train_step(
    model: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: Tensor,
    labels: Tensor,
    *,
    scaler: torch.amp.GradScaler | None = None,
    amp_dtype: torch.dtype | None = None,
    gather: Callable[[Tensor], Tensor] | None = None,
    grad_clip: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One optimizer step on a batch; returns the detached loss and the loss's terms.

    Args:
        model: images (B, 3, H, W) → embeddings (B, D); autocast (``amp_dtype``) wraps it.
        loss_fn: (embeddings, labels) → 0-dim loss, computed in fp32.
        images, labels: (B, 3, H, W) and (B,) on the model's device.
        gather: under DDP, ``distributed.gather``: the loss then sees every rank's batch.
        grad_clip: clip the gradient norm of the optimized parameters (0: off).
    Returns: (loss, terms) as device tensors; nothing is read back to the host. The loss
        is NaN when any embedding is non-finite (every dmlkit loss propagates it).
    """
    with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        embeddings = model(images)  # (B, D)
    if gather is not None:
        embeddings, labels = gather(embeddings), gather(labels)  # (W·B, D), (W·B,)
    loss = loss_fn(embeddings.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    scaler = scaler or torch.amp.GradScaler(images.device.type, enabled=False)
    scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        nn.utils.clip_grad_norm_(parameters, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    terms = getattr(loss_fn, "last_terms", {})
    return loss.detach(), {name: value.detach() for name, value in terms.items()}


def fit(
    cfg: TrainConfig,
    *,
    log: Callable[[str], None] | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> RunResult:
    """Train and evaluate as ``cfg`` says; write the run folder (see the module docstring).

    Args:
        cfg: the run's configuration.
        log: called with one line per epoch and event (default: the ``dmlkit.train`` logger).
        on_step: called as ``on_step(epoch, step)`` after every optimizer step (0-based);
            for tests and fault injection (raise in it to simulate a crash).
    Returns: RunResult. Under torchrun (WORLD_SIZE > 1) it trains with DDP; rank 0 alone
        evaluates, logs and writes files.
    Raises:
        ValueError: a configuration the data cannot serve (e.g. p > number of classes).
        CheckpointError: resume from an unreadable or differently configured checkpoint.
        NonFiniteLossError: the loss became NaN/inf (the last good checkpoint is kept).
        DatasetError: an image cannot be decoded (without ``skip_bad_images``); the last
            good checkpoint is kept.
        OSError: a file of the run folder cannot be written (e.g. a full disk); the message
            names it and its previous version is intact.
    """
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        ctx = distributed.setup(cfg.device)
        stack.callback(distributed.cleanup, ctx)
        run = _prepare(cfg, ctx, log, stack)
        if run.history:  # resumed: a curve point the checkpoint was saved without
            _curve_point(run, run.history[-1])
        for epoch in range(run.epoch, cfg.epochs):
            record = _train_epoch(run, epoch, on_step)
            run.history.append(record)
            run.epoch = epoch + 1
            run.train_seconds += record["seconds"]
            run.images_seen += _epoch_images(run)
            # Saved before evaluating: an evaluation that fails or is killed costs no training.
            save_run(run, time.perf_counter() - started)
            if epoch + 1 < cfg.epochs:
                _curve_point(run, record)
                run.log(epoch_line(record, cfg.epochs))
        metrics = {}
        if ctx.is_main:
            final = final_evaluation(run)
            if run.history:  # the last epoch's curve point is the final evaluation
                run.history[-1].update(curve_metrics(final.retrieval))
                run.log(epoch_line(run.history[-1], cfg.epochs))
            metrics = write_outputs(run, final, time.perf_counter() - started)
        distributed.barrier(ctx)
        out_dir = Path(cfg.out_dir) if cfg.out_dir else None
        bad = read_bad_images(run.bad_images_log)
        return RunResult(cfg, run.history, metrics, run.model, run.loss_fn, out_dir, bad)


def _curve_point(run: RunState, record: dict[str, Any]) -> None:
    """Add the test retrieval metrics to an epoch's record when ``eval_every`` asks for them
    (the last epoch's are the final evaluation's). Rank 0 only. The evaluation draws nothing
    from the training's random streams, so measuring it again after a resume (the
    checkpoint is written before it) gives the same numbers."""
    cfg, epoch = run.cfg, record["epoch"]
    due = cfg.eval_every and epoch % cfg.eval_every == 0 and epoch < cfg.epochs
    if due and run.ctx.is_main and not any(key.startswith("recall@") for key in record):
        with rng_untouched():
            record.update(curve_metrics(evaluate_retrieval(run).metrics))


def _prepare(
    cfg: TrainConfig,
    ctx: distributed.DistributedContext,
    log: Callable[[str], None] | None,
    stack: contextlib.ExitStack,
) -> RunState:
    log = (log if log is not None else logger.info) if ctx.is_main else _silent
    if ctx.is_main:
        lock_run_folder(cfg, stack)
    else:
        check_out_dir(cfg)
    checkpoint = resume_state(cfg, log)  # read and checked before anything is built
    device = distributed.rank_device(ctx, cfg.device) or default_device(cfg.device)
    check_device(device)
    stack.enter_context(cuda_kernel_choice(device, cfg.deterministic))
    # Every rank builds the same datasets and model: rank 0 alone reports on them.
    with distributed.quiet_unless_main(ctx):
        run = _assemble(cfg, ctx, device, log, bad_images_log(cfg, stack))
        stack.callback(stop_workers, run.loader)  # persistent workers end with the run
        if checkpoint is not None:
            restore_run(run, checkpoint)
        else:
            forget_bad_images(run)  # a fresh start: the log of an earlier run no longer counts
            initialise_loss(run)
            # Each rank's own augmentation/dropout stream, started from the seed.
            seed = np.random.SeedSequence([cfg.seed, ctx.rank, 1]).generate_state(1)[0]
            seed_everything(int(seed))
    log(
        f"training {cfg.backbone} + {cfg.loss}{' + density' if cfg.density else ''} on "
        f"{cfg.dataset} ({len(run.train_set)} train / {len(run.test_set)} test images) on "
        f"{device}{f' x {ctx.world_size} ranks' if ctx.enabled else ''}, from epoch {run.epoch}"
    )
    return run


def _assemble(
    cfg: TrainConfig,
    ctx: distributed.DistributedContext,
    device: torch.device,
    log: Callable[[str], None],
    bad_images: Path | None,
) -> RunState:
    train_set, test_set = build_datasets(cfg, bad_images_log=bad_images)
    seed_everything(cfg.seed)  # identical model and loss initialisation on every rank
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = build_model(
        cfg.backbone,
        embedding_dim=cfg.embedding_dim,
        pretrained=cfg.pretrained,
        freeze_bn=cfg.freeze_bn,
    ).to(device, memory_format=memory_format)
    loss_fn = build_loss_module(cfg, train_set.labels).to(device)
    optimizer = build_optimizer(model, loss_fn, cfg)
    loader = build_loader(
        cfg,
        train_set,
        rank=ctx.rank,
        world_size=ctx.world_size,
        pin_memory=device.type == "cuda",
        finish_in_workers=device.type == "cpu",
    )
    return RunState(
        cfg=cfg,
        ctx=ctx,
        device=device,
        log=log,
        train_set=train_set,
        test_set=test_set,
        loader=loader,
        model=model,
        network=wrap_model(model, cfg, ctx),
        loss_fn=loss_fn,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, cfg, len(loader)),
        scaler=torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16"),
        bad_images_log=bad_images,
        data={"train": describe(train_set), "evaluation": describe(test_set)},
    )


def _train_epoch(run: RunState, epoch: int, on_step: Callable[[int, int], None] | None) -> dict:
    cfg, device = run.cfg, run.device
    _start_epoch(run, epoch)
    num_steps = len(run.loader)
    losses = torch.zeros(num_steps, device=device)  # (steps,) filled on the device
    terms: dict[str, Tensor] = {}
    # (steps,) whether every weight and buffer was finite after the step: BatchNorm keeps
    # the loss finite while its running variance overflows, so the loss alone is no guard.
    finite_state = torch.ones(num_steps, dtype=torch.bool, device=device)
    watched = _watched_tensors(run)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    gather = distributed.gather if run.ctx.enabled else None
    batch = cfg.p * cfg.k * run.ctx.world_size  # images per global step
    bar = tqdm(  # counts images, so its rate is the throughput in img/s
        total=num_steps * batch,
        desc=f"epoch {epoch + 1}/{cfg.epochs}",
        unit="img",
        leave=False,
        disable=not (cfg.progress and run.ctx.is_main),
    )
    start = time.perf_counter()
    with loader_batches(run.loader) as batches:
        for step, (images, labels) in enumerate(batches):
            images = to_device(images, device, memory_format)  # (B, 3, H, W)
            labels = labels.to(device, non_blocking=True)
            loss, step_terms = train_step(
                run.network,
                run.loss_fn,
                run.optimizer,
                images,
                labels,
                scaler=run.scaler,
                amp_dtype=run.amp_dtype,
                gather=gather,
                grad_clip=cfg.grad_clip,
            )
            run.scheduler.step()
            losses[step] = loss
            finite_state[step] = get_total_norm(watched, math.inf).isfinite()  # one fused pass
            for name, value in step_terms.items():
                terms.setdefault(name, torch.zeros(num_steps, device=device))[step] = value
            if on_step is not None:
                on_step(epoch, step)
            bar.update(batch)
            if (step + 1) % _SYNC_EVERY == 0:
                _check_finite(run, epoch, losses[: step + 1], terms, finite_state[: step + 1])
                bar.set_postfix(loss=f"{losses[step - _SYNC_EVERY + 1 : step + 1].mean():.4f}")
    _check_finite(run, epoch, losses, terms, finite_state)  # waits for the device: true timing
    if num_steps % _SYNC_EVERY:  # steps since the last read: every bar ends with its loss
        bar.set_postfix(loss=f"{losses[num_steps - num_steps % _SYNC_EVERY :].mean():.4f}")
    bar.close()
    record = _epoch_record(run, epoch, losses, terms, time.perf_counter() - start)
    _check_evaluation_mode(run, epoch, images[:8])
    return record


def _start_epoch(run: RunState, epoch: int) -> None:
    """Point the epoch's batches and augmentations at (seed, epoch) and switch to training."""
    run.loader.batch_sampler.set_epoch(epoch)  # its SampleKeys carry the epoch to workers
    run.network.train()
    run.loss_fn.train()  # loss state (EMAs, tube radii) updates in training mode only


def _epoch_record(
    run: RunState, epoch: int, losses: Tensor, terms: dict[str, Tensor], seconds: float
) -> dict[str, Any]:
    record = {"epoch": epoch + 1, "loss": losses.mean().item()}
    record.update({f"loss/{name}": values.mean().item() for name, values in terms.items()})
    lr = run.optimizer.param_groups[0]["lr"]
    return {**record, "lr": lr, "seconds": seconds, "images_per_s": _epoch_images(run) / seconds}


def _epoch_images(run: RunState) -> int:
    """Images in one epoch over all ranks: its steps × the global batch."""
    return len(run.loader) * run.cfg.p * run.cfg.k * run.ctx.world_size


def _watched_tensors(run: RunState) -> list[Tensor]:
    """The floating-point parameters and buffers of the model and the loss (EMAs, vertices)."""
    modules = (run.model, run.loss_fn)
    tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
    return [t for t in tensors if t.is_floating_point()]


def _check_finite(
    run: RunState, epoch: int, losses: Tensor, terms: dict[str, Tensor], finite_state: Tensor
) -> None:
    bad = ~torch.isfinite(losses) | ~finite_state  # (steps,)
    if not bad.any():
        return
    step = int(bad.nonzero()[0])
    what = []
    if not math.isfinite(float(losses[step])):
        values = ", ".join(f"{name}={float(v[step]):.6g}" for name, v in terms.items())
        what.append(f"loss={float(losses[step]):.6g}; terms: {values or 'none'}")
    if not finite_state[step]:
        what.append(f"non-finite weights or buffers: {non_finite_names(run) or 'none now'}")
    raise NonFiniteLossError(
        f"training diverged at epoch {epoch + 1}, step {step + 1}/{len(losses)}: "
        f"{'; '.join(what)}. Training stopped; {kept_checkpoint(run)}."
    )


def _check_evaluation_mode(run: RunState, epoch: int, images: Tensor) -> None:
    """NonFiniteLossError, before the epoch is checkpointed, when the model in evaluation
    mode gives non-finite embeddings for a few training images: BatchNorm's running
    statistics can overflow activations that batch statistics keep finite in training."""
    run.model.eval()
    with (
        torch.no_grad(),
        torch.autocast(images.device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None),
    ):
        finite = bool(torch.isfinite(run.model(images)).all())
    run.model.train()
    if not finite:
        names = non_finite_names(run) or "none (an activation overflowed)"
        raise NonFiniteLossError(
            f"training diverged in epoch {epoch + 1}: in evaluation mode the model's embeddings "
            f"of training images are NaN or infinite; non-finite weights or buffers: {names}. "
            f"Training stopped; {kept_checkpoint(run)}."
        )


def _silent(message: str) -> None:
    return None

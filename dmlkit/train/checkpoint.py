"""Checkpoints that load with ``torch.load(weights_only=True)`` and resume bit-exactly.

A checkpoint is a plain dict of tensors and Python scalars/containers (no pickled
objects): model, loss module, optimizer, scheduler and gradient-scaler state, the number
of finished epochs, every rank's RNG states, the history and the configuration. It is
written atomically (``dmlkit.io.atomic_writer``: a kill mid-write keeps the old file).
Also how ``fit`` finds, restores and saves the checkpoint of its run folder.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmlkit.io import atomic_writer
from dmlkit.train import distributed
from dmlkit.train.config import RESUMABLE_CHANGES, TrainConfig
from dmlkit.train.state import CHECKPOINT_NAME, RunState

FORMAT = "dmlkit-checkpoint"
VERSION = 1
_REQUIRED = ("format", "version", "config", "epoch", "model", "loss", "optimizer", "rng")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, foreign, or from another config."""


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Atomically write ``state`` (plus format tag and version) to ``path``.

    Raises:
        OSError: the write failed (e.g. a full disk); its message names ``path`` and the
            previous checkpoint there is left intact.
    """
    try:
        with atomic_writer(path, "wb") as handle:
            torch.save({"format": FORMAT, "version": VERSION, **state}, handle)
    except OSError as error:
        raise OSError(
            error.errno,
            f"cannot write checkpoint {path}: {error.strerror or error}; the previous "
            "checkpoint (if any) is intact",
        ) from error


def load_checkpoint(path: str | os.PathLike, *, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a dmlkit checkpoint with ``weights_only=True``.

    Raises:
        CheckpointError: the file is truncated or not a torch file, holds objects that
            weights-only loading refuses, or is not a dmlkit checkpoint.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, OSError) as error:
        raise CheckpointError(
            f"cannot read checkpoint {path}: truncated, corrupted or not written by torch.save "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
            "Delete it, or start over with resume=False and overwrite=True."
        ) from error
    missing = [key for key in _REQUIRED if not isinstance(state, dict) or key not in state]
    if missing or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a dmlkit checkpoint (missing {', '.join(missing) or 'format tag'})"
        )
    if state["version"] > VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {state['version']}; this dmlkit reads <= "
            f"{VERSION}. Upgrade dmlkit."
        )
    return state


def check_compatible(state: dict[str, Any], cfg: TrainConfig, path: str | os.PathLike) -> None:
    """Raise CheckpointError listing every field where ``cfg`` differs from the checkpoint's.

    Fields in ``RESUMABLE_CHANGES`` (epochs, eval_ks, num_workers, device, ...) may differ;
    epochs not under a cosine schedule.
    """
    saved, current = state["config"], cfg.to_dict()
    differences = [
        f"{name}: checkpoint {saved.get(name, '<absent>')!r}, config {value!r}"
        for name, value in current.items()
        if name not in RESUMABLE_CHANGES and _normal(saved.get(name, "<absent>")) != _normal(value)
    ]
    if cfg.lr_schedule == "cosine" and saved.get("epochs") != cfg.epochs:
        differences.append(
            f"epochs: checkpoint {saved.get('epochs')!r}, config {cfg.epochs!r} (the cosine "
            "schedule decays to 0 over the run's epochs: another count would restart its curve "
            "mid-way)"
        )
    if differences:
        raise CheckpointError(
            f"checkpoint {path} was written with a different configuration:\n  "
            + "\n  ".join(differences)
            + "\nUse another out_dir, or start over with resume=False and overwrite=True."
        )


def resume_state(cfg: TrainConfig, log: Callable[[str], None]) -> dict[str, Any] | None:
    """The checkpoint ``fit`` continues from: read and checked, or None to start afresh."""
    if cfg.out_dir is None:
        return None
    path = Path(cfg.out_dir) / CHECKPOINT_NAME
    if not path.exists():
        if cfg.resume:
            log(f"resume: no checkpoint at {path}; starting from scratch")
        return None
    if not cfg.resume:  # only with overwrite=True: check_out_dir refuses it otherwise
        log(f"{path} exists and overwrite=True: starting over (replaced by this run's own)")
        return None
    state = load_checkpoint(path)
    check_compatible(state, cfg, path)
    log(f"resuming from {path} after epoch {state['epoch']}")
    return state


def restore_run(run: RunState, state: dict[str, Any]) -> None:
    """Load a resumed run's model, loss, optimizer, counters and this rank's RNG state."""
    check_same_data(state, run)
    try:
        run.model.load_state_dict(state["model"])
        run.loss_fn.load_state_dict(state["loss"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        run.scaler.load_state_dict(state["scaler"])
    except (RuntimeError, KeyError, ValueError) as error:
        raise CheckpointError(
            f"{run.checkpoint_path} does not fit this model/loss: {error}"
        ) from error
    run.epoch, run.history = int(state["epoch"]), list(state["history"])
    run.train_seconds, run.wall_seconds = state["train_seconds"], state["wall_seconds"]
    run.images_seen = int(state["images_seen"])
    rng = state["rng"]
    if len(rng) != run.ctx.world_size:
        run.log(
            f"checkpoint has RNG states of {len(rng)} ranks, job has {run.ctx.world_size}: "
            "the resumed run will not be bit-identical"
        )
    restore_rng_state(rng[run.ctx.rank % len(rng)])


def check_same_data(state: dict[str, Any], run: RunState) -> None:
    """CheckpointError when the run's datasets are not those the checkpoint was trained and
    evaluated on (``dmlkit.data.identity.describe``); checkpoints older than the record pass."""
    saved = state.get("data")
    if not saved:
        return
    changed = [
        f"{split}: checkpoint {_summary(saved[split])}, now {_summary(now)}"
        for split, now in run.data.items()
        if split in saved and saved[split]["fingerprint"] != now["fingerprint"]
    ]
    if changed:
        raise CheckpointError(
            f"{run.checkpoint_path} was trained on other data than this run reads "
            f"(dataset {run.cfg.dataset!r}, data_root {run.cfg.data_root!r}):\n  "
            + "\n  ".join(changed)
            + "\nResume with the data it was trained on, or start over with resume=False and "
            "overwrite=True."
        )


def _summary(data: dict[str, Any]) -> str:
    images, classes, fingerprint = data["images"], data["classes"], data["fingerprint"]
    return f"{images} images of {classes} classes, fingerprint {fingerprint}"


def save_run(run: RunState, session_seconds: float) -> None:
    """Checkpoint the run after its ``run.epoch`` epochs (rank 0 writes; every rank takes part)."""
    rng = distributed.gather_objects(capture_rng_state(), run.ctx)  # a collective: every rank
    if run.ctx.is_main and run.checkpoint_path is not None:
        save_checkpoint(
            run.checkpoint_path,
            {
                "config": run.cfg.to_dict(),
                "epoch": run.epoch,
                "model": run.model.state_dict(),
                "loss": run.loss_fn.state_dict(),
                "optimizer": run.optimizer.state_dict(),
                "scheduler": run.scheduler.state_dict(),
                "scaler": run.scaler.state_dict(),
                "sampler": run.loader.batch_sampler.state_dict(),
                "rng": rng,
                "history": run.history,
                "train_seconds": run.train_seconds,
                "wall_seconds": run.wall_seconds + session_seconds,
                "images_seen": run.images_seen,
                "data": run.data,
            },
        )
    distributed.barrier(run.ctx)


def _normal(value: Any) -> Any:
    # Tuples come back from torch.load as tuples, but lists/tuples must compare equal.
    return list(value) if isinstance(value, tuple) else value


def capture_rng_state() -> dict[str, Any]:
    """Global RNG states (torch CPU/CUDA, NumPy legacy, Python) as weights-only-safe values."""
    kind, keys, position, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached),
        "python": _python_state_to_plain(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


@contextlib.contextmanager
def rng_untouched() -> Iterator[None]:
    """Restore every global RNG after the block: what it draws (a DataLoader's base seed
    while evaluating) must not shift the training's random streams, or a run resumed from
    the checkpoint written before the block would differ from the uninterrupted one."""
    state = capture_rng_state()
    try:
        yield
    finally:
        restore_rng_state(state)


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))  # noqa: NPY002
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _python_state_to_plain(state: tuple) -> tuple:
    version, internal, gauss = state
    return version, list(internal), gauss

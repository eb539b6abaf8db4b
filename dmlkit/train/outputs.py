"""Evaluation during and after training, and the run folder's metrics.json / embeddings.npz.

Also the run folder's checks and its log of skipped images (``bad_images.jsonl``: every
process that skips an undecodable image appends its path; metrics.json counts them).
"""

from __future__ import annotations

import contextlib
import numbers
import os
import platform
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import Tensor

from dmlkit.io import atomic_writer, exclusive_lock, json_bytes
from dmlkit.runtime import git_commit, library_versions
from dmlkit.train import distributed
from dmlkit.train.config import TrainConfig, resolve_eval_ks
from dmlkit.train.state import (
    CHECKPOINT_NAME,
    EMBEDDINGS_NAME,
    METRICS_NAME,
    NonFiniteLossError,
    RunState,
    kept_checkpoint,
    non_finite_names,
)

_MODES = ("family", "style")  # glyph sub-cluster labels, in order of coarseness
PURITY_KS = (5,)  # family purity@k beside the nearest-neighbour measure (k = 1)
BAD_IMAGES_LOG = "bad_images.jsonl"
RUN_LOCK = ".run.lock"  # held by the process training into the folder (rank 0 under DDP)
# What makes a folder a run's: a new run would replace these (never notebook.ipynb, tsne/).
RUN_FILES = (CHECKPOINT_NAME, METRICS_NAME, EMBEDDINGS_NAME)


def check_out_dir(cfg: TrainConfig) -> None:
    """ValueError, before anything is built or written, if ``out_dir`` cannot be a folder
    or holds a run's files that this run would replace (``check_run_files``)."""
    if cfg.out_dir is None:
        return
    path = Path(cfg.out_dir)
    existing = next(p for p in (path, *path.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise ValueError(f"out_dir: {existing} exists and is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"out_dir: cannot write in {existing} (permission denied)")
    check_run_files(cfg, path)


def lock_run_folder(cfg: TrainConfig, stack: contextlib.ExitStack) -> None:
    """Check ``out_dir`` and hold its lock until ``stack`` closes: a second ``fit`` into the
    same folder at the same time is refused (``LockHeldError``) instead of mixing two runs'
    files. The folder is created now, to hold the lock file; a run that ends without
    writing anything into it (an error before the first checkpoint) removes it again."""
    check_out_dir(cfg)
    if cfg.out_dir is None:
        return
    path = Path(cfg.out_dir)
    if not path.exists():
        stack.callback(_remove_if_empty, path)  # runs after the lock file is gone
    stack.enter_context(exclusive_lock(path / RUN_LOCK, f"run folder {path}"))
    check_run_files(cfg, path)  # again, under the lock: another run may just have written


def _remove_if_empty(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()


def check_run_files(cfg: TrainConfig, path: Path) -> None:
    """ValueError naming the files of ``path`` that this run would silently replace.

    A folder holding any of checkpoint.pt, metrics.json, embeddings.npz (a finished or an
    interrupted run, or a user's own files) is refused unless ``overwrite``, or ``resume``
    with a checkpoint to continue from. Other files (the sweep's notebook.ipynb, written
    into the folder before the notebook runs, a tsne/ cache) never count.
    """
    present = [name for name in RUN_FILES if (path / name).exists()]
    if not present or cfg.overwrite or (cfg.resume and CHECKPOINT_NAME in present):
        return
    message = f"out_dir: {path} already holds {', '.join(present)}, which this run would replace"
    if CHECKPOINT_NAME in present:
        message += (
            ". Continue that run with resume=True (--resume), start over with overwrite=True "
            "(--overwrite), or choose another out_dir."
        )
    else:
        resuming = " (resume=True starts from scratch then)" if cfg.resume else ""
        message += (
            f"; there is no {CHECKPOINT_NAME} to resume from{resuming}. Replace them with "
            "overwrite=True (--overwrite), or choose another out_dir."
        )
    raise ValueError(message)


def bad_images_log(cfg: TrainConfig, stack: contextlib.ExitStack) -> Path | None:
    """The file the datasets append skipped images to; None unless ``skip_bad_images``.

    ``dataset_options["bad_images_log"]`` if given, else ``out_dir/bad_images.jsonl``, else
    a file in a temporary folder that ``stack`` removes when ``fit`` returns.
    """
    options = cfg.dataset_options
    if not options.get("skip_bad_images"):
        return None
    if options.get("bad_images_log") is not None:
        return Path(options["bad_images_log"])
    if cfg.out_dir is not None:
        return Path(cfg.out_dir) / BAD_IMAGES_LOG
    return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dmlkit-"))) / "bad.jsonl"


def forget_bad_images(run: RunState) -> None:
    """On a fresh start, delete the run folder's log of an earlier run (kept on resume)."""
    cfg = run.cfg
    if cfg.out_dir is not None and run.bad_images_log == Path(cfg.out_dir) / BAD_IMAGES_LOG:
        if run.ctx.is_main:
            run.bad_images_log.unlink(missing_ok=True)
        distributed.barrier(run.ctx)  # no rank logs a bad image before the old log is gone


def read_bad_images(log: Path | None) -> list[str]:
    """The distinct skipped images recorded in ``log`` (sorted); [] for None."""
    from dmlkit.data.images import read_bad_images as read_log

    return read_log(log) if log is not None else []


@dataclass
class Retrieval:
    """The evaluation split embedded by the current model, and its retrieval metrics."""

    metrics: dict[str, Any]
    embeddings: Tensor  # (n, D) float32 CPU, the evaluated items only
    labels: Tensor  # (n,) int64 CPU
    evaluated: np.ndarray  # (N,) bool over the split: False for images skipped as undecodable


def evaluate_retrieval(run: RunState) -> Retrieval:
    """Embed the evaluation split with the current model; Recall@K, MAP@R, R-precision, NMI.

    Images skipped as undecodable (``skip_bad_images``) are left out: their placeholder
    would be a query and a neighbour of nothing.
    """
    from dmlkit.evaluate import embed, retrieval_metrics

    cfg = run.cfg
    with torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
        embeddings, labels = embed(
            run.model,
            run.test_set,
            batch_size=cfg.batch_size_eval,
            device=run.device,
            num_workers=cfg.num_workers,
            progress=cfg.progress,
        )
    evaluated = _decoded_items(run)
    embeddings, labels = embeddings[evaluated], labels[evaluated]
    check_embeddings(run, embeddings)
    metrics = retrieval_metrics(
        embeddings, labels, ks=resolve_eval_ks(cfg), nmi=True, seed=cfg.seed
    )
    return Retrieval(dict(metrics), embeddings, labels, evaluated)


def _decoded_items(run: RunState) -> np.ndarray:
    paths = getattr(run.test_set, "paths", None)
    bad = set(read_bad_images(run.bad_images_log))
    if not bad or paths is None:
        return np.ones(len(run.test_set), dtype=bool)
    return np.array([path not in bad for path in paths])


def check_embeddings(run: RunState, embeddings: Tensor) -> None:
    """NonFiniteLossError when an evaluation embedding holds NaN or inf: metrics of such a
    model would be numbers about nothing (and the kNN refuses them)."""
    bad = ~torch.isfinite(embeddings).all(1)  # (N,)
    if not bad.any():
        return
    names = non_finite_names(run)
    cause = (
        f"non-finite weights or buffers: {names}"
        if names
        else f"the weights and buffers are finite: an activation overflowed (amp={run.cfg.amp!r})"
    )
    raise NonFiniteLossError(
        f"training diverged: after epoch {run.epoch}, {int(bad.sum())} of {len(bad)} evaluation "
        f"embeddings are NaN or infinite ({cause}). No metrics written; {kept_checkpoint(run)}."
    )


@dataclass
class FinalEvaluation:
    """What ``final_evaluation`` measured of the final model."""

    metrics: dict[str, Any]
    """Every scalar metric: retrieval, density diagnostics, glyph sub-cluster measures."""
    arrays: dict[str, np.ndarray]
    """embeddings.npz: embeddings, labels, per-class density, glyph family/style."""
    retrieval: dict[str, Any]
    """The retrieval metrics alone (what an epoch's history record keeps)."""


def final_evaluation(run: RunState) -> FinalEvaluation:
    """Retrieval + density diagnostics (+ glyph sub-cluster measures) of the final model."""
    from dmlkit.evaluate import density_metrics, subcluster_agreement, subcluster_preservation

    retrieval = evaluate_retrieval(run)
    embeddings, labels = retrieval.embeddings, retrieval.labels
    metrics = dict(retrieval.metrics)
    arrays: dict[str, np.ndarray] = {"embeddings": embeddings.numpy(), "labels": labels.numpy()}
    for name, value in density_metrics(embeddings, labels).items():
        if _is_scalar(value):
            metrics[name] = _plain(value)
        else:  # per-class r_c ({class: value} → (C, 2) rows): in the npz, not the JSON
            arrays[name] = _as_array(value)
    for mode in _MODES:
        values = getattr(run.test_set, mode, None)
        if values is None:
            continue
        values = np.asarray(values)[retrieval.evaluated]
        arrays[mode] = values.astype(str)
        suffix = "" if mode == "family" else f"_{mode}"
        result = subcluster_preservation(embeddings, labels, values)
        metrics[f"subcluster_preservation{suffix}"] = _plain(result["preservation"])
        metrics[f"subcluster_chance{suffix}"] = _plain(result["chance"])
        if mode != "family":
            continue
        for k in PURITY_KS:
            result = subcluster_preservation(embeddings, labels, values, k=k)
            metrics[f"subcluster_purity@{k}"] = _plain(result["preservation"])
            metrics[f"subcluster_purity_chance@{k}"] = _plain(result["chance"])
        agreement = subcluster_agreement(embeddings, labels, values)
        metrics["subcluster_ari"] = _plain(agreement["ari"])
        metrics["subcluster_nmi"] = _plain(agreement["nmi"])
    return FinalEvaluation(metrics, arrays, retrieval.metrics)


def write_outputs(run: RunState, final: FinalEvaluation, session_seconds: float) -> dict[str, Any]:
    """Write embeddings.npz, then metrics.json (each atomically) into ``out_dir``.

    Returns: the final metrics. Raises: OSError naming the file that could not be written.
    """
    metrics, arrays = final.metrics, final.arrays
    run.log("final: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if _is_float(v)))
    if run.cfg.out_dir is None:
        return metrics
    out_dir = Path(run.cfg.out_dir)
    record = _metrics_record(run, metrics, run.wall_seconds + session_seconds)
    if record.get("num_bad_images"):
        run.log(f"skipped {record['num_bad_images']} undecodable image(s): see metrics.json")
    _write(run, out_dir / EMBEDDINGS_NAME, lambda handle: np.savez(handle, **arrays))
    # Last: a metrics.json newer than embeddings.npz marks a finished run.
    _write(run, out_dir / METRICS_NAME, lambda handle: handle.write(json_bytes(record)))
    if run.epoch == 0 and run.checkpoint_path is not None:
        # No epoch trained, so no checkpoint of this run: one there is an older run's
        # (overwrite=True) and would resume that run over these outputs. Removed only now
        # that they are written, like the files a run replaces.
        run.checkpoint_path.unlink(missing_ok=True)
    return metrics


def _metrics_record(run: RunState, metrics: dict[str, Any], wall: float) -> dict[str, Any]:
    cfg = run.cfg
    record = {
        "config": cfg.to_dict(),
        "metrics": metrics,
        "history": run.history,
        "git_commit": git_commit(),
        "versions": library_versions(),
        "device": _device_name(run.device),
        "world_size": run.ctx.world_size,
        "torch_threads": torch.get_num_threads(),
        "wall_time_s": wall,
        "train_time_s": run.train_seconds,
        "images_per_s": run.images_seen / run.train_seconds if run.train_seconds else None,
        "num_train_images": len(run.train_set),
        "num_test_images": len(run.test_set),
        "eval_ks": list(resolve_eval_ks(cfg)),
    }
    if run.bad_images_log is not None:
        bad = read_bad_images(run.bad_images_log)
        record.update(num_bad_images=len(bad), bad_images=bad)
    return record


def _write(run: RunState, path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """``write(handle)`` into ``path`` atomically; an OSError names the file and what is kept."""
    try:
        with atomic_writer(path, "wb") as handle:
            write(handle)
    except OSError as error:
        checkpoint = run.checkpoint_path
        rerun = (
            f"; {checkpoint} holds the trained model: rerun with resume=True to write it"
            if checkpoint is not None and checkpoint.is_file()
            else ""
        )
        raise OSError(
            error.errno,
            f"cannot write {path}: {error.strerror or error}; its previous version (if any) "
            f"is intact{rerun}",
        ) from error


def curve_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The metrics a per-epoch history record keeps (values, not query bookkeeping counts)."""
    return {k: v for k, v in metrics.items() if k not in ("num_queries", "num_skipped")}


def epoch_line(record: dict[str, Any], epochs: int) -> str:
    """One log line for a history record: loss, its terms, throughput, Recall@K."""
    terms = ", ".join(
        f"{k.removeprefix('loss/')} {v:.4g}" for k, v in record.items() if k.startswith("loss/")
    )
    recall = ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith("recall@"))
    return (
        f"epoch {record['epoch']}/{epochs}: loss {record['loss']:.4f}"
        f"{f' ({terms})' if terms else ''}, {record['images_per_s']:.0f} img/s"
        f"{f', {recall}' if recall else ''}"
    )


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({platform.processor() or platform.machine()})"


def _is_scalar(value: Any) -> bool:
    return isinstance(value, numbers.Number) or (
        isinstance(value, (np.ndarray, Tensor)) and value.ndim == 0
    )


def _is_float(value: Any) -> bool:
    return isinstance(value, float)


def _plain(value: Any) -> Any:
    if isinstance(value, (np.ndarray, Tensor, np.generic)):
        return value.item()
    return value


def _as_array(value: Any) -> np.ndarray:
    if isinstance(value, Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, dict):  # class → value
        return np.asarray([[k, v] for k, v in value.items()], dtype=np.float64)
    return np.asarray(value)

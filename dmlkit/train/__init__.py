"""Training: ``TrainConfig`` → ``fit`` → run folder (metrics.json, embeddings.npz, checkpoint.pt).

    from dmlkit.train import TrainConfig, fit
    result = fit(TrainConfig(loss="triplet", density=True, out_dir="runs/triplet-da"))
    result.metrics["recall@1"]

``python -m dmlkit.train --help`` maps command-line flags to the config's fields; under
``torchrun --nproc_per_node=N -m dmlkit.train ...`` the same call trains with DDP.
"""

from dmlkit.train.build import build_optimizer
from dmlkit.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dmlkit.train.config import TrainConfig, field_docs, resolve_eval_ks
from dmlkit.train.loop import NonFiniteLossError, RunResult, fit, train_step

__all__ = [
    "CheckpointError",
    "NonFiniteLossError",
    "RunResult",
    "TrainConfig",
    "build_optimizer",
    "field_docs",
    "fit",
    "load_checkpoint",
    "resolve_eval_ks",
    "save_checkpoint",
    "train_step",
]

"""Glue the notebooks call, so that no notebook needs a ``def`` of its own.

- ``train_config(parameters, smoke=...)``: a notebook's parameter cell → ``TrainConfig``.
- ``load_run(run_dir)``: a finished run folder (metrics.json + embeddings.npz) as a record.
- ``run_dataset(run, split)``: the run's dataset, as PIL images, for thumbnails.
- ``figure_stem(run_dir)``: a file-name stem for a run's figures.
- ``class_names(dataset)``: {class id: name} of a dataset, or None (SOP has no names).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from dmlkit.train import TrainConfig

# What ``smoke=True`` changes: one short epoch, evaluation only at the end. Everything
# else (dataset, model, loss, evaluation code) runs exactly as in the full run.
SMOKE_OVERRIDES: dict[str, Any] = {"epochs": 1, "num_batches": 2, "eval_every": 0}


def train_config(parameters: Mapping[str, Any], *, smoke: bool = False) -> TrainConfig:
    """The ``TrainConfig`` named by a notebook's parameters (e.g. ``globals()``).

    Every ``TrainConfig`` field present in ``parameters`` is used; other names are ignored.
    ``smoke`` applies ``SMOKE_OVERRIDES``.
    """
    names = {item.name for item in dataclasses.fields(TrainConfig)}
    values = {name: parameters[name] for name in names if name in parameters}
    if smoke:
        values.update(SMOKE_OVERRIDES)
    return TrainConfig(**values)


class Run(NamedTuple):
    """A finished run folder."""

    path: Path
    config: dict[str, Any]  # TrainConfig fields as written to metrics.json
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    arrays: dict[str, np.ndarray]  # embeddings.npz: embeddings, labels, family, style, ...


def load_run(run_dir: str | os.PathLike) -> Run:
    """Read ``metrics.json`` and ``embeddings.npz`` of a run folder written by ``fit``."""
    path = Path(run_dir)
    metrics_file, arrays_file = path / "metrics.json", path / "embeddings.npz"
    for file in (metrics_file, arrays_file):
        if not file.is_file():
            raise FileNotFoundError(
                f"{file} not found: {path} is not a finished run folder (train it with "
                "notebooks/train_eval.ipynb or dmlkit.train.fit with out_dir set)"
            )
    data = json.loads(metrics_file.read_text())
    with np.load(arrays_file, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    return Run(path, data["config"], data["metrics"], data.get("history", []), arrays)


def run_dataset(run: Run, split: str = "test", transform: Any = None) -> Any:
    """The dataset the run was trained/evaluated on, in the order of its embeddings."""
    from dmlkit.data import get_dataset

    config = run.config
    return get_dataset(
        config["dataset"],
        split,
        root=config.get("data_root"),
        transform=transform,
        **config.get("dataset_options", {}),
    )


def figure_stem(run_dir: str | os.PathLike) -> str:
    """``<sweep>_<values>`` for ``papermill_runs/<sweep>/<k=v,...>``, safe as a file name.

    ``.../quickstart/loss=triplet,density=true,seed=0`` → ``quickstart_triplet_density_seed-0``:
    the loss value stands alone, a true flag is its key, a false flag is dropped, other
    values follow their key.
    """
    path = Path(run_dir).resolve()
    parts = [path.parent.name]
    for pair in path.name.split(","):
        key, _, value = pair.partition("=")
        if key == "loss" or not value:
            parts.append(value or key)
        elif value in ("true", "false"):
            parts.extend([key] if value == "true" else [])
        else:
            parts.append(f"{key}-{value}")
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", "_".join(parts))


def class_names(dataset: Any) -> dict[Any, str] | None:
    """{class id: name} from ``dataset.classes`` and ``dataset.class_names``; None without names."""
    names = getattr(dataset, "class_names", None)
    if names is None:
        return None
    if isinstance(names, Mapping):
        return dict(names)
    return dict(zip(np.asarray(dataset.classes).tolist(), names, strict=True))

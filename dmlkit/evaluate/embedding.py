"""Embed a dataset with a model: inference mode, eval mode, progress bar."""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm  # text bars: tqdm.auto warns in Jupyter without ipywidgets

from dmlkit.data.crops import collate, to_device
from dmlkit.data.loader import loader_batches
from dmlkit.runtime import default_device
from dmlkit.samplers import SampleKey


def embed(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> tuple[Tensor, Tensor]:
    """Embeddings and labels of every item of ``dataset``, in dataset order.

    Items are ``(image, label, ...)`` (extra fields ignored). The model runs under
    ``torch.inference_mode`` in eval mode; its previous train/eval mode is restored
    afterwards, also when embedding fails.

    Args:
        model: maps a batch (B, ...) to embeddings (B, D).
        dataset: map-style dataset, e.g. ``get_dataset(..., transform="test")``.
        device: where the model runs; default: the device of its parameters (or buffers),
            else ``dmlkit.runtime.default_device()``. The model is not moved.
        num_workers: DataLoader workers. progress: show a tqdm bar.
    Returns: embeddings (N, D) float32 CPU tensor, labels (N,) int64 CPU tensor.
    """
    device = torch.device(device) if device is not None else _model_device(model)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=_in_order(dataset),
        num_workers=num_workers,
        collate_fn=functools.partial(collate, finish=device.type == "cpu"),
        pin_memory=device.type == "cuda",
    )
    was_training = model.training
    model.eval()
    embeddings, labels = [], []
    try:
        with torch.inference_mode(), loader_batches(loader) as batches:
            bar = tqdm(batches, total=len(loader), desc="embed", unit="batch", disable=not progress)
            for batch in bar:
                images, targets = batch[0], batch[1]
                out = model(to_device(images, device))
                embeddings.append(out.float().cpu())
                labels.append(torch.as_tensor(targets).reshape(-1).long().cpu())
    finally:
        model.train(was_training)
    if not embeddings:
        raise ValueError("the dataset is empty: nothing to embed")
    return torch.cat(embeddings), torch.cat(labels)


def _in_order(dataset: Dataset) -> list:
    """Every index of ``dataset`` in order: as SampleKeys where it takes them (its images
    then arrive as uint8 crops and are finished on the device)."""
    if getattr(dataset, "accepts_sample_keys", False):
        return [SampleKey(i, 0, 0, i) for i in range(len(dataset))]
    return list(range(len(dataset)))


def _model_device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return default_device()

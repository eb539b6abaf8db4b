"""fit's input pipeline on the host: the decoded cache + device crop against the PIL path.

    .venv/bin/python benchmarks/bench_input.py [--images 384] [--repeats 3] [--quick]
        [--json rows.json]

Data: a ``folder`` dataset of JPEGs the size of CUB's (500 × 375 px, quality 90, smooth
content with edges), written once into a temporary folder. Both sides are fit's own
training DataLoader (``dmlkit.train.build.build_loader``, the "imagenet" train protocol:
resize 256, RandomResizedCrop 224, flip, normalise), one process, one thread, the same
files, alternating; a cell is the median over ``--repeats`` epochs:

- host cost per image: today's path decodes every JPEG with PIL, resizes, crops, flips and
  normalises a float tensor; the new path reads the uint8 resized image from the decoded
  cache (``dmlkit.data.decoded``), draws the box and cuts it, and collates the uint8 crops
  — the crop-resize, flip and normalisation run on the training device (target: ≤ 0.1 of
  today's, i.e. ≥ 10× fewer host seconds per image per core);
- for information: torchvision.io's libjpeg-turbo ``decode_jpeg`` + a tensor resize, the
  fastest per-epoch decoding without a cache; NVIDIA DALI's CPU pipeline of the same
  protocol when ``nvidia-dali-cuda130`` is installed (optional, not a dependency: its GPU
  mode needs a GPU, which a CPU table cannot show); the one-time cache build per image; the
  device half of the new path run on this CPU (on a GPU it is batched matmuls);
- the first batch of epoch 2 with 2 workers: persistent workers (fit now) against workers
  started again every epoch (fit before).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import header
from PIL import Image
from rows import make_row, markdown_table, write_json
from torch.utils.data import DataLoader

from dmlkit.data import get_dataset
from dmlkit.data.crops import to_device
from dmlkit.data.loader import loader_batches, stop_workers
from dmlkit.train import TrainConfig
from dmlkit.train.build import build_loader

GROUP = "input pipeline (CPU, 1 core)"


def write_jpegs(root: Path, images: int, classes: int = 8) -> None:
    """``images`` CUB-sized JPEGs in ``classes`` class folders (the first half: train)."""
    rng = np.random.default_rng(0)
    for i in range(images):
        folder = root / f"{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
        pixels = np.array(Image.fromarray(small).resize((500, 375), Image.BICUBIC))
        top, left = rng.integers(0, 300), rng.integers(0, 400)
        pixels[top : top + 60, left : left + 90] = rng.integers(0, 256, 3)
        Image.fromarray(pixels).save(folder / f"{i:04d}.jpg", quality=90)


def config(root: Path, cache: Path, decoded: bool, workers: int = 0) -> TrainConfig:
    return TrainConfig(
        dataset="folder",
        data_root=str(root),
        dataset_options={"decoded_cache": decoded, "cache_dir": str(cache)},
        p=4,
        k=8,
        num_workers=workers,
        progress=False,
    )


def train_set(cfg: TrainConfig):
    return get_dataset(
        cfg.dataset, "train", root=cfg.data_root, transform="train", **cfg.dataset_options
    )


def epoch_seconds(cfg: TrainConfig, dataset, epoch: int, finish: bool = False):
    """(host seconds, images) of one epoch of fit's DataLoader: batches left on the host
    for the device to finish, or (``finish``, a CPU run) finished by Pillow."""
    loader = build_loader(cfg, dataset, finish_in_workers=finish)
    loader.batch_sampler.set_epoch(epoch)
    count, start = 0, time.perf_counter()
    for images, _labels in loader:
        count += len(images)
    return time.perf_counter() - start, count


def decode_jpeg_seconds(paths: list[str]) -> float:
    """Seconds per image: libjpeg-turbo decode + antialiased resize to 256, on tensors."""
    from torchvision.io import decode_jpeg, read_file
    from torchvision.transforms.v2 import functional as F

    start = time.perf_counter()
    for path in paths:
        F.resize(decode_jpeg(read_file(path)), 256, antialias=True)
    return (time.perf_counter() - start) / len(paths)


def dali_seconds(paths: list[str], batch: int = 32) -> float | None:
    """Seconds per image of NVIDIA DALI's CPU pipeline for the same protocol (one thread):
    decode, resize 256, random resized crop 224, flip, normalise; None without DALI."""
    try:
        from nvidia.dali import fn, pipeline_def, types
    except ImportError:
        return None

    @pipeline_def(batch_size=batch, num_threads=1, device_id=None, seed=0)
    def pipeline():
        jpegs, labels = fn.readers.file(files=paths, labels=list(range(len(paths))))
        images = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
        images = fn.resize(images, resize_shorter=256, antialias=True)
        images = fn.random_resized_crop(images, size=(224, 224), random_area=(0.08, 1.0))
        mean, std = (
            [255 * m for m in (0.485, 0.456, 0.406)],
            [255 * s for s in (0.229, 0.224, 0.225)],
        )
        coin = fn.random.coin_flip()
        images = fn.crop_mirror_normalize(
            images, mirror=coin, dtype=types.FLOAT, mean=mean, std=std
        )
        return images, labels

    dali = pipeline()
    dali.build()
    dali.run()  # warm-up
    runs = max(1, len(paths) // batch)
    start = time.perf_counter()
    for _ in range(runs):
        dali.run()
    return (time.perf_counter() - start) / (runs * batch)


def first_batch_of_epoch_2(cfg: TrainConfig, dataset, persistent: bool) -> float:
    """Seconds from the start of epoch 2 to its first batch (epoch 1 run to its end)."""
    loader = build_loader(cfg, dataset)
    if not persistent:  # fit before: the same loader, its workers started every epoch
        loader = DataLoader(
            dataset,
            batch_sampler=loader.batch_sampler,
            collate_fn=loader.collate_fn,
            num_workers=cfg.num_workers,
            persistent_workers=False,
        )
    with loader_batches(loader) as batches:
        for _ in batches:
            pass
    loader.batch_sampler.set_epoch(1)
    start = time.perf_counter()
    with loader_batches(loader) as batches:
        next(batches)
        seconds = time.perf_counter() - start
    stop_workers(loader)
    return seconds


def measure(root: Path, cache: Path, repeats: int) -> list[dict]:
    pil_cfg, new_cfg = config(root, cache, False), config(root, cache, True)
    pil_set = train_set(pil_cfg)
    start = time.perf_counter()
    new_set = train_set(new_cfg)  # builds the cache: once per dataset
    build_s = (time.perf_counter() - start) / len(new_set)
    times: dict[str, list[float]] = {"pil": [], "new": [], "cpu run": []}
    for repeat in range(repeats):
        for side in ("pil", "new", "cpu run") if repeat % 2 == 0 else ("cpu run", "new", "pil"):
            cfg, dataset = (pil_cfg, pil_set) if side == "pil" else (new_cfg, new_set)
            seconds, count = epoch_seconds(cfg, dataset, repeat, finish=side == "cpu run")
            times[side].append(seconds / count)
            print(f"  {side}: {1e3 * seconds / count:.2f} ms/image", flush=True)
    pil_s, new_s, cpu_s = (statistics.median(times[side]) for side in ("pil", "new", "cpu run"))
    batch = next(iter(build_loader(new_cfg, new_set)))[0]
    start = time.perf_counter()
    to_device(batch, torch.device("cpu"))
    device_s = (time.perf_counter() - start) / len(batch)
    jpeg_s = decode_jpeg_seconds(pil_set.paths[: min(len(pil_set), 128)])
    dali_s = dali_seconds(pil_set.paths)
    rows = [
        make_row(
            GROUP,
            "host seconds per training image, 500×375 JPEG → 224 px",
            dmlkit_s=new_s,
            reference="PIL decode + transforms per epoch (fit before)",
            reference_s=pil_s,
            target="≤ 0.1",
            note=f"{1 / new_s:,.0f} against {1 / pil_s:,.0f} images/s per core",
        ),
        make_row(
            GROUP,
            "for information: torchvision.io decode_jpeg + resize 256",
            dmlkit_s=jpeg_s,
            reference="PIL path",
            reference_s=pil_s,
            note="the fastest uncached decode: per epoch, before any crop",
        ),
        make_row(
            GROUP,
            "for information: NVIDIA DALI CPU pipeline, same protocol",
            dmlkit_s=dali_s,
            reference="PIL path",
            reference_s=pil_s if dali_s is not None else None,
            note="decodes every epoch (nvidia-dali-cuda130, CPU mode, 1 thread)"
            if dali_s is not None
            else "not run: nvidia-dali not installed (optional: pip install nvidia-dali-cuda130)",
        ),
        make_row(
            GROUP,
            "for information: building the decoded cache, per image",
            dmlkit_s=build_s,
            note="once per dataset and resize (2 processes here)",
        ),
        make_row(
            GROUP,
            "for information: the device half on this CPU, per image",
            dmlkit_s=device_s,
            note="crop-resize + flip + normalise of a 32-image batch as batched matmuls",
        ),
        make_row(
            GROUP,
            "for information: a CPU run's input path (cache, crops finished by Pillow)",
            dmlkit_s=cpu_s,
            reference="PIL path",
            reference_s=pil_s,
            note="what fit on the CPU does in its workers: host and device half together",
        ),
    ]
    workers = config(root, cache, True, workers=2)
    warm = first_batch_of_epoch_2(workers, new_set, persistent=True)
    cold = first_batch_of_epoch_2(workers, new_set, persistent=False)
    rows.append(
        make_row(
            "input pipeline (CPU, 2 workers)",
            "time to the first batch of epoch 2",
            dmlkit_s=warm,
            reference="workers started again each epoch (fit before)",
            reference_s=cold,
            note="persistent workers: the batch was prefetched while epoch 1 ended",
        )
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=384, help="JPEGs written (half train)")
    parser.add_argument("--repeats", type=int, default=3, help="epochs per side")
    parser.add_argument("--quick", action="store_true", help="128 images, one repeat")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args()
    images, repeats = (128, 1) if args.quick else (args.images, args.repeats)
    torch.set_num_threads(1)
    print(header() + "\n", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root, cache = Path(tmp) / "jpegs", Path(tmp) / "cache"
        write_jpegs(root, images)
        rows = measure(root, cache, repeats)
    print(markdown_table(rows))
    if args.json:
        write_json(rows, args.json)


if __name__ == "__main__":
    main()

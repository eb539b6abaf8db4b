"""Training throughput: ``fit``'s training step against the model's bare forward+backward.

    .venv/bin/python benchmarks/bench_train.py [--threads 1] [--repeats 3] [--models ...]
        [--quick] [--json rows.json]

CPU rows: glyphs-mini (64 px), batch 32×4, triplet loss, Adam, ``num_workers=0``. The
"fit" column is the images/s that ``fit`` itself measures for its training epochs
(DataLoader + PKBatchSampler + transforms + host→device copy + forward + loss + backward +
optimizer + scheduler; evaluation excluded), median over the epochs after a warm-up
epoch. The "bare" column is the same model's forward + ``sum().backward()`` on one
pre-built batch tensor of the same shape, median of ``--repeats`` rounds taken before and
after the fit run (so load from other processes hits both). ratio = fit / bare; the
target is ≥ 0.85 (data, sampler, loss and optimizer overhead ≤ 15 %).

CUDA rows (only when a GPU is present): resnet50 and googlenet at 224 px, batch 128
(32×4), bf16 autocast + channels_last, fed from 256 px JPEG files this script writes into a
temporary ``folder`` dataset (100 train classes × 60 images: a CUB-sized epoch of 46 steps)
and decodes with DataLoader workers ("imagenet" transforms), so the input pipeline is part
of what is measured; the note gives the rate of that DataLoader alone (one epoch, no
model). Without a GPU they are rows that say "not run: no CUDA". ``--quick``: glyphnet
only, one bare round before and after. ``--gpu-only``: the CUDA rows alone;
``--gpu-dry-run``: their whole path (JPEG folder, DataLoader workers, bf16 autocast,
channels_last, ``fit``) on the CPU with glyphnet at 224 px and a toy batch, no target (see
rows.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import rows as table_rows
import torch
from machine import header
from rows import NO_CUDA, make_row, markdown_table, not_run, write_json

from dmlkit.data.crops import to_device
from dmlkit.data.loader import loader_batches
from dmlkit.models import build_model
from dmlkit.train import TrainConfig, fit
from dmlkit.train.build import build_datasets, build_loader

AMP = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def bare_images_per_s(cfg: TrainConfig, size: int, device: torch.device, steps: int) -> float:
    """Forward + backward of the model alone on one resident batch (no data, loss, optimizer)."""
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = build_model(cfg.backbone, embedding_dim=cfg.embedding_dim).to(
        device, memory_format=memory_format
    )
    batch = cfg.p * cfg.k
    images = torch.randn(batch, 3, size, size, device=device).contiguous(
        memory_format=memory_format
    )
    dtype = AMP[cfg.amp]

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            embeddings = model(images)
        embeddings.sum().backward()

    for _ in range(2):  # warm-up: allocator, oneDNN/cuDNN kernel selection
        step()
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _synchronize(device)
    return steps * batch / (time.perf_counter() - start)


def fit_images_per_s(cfg: TrainConfig) -> float:
    """``fit``'s own training throughput, median over the epochs after the first."""
    history = fit(cfg).history
    return statistics.median(record["images_per_s"] for record in history[1:])


def loader_epoch(cfg: TrainConfig, device: torch.device, pin_memory: bool | None = None):
    """(images, seconds, seconds to the first batch) of one epoch of ``fit``'s own
    DataLoader alone: fresh workers, as every epoch of ``fit`` starts them; batches copied to
    ``device``; ``pin_memory`` as ``fit`` sets it unless given."""
    train_set, _ = build_datasets(cfg)
    pin = device.type == "cuda" if pin_memory is None else pin_memory
    loader = build_loader(cfg, train_set, pin_memory=pin)
    start, first, count = time.perf_counter(), None, 0
    with loader_batches(loader) as batches:
        for images, _labels in batches:
            to_device(images, device)
            first = first if first is not None else time.perf_counter() - start
            count += len(images)
    _synchronize(device)
    return count, time.perf_counter() - start, first or 0.0


def measure(
    cfg: TrainConfig, size: int, repeats: int, bare_steps: int, loader: bool = False
) -> dict:
    """fit's and the bare model's images/s; ``loader``: also the DataLoader's alone."""
    device = torch.device(cfg.device) if cfg.device else torch.device("cpu")
    bare = [bare_images_per_s(cfg, size, device, bare_steps) for _ in range(repeats)]
    fitted = fit_images_per_s(cfg)
    bare += [bare_images_per_s(cfg, size, device, bare_steps) for _ in range(repeats)]
    bare_median = statistics.median(bare)
    images, seconds, _ = loader_epoch(cfg, device) if loader else (None, None, None)
    return {
        "model": cfg.backbone,
        "device": str(device),
        "images": cfg.p * cfg.k,
        "bare img/s": bare_median,
        "fit img/s": fitted,
        "ratio": fitted / bare_median,
        "loader img/s": images / seconds if loader else None,
        "workers": cfg.num_workers,
    }


def cpu_configs(models: list[str], out: Path) -> list[tuple[TrainConfig, int, int]]:
    rows = []
    for backbone in models:
        heavy = backbone != "glyphnet"
        cfg = TrainConfig(
            dataset="glyphs-mini",
            backbone=backbone,
            loss="triplet",
            p=32,
            k=4,
            epochs=3,
            num_batches=6 if heavy else 20,
            eval_every=0,
            device="cpu",
            progress=False,
            out_dir=str(out / f"cpu-{backbone}"),
        )
        rows.append((cfg, 64, 3 if heavy else 10))
    return rows


def write_jpeg_folder(root: Path, *, classes: int = 64, train_images: int = 48) -> None:
    """A ``folder`` dataset of 256 px JPEGs: class folders 000..; the second half (test
    split) gets 4 images per class so the final evaluation stays short."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"{c:03d}"
        folder.mkdir(parents=True)
        base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        count = train_images if c < classes // 2 else 4
        for i in range(count):
            noise = rng.integers(0, 64, (256, 256, 3), dtype=np.uint8)
            pixels = np.kron(base, np.ones((32, 32, 1), np.uint8)) // 2 + noise
            Image.fromarray(pixels).save(folder / f"{i:03d}.jpg", quality=90)


def cuda_configs(
    root: Path, out: Path, device: torch.device | None = None
) -> list[tuple[TrainConfig, int, int]]:
    """The CUDA rows' runs; on a CPU ``device`` the dry run: glyphnet, a 4×2 batch, 2 steps."""
    device = device or torch.device("cuda")
    dry_run = device.type != "cuda"
    workers = 1 if dry_run else max(1, min(16, (os.cpu_count() or 2) - 2))
    backbones = ("glyphnet",) if dry_run else ("resnet50", "googlenet")
    shape = {"p": 4, "k": 2, "epochs": 2, "num_batches": 2} if dry_run else {"p": 32, "k": 4}
    return [
        (
            TrainConfig(
                dataset="folder",
                data_root=str(root),
                dataset_options={"decoded_cache": True, "cache_dir": str(out / "decoded")},
                backbone=backbone,
                loss="triplet",
                **{"epochs": 3, **shape},
                eval_every=0,
                amp="bf16",
                channels_last=True,
                num_workers=workers,
                device=device.type,
                deterministic=False,  # cuDNN autotuning on, as in a speed-minded run
                progress=False,
                out_dir=str(out / f"cuda-{backbone}"),
            ),
            224,
            2 if dry_run else 20,
        )
        for backbone in backbones
    ]


BARE = "bare forward+backward"
CUB_SIZED = {"classes": 200, "train_images": 60}


def group_name(threads: int, cuda: bool) -> str:
    return "training (CUDA)" if cuda else f"training (CPU, {threads} thread{'s' * (threads > 1)})"


def case_name(cfg: TrainConfig, size: int, cuda: bool) -> str:
    amp = ("fp32" if cfg.amp == "off" else cfg.amp) + (
        " + channels_last" if cfg.channels_last else ""
    )
    jpeg = ", JPEG decoding" if cuda else ""
    return f"{cfg.backbone}, {size} px, {cfg.p}×{cfg.k}, {amp}{jpeg}"


def as_row(result: dict, case: str, threads: int, cuda: bool) -> dict:
    """The measurement as a rows.py row: seconds per training step, ratio = fit / bare.

    cuda: whether it is a CUDA row; one that ran on the CPU is a dry run.
    """
    images = result["images"]
    row = make_row(
        group_name(threads, cuda),
        case,
        dmlkit_s=images / result["fit img/s"],
        reference=BARE,
        reference_s=images / result["bare img/s"],
        ratio=result["fit img/s"] / result["bare img/s"],
        target="≥ 0.85",
        note=(
            f"times per step of {images} images; fit {result['fit img/s']:.0f} img/s, "
            f"bare {result['bare img/s']:.0f} img/s"
            + (
                f"; fit decodes the JPEG files in {result['workers']} DataLoader workers, "
                f"which alone deliver {result['loader img/s']:.0f} img/s"
                if cuda
                else ""
            )
        ),
    )
    return table_rows.dry_run(row) if cuda and result["device"] == "cpu" else row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, help="bare rounds before and after (default 3)")
    parser.add_argument("--models", nargs="+", help="CPU backbones (default glyphnet resnet18)")
    parser.add_argument("--quick", action="store_true", help="glyphnet only, 1 bare round")
    parser.add_argument("--json", help="also write the rows (benchmarks/rows.py) to this file")
    table_rows.add_gpu_options(parser)
    args = parser.parse_args()
    models = args.models or (["glyphnet"] if args.quick else ["glyphnet", "resnet18"])
    repeats = args.repeats or (1 if args.quick or args.gpu_dry_run else 3)
    gpu = table_rows.gpu_device(args)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    print(header() + "\n", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        plans = cpu_configs(models, out) if table_rows.cpu_rows_wanted(args) else []
        plans = [(*plan, False) for plan in plans]
        if gpu is not None:
            # 100 train classes × 60: a CUB-sized epoch (5,864 images, 46 steps of 128)
            classes = {"classes": 8, "train_images": 8} if args.gpu_dry_run else CUB_SIZED
            write_jpeg_folder(out / "jpegs", **classes)
            plans += [(*plan, True) for plan in cuda_configs(out / "jpegs", out, gpu)]
        for cfg, size, bare_steps, is_gpu in plans:
            case = case_name(cfg, size, is_gpu)
            try:
                result = measure(cfg, size, repeats, bare_steps, loader=is_gpu)
            except Exception as error:  # one failing model must not cost the others
                traceback.print_exc()
                group = group_name(args.threads, is_gpu)
                rows.append(table_rows.failed(group, case, error, reference=BARE))
            else:
                rows.append(as_row(result, case, args.threads, cuda=is_gpu))
            print(markdown_table(rows[-1:]).splitlines()[-1], flush=True)
    if gpu is None:
        rows += [
            not_run(
                group_name(1, True),
                case_name(cfg, size, True),
                NO_CUDA,
                reference=BARE,
                target="≥ 0.85",
            )
            for cfg, size, _ in cuda_configs(Path(), Path())  # only named, never built
        ]
    print(f"\n{args.threads} CPU thread(s); target: fit / bare ≥ 0.85\n")
    print(markdown_table(rows))
    if args.json:
        write_json(rows, args.json)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()

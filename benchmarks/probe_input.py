"""Where the CUDA training rows lose time: fit's input pipeline alone, against fit.

    python benchmarks/probe_input.py [--device cuda] [--big-classes 200]

Not part of ``make bench`` (no target): it explains the training (CUDA) rows of
``bench_train.py``. On the JPEG folders that script writes, it prints

1. one image through the "imagenet" train transform (PIL decode, resize, random crop,
   flip, ToTensor, Normalize) in this process, and the rate that many workers could reach;
2. fit's own DataLoader alone (``dmlkit.train.build.build_loader``, fresh workers per epoch
   as in ``fit``), two epochs each with and without pinned memory, for a 1,536-image epoch
   and a CUB-sized one (``--big-classes`` 200: 100 train classes × 60 images), with the
   wait for the first batch;
3. ResNet-50 ``fit`` against its bare forward + backward (``bench_train.measure``) on each.

On a machine without CUDA, ``--device cpu`` runs the same code with glyphnet at toy size.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch
from bench_train import cuda_configs, loader_epoch, measure, write_jpeg_folder
from machine import header

from dmlkit.train.build import build_datasets


def per_image_seconds(cfg, count: int = 300) -> float:
    train_set, _ = build_datasets(cfg)
    start = time.perf_counter()
    for i in range(count):
        train_set[i % len(train_set)]
    return (time.perf_counter() - start) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--big-classes", type=int, default=200)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(1)
    print(header() + "\n", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folders = {"1,536-image epoch": tmp / "small", "CUB-sized epoch": tmp / "big"}
        write_jpeg_folder(folders["1,536-image epoch"])
        write_jpeg_folder(folders["CUB-sized epoch"], classes=args.big_classes, train_images=60)
        cfg = cuda_configs(folders["1,536-image epoch"], tmp, device)[0][0]
        seconds = per_image_seconds(cfg)
        print(
            f"one image, decode + train transform: {1e3 * seconds:.2f} ms; "
            f"{cfg.num_workers} workers: at most {cfg.num_workers / seconds:.0f} img/s\n"
        )
        print("| epoch | what | images/s | first batch after | note |")
        print("| --- | --- | ---: | ---: | --- |")
        for name, root in folders.items():
            cfg = dataclasses.replace(cuda_configs(root, tmp, device)[0][0], out_dir=None)
            for pin in (False, True):
                for epoch in range(2):
                    count, total, first = loader_epoch(cfg, device, pin)
                    after = (count - cfg.p * cfg.k) / max(total - first, 1e-9)
                    print(
                        f"| {name} | DataLoader alone, pin_memory={pin}, epoch {epoch} "
                        f"| {count / total:.0f} | {first:.2f} s | {after:.0f} img/s after "
                        "the first batch |",
                        flush=True,
                    )
            fitted = dataclasses.replace(cfg, out_dir=str(tmp / f"fit-{root.name}"))
            result = measure(fitted, 224, 1, 20 if device.type == "cuda" else 2, loader=True)
            print(
                f"| {name} | fit, {result['model']} | {result['fit img/s']:.0f} | — | "
                f"bare {result['bare img/s']:.0f} img/s, fit / bare {result['ratio']:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()

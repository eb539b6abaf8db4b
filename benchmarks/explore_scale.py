"""What the explorer (explore.ipynb) costs at a size: kNN, thumbnails, the page and its bytes.

    .venv/bin/python benchmarks/explore_scale.py [--n 60502] [--classes 11316] [--points 3000]
        [--k 5] [--out page.html]

Synthetic data of SOP's test size by default: N unit vectors in 128-D around one centre
per class (about 5 images a class, as SOP), and one 32 × 32 RGB thumbnail per image made
of a seeded 4 × 4 colour grid enlarged smoothly plus noise (PNG bytes of the order of a
small photo; glyphs, grayscale, are smaller). Times are wall seconds of one run on this
machine; the t-SNE of the shown points is not included (``bench_tsne.py``). Prints one
line per step and the page's size.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from dmlkit.plotting import (
    embedding_explorer,
    needed_items,
    save_explorer,
    thumbnail_uris,
    top_k,
)
from dmlkit.tsne import subsample


def synthetic(n: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centres = rng.normal(size=(classes, 128))
    embeddings = centres[labels] + rng.normal(size=(n, 128)) * 0.7
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings.astype(np.float32), labels


def thumbnail(index: int) -> np.ndarray:
    rng = np.random.default_rng(index)
    grid = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    smooth = np.asarray(grid.resize((32, 32), Image.Resampling.BILINEAR), dtype=np.int16)
    return np.clip(smooth + rng.integers(-8, 9, smooth.shape), 0, 255).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=60502)
    parser.add_argument("--classes", type=int, default=11316)
    parser.add_argument("--points", type=int, default=3000, help="points on the map")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--out", type=Path, help="keep the page here (else a temporary file)")
    args = parser.parse_args()
    embeddings, labels = synthetic(args.n, args.classes)
    start = time.perf_counter()

    def step(what: str) -> None:
        nonlocal start
        print(f"{what}: {time.perf_counter() - start:.1f} s", flush=True)
        start = time.perf_counter()

    found = top_k(embeddings, labels, k=args.k)
    step(f"top_k of all {args.n:,} (exact kNN, k = {args.k})")
    points = subsample(args.n, args.points, seed=0, labels=labels)
    items = needed_items(points, found)
    uris = thumbnail_uris({int(i): thumbnail(int(i)) for i in items})
    step(f"{len(items):,} thumbnails ({len(points):,} points and their neighbours)")
    coords = np.random.default_rng(1).normal(size=(len(points), 2))  # stands in for t-SNE
    layout = embedding_explorer(coords, points, labels, found, uris)
    with tempfile.TemporaryDirectory() as folder:
        page = save_explorer(layout, args.out or Path(folder) / "explore.html")
        step("the view and its standalone page")
        thumbs = sum(len(uri) for uri in uris.values())
        print(
            f"page: {page.stat().st_size / 1e6:.1f} MB, of which thumbnails "
            f"{thumbs / 1e6:.1f} MB ({thumbs / len(uris):.0f} B each)"
        )


if __name__ == "__main__":
    main()

"""Barnes-Hut t-SNE of a Cars-test-sized embedding: ``dmlkit.tsne`` beside scikit-learn's.

    .venv/bin/python benchmarks/bench_tsne.py [--threads 1 2] [--repeats 2] [--settings]
        [--quick] [--json rows.json]

Data: 8,131 × 512 unit vectors (the size of the Cars196 test set), 98 classes of three
modes each, with noise such that Recall@1 in the input space is about 0.7 (a trained
Cars embedding's range); seeded. Both sides: perplexity 30, Barnes-Hut with θ (sklearn's
``angle``) 0.5, PCA initialisation, early exaggeration 12 for 250 iterations then 500
more (sklearn ``max_iter=750``), each library's ``learning_rate="auto"`` (openTSNE: N/12
while exaggerated, then N; sklearn: N/48 throughout — its gradient carries a factor 4
that openTSNE's does not, so N/48 there is N/12 in openTSNE's units), seed 0.

A row limits both sides to T threads (``n_jobs`` and threadpoolctl, which also bounds
sklearn's OpenMP gradient, otherwise on every core). Runs alternate sklearn, dmlkit,
dmlkit, sklearn, …; a cell is the median over ``--repeats``. ratio = dmlkit / sklearn,
target ≤ 0.85. The note gives each map's 10-NN label agreement (the fraction of a point's
10 nearest map neighbours in its class), so a faster run that draws a worse map shows.
The cache-hit row times ``tsne_coordinates`` reading its own cache back (target ≤ 1 s).
``--settings`` adds information rows for openTSNE's neighbour search ("exact": sklearn's
exact kNN; "annoy", "pynndescent": approximate — all give the standard perplexity-based
affinities on the 90 neighbours found) at each thread count, and θ = 0.6 and 0.8 (still
Barnes-Hut, but coarser than sklearn's 0.5).
``--quick``: 2,000 points, one thread, one repeat.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from machine import header
from rows import make_row, markdown_table, write_json
from threadpoolctl import threadpool_limits

from dmlkit.tsne import tsne_coordinates

PERPLEXITY = 30.0
CARS_TEST = 8131


def cars_like(n: int = CARS_TEST, dim: int = 512, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) float32 unit vectors and labels: 98 classes × 3 modes, Recall@1 ≈ 0.7."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 98, n)
    centres = rng.normal(size=(98, 3, dim))
    x = centres[labels, rng.integers(0, 3, n)] + 3.0 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def run_dmlkit(x: np.ndarray, threads: int, cache=None, **options) -> np.ndarray:
    """``tsne_coordinates`` with its defaults unless ``options`` (neighbors, theta) says."""
    return tsne_coordinates(x, perplexity=PERPLEXITY, n_jobs=threads, cache_path=cache, **options)


def run_sklearn(x: np.ndarray, threads: int) -> np.ndarray:
    from sklearn.manifold import TSNE

    tsne = TSNE(
        perplexity=PERPLEXITY,
        method="barnes_hut",
        angle=0.5,
        init="pca",
        learning_rate="auto",
        max_iter=750,
        random_state=0,
        n_jobs=threads,
    )
    return tsne.fit_transform(x)


def agreement(coords: np.ndarray, labels: np.ndarray, k: int = 10) -> float:
    """Fraction of each point's k nearest map neighbours that share its label."""
    from sklearn.neighbors import NearestNeighbors

    index = NearestNeighbors(n_neighbors=k + 1).fit(coords)
    neighbours = index.kneighbors(coords, return_distance=False)[:, 1:]
    return float((labels[neighbours] == labels[:, None]).mean())


def timed(run: Callable[[], np.ndarray], threads: int) -> tuple[float, np.ndarray]:
    with threadpool_limits(threads):
        start = time.perf_counter()
        coords = run()
        return time.perf_counter() - start, coords


def compare(x, labels, threads: int, repeats: int, cache_root: Path) -> tuple[list, Path]:
    """dmlkit vs sklearn at ``threads``, alternating; returns the rows and a filled cache."""
    times: dict[str, list[float]] = {"dmlkit": [], "sklearn": []}
    quality: dict[str, float] = {}
    cache = cache_root / f"threads-{threads}"
    for step in range(repeats):
        order = ["sklearn", "dmlkit"] if step % 2 == 0 else ["dmlkit", "sklearn"]
        for side in order:
            if side == "dmlkit":
                # A fresh folder per run: a miss, then the write, as a first call pays.
                folder = cache / str(step)
                seconds, coords = timed(lambda f=folder: run_dmlkit(x, threads, cache=f), threads)
            else:
                seconds, coords = timed(lambda: run_sklearn(x, threads), threads)
            times[side].append(seconds)
            quality[side] = agreement(coords, labels)
            print(f"  {side}, {threads} thread(s): {seconds:.1f} s", flush=True)
    dmlkit_s, sklearn_s = (statistics.median(times[k]) for k in ("dmlkit", "sklearn"))
    row = make_row(
        f"t-SNE (CPU, {threads} thread{'s' * (threads > 1)})",
        f"Barnes-Hut, {len(x):,} × {x.shape[1]}, dmlkit.tsne defaults",
        dmlkit_s=dmlkit_s,
        reference="sklearn TSNE(method='barnes_hut')",
        reference_s=sklearn_s,
        target="≤ 0.85",
        note=(
            f"perplexity 30, θ 0.5, 250 + 500 iterations, PCA init; 10-NN label agreement "
            f"dmlkit {quality['dmlkit']:.3f}, sklearn {quality['sklearn']:.3f}; "
            f"median of {repeats}"
        ),
    )
    return [row], cache / "0"


def cache_hit_row(x: np.ndarray, threads: int, cache: Path) -> dict:
    hits = []
    for _ in range(5):
        start = time.perf_counter()
        run_dmlkit(x, threads, cache=cache)
        hits.append(time.perf_counter() - start)
    return make_row(
        "t-SNE (CPU)",
        f"cache hit, {len(x):,} × {x.shape[1]}",
        dmlkit_s=statistics.median(hits),
        target="≤ 1 s",
        note="tsne_coordinates reading its .npz back (hashing the input included); median of 5",
    )


SETTINGS = (
    {"neighbors": "exact"},
    {"neighbors": "annoy"},
    {"neighbors": "pynndescent"},
    {"neighbors": "exact", "theta": 0.6},
    {"neighbors": "exact", "theta": 0.8},
)
"""openTSNE options timed by --settings: the neighbour search at θ = 0.5, then θ (the
Barnes-Hut accuracy/speed trade-off; sklearn stays at 0.5, so those rows are not the
same computation)."""


def settings_rows(x, labels, threads: int, sklearn_s: float) -> list[dict]:
    """Each of SETTINGS beside the sklearn time at ``threads``; one run each."""
    rows = []
    for options in SETTINGS:
        described = ", ".join(f"{key}={value!r}" for key, value in options.items())
        case = f"openTSNE {described}, n_jobs={threads}"
        group = f"t-SNE settings (CPU, {threads} thread{'s' * (threads > 1)})"
        try:
            seconds, coords = timed(lambda o=options: run_dmlkit(x, threads, **o), threads)
        except ImportError:  # openTSNE's "pynndescent" needs the optional package
            what = options["neighbors"]
            rows.append(make_row(group, case, note=f"not run: {what} is not installed"))
            continue
        rows.append(
            make_row(
                group,
                case,
                dmlkit_s=seconds,
                reference="sklearn TSNE(method='barnes_hut')",
                reference_s=sklearn_s,
                note=f"10-NN label agreement {agreement(coords, labels):.3f}; one run",
            )
        )
        print(markdown_table(rows[-1:]).splitlines()[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", help="thread counts (default 1 2)")
    parser.add_argument("--repeats", type=int, help="runs per side and thread count (default 2)")
    parser.add_argument("--points", type=int, help=f"points (default {CARS_TEST:,})")
    parser.add_argument("--settings", action="store_true", help="openTSNE neighbour methods")
    parser.add_argument("--quick", action="store_true", help="2,000 points, 1 thread, 1 run")
    parser.add_argument("--json", help="also write the rows (benchmarks/rows.py) to this file")
    args = parser.parse_args()
    threads = args.threads or ([1] if args.quick else [1, 2])
    repeats = args.repeats or (1 if args.quick else 2)
    x, labels = cars_like(args.points or (2000 if args.quick else CARS_TEST))
    print(header() + "\n", flush=True)
    for count in threads:  # imports and first-call set-up outside the clock
        timed(lambda c=count: run_dmlkit(x[:300], c), count)
        timed(lambda c=count: run_sklearn(x[:300], c), count)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for count in threads:
            found, cache = compare(x, labels, count, repeats, Path(tmp))
            rows += found
            if count == threads[0]:
                rows.append(cache_hit_row(x, count, cache))
            if args.settings:
                rows += settings_rows(x, labels, count, found[0]["reference_s"])
    print("\n" + markdown_table(rows))
    if args.json:
        write_json(rows, args.json)


if __name__ == "__main__":
    main()

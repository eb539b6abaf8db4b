"""Exact kNN retrieval at SOP scale: dmlkit vs sklearn, faiss-cpu and pytorch-metric-learning.

    python benchmarks/bench_eval.py                      # N = 10,000 and 60,502, D = 512
    python benchmarks/bench_eval.py --sizes 10000 --repeats 1 --nmi

Data: unit-norm embeddings drawn as a mixture of many small classes (SOP-like: about
5.4 items per class, grouped under 12 super-classes so that near neighbours are dense),
seeded. Every method runs in a fresh subprocess (so its peak RSS is its own), on all CPU
threads, and must return the 100 nearest neighbours of every item among the others.
Columns: seconds (median of --repeats, data generation excluded), peak RSS of the
process (data included), Recall@1/10/100, and whether they are identical to the exact
reference (float64 brute force, ties by lower index, computed once per size).
faiss-cpu / pytorch-metric-learning rows are skipped when not installed
(``pip install -c constraints.txt faiss-cpu pytorch-metric-learning``).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time

import torch

KS = (1, 10, 100)
METHODS = ("dmlkit", "dmlkit-fp32", "dmlkit-cuda", "torch-naive", "sklearn", "faiss", "pml")


def sop_like(
    n: int, dim: int = 512, seed: int = 0, noise: float = 1.9
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, dim) unit-norm embeddings and labels of ~n/5.4 classes in 12 super-classes;
    every class has at least 2 items (as in SOP).

    Drawn a chunk of rows at a time, so generating the data adds little to peak RSS.
    """
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(2, 10, (n,), generator=g)
    num_classes = int((torch.cumsum(sizes, 0) < n).sum()) + 1
    sizes = sizes[:num_classes]
    sizes[-1] = n - sizes[:-1].sum()  # the last class takes what is left: 1..9 items
    if sizes[-1] == 1 and num_classes > 1:
        # A singleton class has no positive: retrieval_metrics skips such queries while
        # the reference averages over all n, and the `identical` column would say NO.
        sizes[-2] += 1
        sizes, num_classes = sizes[:-1], num_classes - 1
    labels = torch.repeat_interleave(torch.arange(num_classes), sizes)
    labels = labels[torch.randperm(n, generator=g)]
    supers = torch.randn(12, dim, generator=g)
    centers = supers[torch.randint(0, 12, (num_classes,), generator=g)]
    centers = centers + 1.2 * torch.randn(num_classes, dim, generator=g)
    centers = torch.nn.functional.normalize(centers, dim=1)
    x = torch.empty(n, dim)
    for s in range(0, n, 4096):
        part = centers[labels[s : s + 4096]]
        part += noise * torch.randn(part.shape, generator=g) / math.sqrt(dim)
        x[s : s + 4096] = torch.nn.functional.normalize(part, dim=1)
    return x, labels


def recalls(neighbours: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Recall@1/10/100 from (N, ≥100) neighbour indices (self excluded)."""
    hits = labels[neighbours[:, : max(KS)]] == labels[:, None]
    return {f"recall@{k}": float(hits[:, :k].any(1).double().mean()) for k in KS}


def drop_self(indices, k: int):
    """Remove each row's own index from (N, k+1) results (or its last column)."""
    indices = torch.as_tensor(indices)
    own = indices == torch.arange(len(indices))[:, None]
    own[~own.any(1), -1] = True
    return indices[~own].view(len(indices), k)


def run_dmlkit(x, labels, precision="auto"):
    from dmlkit.evaluate import knn, retrieval_metrics

    if precision == "auto":  # the public metric call: one kNN pass serves every metric
        metrics = retrieval_metrics(x, labels, ks=KS, nmi=False)
        return {key: metrics[key] for key in (f"recall@{k}" for k in KS)}
    return recalls(knn(x, k=max(KS), precision=precision)[1], labels)


def run_dmlkit_cuda(x, labels):
    """``knn`` on the GPU; ``worker`` moved x there before the clock started."""
    from dmlkit.evaluate import knn

    return recalls(knn(x, k=max(KS))[1].cpu(), labels)  # .cpu() waits for the GPU


def run_torch_naive(x, labels, block=2048):
    """Plain blocked fp32 matmul + topk: the obvious baseline."""
    out = []
    for s in range(0, len(x), block):
        scores = x[s : s + block] @ x.T
        scores[torch.arange(len(scores)), torch.arange(s, s + len(scores))] = -math.inf
        out.append(scores.topk(max(KS), dim=1).indices)
    return recalls(torch.cat(out), labels)


def run_sklearn(x, labels):
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=max(KS) + 1, algorithm="brute").fit(x.numpy())
    return recalls(drop_self(nn.kneighbors(x.numpy())[1], max(KS)), labels)


def run_faiss(x, labels):
    import faiss

    index = faiss.IndexFlatIP(x.shape[1])  # inner product = cosine order on unit vectors
    index.add(x.numpy())
    return recalls(drop_self(index.search(x.numpy(), max(KS) + 1)[1], max(KS)), labels)


def run_pml(x, labels):
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    calc = AccuracyCalculator(include=("precision_at_1",), k=max(KS), device=torch.device("cpu"))
    return {"recall@1": calc.get_accuracy(x, labels)["precision_at_1"]}  # P@1 = R@1


RUNNERS = {
    "dmlkit": run_dmlkit,
    "dmlkit-fp32": lambda x, y: run_dmlkit(x, y, "fp32"),
    "dmlkit-cuda": run_dmlkit_cuda,
    "torch-naive": run_torch_naive,
    "sklearn": run_sklearn,
    "faiss": run_faiss,
    "pml": run_pml,
}


def reference_recalls(x, labels, block=1024) -> dict[str, float]:
    """Exact reference: float64 squared distances, stable sort (ties by lower index)."""
    x64 = x.double()
    sq = x64.pow(2).sum(1)
    out = []
    for s in range(0, len(x), block):
        d = sq[s : s + block, None] + sq[None, :] - 2 * x64[s : s + block] @ x64.T
        d[torch.arange(len(d)), torch.arange(s, s + len(d))] = math.inf
        # The 300 smallest by topk, then a stable sort of that short list keeps ties exact.
        near = d.topk(3 * max(KS), dim=1, largest=False).indices.sort(1).values
        order = d.gather(1, near).argsort(dim=1, stable=True)[:, : max(KS)]
        out.append(near.gather(1, order))
    return recalls(torch.cat(out), labels)


def worker(method: str, n: int, repeats: int) -> None:
    """Run one method in this (fresh) process and print one JSON line."""
    x, labels = sop_like(n)
    if method in ("faiss", "pml") and not _installed(method):
        print(json.dumps({"skipped": f"{method} not installed"}))
        return
    if method == "dmlkit-cuda":
        if not torch.cuda.is_available():
            print(json.dumps({"skipped": "no CUDA device"}))
            return
        x = x.to("cuda")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = RUNNERS[method](x, labels)
        times.append(time.perf_counter() - start)
    print(json.dumps({"seconds": statistics.median(times), "peak_mb": _peak_mb(), **result}))


def _peak_mb() -> float:
    """Peak RSS of this process in MB (10^6 bytes, the issue's unit): VmHWM (reset by exec,
    unlike ru_maxrss)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e6  # VmHWM is in KiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6  # Linux: KiB


def _installed(method: str) -> bool:
    module = {"faiss": "faiss", "pml": "pytorch_metric_learning"}[method]
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def _spawn(args: list[str]) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        return {"skipped": f"failed: {done.stderr.strip().splitlines()[-1:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def nmi_worker(n: int) -> None:
    """Time k-means (k = number of classes) + NMI on the SOP-like set."""
    from dmlkit.evaluate import kmeans, normalized_mutual_info

    x, labels = sop_like(n)
    start = time.perf_counter()
    clusters = kmeans(x, int(labels.max()) + 1, seed=0)
    nmi = normalized_mutual_info(labels, clusters)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "nmi": nmi, "peak_mb": _peak_mb()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 60_502])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--nmi", action="store_true", help="also time k-means + NMI")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--nmi-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.sizes[0], args.repeats)
    if args.nmi_worker:
        return nmi_worker(args.sizes[0])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, D = 512, k = 100")
    header = f"{'N':>7} {'method':<12} {'seconds':>8} {'peak RSS':>9}"
    print(header + "".join(f" {f'R@{k}':>7}" for k in KS) + "  identical")
    for n in args.sizes:
        reference = reference_recalls(*sop_like(n))
        for method in args.methods:
            row = _spawn(["--worker", method, "--sizes", str(n), "--repeats", str(args.repeats)])
            _print_row(n, method, row, reference)
        if args.nmi:
            row = _spawn(["--nmi-worker", "--sizes", str(n)])
            print(
                f"{n:>7} k-means+NMI: {row.get('seconds', float('nan')):.1f} s, "
                f"NMI {row.get('nmi', float('nan')):.4f}, peak {row.get('peak_mb', 0):.0f} MB"
            )


def _print_row(n: int, method: str, row: dict, reference: dict) -> None:
    if "skipped" in row:
        print(f"{n:>7} {method:<12} skipped ({row['skipped']})")
        return
    cells, same = "", True
    for k in KS:
        value = row.get(f"recall@{k}")
        cells += f" {value:7.4f}" if value is not None else f" {'n/a':>7}"
        same &= value is None or value == reference[f"recall@{k}"]
    line = f"{n:>7} {method:<12} {row['seconds']:8.2f} {row['peak_mb']:6.0f} MB" + cells
    print(line + f"  {'yes' if same else 'NO'}", flush=True)


if __name__ == "__main__":
    main()

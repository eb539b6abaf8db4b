"""Exact kNN and k-means + NMI: dmlkit against faiss-cpu, side by side in the same process.

    python benchmarks/bench_eval.py                                  # full grid + NMI row
    python benchmarks/bench_eval.py --sizes 8131 --dims 512 --ks 100 --no-nmi
    python benchmarks/bench_eval.py --nmi-only --json bench_eval.json

kNN grid: N ∈ {1,000; 5,924; 8,131; 10,000; 60,502} × D ∈ {128, 512} × k ∈ {1, 100, 1000}
(k capped at N − 1): all-vs-all self-retrieval as ``retrieval_metrics`` runs it (queries =
keys = the N items, self excluded). Data: SOP-like unit-norm embeddings (``sop_like``),
seeded. Each case runs in a fresh subprocess where dmlkit's ``knn`` and faiss
``IndexFlatIP`` (k + 1 neighbours, self dropped) alternate — one untimed warm-up each for
N < 50,000, then ``--repeats`` timed rounds, the order swapped every round, each library
run several times in a row within a round when a search takes under ~30 ms (``BURST``:
faiss's spinning OpenMP threads slow whatever runs right after it) — on the same
thread count (torch and faiss OpenMP: ``--threads``, default all cores); seconds are
medians, ratio = dmlkit / faiss, target ≤ 1.5 for N ≥ 5,924 (the search is a fraction of
an epoch there; smaller searches take milliseconds and are information rows).
"identical": dmlkit's neighbours equal the float64 reference (brute force, ties by lower
index; a difference among equal distances does not count); faiss's share of rows with the
reference's neighbour set is in the note. At N = 60,502 separate processes run dmlkit's
``knn`` and faiss once each and report their peak RSS (VmHWM, 10^9 bytes; ``import torch``
alone is ~0.53 GB); the 1.5 GB bound counts for k ≤ 100 (at k = 1000 the (N, k) answer
alone is 0.73 GB).

NMI row (N = 60,502, D = 512, k = number of classes): dmlkit ``kmeans`` against
``faiss.Kmeans`` with the same number of Lloyd iterations (``--iterations``; dmlkit's early
stop off), each followed by ``normalized_mutual_info`` with the labels.

kNN (CUDA) rows, only when a GPU is present: dmlkit's ``knn`` on the GPU against the plain
float32 brute force on the same GPU (``X @ X.T`` in blocks + ``topk``, which is not exact),
N ∈ {8,131; 60,502}, D = 512, k = 100; "not run: no CUDA" otherwise. ``--gpu-only``: these
rows alone; ``--gpu-dry-run``: their code on the CPU at N = 300 (see rows.py).

``--sklearn-kmeans`` adds an information row: scikit-learn's ``KMeans`` on the same data
(k-means++, ``n_init=1``, the same iterations), its seconds and NMI; ~20 minutes here.

``--quick``: N ∈ {1,000; 8,131}, D = 512, k ∈ {1, 100}, 3 rounds, and the NMI row.

``--json PATH`` writes the rows as a JSON list of objects: group, case, dmlkit_s,
reference, reference_s, ratio, target, ok, note (the ``make bench`` report reads them).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import header  # noqa: E402
from rows import (  # noqa: E402
    NO_CUDA,
    add_gpu_options,
    cpu_rows_wanted,
    dry_run,
    failed,
    gpu_device,
    make_row,
    not_run,
)

SIZES = (1_000, 5_924, 8_131, 10_000, 60_502)
DIMS = (128, 512)
KS = (1, 100, 1000)
SOP = 60_502
RSS_LIMIT_GB = 1.5
# Short searches run in bursts of up to BURST in a row per library (about BURST_SECONDS):
# faiss's OpenMP threads keep spinning for a while after each search (libgomp's default
# wait policy) and hold a core that the next search needs. At N = 1,000, D = 128, k = 100 a
# dmlkit run right after faiss took 9.1 ms against 5.6 ms after dmlkit, 11.4 ms with
# OMP_WAIT_POLICY=passive (D = 512; 16.0 otherwise); faiss after dmlkit 6.6 against 6.3 ms.
BURST = 20
BURST_SECONDS = 0.05
TARGET = 1.5  # kNN time / faiss, for N ≥ TARGET_FROM (issue: the search is a fraction of an epoch)
TARGET_FROM = 5_924  # CUB's test set; smaller searches take milliseconds: information rows
NMI_TARGET = 1.0


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
    if sizes[-1] == 1 and num_classes > 1:  # no singleton class (SOP has none)
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


# ---------------------------------------------------------------- the two kNN searches


def dmlkit_knn(x: torch.Tensor, k: int) -> torch.Tensor:
    from dmlkit.evaluate import knn

    return knn(x, k=k)[1]


def faiss_knn(x: torch.Tensor, k: int) -> torch.Tensor:
    """IndexFlatIP (inner product = Euclidean order on unit vectors), self dropped."""
    import faiss

    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x.numpy())
    found = torch.from_numpy(index.search(x.numpy(), k + 1)[1])
    own = found == torch.arange(len(found))[:, None]
    own[~own.any(1), -1] = True  # self not found (a tie): drop the last instead
    return found[~own].view(len(found), k)


# ---------------------------------------------------------------- float64 reference


def reference_knn(x: torch.Tensor, k: int, block: int = 512) -> torch.Tensor:
    """(N, k) exact neighbours: float64 squared distances, ties by the lower index."""
    x64 = x.double()
    sq = x64.pow(2).sum(1)
    out = torch.empty(len(x), k, dtype=torch.int32)
    keep = min(len(x) - 1, k + 64)  # topk, then an exact stable sort of the short list
    for s in range(0, len(x), block):
        d = sq[s : s + block, None] + sq[None, :] - 2 * x64[s : s + block] @ x64.T
        d[torch.arange(len(d)), torch.arange(s, s + len(d))] = math.inf
        near = d.topk(keep, dim=1, largest=False).indices.sort(1).values
        order = d.gather(1, near).argsort(dim=1, stable=True)[:, :k]
        out[s : s + block] = near.gather(1, order)
    return out


def same_up_to_ties(x: torch.Tensor, found: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(N,) bool: a row's neighbours are the reference's, or differ only among equal
    float64 distances."""
    found = found.long()
    reference = reference[:, : found.shape[1]].long()
    same = (found == reference).all(1)
    rows = torch.nonzero(~same).flatten()
    x64 = x.double()
    for part in rows.split(max(1, 2**22 // (found.shape[1] * x.shape[1]))):
        q = x64[part][:, None, :]  # (rows, 1, D): float64 (q − k)² like the reference
        mine = (q - x64[found[part]]).pow(2).sum(-1).sort(1).values
        theirs = (q - x64[reference[part]]).pow(2).sum(-1).sort(1).values
        same[part] = (mine == theirs).all(1)
    return same


# ---------------------------------------------------------------- subprocess workers


def knn_worker(n: int, dim: int, k: int, repeats: int, threads: int, ref_path: str) -> dict:
    """Alternate dmlkit and faiss on one case; compare both with the reference."""
    import faiss

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    x, _ = sop_like(n, dim)
    runners = {"dmlkit": dmlkit_knn, "faiss": faiss_knn}
    times: dict[str, list[float]] = {name: [] for name in runners}
    results = {}
    burst = 1
    if n < 50_000:  # warm-up: library initialisation, oneDNN kernels, the bf16 probe
        for name, run in runners.items():
            start = time.perf_counter()
            results[name] = run(x, k)
            burst = max(burst, min(BURST, round(BURST_SECONDS / (time.perf_counter() - start))))
    for r in range(repeats):
        for name in runners if r % 2 == 0 else reversed(list(runners)):
            for _ in range(burst):
                start = time.perf_counter()
                results[name] = runners[name](x, k)
                times[name].append(time.perf_counter() - start)
    reference = torch.load(ref_path, weights_only=True)
    return {
        "dmlkit_s": statistics.median(times["dmlkit"]),
        "faiss_s": statistics.median(times["faiss"]),
        "dmlkit_all": times["dmlkit"],
        "faiss_all": times["faiss"],
        "identical": bool(same_up_to_ties(x, results["dmlkit"], reference).all()),
        "faiss_same": float(same_up_to_ties(x, results["faiss"], reference).double().mean()),
    }


def rss_worker(method: str, n: int, dim: int, k: int, threads: int) -> dict:
    """One search ("dmlkit" or "faiss") in this fresh process; its peak RSS."""
    torch.set_num_threads(threads)
    if method == "faiss":
        import faiss

        faiss.omp_set_num_threads(threads)
    x, _ = sop_like(n, dim)
    start = time.perf_counter()
    {"dmlkit": dmlkit_knn, "faiss": faiss_knn}[method](x, k)
    return {"seconds": time.perf_counter() - start, "peak_gb": peak_rss_gb()}


def reference_worker(n: int, dim: int, k: int, threads: int, path: str) -> dict:
    torch.set_num_threads(threads)
    torch.save(reference_knn(sop_like(n, dim)[0], k), path)
    return {}


def nmi_worker(n: int, dim: int, iterations: int, threads: int) -> dict:
    """dmlkit kmeans and faiss.Kmeans (same iterations), each with NMI; alternated once."""
    import faiss

    from dmlkit.evaluate import kmeans, normalized_mutual_info

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    x, labels = sop_like(n, dim)
    clusters = int(labels.max()) + 1

    def run_dmlkit():
        return kmeans(x, clusters, seed=0, max_iter=iterations, tol=0.0)

    def run_faiss():
        km = faiss.Kmeans(dim, clusters, niter=iterations, seed=0, verbose=False)
        km.train(x.numpy())
        return torch.from_numpy(km.index.search(x.numpy(), 1)[1][:, 0])

    out = {"clusters": clusters, "iterations": iterations}
    for name, run in (("dmlkit", run_dmlkit), ("faiss", run_faiss)):
        start = time.perf_counter()
        assignment = run()
        out[f"{name}_nmi"] = normalized_mutual_info(labels, assignment)
        out[f"{name}_s"] = time.perf_counter() - start
    return out


def sklearn_kmeans_worker(n: int, dim: int, iterations: int, threads: int) -> dict:
    """scikit-learn's KMeans (k-means++, n_init=1) on the NMI row's data, with its NMI."""
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    from dmlkit.evaluate import normalized_mutual_info

    x, labels = sop_like(n, dim)
    start = time.perf_counter()
    with threadpool_limits(threads):
        km = KMeans(int(labels.max()) + 1, n_init=1, max_iter=iterations, random_state=0)
        km.fit(x.numpy())
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "nmi": normalized_mutual_info(labels, km.labels_)}


def peak_rss_gb() -> float:
    """Peak RSS of this process in GB (10^9 bytes): VmHWM, reset by exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9  # kB
    return float("nan")


def spawn(*args) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(args)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def cuda_worker(n: int, dim: int, k: int, repeats: int, device: str = "cuda") -> dict:
    """dmlkit's knn on CUDA against float32 mm + topk on the same GPU (not exact)."""
    from dmlkit.evaluate import knn

    x = sop_like(n, dim)[0].to(device)

    def synchronize() -> None:
        if x.is_cuda:
            torch.cuda.synchronize()

    def brute(block: int = 8192) -> torch.Tensor:
        out = []
        for s in range(0, n, block):
            scores = x[s : s + block] @ x.T
            rows = torch.arange(len(scores), device=x.device)
            scores[rows, rows + s] = -math.inf
            out.append(scores.topk(k, dim=1).indices)
        return torch.cat(out)

    runners = {"dmlkit": lambda: knn(x, k=k)[1], "brute": brute}
    times: dict[str, list[float]] = {name: [] for name in runners}
    for run in runners.values():  # warm-up
        run()
    for r in range(repeats):
        for name in runners if r % 2 == 0 else reversed(list(runners)):
            synchronize()
            start = time.perf_counter()
            runners[name]()
            synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


WORKERS = {
    "cuda": cuda_worker,
    "knn": knn_worker,
    "rss": rss_worker,
    "reference": reference_worker,
    "nmi": nmi_worker,
    "sklearn_kmeans": sklearn_kmeans_worker,
}


# ---------------------------------------------------------------- the report


def knn_rows(args, tmp: Path):
    for n in args.sizes:
        for dim in args.dims:
            ks = sorted({min(k, n - 1) for k in args.ks})
            ref_path = str(tmp / f"reference_{n}_{dim}.pt")
            made = spawn("reference", n, dim, max(ks), args.threads, ref_path)
            if "error" in made:
                print(f"reference N={n} D={dim} failed: {made['error']}", flush=True)
                continue
            for k in ks:
                repeats = args.repeats if n < 50_000 else args.sop_repeats
                row = spawn("knn", n, dim, k, repeats, args.threads, ref_path)
                rss = None
                if n >= 50_000:
                    rss = {m: spawn("rss", m, n, dim, k, args.threads) for m in ("dmlkit", "faiss")}
                yield knn_row(n, dim, k, row, rss)
            os.unlink(ref_path)


def knn_row(n: int, dim: int, k: int, row: dict, rss: dict | None) -> dict:
    case = f"N={n} D={dim} k={k}"
    if "error" in row:
        return failed_row("kNN", case, "faiss IndexFlatIP", row["error"])
    ratio = row["dmlkit_s"] / row["faiss_s"]
    notes = ["identical" if row["identical"] else "NOT identical"]
    target = f"≤ {TARGET}" if n >= TARGET_FROM else "—"
    if n >= TARGET_FROM:
        ok = ratio <= TARGET and row["identical"]
    else:  # an information row: only a wrong answer fails it
        ok = None if row["identical"] else False
    if rss is not None:
        mine, theirs = rss["dmlkit"], rss["faiss"]
        if "error" in mine:
            notes.append(f"peak RSS failed: {mine['error']}")
            ok = False
        else:
            notes.append(f"peak {mine['peak_gb']:.2f} GB")
            # The (N, k) answer alone (float32 + int64) is 0.73 GB at k = 1000: with torch's
            # 0.53 GB no search fits 1.5 GB there, so the bound is checked for k ≤ 100.
            if k <= 100:
                ok &= mine["peak_gb"] <= RSS_LIMIT_GB
        if "peak_gb" in theirs:
            notes.append(f"faiss peak {theirs['peak_gb']:.2f} GB")
    notes.append(f"faiss same sets {100 * row['faiss_same']:.2f} %")
    out = make_row(
        "kNN",
        case,
        dmlkit_s=row["dmlkit_s"],
        reference="faiss IndexFlatIP",
        reference_s=row["faiss_s"],
        target=target,
        note="; ".join(notes),
    )
    return {**out, "ok": ok if ok is None else bool(ok)}


def nmi_row(args) -> dict:
    case = f"N={SOP} D=512 C=classes it={args.iterations}"
    row = spawn("nmi", SOP, 512, args.iterations, args.threads)
    if "error" in row:
        return failed_row("k-means+NMI", case, "faiss Kmeans", row["error"])
    delta = row["dmlkit_nmi"] - row["faiss_nmi"]
    out = make_row(
        "k-means+NMI",
        f"N={SOP} D=512 C={row['clusters']} it={row['iterations']}",
        dmlkit_s=row["dmlkit_s"],
        reference="faiss Kmeans",
        reference_s=row["faiss_s"],
        target=f"≤ {NMI_TARGET}",
        note=f"NMI Δ {delta:+.4f} ({row['dmlkit_nmi']:.4f} vs {row['faiss_nmi']:.4f})",
    )
    return {**out, "ok": bool(out["ok"] and abs(delta) <= 0.005)}


def sklearn_kmeans_row(args) -> dict:
    case = f"for information: N={SOP} D=512 C=classes it={args.iterations}"
    row = spawn("sklearn_kmeans", SOP, 512, args.iterations, args.threads)
    if "error" in row:
        return failed_row("k-means+NMI", case, "—", row["error"])
    note = f"NMI {row['nmi']:.4f}; k-means++ tries 11 candidates per center, one at a time"
    return make_row(
        "k-means+NMI", case, reference="scikit-learn KMeans", reference_s=row["seconds"], note=note
    )


def cuda_rows(args) -> list[dict]:
    group, reference = "kNN (CUDA)", "float32 mm + topk (CUDA)"
    device = gpu_device(args)
    if device is None:
        return [not_run(group, "N=8131, 60502 D=512 k=100", NO_CUDA, reference=reference)]
    sizes, k = ((300,), 10) if args.gpu_dry_run else ((8_131, SOP), 100)
    rows = []
    for n in sizes:
        case = f"N={n} D=512 k={k}"
        row = spawn("cuda", n, 512, k, args.repeats, device.type)
        if "error" in row:
            rows.append(failed_row(group, case, reference, row["error"]))
            continue
        measured = make_row(
            group,
            case,
            dmlkit_s=row["dmlkit"],
            reference=reference,
            reference_s=row["brute"],
            note="information: the reference is not exact (float32 scores, no re-rank)",
        )
        rows.append(dry_run(measured) if args.gpu_dry_run else measured)
    return rows


def failed_row(group: str, case: str, reference: str, error: str) -> dict:
    return failed(group, case, error, reference=reference, target=f"≤ {TARGET}")


def print_row(row: dict) -> None:
    def cell(value, fmt):
        return format(value, fmt) if value is not None else "—"

    print(
        f"{row['group']:<12} {row['case']:<26} {cell(row['dmlkit_s'], '9.4f')} "
        f"{cell(row['reference_s'], '9.4f')} {cell(row['ratio'], '6.3f')} "
        f"{ {True: 'ok', False: 'MISS'}.get(row['ok'], '—'):<4}  {row['note']}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--dims", type=int, nargs="+", default=list(DIMS))
    parser.add_argument("--ks", type=int, nargs="+", default=list(KS))
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds, N < 50,000")
    parser.add_argument("--sop-repeats", type=int, default=1, help="timed rounds, N ≥ 50,000")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--iterations", type=int, default=20, help="k-means iterations")
    parser.add_argument("--no-nmi", action="store_true", help="skip the k-means + NMI row")
    parser.add_argument("--nmi-only", action="store_true", help="only the k-means + NMI row")
    parser.add_argument("--quick", action="store_true", help="a smaller grid, 3 rounds")
    parser.add_argument(
        "--sklearn-kmeans", action="store_true", help="also scikit-learn's KMeans (~20 min)"
    )
    parser.add_argument("--json", type=Path, help="also write the rows here (JSON list)")
    add_gpu_options(parser)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        name, *rest = json.loads(args.worker)
        print(json.dumps(WORKERS[name](*rest)))
        return
    if args.quick:
        args.sizes, args.dims, args.ks, args.repeats = [1_000, 8_131], [512], [1, 100], 3
    gpu_only = not cpu_rows_wanted(args)
    if args.gpu_dry_run:
        args.repeats = 1
    print(header())
    print(f"- benchmark threads: {args.threads} (torch and faiss)\n")
    print(f"{'group':<12} {'case':<26} {'dmlkit s':>9} {'faiss s':>9} {'ratio':>6} ok")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        if not args.nmi_only:
            for row in [] if gpu_only else knn_rows(args, Path(tmp)):
                rows.append(row)
                print_row(row)
            for row in cuda_rows(args):
                rows.append(row)
                print_row(row)
    if not (args.no_nmi or gpu_only):
        rows.append(nmi_row(args))
        print_row(rows[-1])
        if args.sklearn_kmeans:
            rows.append(sklearn_kmeans_row(args))
            print_row(rows[-1])
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()

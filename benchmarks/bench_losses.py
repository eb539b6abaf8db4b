"""Forward+backward time of every dmlkit loss beside pytorch-metric-learning's equivalent.

    .venv/bin/python benchmarks/bench_losses.py [--sizes 128 512 2048] [--repeats 15]
        [--quick] [--json rows.json]

Batches are P×K with K = 4: B/4 classes drawn from max(196, B/4) (so B = 2048 has 512
classes, and Proxy-Anchor 512 proxies there), D = 512, L2-normalized random embeddings.
Both libraries run in one process on the same inputs, interleaved repeat by repeat (order
alternating) after a warm-up, so load from other processes hits both alike; a cell is the
median of the repeats (fewer when a cell passes ``--budget`` seconds, at least 3) and the
ratio is dmlkit / PML (< 1: dmlkit faster; target ≤ 1.0). Semantics: "same" rows give the
same loss value in both libraries (the note gives the relative difference measured here);
"≈" rows have no exact PML equivalent and use the nearest one; "—" rows have none and
report dmlkit's time alone. PML columns are empty when pytorch-metric-learning is not
installed (``make bench`` installs it); CUDA rows run when a GPU is present.
``--gpu-only``: the CUDA rows alone; ``--gpu-dry-run``: their code on the CPU at B = 128,
one repeat, no target (see rows.py).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import rows as table_rows
import torch
from machine import header
from rows import NO_CUDA, make_row, markdown_table, not_run, write_json

from dmlkit.losses import build_loss

try:
    from pytorch_metric_learning import distances as pml_distances
    from pytorch_metric_learning import losses as pml_losses
    from pytorch_metric_learning import miners as pml_miners
except ImportError:  # the optional `bench` extra is not installed
    pml_losses = pml_miners = pml_distances = None

DIM = 512
NUM_CLASSES = 196  # Cars196-sized proxy and segment tables (more when B/4 needs more)
SOP_CLASSES = 11318
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Case:
    """One table row: a dmlkit loss and, where one exists, its PML counterpart."""

    name: str
    loss: str
    options: dict
    pml: str | None  # key of _pml_builders(), None: no PML equivalent
    semantics: str
    num_classes: int = NUM_CLASSES


CASES = [
    Case("contrastive (squared=False)", "contrastive", {"squared": False}, "contrastive", "same"),
    Case("contrastive (default, d²)", "contrastive", {}, None, "— (PML has no [m−d]²₊)"),
    Case("triplet all", "triplet", {}, "triplet_all", "same"),
    Case(
        "triplet semihard",
        "triplet",
        {"mining": "semihard"},
        "triplet_semihard",
        "≈ PML keeps every semihard triplet; dmlkit one negative per (a,p)",
    ),
    Case("triplet hard", "triplet", {"mining": "hard"}, "triplet_hard", "same (BatchHardMiner)"),
    Case("npair", "npair", {}, "npair", "same"),
    Case("ms", "ms", {}, "ms", "same (with MultiSimilarityMiner)"),
    Case("proxy_anchor", "proxy_anchor", {}, "proxy_anchor", "same (same proxies)"),
    Case("daal", "daal", {}, None, "—"),
    Case("daal (SOP)", "daal", {}, None, "—", num_classes=SOP_CLASSES),
    Case("contrastive + density", "contrastive", {"density": True}, None, "—"),
    Case("triplet + density", "triplet", {"density": True}, None, "—"),
    Case("npair + density", "npair", {"density": True}, None, "—"),
]


def _with_miner(loss: Callable, miner: Callable) -> Loss:
    return lambda z, y: loss(z, y, miner(z, y))


def _pml_builders() -> dict[str, Callable[[torch.nn.Module], Loss]]:
    """PML counterparts with dmlkit's defaults; each gets the dmlkit module (for proxies)."""
    triplet = pml_losses.TripletMarginLoss(margin=0.2)

    def proxy_anchor(ours: torch.nn.Module) -> Loss:
        theirs = pml_losses.ProxyAnchorLoss(len(ours.proxies), DIM, margin=0.1, alpha=32)
        with torch.no_grad():
            theirs.proxies.copy_(ours.proxies)
        return theirs.to(ours.proxies.device)

    # PML's N-pair has no scale: an unnormalized dot product of √10·z gives 10·<z_i, z_j>.
    npair = pml_losses.NPairsLoss(
        distance=pml_distances.DotProductSimilarity(normalize_embeddings=False)
    )
    return {
        "contrastive": lambda _: pml_losses.ContrastiveLoss(pos_margin=0.0, neg_margin=0.5),
        "triplet_all": lambda _: _with_miner(
            triplet, pml_miners.TripletMarginMiner(margin=0.2, type_of_triplets="all")
        ),
        "triplet_semihard": lambda _: _with_miner(
            triplet, pml_miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard")
        ),
        "triplet_hard": lambda _: _with_miner(triplet, pml_miners.BatchHardMiner()),
        "npair": lambda _: lambda z, y: npair(math.sqrt(10.0) * z, y),
        "ms": lambda _: _with_miner(
            pml_losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5),
            pml_miners.MultiSimilarityMiner(epsilon=0.1),
        ),
        "proxy_anchor": proxy_anchor,
    }


def class_count(case: Case, batch: int) -> int:
    """Classes the labels are drawn from (and proxies/segments): B/4 at least."""
    return max(case.num_classes, batch // 4)


def make_batch(batch: int, device: torch.device, num_classes: int, seed: int = 0) -> tuple:
    """P×4 batch: B/4 distinct classes out of ``num_classes``, normalized embeddings."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.randperm(num_classes, generator=g)[: batch // 4]
    labels = classes.repeat_interleave(4)
    embeddings = torch.nn.functional.normalize(torch.randn(batch, DIM, generator=g), dim=1)
    return embeddings.to(device), labels.to(device)


def time_step(loss: Loss, embeddings: torch.Tensor, labels: torch.Tensor) -> float:
    """Seconds for one forward + backward (device synchronized on both ends)."""
    z = embeddings.detach().clone().requires_grad_(True)
    parameters = list(loss.parameters()) if isinstance(loss, torch.nn.Module) else []
    for parameter in parameters:
        parameter.grad = None
    _sync(z.device)
    start = time.perf_counter()
    loss(z, labels).backward()
    _sync(z.device)
    return time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    case: Case, batch: int, device: torch.device, repeats: int, warmup: int, budget: float
) -> dict:
    """Median seconds of dmlkit and PML, interleaved, plus the relative value difference.

    Stops early once ``budget`` seconds have passed and each side has 3 timed repeats.
    """
    num_classes = class_count(case, batch)
    embeddings, labels = make_batch(batch, device, num_classes)
    ours = build_loss(case.loss, num_classes=num_classes, embedding_dim=DIM, **case.options)
    ours = ours.to(device)
    theirs = None
    if case.pml is not None and pml_losses is not None:
        theirs = _pml_builders()[case.pml](ours)
    value = None
    if theirs is not None and case.semantics.startswith("same"):
        a, b = ours(embeddings, labels).item(), theirs(embeddings, labels).item()
        value = abs(a - b) / max(abs(b), 1e-12)
    times: dict[str, list[float]] = {"ours": [], "theirs": []}
    started = time.perf_counter()
    for step in range(warmup + repeats):
        order = ["ours", "theirs"] if step % 2 == 0 else ["theirs", "ours"]
        for side in order:
            loss = ours if side == "ours" else theirs
            if loss is None:
                continue
            elapsed = time_step(loss, embeddings, labels)
            if step >= warmup:
                times[side].append(elapsed)
        if step + 1 - warmup >= 3 and time.perf_counter() - started > budget:
            break
    median = {k: statistics.median(v) if v else None for k, v in times.items()}
    return {
        "ours": median["ours"],
        "theirs": median["theirs"],
        "value": value,
        "repeats": len(times["ours"]),
        "classes": num_classes,
    }


def group_name(threads: int, gpu: bool) -> str:
    return "losses (CUDA)" if gpu else f"losses (CPU, {threads} thread{'s' * (threads > 1)})"


def row_for(
    case: Case, batch: int, device: torch.device, result: dict, threads: int, gpu: bool = False
) -> dict:
    """The row of one cell; ``gpu``: a CUDA row (a dry run when ``device`` is the CPU)."""
    name = case.name
    if case.loss in ("proxy_anchor", "daal"):
        name += f" (C = {result['classes']})"
    notes = [case.semantics]
    if result["value"] is not None:
        notes.append(f"value Δ {result['value']:.1e}")
    notes.append(f"median of {result['repeats']}")
    has_reference = result["theirs"] is not None
    row = make_row(
        group_name(threads, gpu),
        f"{name}, B = {batch}",
        dmlkit_s=result["ours"],
        reference=f"PML {_pml_version()}" if has_reference else "—",
        reference_s=result["theirs"],
        target="≤ 1.0" if has_reference else "—",
        note="; ".join(notes),
    )
    return table_rows.dry_run(row) if gpu and device.type != "cuda" else row


def _pml_version() -> str:
    if pml_losses is None:
        return "not installed"
    import pytorch_metric_learning

    return pytorch_metric_learning.__version__


def trick_rows(sizes: list[int], repeats: int) -> list[dict]:
    """The two speed tricks of the losses against their plain forms (CPU; information):
    ``_SelfDistance`` (one in-place (B, B) buffer, one-matmul backward) against the Gram
    form + ``safe_sqrt``; Proxy-Anchor's direct exponentials (bounded exponents,
    ``EXP_BOUND``) against the masked log-sum-exp, with B/4 proxies (as above) and 1,000."""
    import dmlkit.losses.proxy_anchor as proxy_anchor
    from dmlkit.numerics import _SelfDistance, safe_sqrt

    def gram(x: torch.Tensor) -> torch.Tensor:
        norms = x.pow(2).sum(1)
        squared = torch.addmm(norms[:, None] + norms[None, :], x, x.T, alpha=-2).clamp_min(0)
        return safe_sqrt(squared - torch.diag_embed(squared.diagonal()))

    def timed(step: Callable[[], None]) -> float:
        step()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def distances(kind, x):
        def step():
            z = x.clone().requires_grad_()
            d = _SelfDistance.apply(z, False) if kind == "trick" else gram(z)
            (d * d.detach()).sum().backward()

        return step

    def proxies(bound, z, y, p):
        def step():
            proxy_anchor.EXP_BOUND = bound
            try:
                zz, pp = z.clone().requires_grad_(), p.clone().requires_grad_()
                proxy_anchor.proxy_anchor_loss(zz, y, pp).backward()
            finally:
                proxy_anchor.EXP_BOUND = default

        return step

    default, group, out = proxy_anchor.EXP_BOUND, "loss speed tricks (CPU, 1 thread)", []
    for batch in sizes:
        x, labels = make_batch(batch, torch.device("cpu"), max(196, batch // 4))
        plain, trick = timed(distances("plain", x)), timed(distances("trick", x))
        out.append(
            make_row(
                group,
                f"pairwise distances, B = {batch}",
                dmlkit_s=trick,
                reference="Gram form + safe_sqrt",
                reference_s=plain,
                note="_SelfDistance kept where this ratio is < 1",
            )
        )
        for count in sorted({batch // 4, 1000}):
            p = torch.randn(count, DIM)
            y = torch.randint(0, count, (batch,))
            plain = timed(proxies(0.0, x, y, p))
            direct = timed(proxies(default, x, y, p))
            out.append(
                make_row(
                    group,
                    f"Proxy-Anchor exponentials, B = {batch}, C = {count}",
                    dmlkit_s=direct,
                    reference="masked log-sum-exp",
                    reference_s=plain,
                    note="direct exp kept where this ratio is < 1",
                )
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", help="batch sizes (default 128 512 2048)")
    parser.add_argument("--repeats", type=int, help="timed repeats per cell (default 15)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--budget", type=float, default=20.0, help="seconds per cell, roughly")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: stable on a shared CPU)"
    )
    parser.add_argument("--only", nargs="*", help="case names containing any of these")
    parser.add_argument("--quick", action="store_true", help="B = 128 and 512, 5 repeats")
    parser.add_argument("--json", help="also write the rows (benchmarks/rows.py) to this file")
    table_rows.add_gpu_options(parser)
    args = parser.parse_args()
    sizes = args.sizes or ([128, 512] if args.quick else [128, 512, 2048])
    repeats = args.repeats or (5 if args.quick else 15)
    torch.set_num_threads(args.threads)
    gpu = table_rows.gpu_device(args)
    # (device, is it the CUDA row) per pass
    devices = [(torch.device("cpu"), False)] if table_rows.cpu_rows_wanted(args) else []
    devices += [(gpu, True)] if gpu is not None else []
    if args.gpu_dry_run:
        sizes, repeats, args.warmup = [128], 1, 0
    selected = [c for c in CASES if not args.only or any(s in c.name for s in args.only)]
    print(header())
    print(
        f"- pytorch-metric-learning: {_pml_version()}\n"
        f"- D = {DIM}, P×4 batches, median of up to {repeats} (warm-up {args.warmup}), "
        "forward+backward\n",
        flush=True,
    )
    rows = []
    for device, is_gpu in devices:
        for batch in sizes:
            for case in selected:
                threads = torch.get_num_threads()
                try:
                    result = measure(case, batch, device, repeats, args.warmup, args.budget)
                except Exception as error:  # one failing cell must not cost the others
                    traceback.print_exc()
                    group = group_name(threads, is_gpu)
                    rows.append(table_rows.failed(group, f"{case.name}, B = {batch}", error))
                else:
                    rows.append(row_for(case, batch, device, result, threads, gpu=is_gpu))
                print(markdown_table(rows[-1:]).splitlines()[-1], flush=True)
    if table_rows.cpu_rows_wanted(args):
        rows += trick_rows(sizes, repeats)
    if gpu is None:
        rows.append(not_run("losses (CUDA)", "every loss", NO_CUDA, target="≤ 1.0"))
    print("\n" + markdown_table(rows))
    if args.json:
        write_json(rows, args.json)


if __name__ == "__main__":
    main()

"""DDP: 2 gloo processes on the CPU against the single-process run on the same global batches.

One ``torch.multiprocessing.spawn`` of 2 ranks checks, in order:
1. ``train_step`` under DDP with the embedding all-gather equals a hand-written single
   process step on the concatenated global batch (a pair loss, and Proxy-Anchor whose
   proxies live outside DDP): parameters after every step within float tolerance;
2. ``fit`` under a torchrun-like environment: only rank 0 writes files and gets metrics,
   the checkpoint holds both ranks' RNG states, and a run crashed on both ranks and
   resumed ends with the same metrics as an uninterrupted DDP run;
3. only rank 0 reports: dataset lines, warnings and progress bars (DAAL's initial embed
   included) appear in rank 0's captured output, never in rank 1's.
"""

import contextlib
import io
import json
import logging
import os
import socket
import time
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import dmlkit.data
from dmlkit.losses import build_loss
from dmlkit.models import build_model
from dmlkit.samplers import PKBatchSampler
from dmlkit.train import TrainConfig, build_optimizer, fit, load_checkpoint, train_step
from dmlkit.train import distributed as ddp_utils
from tests.test_train import TinyGlyphs, comparable, tiny_config, tiny_get_dataset

WORLD_SIZE = 2
STEPS = 4
LOSSES = ("contrastive", "proxy_anchor")


def _setup(loss_name: str):
    data = TinyGlyphs("train")  # no augmentation: both sides see identical pixels
    torch.manual_seed(0)
    model = build_model("glyphnet", embedding_dim=8)
    loss_fn = build_loss(
        loss_name, num_classes=len(data.classes), classes=data.classes, embedding_dim=8
    )
    cfg = TrainConfig(loss=loss_name, optimizer="sgd", lr=0.05, lr_loss_mult=2.0)
    return data, model, loss_fn, build_optimizer(model, loss_fn, cfg)


def _shard(data: TinyGlyphs, rank: int) -> list[list[int]]:
    sampler = PKBatchSampler(
        data.labels, 4, 3, seed=0, num_batches=STEPS * WORLD_SIZE, rank=rank, world_size=WORLD_SIZE
    )
    return list(sampler)


def _parameters(model, loss_fn) -> dict[str, torch.Tensor]:
    named = [*model.named_parameters(), *loss_fn.named_parameters(prefix="loss")]
    return {name: p.detach().clone() for name, p in named}


def _ddp_steps(rank: int, loss_name: str) -> list[dict[str, torch.Tensor]]:
    data, model, loss_fn, optimizer = _setup(loss_name)
    network = DistributedDataParallel(model)
    snapshots = []
    for batch in _shard(data, rank):
        labels = torch.as_tensor(data.labels[batch])
        train_step(network, loss_fn, optimizer, data.images[batch], labels, gather=ddp_utils.gather)
        snapshots.append(_parameters(model, loss_fn))
    return snapshots


def _reference_steps(loss_name: str) -> list[dict[str, torch.Tensor]]:
    data, model, loss_fn, optimizer = _setup(loss_name)
    snapshots = []
    for batches in zip(*(_shard(data, rank) for rank in range(WORLD_SIZE)), strict=True):
        optimizer.zero_grad()
        # One forward per rank's batch: without SyncBatchNorm each rank normalizes its own.
        embeddings = torch.cat([model(data.images[b]) for b in batches])  # (W·B, D)
        labels = torch.cat([torch.as_tensor(data.labels[b]) for b in batches])
        loss_fn(embeddings, labels).backward()
        optimizer.step()
        snapshots.append(_parameters(model, loss_fn))
    return snapshots


class Crash(RuntimeError):
    pass


def _crash_at_epoch_2(epoch, step):
    if (epoch, step) == (1, 1):
        raise Crash


def _reporting_get_dataset(name, split, root=None, transform=None, **options):
    """``tiny_get_dataset`` that reports like the real loaders: an info line, a warning."""
    dataset = tiny_get_dataset(name, split, root, transform, **options)
    logging.getLogger("dmlkit.data.tiny").info(f"tiny/{split}: {len(dataset)} images")
    warnings.warn(f"tiny/{split}: not the official split", UserWarning, stacklevel=2)
    return dataset


def _captured_fit(cfg: TrainConfig) -> str:
    """What ``fit(cfg)`` writes to stderr, logs (INFO and up) and warns, as text."""
    stream = io.StringIO()
    handler, root = logging.StreamHandler(stream), logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stderr(stream), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit(cfg)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    return stream.getvalue() + "".join(f"warning: {w.message}\n" for w in caught)


def _fit_runs(rank: int, out: str, ports: list[int]) -> None:
    dmlkit.data.get_dataset = tiny_get_dataset  # this process's own module: no monkeypatch
    os.environ["WORLD_SIZE"] = str(WORLD_SIZE)  # fit joins the job through the environment
    # Each fit creates and ends its own process group. A fresh port per group: rank 1 could
    # otherwise reach the previous group's store, still listening on the old port, and wait
    # there forever while rank 0 cannot bind a new one (seen as a rare hang).
    os.environ["MASTER_PORT"] = str(ports[0])
    whole = fit(tiny_config(out_dir=os.path.join(out, "whole")))
    crashed = tiny_config(out_dir=os.path.join(out, "crashed"))
    os.environ["MASTER_PORT"] = str(ports[1])
    try:
        fit(crashed, on_step=_crash_at_epoch_2)
    except Crash:
        pass
    os.environ["MASTER_PORT"] = str(ports[2])
    resumed = fit(tiny_config(out_dir=os.path.join(out, "crashed"), resume=True))
    os.environ["MASTER_PORT"] = str(ports[3])
    dmlkit.data.get_dataset = _reporting_get_dataset
    # DAAL: its initialisation embeds the training set on every rank, with a bar.
    output = _captured_fit(tiny_config(loss="daal", epochs=1, progress=True))
    with open(os.path.join(out, f"rank{rank}.log"), "w") as handle:
        handle.write(output)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
        json.dump(
            {
                "whole": whole.metrics,
                "resumed": resumed.metrics,
                "history": comparable(whole.history),
                "resumed_history": comparable(resumed.history),
            },
            handle,
        )


def _worker(rank: int, ports: list[int], out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]), RANK=str(rank), LOCAL_RANK=str(rank)
    )
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        for loss_name in LOSSES:
            snapshots = _ddp_steps(rank, loss_name)
            if rank == 0:
                torch.save(snapshots, os.path.join(out, f"{loss_name}.pt"))
    finally:
        dist.destroy_process_group()
    _fit_runs(rank, out, ports[1:])


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free ports (all bound at once, so none repeats)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    context = mp.spawn(_worker, args=(_free_ports(5), str(out)), nprocs=WORLD_SIZE, join=False)
    deadline = time.monotonic() + 300
    while not context.join(timeout=5):  # re-raises a worker's exception
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the 2 DDP workers did not finish within 300 s (a hang)")
    return out


@pytest.mark.parametrize("loss_name", LOSSES)
def test_ddp_steps_match_single_process_on_the_global_batch(ddp_results, loss_name):
    distributed = torch.load(ddp_results / f"{loss_name}.pt", weights_only=True)
    reference = _reference_steps(loss_name)
    assert len(distributed) == len(reference) == STEPS
    initial = _parameters(*_setup(loss_name)[1:3])
    for step, (got, expected) in enumerate(zip(distributed, reference, strict=True)):
        assert got.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(
                got[name],
                expected[name],
                atol=2e-5,
                rtol=1e-4,
                msg=lambda m, n=name, s=step: f"step {s} {n}: {m}",
            )
    moved = [name for name in initial if not torch.equal(initial[name], reference[-1][name])]
    assert "head.weight" in moved
    assert loss_name != "proxy_anchor" or "loss.proxies" in moved


def test_fit_under_ddp_rank0_writes_and_resume_is_exact(ddp_results):
    ranks = [json.loads((ddp_results / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
    assert ranks[0]["whole"] and ranks[1]["whole"] == {}  # only rank 0 evaluates
    assert ranks[0]["resumed"] == ranks[0]["whole"]
    assert ranks[0]["resumed_history"] == ranks[0]["history"]
    assert [r["epoch"] for r in ranks[1]["history"]] == [1, 2, 3]  # every rank trains
    whole = ddp_results / "whole"
    assert sorted(p.name for p in whole.iterdir()) == [
        "checkpoint.pt",
        "embeddings.npz",
        "metrics.json",
    ]
    saved = json.loads((whole / "metrics.json").read_text())
    assert saved["world_size"] == WORLD_SIZE
    # Global batch = W·P·K images per step, W·P·K·(steps per rank) per epoch.
    history = saved["history"][0]
    assert history["images_per_s"] * history["seconds"] == pytest.approx(WORLD_SIZE * 4 * 3 * 2)
    checkpoint = load_checkpoint(whole / "checkpoint.pt")
    assert len(checkpoint["rng"]) == WORLD_SIZE
    assert not torch.equal(checkpoint["rng"][0]["torch"], checkpoint["rng"][1]["torch"])
    assert np.isfinite(saved["metrics"]["recall@1"])


def test_under_ddp_only_rank0_reports(ddp_results):
    rank0, rank1 = ((ddp_results / f"rank{r}.log").read_text() for r in range(WORLD_SIZE))
    expected = [
        "tiny/train: 48 images",  # dataset lines (logging)
        "tiny/test: 48 images",
        "warning: tiny/train: not the official split",  # warnings while building
        "training glyphnet + daal",  # fit's own log
        "epoch 1/1:",  # the training bar
        "embed:",  # DAAL's initial embed and the evaluation
    ]
    for line in expected:
        assert line in rank0, f"{line!r} missing from rank 0's output:\n{rank0}"
    assert rank1 == "", f"rank 1 reported:\n{rank1}"

"""Reliability and security: bad input, injected faults and untrusted files (issue 7); no
silent wrong result and no silent overwrite (issue 14).

Every case is listed, with what dmlkit does, in docs/reliability.md. Training runs use a tiny ``folder`` dataset of real JPEG files (5 + 5
classes of 3 images; glyphnet on 224 px crops; one run ≈ 1 s), so image decoding, the
DataLoader workers and the run folder are the real ones. Faults are injected for real
where that is cheap (SIGKILL of a training subprocess, a kill between the temporary write
and the rename, a full tmpfs in a private mount namespace) and by monkeypatching
otherwise. Slow tests (``make test-all``): the real notebook through the sweep runner, the
SOP-scale memory bound, more SIGKILL seeds.
"""

from __future__ import annotations

import ast
import dataclasses
import errno
import inspect
import json
import math
import multiprocessing
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor
from torch.testing import assert_close
from torch.utils.data import DataLoader

from dmlkit.data import DatasetError, get_dataset
from dmlkit.io import atomic_write_bytes, remove_stale_temporaries
from dmlkit.losses import (
    build_loss,
    contrastive_loss,
    multi_similarity_loss,
    npair_loss,
    proxy_anchor_loss,
    triplet_margin_loss,
)
from dmlkit.models import build_model
from dmlkit.train import CheckpointError, NonFiniteLossError, TrainConfig, fit, load_checkpoint
from tests.fixtures_datasets import make_cars, make_cub, make_folder, make_sop

ROOT = Path(__file__).resolve().parents[1]
CLASSES = [f"class{c:02d}" for c in range(10)]  # sorted names: 5 train, 5 test classes
TIMING = ("seconds", "images_per_s")


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """root/<class>/<k>.jpg: 10 classes × 3 JPEGs (read-only for the tests: copy to break)."""
    return make_folder(tmp_path_factory.mktemp("data") / "tree", CLASSES, images_per_class=3)


def tiny(root: Path, out_dir: Path | None = None, **overrides) -> TrainConfig:
    """A whole fit in about a second: every step sees all 15 training images (p·k = 15)."""
    values = dict(
        dataset="folder",
        data_root=str(root),
        embedding_dim=8,
        p=5,
        k=3,
        num_batches=2,
        epochs=3,
        eval_ks=(1, 2),
        batch_size_eval=16,
        progress=False,
        out_dir=None if out_dir is None else str(out_dir),
    )
    values.update(overrides)
    return TrainConfig(**values)


def cli_args(cfg: TrainConfig) -> list[str]:
    """``python -m dmlkit.train`` flags for the fields of ``cfg`` that ``tiny`` sets."""
    args = ["--threads", "1", "--no-progress"]
    for name in ("dataset", "data_root", "embedding_dim", "p", "k", "num_batches", "epochs"):
        args += ["--" + name.replace("_", "-"), str(getattr(cfg, name))]
    args += ["--eval-ks", ",".join(map(str, cfg.eval_ks)), "--batch-size-eval", "16"]
    return [*args, "--out-dir", cfg.out_dir]


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder`` → (content, mtime in ns); {} when it does not exist."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def comparable(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k not in TIMING} for record in history]


def break_jpeg(path: str | Path) -> None:
    """A JPEG header followed by garbage: opens as a JPEG, fails to decode."""
    Path(path).write_bytes(b"\xff\xd8\xff\xe0 not a JPEG after all")


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------- undecodable images


def test_dataset_error_keeps_its_type_through_dataloader_workers_and_pickle(tmp_path, tree):
    root = shutil.copytree(tree, tmp_path / "tree")
    ds = get_dataset("folder", "train", root=root, transform="test")
    break_jpeg(ds.paths[4])
    batches = iter(DataLoader(ds, batch_size=15, num_workers=1))
    # Before the fix DataLoader re-raised it as a bare RuntimeError (the constructor
    # needed two arguments), which `except DatasetError` does not catch.
    with pytest.raises(DatasetError, match="cannot decode image") as info:
        next(batches)
    batches._shutdown_workers()  # now, not in a later test's garbage collection
    assert ds.paths[4] in str(info.value) and "worker process" in str(info.value)
    clone = pickle.loads(pickle.dumps(DatasetError("folder", "broken", file=ds.paths[4])))
    assert isinstance(clone, DatasetError) and ds.paths[4] in str(clone)


@pytest.mark.parametrize("workers", [0, 2])
def test_undecodable_image_stops_training_naming_it_and_keeps_the_last_checkpoint(
    tmp_path, tree, workers
):
    root = shutil.copytree(tree, tmp_path / "tree")
    victim = root / "class01" / "1.jpg"  # a training image, seen by every step
    cfg = tiny(root, tmp_path / "run", num_workers=workers)

    def break_after_epoch_1(epoch, step):
        if (epoch, step) == (0, cfg.num_batches - 1):  # epoch 2's loader reads it again
            break_jpeg(victim)

    with pytest.raises(DatasetError, match="cannot decode image") as info:
        fit(cfg, on_step=break_after_epoch_1)
    assert str(victim) in str(info.value)
    # The workers are stopped with the error, not left to a later garbage collection
    # (whose DataLoader finaliser then stalled ~5 s per worker).
    assert multiprocessing.active_children() == []
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["epoch"] == 1
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint.pt"]


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_bad_images_finishes_and_metrics_json_counts_them(tmp_path, tree, workers):
    root = shutil.copytree(tree, tmp_path / "tree")
    bad = sorted([str(root / "class02" / "0.jpg"), str(root / "class07" / "2.jpg")])  # train, test
    for path in bad:
        break_jpeg(path)
    cfg = tiny(
        root, tmp_path / "run", num_workers=workers, dataset_options={"skip_bad_images": True}
    )
    result = fit(cfg)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # With workers, the main process's datasets never decode a training image: only the
    # shared log sees what the worker processes skipped.
    assert (saved["num_bad_images"], saved["bad_images"]) == (2, bad)
    assert result.bad_images == bad
    # The broken test image is left out of the evaluation: a substitute, a copy of another
    # test image of its class, would be a guaranteed hit.
    assert saved["metrics"]["num_queries"] == 14
    with np.load(tmp_path / "run" / "embeddings.npz") as arrays:
        assert len(arrays["embeddings"]) == len(arrays["labels"]) == 14


def test_skipped_images_count_once_across_a_resume_and_not_from_an_old_run(tmp_path, tree):
    root = shutil.copytree(tree, tmp_path / "tree")
    break_jpeg(root / "class03" / "2.jpg")
    cfg = tiny(root, tmp_path / "run", dataset_options={"skip_bad_images": True})
    log = tmp_path / "run" / "bad_images.jsonl"
    log.parent.mkdir()
    log.write_text(json.dumps(str(root / "class00" / "0.jpg")) + "\n{torn")  # an old run's

    def crash(epoch, step):
        if (epoch, step) == (1, 1):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(cfg, on_step=crash)
    victim = json.dumps(str(root / "class03" / "2.jpg"))
    assert log.read_text().splitlines() == [victim]  # the fresh start dropped the old log
    resumed = fit(dataclasses.replace(cfg, resume=True))
    assert log.read_text().splitlines() == [victim, victim]  # each session logs it
    assert resumed.bad_images == [str(root / "class03" / "2.jpg")]
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["num_bad_images"] == 1


def test_skip_bad_images_without_out_dir_still_counts_across_workers(tmp_path, tree):
    root = shutil.copytree(tree, tmp_path / "tree")
    break_jpeg(root / "class04" / "1.jpg")
    cfg = tiny(root, num_workers=2, epochs=1, dataset_options={"skip_bad_images": True})
    assert fit(cfg).bad_images == [str(root / "class04" / "1.jpg")]


# ---------------------------------------------------------------- configuration errors


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tree) -> Path:
    """A finished 3-epoch run folder (checkpoint.pt, metrics.json, embeddings.npz)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    fit(tiny(tree, out))
    return out


def never(epoch: int, step: int) -> None:
    raise AssertionError(f"training started (epoch {epoch}, step {step})")


CONFIG_ERRORS = [
    ({"loss": "arcface"}, ValueError, "loss: unknown value 'arcface'; valid: contrastive"),
    ({"backbone": "alexnet"}, ValueError, "backbone: unknown value 'alexnet'; valid: glyphnet"),
    ({"dataset": "mnist"}, ValueError, "dataset: unknown value 'mnist'; valid: glyphs"),
    ({"p": 6}, ValueError, r"p=6 classes x k=3 .* \(5 classes, 15 images\): choose p <= 5"),
    ({"p": 5, "k": 4}, ValueError, r"p\*k <= 15"),
    ({"p": 2, "k": 5, "epochs": 1}, None, None),  # k > images of a class: topped up, trains
    ({"p": 0}, ValueError, "p: must be >= 2, got 0"),
    ({"k": 0}, ValueError, "k: must be >= 1, got 0"),
    ({"embedding_dim": 0}, ValueError, "embedding_dim: must be >= 2, got 0"),
    ({"embedding_dim": -8}, ValueError, "embedding_dim: must be >= 2, got -8"),
    ({"epochs": -1}, ValueError, "epochs: must be >= 0, got -1"),
    ({"num_batches": 0}, ValueError, "num_batches: must be >= 1 or None, got 0"),
    ({"batch_size_eval": 0}, ValueError, "batch_size_eval: must be >= 1, got 0"),
    ({"num_workers": -1}, ValueError, "num_workers: must be >= 0, got -1"),
    ({"lr": -0.1}, ValueError, "lr: must be > 0, got -0.1"),
    ({"loss_params": {"margn": 0.1}}, ValueError, "margn"),
    ({"dataset_options": {"size": 64}}, ValueError, "dataset_options for 'folder'.*size"),
    ({"data_root": "/nonexistent/tree"}, DatasetError, "/nonexistent/tree: dataset root does"),
    (
        {"dataset": "glyphs-mini", "dataset_options": {"seed": -1}},
        ValueError,
        "glyphs: seed must be an int >= 0, got -1",
    ),
    (
        {"dataset": "glyphs-mini", "dataset_options": {"size": 0}},
        ValueError,
        "glyphs: size must be an int >= 8, got 0",
    ),
    ({"resume": True, "embedding_dim": 16}, CheckpointError, "embedding_dim: checkpoint 8, con"),
    ({"resume": True, "loss": "contrastive"}, CheckpointError, "loss: checkpoint 'triplet'"),
]


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    CONFIG_ERRORS,
    ids=[",".join(f"{k}={v}" for k, v in case[0].items()) for case in CONFIG_ERRORS],
)
def test_config_errors_stop_before_training_and_write_nothing(
    tmp_path, tree, finished, overrides, error, message
):
    run = shutil.copytree(finished, tmp_path / "run")
    fresh = tmp_path / "fresh"  # a run folder that does not exist yet
    before = snapshot(run)
    folders = [run] if overrides.get("resume") else [run, fresh]
    # Into the finished run without resume: overwrite=True, which replaces files only as the
    # new run writes its own, so a run stopped by a configuration error leaves them as is.
    overrides = {"overwrite": not overrides.get("resume"), **overrides}
    for out_dir in folders:
        if error is None:  # the control case: the same path trains
            with pytest.warns(UserWarning, match="drawn with replacement"):
                assert len(fit(tiny(tree, out_dir, **overrides)).history) == 1
            continue
        with pytest.raises(error, match=message):
            fit(tiny(tree, out_dir, **overrides), on_step=never)
    if error is not None:
        assert snapshot(run) == before and not fresh.exists()


def test_out_dir_that_is_a_file_is_refused_before_anything_is_built(tmp_path, tree, monkeypatch):
    import dmlkit.train.loop as loop

    def no_datasets(*args, **kwargs):
        raise AssertionError("datasets were built")

    monkeypatch.setattr(loop, "build_datasets", no_datasets)
    (tmp_path / "taken").write_text("a file")
    for out_dir in (tmp_path / "taken", tmp_path / "taken" / "run"):
        with pytest.raises(ValueError, match=f"out_dir: {tmp_path / 'taken'} exists and is not"):
            fit(tiny(tree, out_dir))
    assert (tmp_path / "taken").read_text() == "a file"


@pytest.mark.slow  # a kernel start: ~8 s
def test_papermill_run_with_an_unknown_loss_fails_at_the_configuration_cell(tmp_path):
    import nbformat
    import papermill

    out_dir = tmp_path / "run"
    with pytest.raises(papermill.PapermillExecutionError) as info:
        papermill.execute_notebook(
            str(ROOT / "notebooks" / "train_eval.ipynb"),
            str(tmp_path / "executed.ipynb"),
            parameters={"loss": "arcface", "out_dir": str(out_dir), "smoke": True},
            kernel_name="dmlkit",
            cwd=str(ROOT),
            progress_bar=False,
        )
    assert info.value.ename == "ValueError"
    assert "loss: unknown value 'arcface'" in info.value.evalue
    executed = nbformat.read(tmp_path / "executed.ipynb", as_version=4)
    failed = [c for c in executed.cells if any(o.get("ename") for o in c.get("outputs", []))]
    assert len(failed) == 1 and "notebook.train_config(" in failed[0].source
    assert not out_dir.exists()


# ---------------------------------------------------------------- damaged checkpoints


class Payload:
    """Unpickling this would create a folder: proof that no code runs at load time."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _reshaped(state: dict) -> dict:
    state["model"] = {k: v[..., :1] if v.ndim > 1 else v for k, v in state["model"].items()}
    return state


DAMAGE = {
    "truncated": lambda path, data: path.write_bytes(data[: len(data) // 2]),
    "empty": lambda path, data: path.write_bytes(b""),
    "random bytes": lambda path, data: path.write_bytes(np.random.default_rng(0).bytes(4096)),
    "foreign torch file": lambda path, data: torch.save({"state_dict": torch.zeros(2)}, path),
    "not a dict": lambda path, data: torch.save([torch.zeros(2)], path),
    "pickled object": lambda path, data: torch.save(Payload(path.parent.parent / "pwned"), path),
    "future version": lambda path, data: torch.save(
        {**torch.load(path, weights_only=True), "version": 99}, path
    ),
    "other shapes": lambda path, data: torch.save(
        _reshaped(torch.load(path, weights_only=True)), path
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_is_a_clear_error_and_the_folder_stays_byte_identical(
    tmp_path, tree, finished, damage
):
    run = shutil.copytree(finished, tmp_path / "run")
    path = run / "checkpoint.pt"
    DAMAGE[damage](path, path.read_bytes())
    before = snapshot(run)
    with pytest.raises(CheckpointError, match=str(path)):
        fit(tiny(tree, run, epochs=4, resume=True), on_step=never)
    assert snapshot(run) == before
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------- hard kills


LONGER = {"epochs": 4, "num_batches": 3}  # the SIGKILL runs: time to land a kill anywhere


@pytest.fixture(scope="module")
def longer(tmp_path_factory, tree) -> dict:
    """metrics.json of an uninterrupted ``LONGER`` run (this process, 1 torch thread)."""
    out = tmp_path_factory.mktemp("longer") / "run"
    fit(tiny(tree, out, **LONGER))
    return json.loads((out / "metrics.json").read_text())


def assert_same_run(run: Path, reference: dict) -> None:
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["metrics"] == reference["metrics"]
    assert comparable(saved["history"]) == comparable(reference["history"])


@pytest.mark.parametrize("seed", [0, *(pytest.param(s, marks=pytest.mark.slow) for s in (1, 2, 3))])
def test_sigkill_at_a_random_moment_then_resume_gives_identical_metrics(
    tmp_path, tree, longer, seed
):
    cfg = tiny(tree, tmp_path / "killed", **LONGER)
    reference = longer
    chooser = random.Random(seed)
    epoch, delay = chooser.randint(1, cfg.epochs - 1), chooser.uniform(0.0, 1.0)
    proc = subprocess.Popen(
        [sys.executable, "-m", "dmlkit.train", *cli_args(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    # The epoch line is logged just before that epoch's checkpoint is written: the kill
    # lands `delay` s later, in the checkpoint write or in one of the next epoch's steps.
    for line in proc.stderr:
        if line.startswith(f"epoch {epoch}/{cfg.epochs}:"):
            break
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, "the run ended before the kill"
    assert not (tmp_path / "killed" / "metrics.json").exists()
    kept = load_checkpoint(tmp_path / "killed" / "checkpoint.pt")["epoch"]
    assert epoch - 1 <= kept <= epoch + 1 and kept < cfg.epochs
    resumed = subprocess.run(
        [sys.executable, "-m", "dmlkit.train", *cli_args(cfg), "--resume"],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=120,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"after epoch {kept}" in resumed.stderr
    assert json.loads(resumed.stdout) == reference["metrics"]
    assert_same_run(tmp_path / "killed", reference)
    assert not list((tmp_path / "killed").glob(".*.tmp"))  # a torn write's file, cleaned


KILL_AT_RENAME = """
import json, os, signal, sys
from pathlib import Path
from dmlkit.train import TrainConfig, fit

target, nth, config = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
real_replace, seen = os.replace, []

def replace(src, dst):
    # Killed with the new content complete in the temporary file, before the rename.
    if Path(dst).name == target:
        seen.append(dst)
        if len(seen) == nth:
            os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)

os.replace = replace
fit(TrainConfig(**config))
"""


@pytest.mark.parametrize(
    ("target", "nth", "first_epochs"),
    [
        ("checkpoint.pt", 2, None),  # epoch 2 of 3: epoch 1's checkpoint must survive
        ("metrics.json", 1, 2),  # extending a finished 2-epoch run to 3 epochs
        pytest.param("embeddings.npz", 1, 2, marks=pytest.mark.slow),
    ],
)
def test_kill_between_temporary_write_and_rename_keeps_the_previous_file(
    tmp_path, tree, finished, target, nth, first_epochs
):
    run = tmp_path / "run"
    reference = json.loads((finished / "metrics.json").read_text())
    if first_epochs:
        fit(tiny(tree, run, epochs=first_epochs))
    before = snapshot(run)
    config = tiny(tree, run, resume=True).to_dict()
    child = subprocess.run(
        [sys.executable, "-c", KILL_AT_RENAME, target, str(nth), json.dumps(config)],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    (stale,) = run.glob(f".{target}.*.tmp")  # the complete, never renamed, new version
    assert stale.stat().st_size > 0
    if first_epochs:  # the finished run's files are as they were (or newer and complete)
        assert before[target] == snapshot(run)[target]
        assert json.loads((run / "metrics.json").read_text())["history"][-1]["epoch"] == 2
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == (nth - 1 if not first_epochs else 3)
    fit(tiny(tree, run, resume=True))
    assert_same_run(run, reference)
    assert not stale.exists() and not list(run.glob(".*.tmp"))


def test_stale_temporaries_are_removed_only_when_their_writer_is_gone(tmp_path):
    import dmlkit.io as io

    dead_pid = 4_194_305  # above the largest pid_max Linux allows (2**22): never running
    names = {
        f".metrics.json.{dead_pid}@{io._HOST}.abc123_x.tmp": False,  # killed writer: removed
        f".metrics.json.{os.getpid()}@{io._HOST}.abc123_x.tmp": True,  # a live writer
        f".metrics.json.{dead_pid}@another-host.abc123_x.tmp": True,  # other host, shared folder
        f".metrics.json.5.{dead_pid}@{io._HOST}.abc123_x.tmp": True,  # metrics.json.5's
        ".metrics.json.abc123_x.tmp": True,  # old naming: not ours to judge
        "metrics.json.bak": True,
    }
    for name in names:
        (tmp_path / name).write_text("x")
    atomic_write_bytes(tmp_path / "metrics.json", b"{}")
    assert {name: (tmp_path / name).exists() for name in names} == names
    assert remove_stale_temporaries(tmp_path / "metrics.json") == []


# ---------------------------------------------------------------- full disk


class FullDisk:
    """A file object whose writes fail with ENOSPC once ``quota`` bytes are written."""

    def __init__(self, handle, quota: int) -> None:
        self.handle, self.left = handle, quota

    def write(self, data) -> int:
        self.left -= len(data)
        if self.left < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return self.handle.__exit__(*exc_info)


def fill_disk_for(monkeypatch, target: str, quota: int = 64) -> None:
    """Writes to the temporary file of ``target`` (see dmlkit.io) hit a full disk."""
    import dmlkit.io

    real_fdopen = os.fdopen

    def fdopen(fd, *args, **kwargs):
        handle = real_fdopen(fd, *args, **kwargs)
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        return FullDisk(handle, quota) if name.startswith(f".{target}.") else handle

    monkeypatch.setattr(dmlkit.io.os, "fdopen", fdopen)


@pytest.mark.parametrize("target", ["embeddings.npz", "metrics.json"])
def test_full_disk_on_final_outputs_names_the_file_and_keeps_the_previous_one(
    tmp_path, tree, finished, monkeypatch, target
):
    run = shutil.copytree(finished, tmp_path / "run")
    before = snapshot(run)
    fill_disk_for(monkeypatch, target)
    with pytest.raises(OSError, match=f"cannot write {run / target}: No space left") as info:
        fit(tiny(tree, run, epochs=4, resume=True))
    assert info.value.errno == errno.ENOSPC
    assert "checkpoint.pt holds the trained model: rerun with resume=True" in str(info.value)
    after = snapshot(run)
    assert after[target] == before[target] and json.loads((run / "metrics.json").read_text())
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 4  # the training is kept
    assert not list(run.glob(".*.tmp"))
    monkeypatch.undo()  # space freed: the rerun only evaluates and writes the outputs
    result = fit(tiny(tree, run, epochs=4, resume=True), on_step=never)
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4]
    assert json.loads((run / "metrics.json").read_text())["metrics"] == result.metrics


FULL_TMPFS = """
import json, os, sys
from pathlib import Path
from dmlkit.train import TrainConfig, fit, load_checkpoint

disk, config = Path(sys.argv[1]), json.loads(sys.argv[2])
run, out = disk / "run", {}
def files():
    return {p.name: p.read_bytes() for p in run.iterdir()}
fit(TrainConfig(**{**config, "epochs": 1}))
with open(disk / "filler", "wb") as filler:  # fill the tmpfs up
    try:
        while True:
            filler.write(b"\\0" * 65536)
            filler.flush()
    except OSError as error:
        out["filler_errno"] = error.errno
before = files()
for name, epochs in (("checkpoint", 2), ("outputs", 1)):
    try:
        fit(TrainConfig(**{**config, "epochs": epochs, "resume": True}))
    except OSError as error:
        out[name] = [error.errno, str(error)]
    out[name + "_unchanged"] = files() == before
out["epoch_kept"] = load_checkpoint(run / "checkpoint.pt")["epoch"]
(disk / "filler").unlink()
out["rerun"] = len(fit(TrainConfig(**{**config, "epochs": 2, "resume": True})).history)
out["left"] = sorted(p.name for p in run.iterdir())
print(json.dumps(out))
"""


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = "mount -t tmpfs -o size=1m tmpfs /mnt 2>/dev/null || mount -t tmpfs tmpfs /tmp"
    return (
        subprocess.run(["unshare", "-rm", "sh", "-c", probe], capture_output=True).returncode == 0
    )


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unshare -rm and a tmpfs mount")
def test_a_real_full_tmpfs_stops_with_enospc_and_keeps_the_run_folder(tmp_path, tree):
    disk = tmp_path / "disk"
    disk.mkdir()
    config = tiny(tree, disk / "run").to_dict()
    # A private mount namespace: the 24 MiB tmpfs exists for the child only.
    mount = 'mount -t tmpfs -o size=24m tmpfs "$1" && shift && exec "$@"'
    child = subprocess.run(
        ["unshare", "-rm", "sh", "-c", mount, "sh", str(disk)]
        + [sys.executable, "-c", FULL_TMPFS, str(disk), json.dumps(config)],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=180,
    )
    assert child.returncode == 0, child.stderr
    out = json.loads(child.stdout.splitlines()[-1])
    assert out["filler_errno"] == errno.ENOSPC
    assert out["checkpoint"][0] == errno.ENOSPC
    assert f"cannot write checkpoint {disk / 'run' / 'checkpoint.pt'}" in out["checkpoint"][1]
    assert out["outputs"][0] == errno.ENOSPC and "cannot write" in out["outputs"][1]
    assert out["checkpoint_unchanged"] and out["outputs_unchanged"] and out["epoch_kept"] == 1
    assert out["rerun"] == 2
    assert out["left"] == ["checkpoint.pt", "embeddings.npz", "metrics.json"]
    assert not (disk / "run").exists()  # it was all on the private tmpfs


# ---------------------------------------------------------------- untrusted metadata


def _edit(path: Path, edit) -> None:
    lines = path.read_bytes().rstrip(b"\n").split(b"\n")
    path.write_bytes(b"\n".join(edit(lines)) + b"\n")


def _cars_b_fname(root: Path, value: str) -> None:
    import scipy.io

    path = root / "devkit" / "cars_train_annos.mat"
    annotations = scipy.io.loadmat(path)["annotations"]
    annotations[0, 0]["fname"] = np.array([value])
    scipy.io.savemat(path, {"annotations": annotations})


def _cars_a_mat(root: Path, change: str) -> None:
    import scipy.io

    mat = scipy.io.loadmat(root / "cars_annos.mat")
    variables = {k: v for k, v in mat.items() if not k.startswith("__")}
    if change == "no annotations":
        del variables["annotations"]
    else:
        variables["annotations"][0, 0]["class"] = np.array([[197]], dtype=np.uint8)
    scipy.io.savemat(root / "cars_annos.mat", variables)


def _load(name: str, split: str, root: Path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the small-fixture count warning
        return get_dataset(name, split, root=root)


def _one_dataset_error(name: str, split: str, root: Path, message: str) -> None:
    with pytest.raises(DatasetError, match=message) as info:
        _load(name, split, root)
    assert "expected layout" in str(info.value) and "published at" in str(info.value)


# Cases beyond tests/test_data.py (CUB truncated/garbled/duplicate/missing ids, '..' and
# absolute paths; SOP header, duplicates, '..'; Cars missing fields, bad paths, duplicates;
# non-UTF-8 metadata and file names) and tests/test_data_fuzz.py (random corruption).
OUTSIDE = "not inside the dataset root"


@pytest.mark.parametrize(
    ("split", "edit", "message"),
    [
        ("train", lambda ls: [*ls, b"99 1 1 /etc/passwd"], OUTSIDE),
        ("train", lambda ls: [*ls, b"99 1 1 ..\\..\\etc\\passwd"], OUTSIDE),
        ("train", lambda ls: [*ls, b"99 1 1 C:/Windows/win.ini"], OUTSIDE),
        ("train", lambda ls: [*ls, b"99 1 1 mug_final/\x01.JPG"], OUTSIDE),
        ("train", lambda ls: [*ls, b"-5 1 1 mug_final/x.JPG"], "image_id must be a non-negative"),
        ("train", lambda ls: ls[:1], "the train split has no images"),
        ("test", lambda ls: [*ls[:3], ls[3][:7], *ls[4:]], "test.txt, line 4: expected 4 fields"),
        ("test", lambda ls: [*ls[:2], b"\xff\xfe\x00", *ls[2:]], "test.txt, line 3: not UTF-8"),
    ],
    ids=["absolute", "backslash-dotdot", "drive", "control", "negative", "empty", "cut", "bytes"],
)
def test_malformed_sop_metadata_is_one_dataset_error(tmp_path, split, edit, message):
    root = make_sop(tmp_path / "Stanford_Online_Products")
    _edit(root / f"Ebay_{split}.txt", edit)
    _one_dataset_error("sop", split, root, message)


@pytest.mark.parametrize(
    ("file", "edit", "message"),
    [
        ("images.txt", lambda ls: [], "images.txt: metadata file is empty"),
        ("image_class_labels.txt", lambda ls: [*ls, ls[0]], "duplicate id 1"),
        ("classes.txt", lambda ls: [*ls, ls[1]], "classes.txt, line 5: duplicate id 2"),
        ("images.txt", lambda ls: [*ls[:-1], ls[-1].split()[0]], "expected '<image_id> <path>'"),
        ("images.txt", lambda ls: [*ls[:-1], b"9 " + ls[-1].split()[1]], "has no entry in"),
    ],
    ids=["empty", "duplicate-label", "duplicate-class", "no-path", "id-mismatch"],
)
def test_malformed_cub_metadata_is_one_dataset_error(tmp_path, file, edit, message):
    root = make_cub(tmp_path / "CUB_200_2011", classes=4)
    _edit(root / file, edit)
    _one_dataset_error("cub200", "train", root, message)


@pytest.mark.parametrize(
    ("layout", "split", "change", "message"),
    [
        ("B", "train", "../../etc/passwd", OUTSIDE),
        ("B", "test", "/etc/passwd", OUTSIDE),
        ("A", "train", "no annotations", "no variable 'annotations'"),
        ("A", "test", "class 197", "outside 1..196"),
    ],
)
def test_malformed_cars_mat_is_one_dataset_error(tmp_path, layout, split, change, message):
    root = make_cars(tmp_path / "cars196", layout)
    if layout == "B":
        _cars_b_fname(root, change)
    else:
        _cars_a_mat(root, change)
    _one_dataset_error("cars196", split, root, message)


def test_folder_dataset_with_too_few_classes_is_a_dataset_error(tmp_path):
    root = make_folder(tmp_path / "tree", ["only"])
    with pytest.raises(DatasetError, match="needs at least 2 class folders, found 1"):
        get_dataset("folder", "train", root=root)


# ---------------------------------------------------------------- untrusted files: no code runs

UNSAFE = {
    ("torch", "load"): "torch.load without weights_only=True",
    ("yaml", "load"): "yaml.load (use yaml.safe_load)",
    ("yaml", "unsafe_load"): "yaml.unsafe_load",
    ("yaml", "full_load"): "yaml.full_load",
    ("yaml", "Loader"): "yaml.Loader",
    ("yaml", "UnsafeLoader"): "yaml.UnsafeLoader",
    ("pickle", "load"): "pickle.load",
    ("pickle", "loads"): "pickle.loads",
    ("pickle", "Unpickler"): "pickle.Unpickler",
    ("marshal", "loads"): "marshal.loads",
    ("shelve", "open"): "shelve.open",
}


def unsafe_calls(source: str, where: str) -> list[str]:
    """Places in ``source`` that could run code from a file: the security audit's rule."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            rule = UNSAFE.get((node.value.id, node.attr))
            if rule and (node.value.id, node.attr) != ("torch", "load"):
                problems.append(f"{where}:{node.lineno}: {rule}")
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        keywords = {k.arg: k.value for k in node.keywords}
        flag = keywords.get("weights_only")
        if name == "torch.load" and not (isinstance(flag, ast.Constant) and flag.value is True):
            problems.append(f"{where}:{node.lineno}: {UNSAFE['torch', 'load']}")
        pickle_flag = keywords.get("allow_pickle")
        if name in ("np.load", "numpy.load") and not (
            pickle_flag is None or (isinstance(pickle_flag, ast.Constant) and not pickle_flag.value)
        ):
            problems.append(f"{where}:{node.lineno}: np.load with allow_pickle")
        if name in ("eval", "exec"):
            problems.append(f"{where}:{node.lineno}: {name}()")
    return problems


def test_the_audit_rule_catches_unsafe_loading():
    bad = "torch.load(p)\ntorch.load(p, weights_only=False)\nyaml.load(t)\npickle.loads(b)\n"
    bad += "np.load(f, allow_pickle=True)\neval(s)\n"
    assert len(unsafe_calls(bad, "x")) == 6
    good = "torch.load(p, map_location='cpu', weights_only=True)\nyaml.safe_load(t)\n"
    assert unsafe_calls(good + "np.load(f)\nnp.load(f, allow_pickle=False)\n", "x") == []


def test_no_library_code_or_notebook_loads_files_unsafely():
    import nbformat

    problems = []
    for path in sorted([*ROOT.glob("dmlkit/**/*.py"), *ROOT.glob("benchmarks/*.py")]):
        problems += unsafe_calls(path.read_text(), str(path.relative_to(ROOT)))
    for path in sorted(ROOT.glob("notebooks/*.ipynb")):
        cells = nbformat.read(path, as_version=4).cells
        code = "\n".join(c.source for c in cells if c.cell_type == "code")
        code = "\n".join(line for line in code.splitlines() if not line.startswith("%"))
        problems += unsafe_calls(code, str(path.relative_to(ROOT)))
    assert problems == []


def test_a_yaml_spec_with_a_python_tag_runs_nothing(tmp_path):
    from dmlkit.sweep import SpecError, load_spec

    marker = tmp_path / "pwned"
    spec = tmp_path / "evil.yaml"
    spec.write_text(f"name: x\ngrid:\n  seed: !!python/object/apply:os.mkdir ['{marker}']\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(spec)
    assert not marker.exists()


# ---------------------------------------------------------------- run folders: no silent overwrite

USER_FILES = {"metrics.json": b'{"my": "own results"}\n', "embeddings.npz": b"PK\x03\x04 mine"}
OCCUPIED = {
    "a finished run": ("checkpoint.pt", "metrics.json", "embeddings.npz"),
    "an interrupted run": ("checkpoint.pt",),
    "a user's metrics.json": ("metrics.json",),
    "a user's embeddings.npz": ("embeddings.npz",),
}


def occupied_folder(path: Path, finished: Path, names: tuple[str, ...]) -> Path:
    """``path`` holding ``names``: a run's own files (a checkpoint present) or a user's."""
    path.mkdir()
    for name in names:
        if "checkpoint.pt" in names:
            shutil.copy(finished / name, path / name)
        else:
            (path / name).write_bytes(USER_FILES[name])
    return path


def crash_at(when: tuple[int, int]):
    def on_step(epoch: int, step: int) -> None:
        if (epoch, step) == when:
            raise RuntimeError(f"crash at epoch {epoch}, step {step}")

    return on_step


@pytest.mark.parametrize("names", list(OCCUPIED.values()), ids=list(OCCUPIED))
def test_a_run_folder_is_not_replaced_without_resume_or_overwrite(tmp_path, tree, finished, names):
    run = occupied_folder(tmp_path / "run", finished, names)
    before = snapshot(run)
    with pytest.raises(ValueError, match="already holds") as caught:
        fit(tiny(tree, run), on_step=never)
    message = str(caught.value)
    assert f"out_dir: {run} already holds {', '.join(names)}, which this run would" in message
    assert "overwrite=True (--overwrite)" in message
    # resume=True is offered only where there is a checkpoint to continue from.
    assert ("resume=True (--resume)" in message) == ("checkpoint.pt" in names)
    assert snapshot(run) == before


def test_the_train_cli_refuses_a_finished_run_folder_and_replaces_it_with_overwrite(
    tmp_path, tree, finished
):
    run = shutil.copytree(finished, tmp_path / "run")
    before = snapshot(run)
    command = [sys.executable, "-m", "dmlkit.train", *cli_args(tiny(tree, run))]
    refused = subprocess.run(command, capture_output=True, text=True, env=child_env(), timeout=300)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert "already holds checkpoint.pt, metrics.json, embeddings.npz" in refused.stderr
    assert snapshot(run) == before
    replaced = subprocess.run(
        [*command, "--overwrite"], capture_output=True, text=True, env=child_env(), timeout=300
    )
    assert replaced.returncode == 0, replaced.stderr
    after = snapshot(run)
    assert all(after[name][1] > before[name][1] for name in before)  # each file rewritten
    assert json.loads((run / "metrics.json").read_text())["config"]["overwrite"] is True


def test_overwrite_replaces_each_file_only_when_the_new_run_writes_its_own(
    tmp_path, tree, finished
):
    run = shutil.copytree(finished, tmp_path / "run")  # trained with seed 0
    before = snapshot(run)
    new = tiny(tree, run, overwrite=True, seed=1)
    with pytest.raises(RuntimeError, match="crash"):  # within epoch 1: nothing written yet
        fit(new, on_step=crash_at((0, 1)))
    assert snapshot(run) == before
    with pytest.raises(RuntimeError, match="crash"):  # in epoch 2: the checkpoint is the new one
        fit(new, on_step=crash_at((1, 0)))
    state = load_checkpoint(run / "checkpoint.pt")
    assert (state["epoch"], state["config"]["seed"]) == (1, 1)
    now = snapshot(run)
    assert all(now[name] == before[name] for name in ("metrics.json", "embeddings.npz"))
    fit(new)
    assert json.loads((run / "metrics.json").read_text())["config"]["seed"] == 1
    assert all(snapshot(run)[name][0] != before[name][0] for name in before)


def test_overwrite_without_epochs_removes_the_old_checkpoint_only_after_its_outputs(
    tmp_path, tree, finished, monkeypatch
):
    run = shutil.copytree(finished, tmp_path / "run")
    old_checkpoint = (run / "checkpoint.pt").read_bytes()
    with monkeypatch.context() as patch:  # metrics.json cannot be written: nothing removed
        fill_disk_for(patch, "metrics.json")
        with pytest.raises(OSError, match="cannot write"):
            fit(tiny(tree, run, overwrite=True, epochs=0))
    assert (run / "checkpoint.pt").read_bytes() == old_checkpoint
    fit(tiny(tree, run, overwrite=True, epochs=0))
    # A checkpoint left there would belong to the old run: resume=True would continue it.
    assert not (run / "checkpoint.pt").exists()
    assert json.loads((run / "metrics.json").read_text())["config"]["epochs"] == 0


def test_resume_without_a_checkpoint_does_not_replace_outputs_it_did_not_write(
    tmp_path, tree, finished
):
    run = occupied_folder(tmp_path / "run", finished, ("metrics.json",))
    with pytest.raises(ValueError, match="no checkpoint.pt to resume from .resume=True starts"):
        fit(tiny(tree, run, resume=True), on_step=never)
    assert (run / "metrics.json").read_bytes() == USER_FILES["metrics.json"]
    fit(tiny(tree, run, resume=True, overwrite=True, epochs=1))
    assert json.loads((run / "metrics.json").read_text())["config"]["epochs"] == 1


def test_files_a_sweep_adds_do_not_count_and_a_retried_run_resumes(tmp_path, tree):
    run = tmp_path / "sweep" / "seed=0"
    (run / "tsne").mkdir(parents=True)
    (run / "notebook.ipynb").write_text("{}")  # papermill writes it before the notebook runs
    (run / "tsne" / "coordinates.npz").write_bytes(b"cached")
    cfg = tiny(tree, run, resume=True)  # every shipped training sweep sets resume: true
    with pytest.raises(RuntimeError, match="crash"):  # the first attempt fails in epoch 2
        fit(cfg, on_step=crash_at((1, 0)))
    result = fit(cfg)  # the sweep's retry: the same parameters
    assert len(result.history) == 3 and (run / "metrics.json").is_file()
    assert (run / "notebook.ipynb").read_text() == "{}"
    fit(tiny(tree, tmp_path / "fresh"))  # control: an empty folder needs no flag


def test_every_shipped_training_sweep_resumes_so_its_retried_runs_work():
    import yaml

    for path in sorted((ROOT / "notebooks" / "sweeps").glob("*.yaml")):
        spec = yaml.safe_load(path.read_text())
        if spec["notebook"].endswith("train_eval.ipynb"):
            assert spec["fixed"].get("resume") is True, path.name


# ---------------------------------------------------------------- sweep specs: no key twice

SPEC_HEAD = "name: dup\nnotebook: notebooks/train_eval.ipynb\n"
DUPLICATE_KEYS = {
    "top level": (SPEC_HEAD + "name: other\ngrid: {seed: [0]}\n", "'name'", 1, 3),
    "grid": (SPEC_HEAD + "grid:\n  seed: [0]\n  loss: [triplet]\n  seed: [1]\n", "'seed'", 4, 6),
    "nested, flow style": (
        SPEC_HEAD + "fixed: {loss_params: {margin: 0.1, margin: 0.2}}\ngrid: {seed: [0]}\n",
        "'margin'",
        3,
        3,
    ),
    "an override's set": (
        SPEC_HEAD + "grid: {seed: [0]}\noverrides:\n  - where: {seed: 0}\n    set:\n"
        "      lr: 0.1\n      lr: 0.2\n",
        "'lr'",
        7,
        8,
    ),
}


@pytest.mark.parametrize(
    ("text", "key", "first", "second"), DUPLICATE_KEYS.values(), ids=list(DUPLICATE_KEYS)
)
def test_a_key_given_twice_in_a_sweep_spec_is_refused_naming_both_lines(
    tmp_path, capsys, text, key, first, second
):
    from dmlkit.sweep import SpecError, load_spec
    from dmlkit.sweep.__main__ import main as sweep_main

    spec = tmp_path / "dup.yaml"
    spec.write_text(text)
    expected = f"{spec}: key {key} is given twice, on line {first} and line {second} (YAML would"
    with pytest.raises(SpecError, match=re.escape(expected)):
        load_spec(spec)
    assert sweep_main([str(spec), "--out", str(tmp_path / "runs")]) == 2
    assert expected in capsys.readouterr().err and not (tmp_path / "runs").exists()


def test_the_spec_reader_allows_merge_keys_and_names_one_key_spelled_two_ways():
    from dmlkit.sweep.spec import safe_yaml

    merged = safe_yaml("base: &b {epochs: 3, seed: 0}\nfixed:\n  <<: *b\n  seed: 1\n")
    assert merged["fixed"] == {"epochs": 3, "seed": 1}  # an override of a merged key is meant
    with pytest.raises(Exception, match="keys '1' \\(line 1\\) and 'true' \\(line 2\\) are the"):
        safe_yaml("1: a\ntrue: b\n")  # equal keys once read (True == 1)


def test_sweep_out_that_is_a_file_is_a_usage_error(tmp_path, capsys):
    from dmlkit.sweep.__main__ import main as sweep_main

    spec = tmp_path / "s.yaml"
    spec.write_text(SPEC_HEAD + "grid: {seed: [0]}\n")
    (tmp_path / "taken").write_text("a file")
    for out in (tmp_path / "taken", tmp_path / "taken" / "below"):
        with pytest.raises(SystemExit) as stopped:
            sweep_main([str(spec), "--out", str(out), "--dry-run"])
        assert stopped.value.code == 2
        assert f"{tmp_path / 'taken'} is a file, not a folder" in capsys.readouterr().err


# ---------------------------------------------------------------- python -m dmlkit.data

DATA_CLI_ERRORS = {
    "--classes 0": (["--classes", "0"], "argument --classes: must be >= 1, got 0"),
    "--samples -1": (["--samples", "-1"], "argument --samples: must be >= 1, got -1"),
    "--classes x": (["--classes", "x"], "argument --classes: expected a whole number >= 1"),
    "--classes above": (
        ["--classes", "100000"],  # drew a 6.4-million-pixel-high blank sheet
        r"classes=100000: must be between 1 and 5 \(the train split of folder has 5 classes\)",
    ),
    "--samples above": (["--samples", "4"], "samples=4: must be between 1 and 3 .* largest"),
    "--sheet a folder": (["--sheet", "{tmp}"], "is a folder; give a file name"),
    "--sheet under a file": (["--sheet", "{tmp}/taken/s.png"], "taken is a file, so no folder"),
    "--sheet not an image": (["--sheet", "{tmp}/s.txt"], "unknown image type '.txt'; use .png"),
}


@pytest.mark.parametrize(("args", "message"), DATA_CLI_ERRORS.values(), ids=list(DATA_CLI_ERRORS))
def test_data_cli_bad_arguments_are_one_usage_error(
    tmp_path, tree, capsys, monkeypatch, args, message
):
    from dmlkit.data.__main__ import main as data_main

    monkeypatch.chdir(tmp_path)  # the default sheet path is relative
    (tmp_path / "taken").write_text("a file")
    args = [arg.format(tmp=tmp_path) for arg in args]
    started = time.perf_counter()
    with pytest.raises(SystemExit) as stopped:
        data_main(["folder", "--root", str(tree), "--split", "train", *args])
    assert stopped.value.code == 2 and time.perf_counter() - started < 60
    assert re.search(message, capsys.readouterr().err)
    assert list(tmp_path.rglob("*.png")) == [] and (tmp_path / "taken").read_text() == "a file"


def test_data_cli_draws_at_most_what_the_dataset_has_and_names_a_missing_root(
    tmp_path, tree, capsys
):
    from PIL import Image

    from dmlkit.data.__main__ import main as data_main

    sheet = tmp_path / "sheets" / "s.png"
    args = ["folder", "--root", str(tree), "--split", "train", "--sheet", str(sheet)]
    assert data_main(args) == 0
    assert Image.open(sheet).size == (150 + 3 * 64, 5 * 64)  # defaults 8 × 10 → 5 × 3, no blanks
    assert data_main(["folder", "--root", str(tmp_path / "none"), "--sheet", str(sheet)]) == 2
    err = capsys.readouterr().err
    assert "dataset root does not exist" in err and "Traceback" not in err


# ---------------------------------------------------------------- evaluation: the stated reason


def test_knn_says_what_is_wrong_with_k_and_answers_no_queries_with_nothing():
    from dmlkit.evaluate import knn

    points = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    for k in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=re.escape(f"k={k!r}: must be a whole number >= 1")):
            knn(points, k=k)
    with pytest.raises(ValueError, match=r"k=5 but only 4 keys per query \(each query excluding"):
        knn(points, k=5)
    with pytest.raises(ValueError, match="k=1 but only 0 keys per query: 0 keys given"):
        knn(points, torch.zeros(0, 3), k=1)
    distances, indices = knn(torch.zeros(0, 3), k=1)  # was "only -1 keys are available"
    assert distances.shape == indices.shape == (0, 1)


@pytest.mark.parametrize(
    ("labels", "ks", "message"),
    [
        (torch.arange(12).view(6, 2) % 3, (1,), r"labels must be 1-D \(N,\), got shape \(6, 2\)"),
        (torch.arange(12) % 2 == 0, (1,), "labels must be integers, got dtype torch.bool"),
        (torch.arange(12) % 3, (1.5,), r"ks must be whole numbers, got \[1.5\]"),
    ],
    ids=["labels (N/2, 2) were flattened", "bool labels were two classes", "K=1.5 was K=1"],
)
def test_retrieval_metrics_refuse_labels_and_ks_they_would_misread(labels, ks, message):
    from dmlkit.evaluate import density_metrics, retrieval_metrics

    z = torch.nn.functional.normalize(torch.randn(12, 4, generator=torch.Generator()), dim=1)
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(z, labels, ks=ks)
    if ks == (1,):
        with pytest.raises(ValueError, match=message):
            density_metrics(z, labels)


def test_density_metrics_name_non_finite_embeddings():
    from dmlkit.evaluate import density_metrics

    z = torch.full((6, 3), math.nan)
    with pytest.raises(ValueError, match="embeddings contain NaN or infinite values"):
        density_metrics(z, torch.arange(6) % 2)  # was a LinAlgError from the SVD


# ---------------------------------------------------------------- losses: no silent wrong result

LOSS_CASES = [
    ("contrastive", {}),
    ("triplet", {"mining": "all"}),
    ("triplet", {"mining": "semihard"}),
    ("triplet", {"mining": "hard"}),
    ("npair", {}),
    ("ms", {}),
    ("proxy_anchor", {}),
    ("daal", {}),
]
LOSS_IDS = [name + "".join(f"-{v}" for v in params.values()) for name, params in LOSS_CASES]
NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def make_loss(name: str, params: dict, density: bool | str, dim: int = 6) -> torch.nn.Module:
    """``build_loss`` for 4 classes; ``density`` False, True or a density target name."""
    target = density if isinstance(density, str) else "ema"
    return build_loss(
        name,
        num_classes=4,
        embedding_dim=dim,
        density=bool(density),
        density_target=target,
        **params,
    ).train()


def loss_batch(dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """12 unit vectors in 6-D and labels 0..3 (three samples per class)."""
    z = torch.randn(12, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return torch.nn.functional.normalize(z, dim=1).to(dtype), torch.arange(12) % 4


@pytest.mark.parametrize("bad", list(NON_FINITE))
@pytest.mark.parametrize("density", [False, True])
@pytest.mark.parametrize(("name", "params"), LOSS_CASES, ids=LOSS_IDS)
def test_every_loss_is_nan_for_a_nan_or_infinite_embedding(name, params, density, bad):
    loss = make_loss(name, params, density)
    z, y = loss_batch()
    one = z.clone()
    one[3, 1] = NON_FINITE[bad]  # one entry of one sample
    every = torch.full_like(z, NON_FINITE[bad])  # all-NaN contrastive was 0.25, triplet 0.2
    for embeddings in (one, every):
        value = loss(embeddings.requires_grad_(), y)
        assert value.dim() == 0 and not torch.isfinite(value), f"{value} for {bad} embeddings"


def test_the_pure_losses_are_nan_for_a_nan_embedding():
    z, y = loss_batch()
    z[5, 0] = math.nan
    proxies = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    values = [fn(z, y) for fn in (contrastive_loss, npair_loss, multi_similarity_loss)]
    values += [triplet_margin_loss(z, y, mining=mining) for mining in ("all", "semihard", "hard")]
    values.append(proxy_anchor_loss(z, y, proxies))
    assert all(torch.isnan(value) for value in values), values


@pytest.mark.parametrize(
    "fn", [contrastive_loss, triplet_margin_loss, npair_loss, multi_similarity_loss]
)
def test_the_nan_guard_leaves_a_finite_loss_and_its_gradient_bit_for_bit(fn):
    z, y = loss_batch()
    guarded = z.clone().requires_grad_()
    bare = z.clone().requires_grad_()
    value = fn(guarded, y)
    expected = inspect.unwrap(fn)(bare, y)  # the loss body, without validation or guard
    value.backward()
    expected.backward()
    assert torch.equal(value, expected) and torch.equal(guarded.grad, bare.grad)


BAD_LOSS_INPUTS = {
    "labels (B, 1)": (
        lambda z, y: (z, y[:, None]),
        r"labels must be 1-D \(B,\), got shape \(12, 1\) \(flatten them: labels.view\(-1\)\)",
    ),
    "labels (B, 2)": (lambda z, y: (z, y.repeat(2, 1).T), r"labels must be 1-D \(B,\)"),
    "1-D embeddings": (
        lambda z, y: (z[:, 0], y),
        r"embeddings must be 2-D \(B, D\) with D >= 1, got shape \(12,\); one embedding is",
    ),
    "3-D embeddings": (lambda z, y: (z[None], y), r"got shape \(1, 12, 6\)"),
    "no columns": (lambda z, y: (z[:, :0], y), r"D >= 1, got shape \(12, 0\)"),
    "shorter labels": (lambda z, y: (z, y[:10]), "embeddings have 12 rows but labels has 10"),
    "longer labels": (lambda z, y: (z[:10], y), "embeddings have 10 rows but labels has 12"),
    "integer embeddings": (lambda z, y: (z.long(), y), "must be floating .* got dtype torch.int64"),
    "complex embeddings": (lambda z, y: (z.cfloat(), y), "got dtype torch.complex64"),
    "numpy embeddings": (lambda z, y: (z.numpy(), y), "embeddings must be a torch.Tensor"),
    "list labels": (
        lambda z, y: (z, y.tolist()),
        r"labels must be a torch.Tensor \(B,\), got list",
    ),
}


@pytest.mark.parametrize("density", [False, True])
@pytest.mark.parametrize("case", list(BAD_LOSS_INPUTS))
@pytest.mark.parametrize(("name", "params"), LOSS_CASES, ids=LOSS_IDS)
def test_bad_loss_inputs_are_one_value_error_saying_what_is_wrong(name, params, density, case):
    make, message = BAD_LOSS_INPUTS[case]
    loss = make_loss(name, params, density)
    before = {key: value.clone() for key, value in loss.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        loss(*make(*loss_batch()))
    after = loss.state_dict()
    assert all(torch.equal(after[key], value) for key, value in before.items())  # no EMA step


@pytest.mark.parametrize(
    "fn", [contrastive_loss, triplet_margin_loss, npair_loss, multi_similarity_loss]
)
def test_the_pure_losses_check_their_inputs_too(fn):
    z, y = loss_batch()
    with pytest.raises(ValueError, match="embeddings have 12 rows but labels has 11"):
        fn(z, y[:11])
    with pytest.raises(ValueError, match=r"labels must be 1-D"):
        fn(z, y[:, None])


@pytest.mark.parametrize("density", [False, True])
@pytest.mark.parametrize("name", ["proxy_anchor", "daal"])
def test_a_stateful_loss_names_the_embedding_width_it_was_built_with(name, density):
    loss = make_loss(name, {}, density, dim=6)
    z, y = loss_batch()
    with pytest.raises(ValueError, match="D = 5 columns but this loss was built with embedding_d"):
        loss(z[:, :5], y)
    proxies = torch.randn(4, 6)
    with pytest.raises(ValueError, match="D = 5 columns .* embedding_dim=6"):
        proxy_anchor_loss(z[:, :5], y, proxies)


@pytest.mark.parametrize("density", [False, "ema", "learned"])
@pytest.mark.parametrize(("name", "params"), LOSS_CASES, ids=LOSS_IDS)
def test_float64_embeddings_are_accepted_by_every_loss(name, params, density):
    z, y = loss_batch(torch.float64)
    single, double = make_loss(name, params, density), make_loss(name, params, density)
    wide = z.clone().requires_grad_()
    value = double(wide, y)
    assert value.dtype == torch.float64
    assert_close(value.float(), single(z.float(), y), rtol=1e-4, atol=1e-5)
    value.backward()
    assert torch.isfinite(wide.grad).all() and wide.grad.abs().sum() > 0
    for parameter in double.parameters():  # proxies, vertices and θ stay fp32 and get a gradient
        assert parameter.dtype == torch.float32 and torch.isfinite(parameter.grad).all()


NAN_LOSSES = ["contrastive", "triplet", "npair", "ms", "proxy_anchor", "daal"]


@pytest.mark.parametrize("bad", ["nan", "inf"])
@pytest.mark.parametrize("loss", NAN_LOSSES)
def test_training_on_non_finite_embeddings_stops_with_non_finite_loss_error(
    tmp_path, tree, monkeypatch, loss, bad
):
    import dmlkit.train.loop as loop

    armed = {"on": False}

    def poisoned_model(*args, **kwargs):
        model = build_model(*args, **kwargs)

        def hook(module, inputs, output):
            if not armed["on"]:
                return output
            output = output.clone()
            output[0, 0] = NON_FINITE[bad]  # one sample's embedding, as a bad image would
            return output

        model.register_forward_hook(hook)
        return model

    def arm(epoch: int, step: int) -> None:
        armed["on"] = True  # from the second step on

    monkeypatch.setattr(loop, "build_model", poisoned_model)
    density = bad == "inf"  # every loss once without and once with the regularizer
    cfg = tiny(tree, tmp_path / "run", loss=loss, density=density, epochs=1)
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step 2/2: loss=nan"):
        fit(cfg, on_step=arm)
    assert not (tmp_path / "run" / "metrics.json").exists()


# ---------------------------------------------------------------- further probes (issue 14)

SAMPLER_ERRORS = {
    "p float": ({"p": 2.5}, "p must be a whole number, got 2.5"),
    "k float (failed only in __iter__)": ({"k": 2.0}, "k must be a whole number, got 2.0"),
    "p True (passed as 1)": ({"p": True}, "p must be a whole number, got True"),
    "num_batches 0": ({"num_batches": 0}, "num_batches must be >= 1 or None, got 0"),
    "seed -1 (failed only in __iter__)": ({"seed": -1}, "seed must be >= 0, got -1"),
    "labels (5, 3) (were flattened)": ({"labels": np.zeros((5, 3), int)}, r"1-D .* \(5, 3\)"),
}


@pytest.mark.parametrize(("change", "message"), SAMPLER_ERRORS.values(), ids=list(SAMPLER_ERRORS))
def test_pk_sampler_refuses_what_it_cannot_honour_when_built(change, message):
    from dmlkit.samplers import PKBatchSampler

    arguments = {"labels": np.repeat(np.arange(5), 3), "p": 2, "k": 2, **change}
    with pytest.raises(ValueError, match=message):
        PKBatchSampler(**arguments)


@pytest.mark.parametrize("name", ["proxy_anchor", "daal"])
@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ({"embedding_dim": -1}, "embedding_dim must be a whole number >= 1, got -1"),
        ({"embedding_dim": 8.5}, "embedding_dim must be a whole number >= 1, got 8.5"),
        ({"embedding_dim": 0}, "embedding_dim must be a whole number >= 1, got 0"),
        ({"num_classes": 2.5}, "num_classes must be a whole number >= 1, got 2.5"),  # 3 classes
    ],
)
def test_build_loss_refuses_sizes_a_stateful_loss_cannot_have(name, sizes, message):
    with pytest.raises(ValueError, match=message):
        build_loss(name, **{"num_classes": 3, "embedding_dim": 4, **sizes})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"embedding_dim": 8.5}, "embedding_dim must be a whole number >= 1, got 8.5"),
        ({"embedding_dim": True}, "embedding_dim must be a whole number >= 1, got True"),
        ({"pretrained": "no"}, "pretrained must be True or False, got 'no'"),
        ({"backbone": ["glyphnet"]}, r"unknown backbone \['glyphnet'\]"),
    ],
)
def test_build_model_says_what_is_wrong_with_its_arguments(kwargs, message):
    arguments = {"backbone": "glyphnet", **kwargs}
    with pytest.raises(ValueError, match=message):
        build_model(arguments.pop("backbone"), **arguments)


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [((2, 3, 32, 32), torch.uint8), ((2, 1, 32, 32), torch.float32), ((3, 32, 32), torch.float32)],
)
def test_the_model_names_images_it_cannot_embed(shape, dtype):
    model = build_model("glyphnet", embedding_dim=8)
    with pytest.raises(ValueError, match=r"images must be a floating \(B, 3, H, W\) tensor"):
        model(torch.zeros(shape, dtype=dtype))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lr": math.inf}, "lr: must be finite, got inf"),
        ({"density_weight": math.inf}, "density_weight: must be finite, got inf"),
        ({"eval_ks": (True,)}, "eval_ks: expected a non-empty tuple of positive ints"),
        ({"out_dir": ""}, "out_dir: an empty path would write into the working folder"),
        ({"overwrite": True, "out_dir": None}, "overwrite: needs out_dir"),
    ],
)
def test_config_refuses_values_that_would_fail_or_mislead_later(tree, overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny(tree, **overrides)


def test_train_cli_threads_below_one_is_a_usage_error(capsys):
    from dmlkit.train.__main__ import main as train_main

    for threads in ("0", "-1"):  # -1 reached torch.set_num_threads: a RuntimeError traceback
        with pytest.raises(SystemExit) as stopped:
            train_main(["--threads", threads, "--epochs", "0"])
        assert stopped.value.code == 2
        assert f"argument --threads: must be >= 1, got {threads}" in capsys.readouterr().err


def test_results_name_a_metric_that_is_not_a_number_and_a_source_that_is_not_a_path(tmp_path):
    from dmlkit.results import load_runs

    run = tmp_path / "sweep" / "run"
    run.mkdir(parents=True)
    metrics = {"recall@1": "n/a", "map@r": True, "nmi": "0.5", "pi_ratio": math.nan}
    record = {"config": {"loss": "x"}, "metrics": metrics}
    (run / "metrics.json").write_text(json.dumps(record))
    with pytest.warns(UserWarning) as warned:
        table = load_runs(tmp_path / "sweep")
    assert math.isnan(table["recall@1"][0]) and math.isnan(table["map@r"][0])  # true was 1.0
    assert table["nmi"][0] == 0.5
    messages = " ".join(str(w.message) for w in warned)
    assert "metric 'recall@1' is 'n/a', not a number" in messages and "'map@r' is True" in messages
    assert len(warned) == 2  # a number written as text, or NaN, is read without a warning
    for source in (5, [tmp_path, 5]):
        with pytest.raises(ValueError, match="must be a path or a glob pattern|a path, a glob"):
            load_runs(source)


def test_every_test_the_reliability_docs_name_exists():
    section = (ROOT / "docs" / "reliability.md").read_text()
    named = re.findall(r"`(R|G|test_\w+\.py)::(test_\w+)", section)
    missing = []
    short = {"R": "test_reliability.py", "G": "test_run_guards.py"}
    for file, test in named:
        source = ROOT / "tests" / short.get(file, file)
        # A name ending in "_" is a prefix followed by *: several tests.
        if not test.endswith("_") and f"def {test}(" not in source.read_text():
            missing.append(f"{file}::{test}")
    assert len(named) > 40 and missing == []


# ---------------------------------------------------------------- load (slow)

# The peak is this process's VmHWM (bench_eval.peak_rss_gb). Not getrusage's ru_maxrss:
# Linux carries the peak of the memory image an exec replaces into it, so a child that
# pytest starts reports the test worker's own peak (1.52-1.57 GB measured under
# `make test-all`, against ~1.2 GB for this search).
SOP_SCALE = """
import json, sys
sys.path.insert(0, sys.argv[1])
from bench_eval import peak_rss_gb, sop_like
from dmlkit.evaluate import retrieval_metrics

embeddings, labels = sop_like(60_502)  # (60502, 512) unit vectors, SOP-like classes
metrics = retrieval_metrics(embeddings, labels, ks=(1, 10, 100), nmi=False)
print(json.dumps({"peak_bytes": peak_rss_gb() * 1e9, **metrics}))
"""


@pytest.mark.slow  # ~25 s on 2 cores
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_sop_scale_evaluation_stays_within_the_memory_bound():
    child = subprocess.run(
        [sys.executable, "-c", SOP_SCALE, str(ROOT / "benchmarks")],
        capture_output=True,
        text=True,
        env=child_env() | {"OMP_NUM_THREADS": str(os.cpu_count() or 1)},
        timeout=600,
    )
    assert child.returncode == 0, child.stderr
    out = json.loads(child.stdout.splitlines()[-1])
    assert out["num_queries"] == 60_502 and 0.5 < out["recall@1"] <= out["recall@100"] <= 1
    # The bound, in decimal units as bench_eval.py prints them: 1.5 GB = 1.5e9 bytes.
    assert out["peak_bytes"] <= 1.5e9, f"peak RSS {out['peak_bytes'] / 1e9:.3f} GB"


@pytest.fixture
def notebook_project(tmp_path, tmp_path_factory, monkeypatch) -> Path:
    """A repository-like folder with train_eval.ipynb, and glyphs-mini rendered in a private
    cache that the sweep's kernels use (``DMLKIT_CACHE`` is inherited)."""
    from tests.fixtures_datasets import glyph_cache_dir

    cache = glyph_cache_dir(tmp_path_factory)
    for split in ("train", "test"):
        get_dataset("glyphs-mini", split, cache_dir=cache)
    monkeypatch.setenv("DMLKIT_CACHE", str(cache))
    (tmp_path / "notebooks" / "sweeps").mkdir(parents=True)
    shutil.copy(ROOT / "notebooks" / "train_eval.ipynb", tmp_path / "notebooks")
    return tmp_path


def write_spec(project: Path, name: str, fixed: dict, grid: dict) -> Path:
    import yaml

    spec = {"name": name, "notebook": "notebooks/train_eval.ipynb", "fixed": fixed, "grid": grid}
    path = project / "notebooks" / "sweeps" / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.mark.slow  # 8 notebook executions, two at a time: ~2 min on 2 cores
def test_eight_real_notebook_runs_with_two_jobs_keep_a_consistent_manifest(notebook_project):
    from dmlkit.sweep import load_spec, plan, read_manifest, run_sweep

    spec = write_spec(
        notebook_project,
        "load",
        {"dataset": "glyphs-mini", "progress": False},
        {"loss": ["contrastive", "triplet", "ms", "proxy_anchor"], "density": [False, True]},
    )
    result = run_sweep(spec, jobs=2, smoke=True, progress=False)
    assert result.exit_code == 0, result.table()
    folder = notebook_project / "papermill_runs" / "load-smoke"
    lines = (folder / "manifest.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line whole JSON
    assert records == read_manifest(folder) and len(records) == 8
    assert sorted(r["run"] for r in records) == sorted(job.key for job in plan(load_spec(spec)))
    assert all(r["status"] == "ok" and r["params"]["smoke"] is True for r in records)
    for record in records:
        saved = json.loads((folder / record["run"] / "metrics.json").read_text())
        assert saved["config"]["loss"] == record["params"]["loss"]
        assert saved["config"]["density"] == record["params"]["density"]
        assert 0 <= saved["metrics"]["recall@1"] <= 1
        assert (folder / record["run"] / "notebook.ipynb").is_file()


@pytest.mark.slow  # three notebook executions: ~1.5 min on 2 cores
def test_sigint_during_a_real_training_notebook_keeps_the_checkpoint_and_resumes(
    notebook_project,
):
    import nbformat

    from dmlkit.sweep import read_manifest, run_sweep

    fixed = {
        "dataset": "glyphs-mini",
        "epochs": 4,
        "num_batches": 6,
        "p": 16,
        "eval_every": 0,
        "resume": True,
        "progress": False,
    }
    spec = write_spec(notebook_project, "stopped", fixed, {"seed": [0]})
    run = notebook_project / "papermill_runs" / "stopped" / "seed=0"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dmlkit.sweep", str(spec), "--jobs", "2"],
        cwd=notebook_project,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not (run / "checkpoint.pt").exists():  # epoch 1 is done: stop it in epoch 2
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    (record,) = read_manifest(run.parent)
    assert (record["status"], record["error"]) == ("interrupted", "Interrupted: stopped by SIGINT")
    kept = load_checkpoint(run / "checkpoint.pt")["epoch"]
    assert 1 <= kept < 4 and not (run / "metrics.json").exists()

    assert run_sweep(spec, jobs=2, progress=False).exit_code == 0  # the same command again
    executed = nbformat.read(run / "notebook.ipynb", as_version=4)
    text = "".join(o.get("text", "") for c in executed.cells for o in c.get("outputs", []))
    assert f"resuming from {Path('papermill_runs/stopped/seed=0/checkpoint.pt')}" in text
    assert f"after epoch {kept}" in text
    assert [r["status"] for r in read_manifest(run.parent)] == ["interrupted", "ok"]
    reference = write_spec(notebook_project, "reference", fixed, {"seed": [0]})
    assert run_sweep(reference, jobs=2, progress=False).exit_code == 0
    uninterrupted = notebook_project / "papermill_runs" / "reference" / "seed=0"
    assert_same_run(run, json.loads((uninterrupted / "metrics.json").read_text()))

"""A diverged run is never a result, and a run folder holds one run of one dataset
(issue 25: items 1, 4, 5, 6 and 9).

Runs use a tiny ``folder`` dataset of real JPEG files (5 + 5 classes of 3 images, glyphnet
at 224 px crops; one fit ≈ 1 s), like tests/test_reliability.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from dmlkit.io import LockHeldError, exclusive_lock
from dmlkit.train import CheckpointError, NonFiniteLossError, TrainConfig, fit, load_checkpoint
from tests import reliability_fixtures
from tests.fixtures_datasets import make_folder

ROOT = Path(__file__).resolve().parents[1]


def tiny(root: Path, out_dir: Path | None = None, **overrides) -> TrainConfig:
    """``reliability_fixtures.tiny`` with two epochs (the ``tree`` fixture: conftest.py)."""
    return reliability_fixtures.tiny(root, out_dir, **{"epochs": 2, **overrides})


def keep_model(monkeypatch) -> dict:
    """Patch ``fit``'s model builder to keep the model it builds in the returned dict."""
    import dmlkit.train.loop as loop

    made = {}
    build = loop.build_model

    def keeping(*args, **kwargs):
        made["model"] = build(*args, **kwargs)
        return made["model"]

    monkeypatch.setattr(loop, "build_model", keeping)
    return made


def bn_buffer(model: torch.nn.Module, name: str) -> torch.Tensor:
    return next(b for n, b in model.named_buffers() if n.endswith(name))


# ---------------------------------------------------------------- divergence (item 1)


def test_a_huge_learning_rate_stops_naming_the_running_variance_and_writes_nothing(tmp_path, tree):
    # lr 1e10: the loss stays finite (BatchNorm renormalises) while running_var overflows.
    with pytest.raises(NonFiniteLossError) as error:
        fit(tiny(tree, tmp_path / "run", lr=1e10, epochs=1))
    message = str(error.value)
    assert "epoch 1, step" in message and "running_var (inf)" in message, message
    assert "no checkpoint had been written yet" in message
    assert not (tmp_path / "run").exists()  # created for the lock, removed: nothing in it


def test_a_non_finite_buffer_mid_run_keeps_the_last_good_checkpoint(tmp_path, tree, monkeypatch):
    made = keep_model(monkeypatch)

    def overflow(epoch, step):
        if (epoch, step) == (1, 0):
            bn_buffer(made["model"], "running_var").fill_(float("inf"))

    # Corrupted after step 1 of epoch 2 (on_step runs after the step): found at step 2.
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 2/2: non-finite weights") as error:
        fit(tiny(tree, tmp_path), on_step=overflow)
    assert f"{tmp_path / 'checkpoint.pt'} holds epoch 1" in str(error.value)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (tmp_path / "metrics.json").exists()


def test_embeddings_that_overflow_only_in_evaluation_mode_stop_before_the_checkpoint(
    tmp_path, tree, monkeypatch
):
    # A finite but huge running mean: training (batch statistics) is unaffected, evaluation
    # (running statistics) overflows — the guard that checks weights and losses passes.
    made = keep_model(monkeypatch)

    def shift(epoch, step):
        if (epoch, step) == (1, 1):
            bn_buffer(made["model"], "running_mean").fill_(-3e38)  # ReLU keeps +huge

    with pytest.raises(NonFiniteLossError, match="in evaluation mode") as error:
        fit(tiny(tree, tmp_path), on_step=shift)
    assert "holds epoch 1" in str(error.value)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1
    assert not (tmp_path / "metrics.json").exists()


def test_the_train_cli_reports_a_diverged_run_in_one_message(tmp_path, tree):
    command = [
        sys.executable,
        "-m",
        "dmlkit.train",
        "--threads",
        "1",
        "--no-progress",
        "--dataset",
        "folder",
        "--data-root",
        str(tree),
        "--embedding-dim",
        "8",
        "--p",
        "5",
        "--k",
        "3",
        "--num-batches",
        "1",
        "--epochs",
        "1",
        "--eval-ks",
        "1,2",
        "--lr",
        "1e10",
        "--out-dir",
        str(tmp_path / "run"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "training diverged" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()


# ---------------------------------------------------------------- one run per folder (item 4)


def test_a_second_training_into_a_busy_run_folder_is_refused(tmp_path, tree):
    started, release = threading.Event(), threading.Event()
    errors = []

    def first_run():
        def wait_in_epoch_one(epoch, step):
            started.set()
            release.wait(60)

        try:
            fit(tiny(tree, tmp_path / "run"), on_step=wait_in_epoch_one)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    thread = threading.Thread(target=first_run)
    thread.start()
    try:
        assert started.wait(60)
        with pytest.raises(LockHeldError, match="run folder .*run is in use by another process"):
            fit(tiny(tree, tmp_path / "run", seed=1))
    finally:
        release.set()
        thread.join(120)
    assert not errors
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["config"]["seed"] == 0  # the first run's files, whole
    assert not (tmp_path / "run" / ".run.lock").exists()


def test_the_lock_is_refused_across_processes_and_names_the_holder(tmp_path):
    holder = (
        "import sys, time; from dmlkit.io import exclusive_lock\n"
        "with exclusive_lock(sys.argv[1], 'x'):\n"
        "    print('held', flush=True); time.sleep(60)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", holder, str(tmp_path / "lock")], stdout=subprocess.PIPE, cwd=ROOT
    )
    try:
        assert child.stdout.readline().strip() == b"held"
        with pytest.raises(LockHeldError, match=f"pid {child.pid} on"):
            with exclusive_lock(tmp_path / "lock", "the folder"):
                pass
    finally:
        child.kill()
        child.wait()
    with exclusive_lock(tmp_path / "lock", "the folder"):  # a dead holder's lock is free
        assert (tmp_path / "lock").exists()
    assert not (tmp_path / "lock").exists()


# ---------------------------------------------------------------- resume on other data (item 5)


def test_resume_on_other_data_is_refused_and_a_moved_dataset_is_accepted(tmp_path, tree):
    fit(tiny(tree, tmp_path / "run", epochs=1))
    other = make_folder(tmp_path / "other", [f"other{c:02d}" for c in range(10)], 3)
    with pytest.raises(CheckpointError, match="trained on other data") as error:
        fit(tiny(other, tmp_path / "run", resume=True))
    assert "train: checkpoint 15 images of 5 classes" in str(error.value)
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["epoch"] == 1
    moved = shutil.copytree(tree, tmp_path / "moved")
    assert len(fit(tiny(moved, tmp_path / "run", resume=True)).history) == 2


def test_resume_with_one_image_less_is_refused(tmp_path, tree):
    fit(tiny(tree, tmp_path / "run", epochs=1))
    fewer = shutil.copytree(tree, tmp_path / "fewer")
    (fewer / "class07" / "2.jpg").unlink()  # a test-class image
    with pytest.raises(CheckpointError, match="evaluation: checkpoint 15 images .* now 14"):
        fit(tiny(fewer, tmp_path / "run", resume=True))


# ---------------------------------------------------------------- evaluation settings (item 6)


def test_eval_ks_beyond_the_test_split_are_refused_before_training(tmp_path, tree):
    with pytest.raises(ValueError, match=r"Recall@15 needs more than 15 images.*has 15"):
        fit(tiny(tree, tmp_path / "run", eval_ks=(1, 15)))
    assert not (tmp_path / "run").exists()


def test_a_failed_final_evaluation_keeps_the_last_epoch_and_resumes_with_other_eval_ks(
    tmp_path, tree, monkeypatch
):
    import dmlkit.train.loop as loop

    reference = fit(tiny(tree, tmp_path / "reference", eval_ks=(1, 4)))

    def failing(run):
        raise MemoryError("evaluation ran out of memory")

    with monkeypatch.context() as patch:
        patch.setattr(loop, "final_evaluation", failing)
        with pytest.raises(MemoryError):
            fit(tiny(tree, tmp_path / "run"))
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["epoch"] == 2  # nothing lost
    resumed = fit(tiny(tree, tmp_path / "run", eval_ks=(1, 4), resume=True))
    assert resumed.metrics == reference.metrics
    assert resumed.history[-1]["recall@4"] == reference.history[-1]["recall@4"]
    assert "recall@2" in resumed.history[0]  # epoch 1 was evaluated with the first eval_ks


# ---------------------------------------------------------------- cosine schedule (item 9)


def test_resuming_a_cosine_run_with_more_epochs_is_refused(tmp_path, tree):
    fit(tiny(tree, tmp_path / "run", lr_schedule="cosine"))
    with pytest.raises(CheckpointError, match="cosine schedule decays to 0"):
        fit(tiny(tree, tmp_path / "run", lr_schedule="cosine", epochs=4, resume=True))
    extended = fit(tiny(tree, tmp_path / "const", epochs=1))
    assert extended.history[-1]["lr"] == 1e-3
    assert len(fit(tiny(tree, tmp_path / "const", epochs=2, resume=True)).history) == 2

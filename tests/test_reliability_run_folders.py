"""Reliability, run folders and configuration: no silent overwrite, damaged checkpoints, errors
before training.

Every case is listed in docs/reliability.md; the tiny real-JPEG runs and helpers are in
``tests/reliability_fixtures.py``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dmlkit.data import DatasetError
from dmlkit.train import CheckpointError, fit, load_checkpoint
from tests.reliability_fixtures import (
    ROOT,
    child_env,
    cli_args,
    fill_disk_for,
    never,
    snapshot,
    tiny,
)

# ---------------------------------------------------------------- configuration errors


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


# ---------------------------------------------------------------- further probes (issue 14)


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

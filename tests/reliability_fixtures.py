"""Shared pieces of the tests/test_reliability_*.py files: a tiny ``folder`` dataset of real
JPEG files (5 + 5 classes of 3 images; glyphnet on 224 px crops), a one-second TrainConfig, a
finished run, and helpers to compare run folders — so image decoding, the DataLoader workers
and the run folder are the real ones."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from dmlkit.train import TrainConfig, fit
from tests.fixtures_datasets import make_folder

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


# ---------------------------------------------------------------- configuration errors


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tree) -> Path:
    """A finished 3-epoch run folder (checkpoint.pt, metrics.json, embeddings.npz)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    fit(tiny(tree, out))
    return out


def never(epoch: int, step: int) -> None:
    raise AssertionError(f"training started (epoch {epoch}, step {step})")


# ---------------------------------------------------------------- hard kills


def assert_same_run(run: Path, reference: dict) -> None:
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["metrics"] == reference["metrics"]
    assert comparable(saved["history"]) == comparable(reference["history"])


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

"""Facts about where a run happens: device choice, seeding, versions, git commit."""

from __future__ import annotations

import contextlib
import os
import platform
import random
import subprocess
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

_REPORTED_PACKAGES = (
    "torch",
    "torchvision",
    "numpy",
    "scipy",
    "scikit-learn",
    "pillow",
    "matplotlib",
    "openTSNE",
    "papermill",
)


def default_device(preferred: str | torch.device | None = None) -> torch.device:
    """``preferred`` if given, else the best available: cuda → mps → cpu."""
    if preferred is not None:
        return torch.device(preferred)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@contextlib.contextmanager
def cuda_kernel_choice(device: torch.device, deterministic: bool):
    """Inside the block, how kernels are chosen on CUDA (a no-op on other devices).

    deterministic: bit-reproducible runs: deterministic cuDNN kernels with no autotuning,
    and PyTorch's deterministic versions of the ops that otherwise add with atomics, such
    as ``index_add_`` and the backward of indexing (``torch.use_deterministic_algorithms``
    with ``warn_only``: an op that has no deterministic version warns instead of stopping
    the run). cuBLAS needs ``CUBLAS_WORKSPACE_CONFIG`` for that; ``:4096:8`` is set when
    it is unset. Otherwise: cuDNN autotuning, the fastest kernels. Restores every setting
    and the variable on exit.
    """
    if device.type != "cuda":
        yield
        return
    before = (
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    )
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[:2]
        torch.use_deterministic_algorithms(before[2], warn_only=before[3])
        if before[4] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = before[4]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy's legacy global RNG and torch (CPU and CUDA).

    dmlkit's own samplers and datasets never use these global generators (they own
    seeded ones); this covers model initialisation and third-party code.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - seeds third-party code that uses it
    torch.manual_seed(seed)


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _REPORTED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit(folder: str | Path | None = None) -> str | None:
    """The checked-out commit (with ``-dirty`` when the tree has changes), or None."""
    folder = Path(folder) if folder is not None else Path(__file__).resolve().parent
    try:
        commit = _git(folder, "rev-parse", "HEAD")
        dirty = _git(folder, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def _git(folder: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", *args], cwd=folder, capture_output=True, text=True, check=True, timeout=10
    )
    return out.stdout.strip()

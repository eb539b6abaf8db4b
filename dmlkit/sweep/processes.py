"""Process plumbing of the sweep runner: thread budget, signalling process groups, the local
executor (worker subprocesses, GPU slots)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "DMLKIT_NUM_THREADS",
)


def available_cores() -> int:
    """CPU cores this process may use (the affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def threads_per_job(jobs: int) -> int:
    """``max(1, cores // jobs)``: the thread budget of each of ``jobs`` parallel runs."""
    return max(1, available_cores() // max(1, jobs))


def gpu_slots(text: str) -> list[str]:
    """``--gpus``: ``"0,1,2,3"`` (one device per run), ``"0+1,2+3"`` (two per run) or ``"all"``.

    Returns each slot's ``CUDA_VISIBLE_DEVICES`` value (``["0", "1"]``, ``["0,1", "2,3"]``).
    ``all`` is every device this process sees: its own ``CUDA_VISIBLE_DEVICES``, else
    ``torch.cuda.device_count()``.

    Raises:
        ValueError: an empty item, a device listed twice, or ``all`` with no GPU.
    """
    if text.strip() == "all":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is None:
            import torch  # deferred: only `all` needs to count devices

            visible = ",".join(map(str, range(torch.cuda.device_count())))
        items = [item.strip() for item in visible.split(",") if item.strip()]
        if not items:
            raise ValueError("--gpus all: this machine shows no GPU")
    else:
        items = [item.strip() for item in text.split(",")]
    slots = [",".join(device.strip() for device in item.split("+")) for item in items]
    devices = [device for slot in slots for device in slot.split(",")]
    if "" in devices or len(set(devices)) != len(devices):
        raise ValueError(f"--gpus {text}: expected devices like 0,1,2,3 or 0+1,2+3, each once")
    return slots


def read_result(path: Path) -> dict[str, Any]:
    """The worker's result file as a dict; ``{}`` if it is missing or unreadable."""
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return result if isinstance(result, dict) else {}


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` to the process group ``proc`` leads (started with a new session)."""
    # Signalling the group reaches anything the worker started in it, too. The kernel has
    # a session of its own (see kill_kernel).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if hasattr(os, "killpg"):
            os.killpg(proc.pid, sig)
        else:  # pragma: no cover - Windows
            proc.kill() if sig != signal.SIGTERM else proc.terminate()


def kill_kernel(pid_file: Path) -> None:
    """SIGKILL the process group of the kernel whose pid the worker wrote to ``pid_file``."""
    # jupyter_client starts each kernel as the leader of a new session: kill its group
    # (the kernel and anything it spawned, e.g. DataLoader workers).
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if hasattr(os, "killpg"):
            os.killpg(pid, signal.SIGKILL)
        else:  # pragma: no cover - Windows
            os.kill(pid, signal.SIGTERM)


class LocalProcess:
    """A ``python -m dmlkit.sweep.worker`` subprocess in its own session, and its kernel."""

    def __init__(self, description: dict[str, Any], env: dict[str, str], gpus: str | None) -> None:
        self.pid_file, self.gpus = Path(description["pid_file"]), gpus
        self.log_path = Path(description["output"]).with_suffix(".log")
        self.record = {} if gpus is None else {"gpus": gpus}
        if gpus is not None:
            env = {**env, "CUDA_VISIBLE_DEVICES": gpus}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dmlkit.sweep.worker", json.dumps(description, default=str)],
                cwd=description["cwd"], env=env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=os.name == "posix",
            )  # fmt: skip

    def poll(self) -> int | None:
        return self.proc.poll()

    def stop(self) -> None:
        """SIGTERM the worker's group: it saves the partial notebook and stops its kernel."""
        signal_group(self.proc, signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the worker's group, reap it, and SIGKILL its kernel's group."""
        if self.proc.poll() is None:
            signal_group(self.proc, signal.SIGKILL)
        self.proc.wait()
        kill_kernel(self.pid_file)

    def error(self) -> str:
        return (
            f"WorkerDied: exit status {self.proc.returncode} without a result; see {self.log_path}"
        )


class LocalExecutor:
    """Starts each execution as a :class:`LocalProcess` on this machine.

    The executor interface the runner uses (``slurm.SlurmExecutor`` has it too): ``jobs``
    (executions at once), ``remote`` (run elsewhere: no pid files, a ``submitted`` manifest
    line), ``result_dir`` (where workers write outcomes; None: a temp folder),
    ``start_many(descriptions)`` → process-likes with ``poll``/``stop``/``kill``/``error``/
    ``record``, ``attach(manifest record)`` → the still-tracked execution or None, and
    ``release(process)`` when one ends.
    """

    remote = False
    result_dir = None

    def __init__(self, jobs: int, gpus: list[str] | None) -> None:
        self.jobs = jobs
        self.env = {**os.environ, **dict.fromkeys(THREAD_VARIABLES, str(threads_per_job(jobs)))}
        self.free_gpus = list(gpus or ())

    def start_many(self, descriptions: list[dict[str, Any]]) -> list[LocalProcess]:
        return [
            LocalProcess(d, self.env, self.free_gpus.pop(0) if self.free_gpus else None)
            for d in descriptions
        ]

    def release(self, proc: LocalProcess) -> None:
        if proc.gpus is not None:
            self.free_gpus.append(proc.gpus)

    def attach(self, record: dict[str, Any] | None) -> None:
        return None  # a local execution does not outlive its runner

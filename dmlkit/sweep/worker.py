"""Local executions: ``python -m dmlkit.sweep.worker JOB_JSON`` runs one papermill execution in
a session of its own (docs/sweeps.md, "Resume, failures, interruption"). It writes its kernel's
pid to ``pid_file`` (the runner kills the kernel's group if the worker cannot) and its outcome,
``{"status", "error", "error_cell"}``, to ``result_file``; it exits when the runner dies."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from jupyter_client import AsyncKernelManager

from ..io import atomic_write_text, write_json

THREAD_VARIABLES = (
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "DMLKIT_NUM_THREADS"
)  # fmt: skip
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_MAX_MESSAGE = 500
# Starts of a kernel that does not answer kernel_info (jupyter_client's RuntimeError): kernels
# started at once can race for a port (docs/sweeps.md, "Resume, failures, interruption").
_KERNEL_STARTS = 2
_NEVER_STARTED = ("Kernel died before replying to kernel_info", "Kernel didn't respond in")


def available_cores() -> int:
    """CPU cores this process may use (the affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def threads_per_job(jobs: int) -> int:
    """``max(1, cores // jobs)``: the thread budget of each of ``jobs`` parallel runs."""
    return max(1, available_cores() // max(1, jobs))


def gpu_slots(text: str) -> list[str]:
    """``--gpus`` (``0,1,2,3``, ``0+1,2+3`` or ``all``) as each slot's ``CUDA_VISIBLE_DEVICES``
    (``["0,1", "2,3"]``); ``all`` is this process's ``CUDA_VISIBLE_DEVICES``, else every GPU
    torch counts. A ``ValueError`` for an empty item, a device twice, or ``all`` and no GPU."""
    items = text.split(",")
    if text.strip() == "all":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is None:
            import torch  # deferred: only `all` needs to count devices

            visible = ",".join(map(str, range(torch.cuda.device_count())))
        items = [item for item in visible.split(",") if item.strip()]
        if not items:
            raise ValueError("--gpus all: this machine shows no GPU")
    slots = [",".join(device.strip() for device in item.split("+")) for item in items]
    devices = [device for slot in slots for device in slot.split(",")]
    if "" in devices or len(set(devices)) != len(devices):
        raise ValueError(f"--gpus {text}: expected devices like 0,1,2,3 or 0+1,2+3, each once")
    return slots


def local_jobs(jobs: int | None, gpus: list[str] | None) -> int:
    """``--jobs`` of a local sweep: by default one per GPU slot, else 1; never more than slots."""
    if jobs is None:
        jobs = len(gpus) if gpus else 1
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    if gpus and jobs > len(gpus):
        raise ValueError(
            f"--jobs {jobs} with {len(gpus)} GPU slot(s): a run needs a slot of its own"
        )
    return jobs


def read_result(path: Path) -> dict[str, Any]:
    """A worker's result file as a dict; ``{}`` if it is missing or unreadable."""
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return result if isinstance(result, dict) else {}


def _killpg(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


class LocalProcess:
    """A worker subprocess in its own session, and the kernel whose pid it writes."""

    def __init__(self, description: dict[str, Any], env: dict[str, str], gpus: str | None) -> None:
        self.pid_file, self.gpus = Path(description["pid_file"]), gpus
        self.log_path = Path(description["output"]).with_suffix(".log")
        self.record = {} if gpus is None else {"gpus": gpus}
        env = env if gpus is None else {**env, "CUDA_VISIBLE_DEVICES": gpus}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dmlkit.sweep.worker", json.dumps(description, default=str)],
                cwd=description["cwd"], env=env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def poll(self) -> int | None:
        return self.proc.poll()

    def stop(self) -> None:
        """SIGTERM the worker's group: it saves the partial notebook and stops its kernel."""
        _killpg(self.proc.pid, signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the worker's group, reap it, and SIGKILL its kernel's (a session leader's)
        group, which holds e.g. DataLoader workers."""
        if self.proc.poll() is None:
            _killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        with contextlib.suppress(OSError, ValueError):
            _killpg(int(self.pid_file.read_text()), signal.SIGKILL)

    def error(self) -> str:
        return (
            f"WorkerDied: exit status {self.proc.returncode} without a result; see {self.log_path}"
        )


class LocalExecutor:
    """Starts each execution as a :class:`LocalProcess`, each with a free GPU slot if any."""

    remote = False
    result_dir = None

    def __init__(self, jobs: int, gpus: list[str] | None) -> None:
        self.jobs = jobs
        self.env = {**os.environ, **dict.fromkeys(THREAD_VARIABLES, str(threads_per_job(jobs)))}
        self.free_gpus = list(gpus or ())

    def start_many(self, descriptions: list[dict[str, Any]], token: str) -> list[LocalProcess]:
        return [
            LocalProcess(d, self.env, self.free_gpus.pop(0) if self.free_gpus else None)
            for d in descriptions
        ]

    def release(self, proc: LocalProcess) -> None:
        if proc.gpus is not None:
            self.free_gpus.append(proc.gpus)

    def attach(self, record: dict[str, Any]) -> None:
        return None  # a local execution does not outlive its runner


class PidFileKernelManager(AsyncKernelManager):
    """A kernel manager that records the started kernel's pid in ``pid_file``."""

    pid_file: str | None = None

    async def start_kernel(self, **kwargs: Any) -> None:
        await super().start_kernel(**kwargs)
        pid = getattr(self.provisioner, "pid", None)
        if self.pid_file and pid:
            atomic_write_text(self.pid_file, str(pid))


def error_summary(exc: BaseException) -> tuple[str, int | None]:
    """``"ExceptionName: message"`` of a failed cell (not the traceback) and its number."""
    name = getattr(exc, "ename", None) or type(exc).__name__
    message = getattr(exc, "evalue", None)
    message = _ANSI.sub("", str(exc if message is None else message)).strip()
    if len(message) > _MAX_MESSAGE:
        message = message[: _MAX_MESSAGE - 1] + "…"
    cell = getattr(exc, "exec_count", None)
    return (f"{name}: {message}" if message else name), cell


def execute(job: dict[str, Any]) -> dict[str, Any]:
    """Run one job description (see ``runner._Runner._launch``); raises only SystemExit. A
    kernel that never answered ``kernel_info`` has run no cell: it is started once more."""
    import papermill

    PidFileKernelManager.pid_file = job.get("pid_file")
    starts = 1
    while True:
        try:
            papermill.execute_notebook(
                job["notebook"],
                job["output"],
                parameters=job["parameters"],
                kernel_name=job["kernel"],
                cwd=job["cwd"],
                progress_bar=False,
                log_output=False,
                request_save_on_cell_execute=True,
                kernel_manager_class=PidFileKernelManager,
            )
        except SystemExit:
            # submitit's exit after requeueing a preempted or timed-out Slurm job: this
            # attempt has no outcome; the requeued job will (papermill stopped the kernel).
            raise
        except BaseException as exc:  # noqa: BLE001 - every outcome must reach the runner
            if _requeue_killed(exc):
                raise SystemExit(f"requeued by Slurm ({exc})") from exc
            message = str(exc) if isinstance(exc, RuntimeError) else ""
            if starts < _KERNEL_STARTS and any(text in message for text in _NEVER_STARTED):
                starts += 1
                continue
            error, cell = error_summary(exc)
            status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            return {"status": status, "error": error, "error_cell": cell}
        trust(job["output"])
        return {"status": "ok", "error": None, "error_cell": None}


def _requeue_killed(exc: BaseException) -> bool:
    # submitit's `scontrol requeue`, killed by the SIGTERM with which Slurm ends the job it
    # requeues: the job is requeued all the same, so this attempt has no outcome either.
    requeue = ["scontrol", "requeue"]
    return isinstance(exc, subprocess.CalledProcessError) and list(exc.cmd[:2]) == requeue


def trust(path: str) -> None:
    """Sign an executed notebook in this user's signature store, as ``jupyter trust`` does
    (docs/sweeps.md, "Where things go"); a store that cannot be written only warns."""
    import nbformat
    from nbformat.sign import NotebookNotary

    try:
        NotebookNotary().sign(nbformat.read(path, as_version=4))
    except Exception as error:  # noqa: BLE001 - the run itself succeeded
        logging.getLogger(__name__).warning("could not mark %s trusted: %s", path, error)


def skip_slow_optional_imports() -> None:
    """Make this process's first papermill import ~1 s faster (call only in own processes)."""
    # jsonschema (imported by nbformat) compiles an RFC 3987 grammar at import when
    # rfc3987-syntax is installed (~0.8 s), for a format check notebooks never use.
    sys.modules.setdefault("rfc3987_syntax", None)


def _exit_with_parent(parent: int) -> None:
    # A SIGKILLed runner would leave the worker (in its own session) running; SIGTERM lets
    # nbclient shut the kernel down cleanly.
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


def _interrupt(signum: int, frame: Any) -> None:
    # Unwinding as KeyboardInterrupt lets papermill save the partial notebook and nbclient
    # shut the kernel down, instead of dying with the kernel still running.
    raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: execute the job given as a JSON argument, write its result file."""
    job = json.loads((sys.argv[1:] if argv is None else argv)[0])
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    skip_slow_optional_imports()
    parent = int(job.get("parent_pid") or os.getppid())
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    result = execute(job)
    write_json(job["result_file"], result)
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())

"""``--executor slurm``: each execution is one Slurm job, submitted with submitit; executions
submitted together form one job array (docs/sweeps.md, "On a cluster"). Job states come from
``squeue``: submitit reads ``sacct``, which clusters without accounting storage do not answer.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..io import write_json
from .worker import THREAD_VARIABLES, execute, read_result, skip_slow_optional_imports

SLURM_FOLDER = "slurm"  # in the sweep folder: submitit's scripts, pickles and logs
# squeue states of a job that may still run (anything else, or no line, means it ended).
ALIVE = frozenset(
    {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD",
     "REQUEUE_FED", "RESIZING", "SUSPENDED", "PREEMPTED", "SIGNALING", "STAGE_OUT"}
)  # fmt: skip
_SQUEUE = ("squeue", "--me", "--noheader", "--array", "--states=all", "--format=%i|%T|%k")
_SQUEUE_EVERY_S = 2.0
# A job squeue has not shown alive this long, and that wrote no outcome, has ended: squeue
# lists a new job after a moment, and shows a requeued one FAILED for a moment before PENDING.
_GONE_S = 30.0


class SlurmUnavailableError(RuntimeError):
    """No Slurm answers here: no ``sbatch``, the controller is down, or no such partition."""


@dataclass
class SlurmResources:
    """What each execution asks Slurm for: the spec's ``executor:`` keys, then the CLI's."""

    partition: str | None = None
    gpus_per_run: int = 0
    cpus_per_run: int = 1
    mem_gb: float | None = None
    time_min: int = 24 * 60
    sbatch: dict[str, Any] = field(default_factory=dict)

    def submitit_parameters(self) -> dict[str, Any]:
        optional = {"slurm_partition": self.partition or None, "mem_gb": self.mem_gb}
        return {
            "timeout_min": self.time_min,
            "cpus_per_task": self.cpus_per_run,
            "gpus_per_node": self.gpus_per_run,
            "tasks_per_node": 1,
            "slurm_additional_parameters": dict(self.sbatch),
            **{key: value for key, value in optional.items() if value is not None},
        }


def resources_from(
    spec_executor: dict[str, Any], timeout_s: float | None, **cli: Any
) -> SlurmResources:
    """The spec's ``executor`` values, overridden by the CLI's (those not None; ``sbatch``
    options are merged); without a ``time_min``, ``timeout_s`` rounded up to minutes."""
    given = {key: value for key, value in cli.items() if value is not None}
    sbatch = {**spec_executor.get("sbatch", {}), **given.get("sbatch", {})}
    values = {**spec_executor, **given, "sbatch": sbatch}
    if "time_min" not in values and timeout_s is not None:
        values["time_min"] = math.ceil(timeout_s / 60)
    return SlurmResources(**values)


def check_slurm(resources: SlurmResources) -> None:
    """Raise :class:`SlurmUnavailableError` naming what was tried unless Slurm answers."""

    def unavailable(problem: str) -> SlurmUnavailableError:
        return SlurmUnavailableError(f"--executor slurm: {problem}")

    if shutil.which("sbatch") is None:
        raise unavailable("no `sbatch` on PATH; is this a Slurm login node?")
    command = ["sinfo", "--noheader", "--format=%P"]
    tried = f"`{' '.join(command)}`"
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise unavailable(f"{tried} failed: {exc}") from exc
    if done.returncode != 0:
        said = done.stderr.strip() or done.stdout.strip()
        raise unavailable(
            f"{tried} exited {done.returncode}: {said} (is slurmctld up? SLURM_CONF?)"
        )
    partitions = [name.rstrip("*") for name in done.stdout.split()]
    if resources.partition and resources.partition not in partitions:
        listed = ", ".join(partitions) or "none"
        raise unavailable(f"no partition {resources.partition!r}; {tried} lists: {listed}")


@dataclass
class NotebookTask:
    """What a Slurm job runs: one papermill execution, its outcome written to ``result_file``."""

    description: dict[str, Any]

    def __call__(self) -> dict[str, Any]:
        # Slurm signals every process of a job it preempts, requeues or cancels: with SIGTERM
        # ignored (inherited by the kernel), submitit's USR2 or Slurm's SIGKILL ends the
        # attempt, never a kernel that died of the SIGTERM (a failed run, then requeued).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        threads = os.environ.get("SLURM_CPUS_PER_TASK", "1")
        os.environ.update(dict.fromkeys(THREAD_VARIABLES, threads))
        skip_slow_optional_imports()
        result = execute(self.description)
        write_json(self.description["result_file"], result)
        return result

    def checkpoint(self) -> Any:
        """Preempted or timed out: submitit requeues the same task; the notebook resumes."""
        import submitit

        return submitit.helpers.DelayedSubmission(self)


@dataclass
class SlurmProcess:
    """A submitted execution, with the interface of a local worker process."""

    job_id: str | None
    result_file: Path
    executor: SlurmExecutor
    own: bool = True  # submitted by this invocation (Ctrl-C cancels only those)
    returncode: int | None = None
    state: str | None = None
    alive: float = field(default_factory=time.monotonic)  # when last seen alive (or found)

    def poll(self) -> int | None:
        if self.returncode is None:
            listed = self.executor.squeue().get(self.job_id, (None,))[0]
            self.state = listed or self.state
            result = read_result(self.result_file)
            if listed in ALIVE and not result:
                self.alive = time.monotonic()
            elif result or time.monotonic() - self.alive > _GONE_S:
                self.returncode = 0 if result.get("status") == "ok" else 1
        return self.returncode

    def stop(self) -> None:
        if self.own:
            subprocess.run(["scancel", self.job_id], capture_output=True, timeout=60)
            self.alive = -math.inf  # cancelled: a state that is not alive is final

    def kill(self) -> None:
        if self.returncode is None:
            self.stop()

    @property
    def record(self) -> dict[str, Any]:
        return {"slurm_job": self.job_id, "slurm_state": self.state}

    def error(self) -> str:
        return f"SlurmJobEnded: job {self.job_id} ended {self.state or 'unseen'} without a result"


class SlurmExecutor:
    """Submits executions through submitit's ``AutoExecutor`` into ``<sweep>/slurm/``."""

    remote = True

    def __init__(self, folder: Path, resources: SlurmResources, *, jobs: int) -> None:
        import submitit

        self.jobs = jobs  # at most this many queued or running at once
        self.result_dir = folder / SLURM_FOLDER
        self.executor = submitit.AutoExecutor(folder=self.result_dir / "%j", cluster="slurm")
        self.executor.update_parameters(**resources.submitit_parameters())
        self.listed: dict[str, tuple[str, str]] = {}  # job id -> (state, comment)
        self.checked = -math.inf

    def squeue(self) -> dict[str, tuple[str, str]]:
        """This user's jobs (id -> state, comment), asked at most every ``_SQUEUE_EVERY_S``."""
        if time.monotonic() - self.checked > _SQUEUE_EVERY_S:
            done = subprocess.run(_SQUEUE, capture_output=True, text=True, timeout=60)
            if done.returncode == 0:  # a controller that blinks: keep the last answer
                lines = (line.split("|", 2) for line in done.stdout.splitlines())
                self.listed = {job: (state, comment) for job, state, comment in lines}
            self.checked = time.monotonic()
        return self.listed

    def start_many(self, descriptions: list[dict[str, Any]], token: str) -> list[SlurmProcess]:
        """Submit one job array whose jobs carry ``token`` as their Slurm comment."""
        self.executor.update_parameters(slurm_comment=token)
        with self.executor.batch():
            jobs = [self.executor.submit(NotebookTask(d)) for d in descriptions]
        return [
            SlurmProcess(job.job_id, Path(d["result_file"]), self)
            for job, d in zip(jobs, descriptions, strict=True)
        ]

    def release(self, proc: SlurmProcess) -> None:
        pass  # Slurm allocates and frees the resources

    def attach(self, record: dict[str, Any] | None) -> SlurmProcess | None:
        """The job of a ``submitted`` manifest record; for a ``submitting`` one (the runner was
        killed while it submitted), the job squeue lists with its token (the job array's
        comment; ``<array>_<index>``, or a lone job), else its outcome if it wrote one."""
        status = (record or {}).get("status")
        if status not in ("submitted", "submitting"):
            return None
        result_file = Path(record["result_file"])
        job_id = record.get("slurm_job")
        if status == "submitting":
            index, token = str(record["slurm_index"]), record["slurm_token"]
            listed = self.squeue().items()
            found = [j for j, (_, c) in listed if c == token and j.partition("_")[2] in ("", index)]
            job_id = found[0] if found else None
            if job_id is None and not read_result(result_file):
                return None  # never submitted, or ended without an outcome: submit it again
        return SlurmProcess(job_id, result_file, self, own=False)

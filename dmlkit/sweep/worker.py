"""One papermill execution in its own process: ``python -m dmlkit.sweep.worker JOB_JSON``.

The sweep runner starts one worker per job in a new session, so a crash, a hang or a
Ctrl-C is contained and the runner can stop it (its whole process group) at will. The
worker writes the kernel's pid to ``pid_file`` as soon as the kernel starts (the kernel
lives in a session of its own; the runner kills its group if the worker cannot) and its
outcome to ``result_file``: ``{"status", "error", "error_cell"}``.

The kernel also exits by itself when the worker dies (ipykernel polls its parent), and the
worker exits when the runner dies, so nothing is left running after a hard kill.
"""

from __future__ import annotations

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

from ..io import write_json

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_MAX_MESSAGE = 500


class PidFileKernelManager(AsyncKernelManager):
    """A kernel manager that records the started kernel's pid in ``pid_file``."""

    pid_file: str | None = None

    async def start_kernel(self, **kwargs: Any) -> None:
        """Start the kernel, then write its pid (atomically) for the sweep runner."""
        await super().start_kernel(**kwargs)
        pid = getattr(self.provisioner, "pid", None)
        if self.pid_file and pid:
            tmp = f"{self.pid_file}.tmp"
            Path(tmp).write_text(str(pid))
            os.replace(tmp, self.pid_file)


def error_summary(exc: BaseException) -> tuple[str, int | None]:
    """``"ExceptionName: message"`` of a failed cell (not the traceback) and its cell number.

    Papermill's execution error carries the kernel-side exception name and message; any
    other exception (a dead kernel, a missing kernelspec) is summarised by its own type.
    """
    name = getattr(exc, "ename", None) or type(exc).__name__
    message = getattr(exc, "evalue", None)
    if message is None:
        message = str(exc)
    message = _ANSI.sub("", str(message)).strip()
    if len(message) > _MAX_MESSAGE:
        message = message[: _MAX_MESSAGE - 1] + "…"
    cell = getattr(exc, "exec_count", None)
    return (f"{name}: {message}" if message else name), cell


def execute(job: dict[str, Any]) -> dict[str, Any]:
    """Run one job description (see :mod:`dmlkit.sweep.runner`); raises only SystemExit.

    A kernel that dies, or stays silent for nbclient's start-up timeout, before it answers
    ``kernel_info`` has run no cell, so it is started once more (``_KERNEL_STARTS``) before
    the run counts as failed.
    """
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
            if starts < _KERNEL_STARTS and never_started(exc):
                starts += 1
                continue
            error, cell = error_summary(exc)
            status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            return {"status": status, "error": error, "error_cell": cell}
        trust(job["output"])
        return {"status": "ok", "error": None, "error_cell": None}


def _requeue_killed(exc: BaseException) -> bool:
    """submitit's `scontrol requeue`, killed by the SIGTERM with which Slurm ends the job it
    requeues (seen once in four clean-clone test runs): the job is requeued all the same,
    so this attempt has no outcome, as with submitit's own exit."""
    return isinstance(exc, subprocess.CalledProcessError) and list(exc.cmd[:2]) == [
        "scontrol",
        "requeue",
    ]


def trust(path: str) -> None:
    """Sign an executed notebook in this user's notebook-signature store (``jupyter trust``).

    Jupyter runs an output's JavaScript only in a trusted notebook, so without this the
    interactive view of explore.ipynb (Bokeh) in a sweep's executed copy stays blank when
    opened later. It trusts only what this machine's own sweep just ran. A store that
    cannot be written (read-only home, locked database) leaves the notebook untrusted: a
    warning, never a failed run.
    """
    import nbformat
    from nbformat.sign import NotebookNotary

    try:
        NotebookNotary().sign(nbformat.read(path, as_version=4))
    except Exception as error:  # noqa: BLE001 - the run itself succeeded
        logging.getLogger(__name__).warning("could not mark %s trusted: %s", path, error)


# Starts of a kernel that does not answer kernel_info. Seen in clean-clone test runs on two
# cores, with a sweep test starting two kernels at once while the other test worker ran:
# once as "died before replying" (in 3 runs), once as 60 s of silence (2026-12-04, in the
# third run that day). A likely cause is that jupyter_client picks a kernel's ports before
# the kernel binds them, so kernels started at the same moment can race for one.
_KERNEL_STARTS = 2
_NEVER_STARTED = ("Kernel died before replying to kernel_info", "Kernel didn't respond in")


def never_started(exc: BaseException) -> bool:
    """True for jupyter_client's errors of a kernel that never answered ``kernel_info``
    (it died, or stayed silent for the start-up timeout): no cell has run."""
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in _NEVER_STARTED)


def _exit_with_parent(parent: int) -> None:
    # The worker runs in its own session, so a SIGKILLed runner would leave it (and its
    # kernel) running; SIGTERM lets nbclient shut the kernel down cleanly.
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)
            return


def skip_slow_optional_imports() -> None:
    """Make this process's first papermill import ~1 s faster (call only in own processes)."""
    # jsonschema (imported by nbformat) compiles an RFC 3987 grammar at import when the
    # optional rfc3987-syntax package is installed: ~0.8 s of CPU at every worker start, for
    # an "iri" format check that notebook schemas never use. Marking it absent skips it.
    sys.modules.setdefault("rfc3987_syntax", None)


def _interrupt(signum: int, frame: Any) -> None:
    # Unwinding as KeyboardInterrupt lets papermill save the partial notebook and nbclient
    # shut the kernel down, instead of dying with the kernel still running.
    raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: execute the job given as a JSON argument, write its result file."""
    args = sys.argv[1:] if argv is None else argv
    job = json.loads(args[0])
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

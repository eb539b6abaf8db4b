"""Run a sweep's jobs through an executor: parallel, resumable, interruptible.

An executor starts executions and hands back process-like objects (``poll``, ``stop``,
``kill``): locally each is a ``python -m dmlkit.sweep.worker`` process in its own session
(so a terminal Ctrl-C reaches only this runner, which then stops the workers deliberately;
see ``processes.LocalExecutor``); with Slurm each is a job (``slurm.SlurmExecutor``). The
runner polls them, appends one ``manifest.jsonl`` record per finished attempt (and, for
Slurm, one per submission), queues each finished run's ``then`` steps, and on SIGINT/SIGTERM
stops every execution it started, records it ``interrupted`` and returns. With
``figures_only`` it starts no run: it queues the steps of the runs finished earlier, forced.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm  # text bars: tqdm.auto warns in Jupyter without ipywidgets

from .manifest import MANIFEST, append_record, latest_records, lock_manifest, now_iso
from .manifest import read_manifest as _read_manifest
from .outcome import Outcome, SweepResult
from .plan import Job, OnlyFilter, plan, plan_steps, shown_path, sweep_folder
from .processes import LocalExecutor, read_result
from .resume import check_owner, check_some_finished, is_finished, record_owner
from .spec import SweepSpec, load_spec

logger = logging.getLogger(__name__)

_POLL_S = 0.05


def run_sweep(
    spec_path: str | Path | SweepSpec,
    *,
    jobs: int | None = None,
    gpus: list[str] | None = None,
    smoke: bool = False,
    only: OnlyFilter = None,
    out: str | Path | None = None,
    progress: bool = True,
    grace_s: float = 10.0,
    figures_only: bool = False,
    executor: str = "local",
    slurm: dict[str, Any] | None = None,
    detach: bool = False,
) -> SweepResult:
    """Run (or resume) a sweep; see docs/sweeps.md.

    Args:
        spec_path: a spec file or a spec from :func:`load_spec`.
        jobs: parallel executions (default: one per GPU slot, else 1); each gets
            ``max(1, cores // jobs)`` threads.
        gpus: ``CUDA_VISIBLE_DEVICES`` of each slot (see ``processes.gpu_slots``): a run
            gets a free slot for its whole execution, recorded as ``gpus`` in the manifest.
        smoke: inject ``smoke=True``.  only: restrict the grid (see ``parse_only``).
        out: parent of the sweep folder (default ``<root>/papermill_runs``).
        progress: show a tqdm bar.  grace_s: seconds a stopped job gets to exit cleanly.
        figures_only: start no grid run; execute the ``then`` steps again, even those that
            succeeded before: per-run steps on every finished run, then per-sweep steps.
            Runs not finished are listed ``skipped`` with the reason as their error.
        executor: ``"local"`` or ``"slurm"`` (one Slurm job per execution; ``jobs`` then
            caps how many are queued at once, default all).
        slurm: resources overriding the spec's ``executor`` mapping (``SlurmResources``
            fields).  detach: with Slurm, submit the runs and return; a later call
            collects them (and runs the steps).
    Returns:
        The outcome of every job; ``exit_code`` is 0 iff every job succeeded (or was
        already done), 128 + signal number when interrupted, 1 otherwise.
    Raises:
        SpecError: before anything runs.  ManifestLockedError: a sweep already runs there.
        NoFinishedRunError: ``figures_only`` and no selected run has finished.
    """
    spec = spec_path if isinstance(spec_path, SweepSpec) else load_spec(spec_path)
    grid_jobs = plan(spec, only=only, smoke=smoke, out=out)
    folder = sweep_folder(spec, out, smoke=smoke)
    starter = make_executor(executor, spec, folder, jobs, gpus, slurm)
    # Before taking the lock, which would create the sweep folder.
    check_owner(spec, folder)
    if figures_only:
        check_some_finished(spec, grid_jobs, folder)
    with lock_manifest(folder / MANIFEST):
        check_owner(spec, folder)  # again: another spec's sweep may have started meanwhile
        record_owner(spec, folder)
        runner = _Runner(
            spec, folder, starter, smoke=smoke, grace_s=grace_s, figures_only=figures_only,
            detach=detach,
        )  # fmt: skip
        return runner.run(grid_jobs, progress=progress)


def make_executor(
    kind: str,
    spec: SweepSpec,
    folder: Path,
    jobs: int | None,
    gpus: list[str] | None,
    slurm: dict[str, Any] | None,
) -> Any:
    """The executor of ``kind``, checked (Slurm answers; jobs fit the GPU slots); writes nothing."""
    if kind == "slurm":
        from .slurm import SlurmExecutor, check_slurm, resources_from

        resources = resources_from(spec.executor, spec.timeout_s, **(slurm or {}))
        check_slurm(resources)
        return SlurmExecutor(folder, resources, jobs=jobs or 10**9)
    if kind != "local":
        raise ValueError(f"executor must be 'local' or 'slurm', got {kind!r}")
    if jobs is None:
        jobs = len(gpus) if gpus else 1
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    if gpus and jobs > len(gpus):
        raise ValueError(
            f"--jobs {jobs} with {len(gpus)} GPU slot(s): a run needs a slot of its own"
        )
    return LocalExecutor(jobs, gpus)


def read_manifest(path: str | Path) -> list[dict[str, Any]]:
    """Records of ``manifest.jsonl`` (a file, or a sweep folder holding one)."""
    path = Path(path)
    return _read_manifest(path / MANIFEST if path.is_dir() else path)


@dataclass
class _Active:
    """A running execution and what is needed to judge and record its outcome."""

    job: Job
    proc: Any  # processes.LocalProcess or slurm.SlurmProcess
    started: str
    t0: float
    result_file: Path
    metrics_mtime: int | None


class _Runner:
    """The scheduling loop of one ``run_sweep`` call."""

    def __init__(
        self,
        spec: SweepSpec,
        folder: Path,
        executor: Any,
        *,
        smoke: bool,
        grace_s: float,
        figures_only: bool = False,
        detach: bool = False,
    ) -> None:
        self.spec, self.folder, self.smoke = spec, folder, smoke
        self.grace_s, self.figures_only, self.detach = grace_s, figures_only, detach
        self.executor = executor
        self.latest = latest_records(_read_manifest(folder / MANIFEST))
        self.active: list[_Active] = []
        self.outcomes: dict[str, Outcome] = {}
        self.executed: set[str] = set()
        self.stop_signal: int | None = None
        self.force = False
        self.bar: tqdm | None = None
        self.tmp = Path(tempfile.mkdtemp(prefix="dmlkit-sweep-"))
        # Where workers write their outcome: the sweep folder when they run elsewhere.
        self.results = executor.result_dir or self.tmp

    def run(self, grid_jobs: list[Job], *, progress: bool) -> SweepResult:
        queue: deque[Job] = deque()
        for job in grid_jobs:
            if self.figures_only:
                queue.extend(self._figures_of(job))
            elif self._skip(job):
                queue.extend(j for j in self._steps_of(job) if not self._skip(j))
            elif (proc := self.executor.attach(self.latest.get(job.key))) is not None:
                # Submitted earlier and not collected yet: wait for that job, never a copy.
                record = self.latest[job.key]
                self.executed.add(job.key)
                result_file = Path(record["result_file"])
                self.active.append(
                    _Active(job, proc, record["started"], time.monotonic(), result_file, None)
                )
            else:
                queue.append(job)
        previous = self._install_handlers()
        self.bar = tqdm(total=len(queue), desc=self.spec.name, unit="job", disable=not progress)
        try:
            self._loop(queue)
            for active in list(self.active):  # --detach
                self._leave_running(active)
            if self.stop_signal is None and not self._pending():
                self._loop(deque(self._sweep_steps(grid_jobs)))
        except BaseException:
            # A bug or an unexpected error in the runner: leave no worker or kernel behind.
            for active in self.active:
                active.proc.kill()
            raise
        finally:
            self.bar.close()
            self._restore_handlers(previous)
            shutil.rmtree(self.tmp, ignore_errors=True)
        rank = {job.key: i for i, job in enumerate(grid_jobs)}
        outcomes = sorted(self.outcomes.values(), key=lambda o: _plan_order(o, rank))
        return SweepResult(self.spec, self.folder, outcomes, self.stop_signal)

    def _pending(self) -> bool:
        return any(o.status == "submitted" for o in self.outcomes.values())

    def _skip(self, job: Job) -> bool:
        if not is_finished(job, self.latest):
            return False
        recorded = self.latest[job.key].get("params")
        if recorded is not None and recorded != json.loads(json.dumps(job.parameters, default=str)):
            logger.warning(
                "%s finished earlier with other parameters (%s); delete %s to rerun it",
                job.key,
                recorded,
                job.folder,
            )
        self.outcomes[job.key] = Outcome(job.key, job.kind, "skipped", None, None, job.output)
        return True

    def _figures_of(self, run: Job) -> list[Job]:
        # figures_only: every step of a finished run, forced; an unfinished run is left alone.
        if is_finished(run, self.latest):
            return self._steps_of(run)
        status = self.latest.get(run.key, {}).get("status")
        reason = {None: "never run", "ok": "outputs missing"}.get(status, f"last attempt {status}")
        self.outcomes[run.key] = Outcome(
            run.key, run.kind, "skipped", None, f"not finished ({reason})", run.output
        )
        return []

    def _steps_of(self, run: Job) -> list[Job]:
        return plan_steps(self.spec, run, smoke=self.smoke, folder=self.folder)

    def _sweep_steps(self, grid_jobs: list[Job]) -> list[Job]:
        steps = plan_steps(self.spec, None, smoke=self.smoke, folder=self.folder)
        if self.figures_only:
            done = [j for j in grid_jobs if is_finished(j, self.latest)]
        else:
            done = [j for j in grid_jobs if self.outcomes[j.key].status in ("ok", "skipped")]
        if steps and not done:
            logger.warning("no run finished; per-sweep steps not run")
            return []
        if self.executed or self.figures_only:
            return steps
        return [step for step in steps if not self._skip(step)]

    def _loop(self, queue: deque[Job]) -> None:
        if self.bar is not None:
            self.bar.total = self.bar.n + len(queue) + len(self.active)
            self.bar.refresh()
        while (queue or self.active) and self.stop_signal is None:
            free = self.executor.jobs - len(self.active)
            if queue and free > 0:
                self._launch([queue.popleft() for _ in range(min(free, len(queue)))])
            if self.detach and not queue:
                break
            for active in list(self.active):
                if active.proc.poll() is not None:
                    self._finish(active, queue)
                elif self._timed_out(active):
                    active.proc.kill()
                    limit = self.spec.timeout_s
                    self._finish(active, queue, "failed", f"TimeoutError: exceeded {limit:g} s")
            time.sleep(_POLL_S)
        if self.stop_signal is not None:
            self._stop_all(queue)
            for job in queue:
                self.outcomes[job.key] = Outcome(
                    job.key, job.kind, "pending", None, None, job.output
                )

    def _launch(self, batch: list[Job]) -> None:
        started, t0, ready = now_iso(), time.monotonic(), []
        for job in batch:
            name = uuid.uuid4().hex
            description = {
                "notebook": str(job.notebook), "output": str(job.output),
                "parameters": job.parameters, "kernel": self.spec.kernel,
                "cwd": str(self.spec.root), "result_file": str(self.results / f"{name}.json"),
                "pid_file": str(self.tmp / f"{name}.kernel.pid"), "parent_pid": os.getpid(),
            }  # fmt: skip
            if self.executor.remote:  # the kernel is another machine's: Slurm stops it
                description["pid_file"] = None
            self.executed.add(job.key)
            try:
                job.folder.mkdir(parents=True, exist_ok=True)
                self.results.mkdir(parents=True, exist_ok=True)
                metrics_mtime = _mtime(job.folder / "metrics.json") if job.kind == "run" else None
                if not self.executor.remote:  # Slurm jobs log under <sweep>/slurm/
                    job.output.with_suffix(".log").open("ab").close()
            except OSError as exc:  # e.g. a full disk or a read-only folder: this job fails
                self._record(job, "failed", 0.0, started, f"{type(exc).__name__}: {exc}", None)
                continue
            ready.append((job, description, metrics_mtime))
        procs = self.executor.start_many([description for _, description, _ in ready])
        for (job, description, metrics_mtime), proc in zip(ready, procs, strict=True):
            result_file = Path(description["result_file"])
            self.active.append(_Active(job, proc, started, t0, result_file, metrics_mtime))
            if self.executor.remote:
                self._record(job, "submitted", None, started, None, None, proc.record, result_file)

    def _timed_out(self, active: _Active) -> bool:
        limit = None if self.executor.remote else self.spec.timeout_s  # Slurm's time limit
        return limit is not None and time.monotonic() - active.t0 > limit

    def _finish(
        self,
        active: _Active,
        queue: deque[Job] | None,
        status: str | None = None,
        error: str | None = None,
    ) -> None:
        self.active.remove(active)
        self.executor.release(active.proc)
        job, seconds = active.job, round(time.monotonic() - active.t0, 3)
        result = read_result(active.result_file)
        if status is None:
            status, error = result.get("status", "failed"), result.get("error")
            if not result:
                error = active.proc.error()
        if status == "ok" and job.kind == "run":
            status, error = self._check_metrics(active)
        if status != "ok":
            active.proc.kill()
        cell = result.get("error_cell")
        self._record(job, status, seconds, active.started, error, cell, active.proc.record)
        if status == "ok" and job.kind == "run" and queue is not None:
            steps = self._steps_of(job)
            queue.extend(steps)
            if self.bar is not None and steps:
                self.bar.total += len(steps)
                self.bar.refresh()

    def _check_metrics(self, active: _Active) -> tuple[str, str | None]:
        # A notebook that "succeeds" without (re)writing metrics.json did not do its job,
        # and would otherwise be skipped forever by the resume rule.
        metrics = active.job.folder / "metrics.json"
        mtime = _mtime(metrics)
        if mtime is None or mtime == active.metrics_mtime:
            return "failed", f"MissingOutput: the notebook finished without writing {metrics}"
        return "ok", None

    def _record(
        self,
        job: Job,
        status: str,
        seconds: float | None,
        started: str,
        error: str | None,
        error_cell: int | None,
        extra: dict[str, Any] | None = None,
        result_file: Path | None = None,
    ) -> None:
        extra = {**(extra or {}), **({"result_file": str(result_file)} if result_file else {})}
        append_record(
            self.folder / MANIFEST,
            {
                "run": job.key,
                "kind": job.kind,
                "status": status,
                "params": job.parameters,
                "seconds": seconds,
                "started": started,
                "ended": now_iso(),
                "error": error,
                "error_cell": error_cell,
                "notebook": shown_path(job.notebook, self.spec.root),
                "output": shown_path(job.output, self.spec.root),
                **extra,
            },
        )
        if status == "submitted":
            return
        self.outcomes[job.key] = Outcome(job.key, job.kind, status, seconds, error, job.output)
        log = logger.info if status == "ok" else logger.warning
        log("%s: %s in %.1f s%s", job.key, status, seconds, f" ({error})" if error else "")
        if self.bar is not None:
            self.bar.update(1)

    def _stop_all(self, queue: deque[Job]) -> None:
        name = signal.Signals(self.stop_signal).name
        for active in [a for a in self.active if not getattr(a.proc, "own", True)]:
            self._leave_running(active)  # submitted by an earlier invocation: not ours to stop
        logger.warning("%s: stopping %d running job(s)", name, len(self.active))
        for active in self.active:
            active.proc.stop()
        deadline = time.monotonic() + self.grace_s
        while (
            any(a.proc.poll() is None for a in self.active)
            and not self.force
            and time.monotonic() < deadline
        ):
            time.sleep(_POLL_S)
        for active in list(self.active):
            active.proc.kill()
            # A job that completed before the signal reached it keeps its real outcome.
            if read_result(active.result_file).get("status") == "ok":
                self._finish(active, queue)
            else:
                self._finish(active, queue, "interrupted", f"Interrupted: stopped by {name}")

    def _leave_running(self, active: _Active) -> None:
        # A Slurm job left queued or running (--detach, or another invocation's): the
        # manifest's `submitted` line lets the next invocation collect it.
        self.active.remove(active)
        job = active.job
        self.outcomes[job.key] = Outcome(job.key, job.kind, "submitted", None, None, job.output)

    def _install_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}  # signal handlers can only be set from the main thread
        return {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _restore_handlers(self, previous: dict[int, Any]) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Only set flags: the loop notices within _POLL_S. A second signal skips the grace.
        if self.stop_signal is None:
            self.stop_signal = signum
        else:
            self.force = True


def _plan_order(outcome: Outcome, rank: dict[str, int]) -> tuple[int, bool, str]:
    # Runs in grid order, each followed by its steps; per-sweep steps last. Run names
    # escape "/", so a step key's run is everything before its first "/".
    run = outcome.key.split("/", 1)[0] if outcome.kind == "then-run" else outcome.key
    return rank.get(run, len(rank)), outcome.kind != "run", outcome.key


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None

"""Run a sweep's jobs through an executor: parallel, resumable, interruptible (docs/sweeps.md).

An executor (``worker.LocalExecutor``, ``slurm.SlurmExecutor``) has ``jobs`` (executions at
once), ``remote`` (they run elsewhere: no kernel pid files, a manifest line at submission),
``result_dir`` (where outcomes go; None: a temp folder), ``start_many(descriptions, token)``
-> process-likes (``poll``, ``stop``, ``kill``, ``error()``, ``record``), ``attach(manifest
record)`` -> the execution an earlier invocation left, or None, and ``release(process)``.
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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm  # text bars: tqdm.auto warns in Jupyter without ipywidgets

from . import manifest
from .plan import METRICS_FILE, Job, OnlyFilter, plan, plan_steps, shown_path, sweep_folder
from .slurm import SlurmExecutor, check_slurm, resources_from
from .spec import SweepSpec, load_spec
from .worker import LocalExecutor, local_jobs, read_result

logger = logging.getLogger(__name__)

_POLL_S = 0.05
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
DONE = ("ok", "skipped", "submitted")
_STATUS_ORDER = ("ok", "skipped", "submitted", "failed", "interrupted", "pending")


@dataclass(frozen=True)
class Outcome:
    """One job in this invocation: ``status`` is ``ok``, ``failed``, ``interrupted``,
    ``skipped`` (finished earlier; with ``figures_only``, ``error`` says why a run is not),
    ``pending`` (never started) or ``submitted`` (a Slurm job left for a later invocation)."""

    key: str
    kind: str
    status: str
    seconds: float | None
    error: str | None
    output: Path


@dataclass(frozen=True)
class SweepResult:
    """The outcomes of one ``run_sweep`` call, in plan order."""

    spec: SweepSpec
    folder: Path
    outcomes: Sequence[Outcome]
    signal: int | None = None

    @property
    def exit_code(self) -> int:
        """128 + the signal's number when one stopped the sweep; else 0 if every job is done."""
        if self.signal is not None:
            return 128 + int(self.signal)
        return 0 if all(o.status in DONE for o in self.outcomes) else 1

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    @property
    def unfinished(self) -> list[Outcome]:
        """Jobs a signal stopped or kept from starting; the next invocation runs them."""
        return [o for o in self.outcomes if o.status in ("interrupted", "pending")]

    def table(self) -> str:
        """A plain-text summary table: run, status, seconds, error."""
        rows = [("run", "status", "seconds", "error")]
        for o in self.outcomes:
            seconds = "" if o.seconds is None else f"{o.seconds:.1f}"
            rows.append((o.key, o.status, seconds, o.error or ""))
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = [
            f"{key:<{widths[0]}}  {status:<{widths[1]}}  {seconds:>{widths[2]}}  {error}".rstrip()
            for key, status, seconds, error in rows
        ]
        counts = {s: sum(o.status == s for o in self.outcomes) for s in _STATUS_ORDER}
        summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        if self.signal is not None:
            summary += f"; stopped by {signal.Signals(self.signal).name}"
        return "\n".join([*lines, "", f"{self.spec.name}: {summary or 'nothing to do'}"])


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
    """Run (or resume) a sweep, as ``python -m dmlkit.sweep`` does (docs/sweeps.md, "Python API").
    Raises, before anything runs: ``SpecError``, ``ManifestLockedError``, ``NoFinishedRunError``
    (``figures_only``), ``ValueError`` (``jobs``, ``gpus``) or ``SlurmUnavailableError``."""
    spec = spec_path if isinstance(spec_path, SweepSpec) else load_spec(spec_path)
    grid_jobs = plan(spec, only=only, smoke=smoke, out=out)
    folder = sweep_folder(spec, out, smoke=smoke)
    if executor == "slurm":
        resources = resources_from(spec.executor, spec.timeout_s, **(slurm or {}))
        check_slurm(resources)
        starter: Any = SlurmExecutor(folder, resources, jobs=jobs or 10**9)
    elif executor == "local":
        starter = LocalExecutor(local_jobs(jobs, gpus), gpus)
    else:
        raise ValueError(f"executor must be 'local' or 'slurm', got {executor!r}")
    manifest.check_owner(spec, folder)  # before the lock, which creates the sweep folder
    if figures_only:
        manifest.check_some_finished(spec, grid_jobs, folder)
    with manifest.lock_manifest(folder / manifest.MANIFEST):
        manifest.check_owner(spec, folder, claim=True)  # another spec's sweep may have begun
        runner = _Runner(spec, folder, starter, smoke, grace_s, figures_only, detach)
        return runner.run(grid_jobs, progress)


@dataclass
class _Active:
    """A running execution and what is needed to judge and record its outcome."""

    job: Job
    proc: Any  # worker.LocalProcess or slurm.SlurmProcess
    started: str
    t0: float
    result_file: Path
    metrics_mtime: int | None


@dataclass
class _Runner:
    """The scheduling loop of one ``run_sweep`` call."""

    spec: SweepSpec
    folder: Path
    executor: Any
    smoke: bool
    grace_s: float
    figures_only: bool
    detach: bool

    def __post_init__(self) -> None:
        self.latest = manifest.latest(self.folder)
        self.active: list[_Active] = []
        self.outcomes: dict[str, Outcome] = {}
        self.stop_signal: int | None = None
        self.force = False
        self.tmp = Path(tempfile.mkdtemp(prefix="dmlkit-sweep-"))
        # Where workers write their outcome: the sweep folder when they run elsewhere.
        self.results = self.executor.result_dir or self.tmp

    def run(self, grid_jobs: list[Job], progress: bool) -> SweepResult:
        queue: deque[Job] = deque()
        for job in grid_jobs:
            if self.figures_only:
                queue.extend(self._figures_of(job))
            elif self._skip(job):
                queue.extend(j for j in self._steps_of(job) if not self._skip(j))
            else:
                queue.append(job)
        handlers = {}
        if threading.current_thread() is threading.main_thread():  # else signal() raises
            handlers = {s: signal.signal(s, self._on_signal) for s in _STOP_SIGNALS}
        self.bar = tqdm(total=len(queue), desc=self.spec.name, unit="job", disable=not progress)
        try:
            self._loop(queue)
            left = any(o.status == "submitted" for o in self.outcomes.values())
            if self.stop_signal is None and not left:
                self._loop(deque(self._sweep_steps(grid_jobs)))
        except BaseException:
            # A bug or an unexpected error in the runner: leave no worker or kernel behind.
            for active in self.active:
                active.proc.kill()
            raise
        finally:
            self.bar.close()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            shutil.rmtree(self.tmp, ignore_errors=True)
        rank = {job.key: i for i, job in enumerate(grid_jobs)}
        outcomes = sorted(self.outcomes.values(), key=lambda o: _plan_order(o, rank))
        return SweepResult(self.spec, self.folder, outcomes, self.stop_signal)

    def _skip(self, job: Job) -> bool:
        if not manifest.is_finished(job, self.latest):
            return False
        recorded = self.latest[job.key].get("params")
        if recorded is not None and recorded != json.loads(json.dumps(job.parameters, default=str)):
            message = "%s finished earlier with other parameters (%s); delete %s to rerun it"
            logger.warning(message, job.key, recorded, job.folder)
        self._settle(job, "skipped")
        return True

    def _settle(
        self, job: Job, status: str, seconds: float | None = None, error: str | None = None
    ):
        self.outcomes[job.key] = Outcome(job.key, job.kind, status, seconds, error, job.output)

    def _figures_of(self, run: Job) -> list[Job]:
        # figures_only: every step of a finished run, forced; an unfinished run is left alone.
        if manifest.is_finished(run, self.latest):
            return self._steps_of(run)
        status = self.latest.get(run.key, {}).get("status")
        reason = {None: "never run", "ok": "outputs missing"}.get(status, f"last attempt {status}")
        self._settle(run, "skipped", error=f"not finished ({reason})")
        return []

    def _steps_of(self, run: Job) -> list[Job]:
        return plan_steps(self.spec, run, smoke=self.smoke, folder=self.folder)

    def _sweep_steps(self, grid_jobs: list[Job]) -> list[Job]:
        steps = plan_steps(self.spec, None, smoke=self.smoke, folder=self.folder)
        if self.figures_only:  # run_sweep checked that some run has finished
            return steps
        if steps and not any(self.outcomes[j.key].status in ("ok", "skipped") for j in grid_jobs):
            logger.warning("no run finished; per-sweep steps not run")
            return []
        if any(o.status != "skipped" for o in self.outcomes.values()):  # something executed
            return steps
        return [step for step in steps if not self._skip(step)]

    def _loop(self, queue: deque[Job]) -> None:
        self.bar.total = self.bar.n + len(queue) + len(self.active)
        self.bar.refresh()
        limit = None if self.executor.remote else self.spec.timeout_s  # Slurm has its own
        while (queue or self.active) and self.stop_signal is None:
            free = self.executor.jobs - len(self.active)
            if queue and free > 0:
                self._launch([queue.popleft() for _ in range(min(free, len(queue)))])
            if self.detach and not queue:
                break
            for active in list(self.active):
                if active.proc.poll() is not None:
                    self._finish(active, queue)
                elif limit is not None and time.monotonic() - active.t0 > limit:
                    active.proc.kill()
                    self._finish(active, queue, "failed", f"TimeoutError: exceeded {limit:g} s")
            time.sleep(_POLL_S)
        if self.stop_signal is not None:
            self._stop_all(queue)
            for job in queue:
                self._settle(job, "pending")
        for active in list(self.active):  # --detach
            self._leave_running(active)

    def _launch(self, batch: list[Job]) -> None:
        started, t0, ready = manifest.now_iso(), time.monotonic(), []
        for job in batch:
            record = self.latest.get(job.key)
            if (proc := self.executor.attach(record)) is not None:
                # Submitted by an earlier invocation and not collected: wait for that job.
                started_then, result_file = record["started"], record["result_file"]
                if record["status"] == "submitting":  # found by its token: now it is known
                    self._record(
                        job, "submitted", started_then, result_file=result_file, **proc.record
                    )
                self.active.append(_Active(job, proc, started_then, t0, Path(result_file), None))
                continue
            name = uuid.uuid4().hex
            description = {
                "notebook": str(job.notebook), "output": str(job.output),
                "parameters": job.parameters, "kernel": self.spec.kernel,
                "cwd": str(self.spec.root), "result_file": str(self.results / f"{name}.json"),
                "pid_file": None if self.executor.remote else str(self.tmp / f"{name}.pid"),
                "parent_pid": os.getpid(),
            }  # fmt: skip
            try:
                job.folder.mkdir(parents=True, exist_ok=True)
                metrics_mtime = _mtime(job.folder / METRICS_FILE) if job.kind == "run" else None
                if not self.executor.remote:  # Slurm jobs log under <sweep>/slurm/
                    job.output.with_suffix(".log").open("ab").close()
            except OSError as exc:  # e.g. a full disk or a read-only folder: this job fails
                error = f"{type(exc).__name__}: {exc}"
                self._record(job, "failed", started, seconds=0.0, error=error)
                continue
            ready.append((job, description, metrics_mtime))
        if not ready:
            return
        token = uuid.uuid4().hex
        if self.executor.remote:
            # Before submitting: a runner killed before its `submitted` lines leaves these,
            # and the next invocation asks Slurm for the token instead of submitting again.
            for index, (job, description, _) in enumerate(ready):
                intent = {"result_file": description["result_file"], "slurm_token": token}
                self._record(job, "submitting", started, slurm_index=index, **intent)
        procs = self.executor.start_many([d for _, d, _ in ready], token)
        for (job, description, metrics_mtime), proc in zip(ready, procs, strict=True):
            result_file = Path(description["result_file"])
            self.active.append(_Active(job, proc, started, t0, result_file, metrics_mtime))
            if self.executor.remote:
                self._record(job, "submitted", started, result_file=str(result_file), **proc.record)

    def _finish(self, active: _Active, queue: deque[Job], *decided: str) -> None:
        # `decided`: the status and error the runner gives (a timeout, an interruption).
        self.active.remove(active)
        self.executor.release(active.proc)
        job, seconds = active.job, round(time.monotonic() - active.t0, 3)
        result = read_result(active.result_file)
        status, error = decided or (result.get("status", "failed"), result.get("error"))
        if not result and not decided:
            error = active.proc.error()
        metrics = job.folder / METRICS_FILE
        if status == "ok" and job.kind == "run" and _mtime(metrics) in (None, active.metrics_mtime):
            # A notebook that "succeeds" without (re)writing metrics.json did not do its job,
            # and would otherwise be skipped forever by the resume rule.
            status = "failed"
            error = f"MissingOutput: the notebook finished without writing {metrics}"
        if status != "ok":
            active.proc.kill()
        fields = {"seconds": seconds, "error": error, "error_cell": result.get("error_cell")}
        self._record(job, status, active.started, **fields, **active.proc.record)
        if status == "ok" and job.kind == "run":
            steps = self._steps_of(job)
            queue.extend(steps)
            self.bar.total += len(steps)
            self.bar.refresh()

    def _record(self, job: Job, status: str, started: str, **fields: Any) -> None:
        """Append a manifest line (``fields``: seconds, error, error_cell, Slurm fields)."""
        record = {
            "run": job.key,
            "kind": job.kind,
            "status": status,
            "params": job.parameters,
            "seconds": None,
            "started": started,
            "ended": manifest.now_iso(),
            "error": None,
            "error_cell": None,
            "notebook": shown_path(job.notebook, self.spec.root),
            "output": shown_path(job.output, self.spec.root),
        }
        manifest.append_record(self.folder / manifest.MANIFEST, {**record, **fields})
        if status in ("submitting", "submitted"):
            return
        seconds, error = fields.get("seconds"), fields.get("error")
        self._settle(job, status, seconds, error)
        log = logger.info if status == "ok" else logger.warning
        log("%s: %s in %.1f s%s", job.key, status, seconds, f" ({error})" if error else "")
        self.bar.update(1)

    def _stop_all(self, queue: deque[Job]) -> None:
        name = signal.Signals(self.stop_signal).name
        for active in [a for a in self.active if not getattr(a.proc, "own", True)]:
            self._leave_running(active)  # submitted by an earlier invocation: not ours to stop
        logger.warning("%s: stopping %d running job(s)", name, len(self.active))
        for active in self.active:
            active.proc.stop()
        deadline = time.monotonic() + self.grace_s
        while not self.force and time.monotonic() < deadline:
            if all(a.proc.poll() is not None for a in self.active):
                break
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
        self._settle(active.job, "submitted")

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

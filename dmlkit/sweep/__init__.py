"""Papermill sweeps: one notebook execution per grid point, resumable and interruptible, on
this machine or on Slurm; ``python -m dmlkit.sweep SPEC.yaml`` (docs/sweeps.md). The API:
:func:`load_spec`, :func:`plan`, :func:`run_sweep` and :func:`read_manifest`.
"""

from .manifest import (
    ManifestLockedError,
    NoFinishedRunError,
    append_record,
    is_finished,
    read_manifest,
)
from .plan import Job, format_value, plan, plan_steps, run_name
from .runner import Outcome, SweepResult, run_sweep
from .spec import Override, SpecError, SweepSpec, ThenStep, load_spec
from .worker import threads_per_job

__all__ = [
    "Job",
    "ManifestLockedError",
    "NoFinishedRunError",
    "Outcome",
    "Override",
    "SpecError",
    "SweepResult",
    "SweepSpec",
    "ThenStep",
    "append_record",
    "format_value",
    "is_finished",
    "load_spec",
    "plan",
    "plan_steps",
    "read_manifest",
    "run_name",
    "run_sweep",
    "threads_per_job",
]

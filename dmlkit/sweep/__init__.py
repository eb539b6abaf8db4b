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
from .plan import Job, format_value, plan, run_name
from .runner import Outcome, SweepResult, run_sweep
from .spec import SpecError, SweepSpec, load_spec
from .worker import threads_per_job

__all__ = [
    "Job",
    "ManifestLockedError",
    "NoFinishedRunError",
    "Outcome",
    "SpecError",
    "SweepResult",
    "SweepSpec",
    "append_record",
    "format_value",
    "is_finished",
    "load_spec",
    "plan",
    "read_manifest",
    "run_name",
    "run_sweep",
    "threads_per_job",
]

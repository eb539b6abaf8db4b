"""Papermill sweeps: one notebook execution per grid point, resumable and interruptible.

``python -m dmlkit.sweep notebooks/sweeps/quickstart.yaml --jobs 2`` — see docs/sweeps.md
for the spec format, run naming, the manifest and what happens on failure or Ctrl-C.

API: :func:`load_spec` (validate a spec), :func:`plan` (its grid jobs),
:func:`run_sweep` (run or resume it; ``figures_only=True`` redraws the ``then`` steps),
:func:`read_manifest` (the attempt log).
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

"""Papermill sweeps: one notebook execution per grid point, resumable and interruptible, on
this machine or on Slurm; ``python -m dmlkit.sweep SPEC.yaml`` (docs/sweeps.md). The API:
:func:`load_spec`, :func:`plan`, :func:`run_sweep` and :func:`read_manifest`.
"""

from .manifest import ManifestLockedError, NoFinishedRunError, read_manifest
from .plan import Job, plan
from .runner import Outcome, SweepResult, run_sweep
from .spec import SpecError, SweepSpec, load_spec

__all__ = [
    "Job",
    "ManifestLockedError",
    "NoFinishedRunError",
    "Outcome",
    "SpecError",
    "SweepResult",
    "SweepSpec",
    "load_spec",
    "plan",
    "read_manifest",
    "run_sweep",
]

"""Which jobs of a sweep are finished: the resume rule, and the precondition of ``--figures``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .manifest import MANIFEST, latest_records, read_manifest
from .plan import Job
from .spec import SweepSpec

logger = logging.getLogger(__name__)


class NoFinishedRunError(RuntimeError):
    """``figures_only``: no run of the (``only``-restricted) grid has finished yet."""


def is_finished(job: Job, latest: dict[str, dict[str, Any]]) -> bool:
    """Whether a job can be skipped: its latest record is ``ok`` and its outputs exist."""
    record = latest.get(job.key)
    return (
        record is not None
        and record.get("status") == "ok"
        and all(path.is_file() for path in job.required_outputs)
    )


def check_some_finished(spec: SweepSpec, grid_jobs: list[Job], folder: Path) -> None:
    """Raise :class:`NoFinishedRunError` unless one of ``grid_jobs`` has finished.

    Reads ``folder/manifest.jsonl`` without creating anything; warns when the spec has no
    ``then`` steps (a figures-only invocation then has nothing to do).
    """
    latest = latest_records(read_manifest(folder / MANIFEST))
    if not any(is_finished(job, latest) for job in grid_jobs):
        raise NoFinishedRunError(
            f"{folder}: none of the {len(grid_jobs)} selected run(s) has finished, so there "
            f"are no figures to draw; run the sweep first: python -m dmlkit.sweep {spec.path}"
        )
    if not spec.then:
        logger.warning("%s: the spec has no `then` steps; nothing to redraw", spec.path)

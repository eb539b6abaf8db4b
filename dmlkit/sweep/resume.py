"""Which jobs of a sweep are finished: the resume rule, the precondition of ``--figures``,
and which spec a sweep folder belongs to (``sweep.json``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..io import write_json
from .manifest import MANIFEST, latest_records, read_manifest
from .plan import Job, shown_path
from .spec import SpecError, SweepSpec

OWNER_FILE = "sweep.json"

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


def spec_identity(spec: SweepSpec) -> dict[str, Any]:
    """What a sweep folder records of the spec that made it: spec file, notebook, grid keys.

    Grid *values* may grow (another seed) and parameters may change (the runs then warn),
    but another spec file, notebook or set of grid keys is another sweep.
    """
    return {
        "spec": shown_path(spec.path.resolve(), spec.root),
        "notebook": shown_path(spec.notebook, spec.root),
        "grid_keys": list(spec.grid),
    }


def check_owner(spec: SweepSpec, folder: Path) -> None:
    """Raise :class:`SpecError` if ``folder`` was made by another spec; write nothing.

    A folder from before ``sweep.json`` existed is judged by its manifest's run notebooks.
    """
    identity = spec_identity(spec)
    try:
        recorded = json.loads((folder / OWNER_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        runs = [r for r in read_manifest(folder / MANIFEST) if r.get("kind") == "run"]
        others = {r["notebook"] for r in runs if r.get("notebook")} - {identity["notebook"]}
        recorded = {"notebook": others.pop()} if others else identity
    except (OSError, ValueError):
        recorded = None
    if not isinstance(recorded, dict):
        raise SpecError(f"{folder / OWNER_FILE}: unreadable; delete it to adopt the folder")
    changed = [key for key, value in identity.items() if recorded.get(key, value) != value]
    if changed:
        was = ", ".join(f"{key} {recorded[key]}" for key in changed)
        now = ", ".join(f"{key} {identity[key]}" for key in changed)
        raise SpecError(
            f"{spec.path}: the sweep folder {folder} was made by another spec ({was}; this one: "
            f"{now}), and its runs would be mixed with this one's: give this spec another "
            f"name, or --out another folder; if this spec replaces the old one, delete "
            f"{folder / OWNER_FILE}"
        )


def record_owner(spec: SweepSpec, folder: Path) -> None:
    """Write ``folder/sweep.json`` (after :func:`check_owner`, under the manifest lock)."""
    write_json(folder / OWNER_FILE, spec_identity(spec))

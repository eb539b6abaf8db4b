"""A sweep folder's state: ``manifest.jsonl`` (one line per execution attempt), the resume
rule, and ``sweep.json`` (the spec that made the folder); docs/sweeps.md, "Where things go"."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..io import write_json
from .plan import METRICS_FILE, Job, shown_path
from .spec import SpecError, SweepSpec

logger = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
OWNER_FILE = "sweep.json"


class ManifestLockedError(RuntimeError):
    """Another sweep process is writing this manifest."""


class NoFinishedRunError(RuntimeError):
    """``figures_only``: no run of the (``only``-restricted) grid has finished yet."""


def now_iso() -> str:
    """The current UTC time, ISO 8601 with milliseconds."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def append_record(path: str | Path, record: dict[str, Any]) -> None:
    """Append one record as a JSON line, flushed and fsynced before returning; after a torn
    last line (a crash mid-write) a newline comes first, so only the torn record is lost."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, ensure_ascii=False, default=str) + "\n"
    with open(path, "a+b") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size:
            handle.seek(size - 1)
            if handle.read(1) != b"\n":
                line = "\n" + line
        handle.write(line.encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())


def read_manifest(path: str | Path) -> list[dict[str, Any]]:
    """All readable records of a manifest (or a sweep folder's), in file order (``[]`` without
    it); a line that is not a JSON object with a ``run`` key is skipped with a warning."""
    path = Path(path) / MANIFEST if Path(path).is_dir() else Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    records = []
    for number, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            record = None
        if not isinstance(record, dict) or "run" not in record:
            logger.warning("%s:%d: unreadable manifest line ignored: %.80r", path, number, raw)
            continue
        records.append(record)
    return records


def latest(folder: Path) -> dict[str, dict[str, Any]]:
    """The last record of each job (``run`` key) in a sweep folder's manifest."""
    return {record["run"]: record for record in read_manifest(folder / MANIFEST)}


@contextlib.contextmanager
def lock_manifest(path: str | Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the manifest for the whole sweep (closing the file
    releases it), or raise :class:`ManifestLockedError` (a sweep already runs there)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            raise ManifestLockedError(
                f"{path} is locked: another `python -m dmlkit.sweep` is running this sweep"
            ) from exc
        yield


def is_finished(job: Job, latest: dict[str, dict[str, Any]]) -> bool:
    """Whether a job can be skipped: its latest record is ``ok`` and its outputs exist."""
    outputs = [job.output, *([job.folder / METRICS_FILE] if job.kind == "run" else [])]
    record = latest.get(job.key) or {}
    return record.get("status") == "ok" and all(path.is_file() for path in outputs)


def check_some_finished(spec: SweepSpec, grid_jobs: list[Job], folder: Path) -> None:
    """Raise :class:`NoFinishedRunError` unless one of ``grid_jobs`` has finished (creates
    nothing); warn when the spec has no ``then`` steps to redraw."""
    records = latest(folder)
    if not any(is_finished(job, records) for job in grid_jobs):
        raise NoFinishedRunError(
            f"{folder}: none of the {len(grid_jobs)} selected run(s) has finished, so there "
            f"are no figures to draw; run the sweep first: python -m dmlkit.sweep {spec.path}"
        )
    if not spec.then:
        logger.warning("%s: the spec has no `then` steps; nothing to redraw", spec.path)


def check_owner(spec: SweepSpec, folder: Path, claim: bool = False) -> None:
    """Raise :class:`SpecError` if another spec made ``folder`` (docs/sweeps.md, "Where things
    go"); with ``claim`` (under the manifest lock), then write ``sweep.json``."""
    identity = {
        "spec": shown_path(spec.path.resolve(), spec.root),
        "notebook": shown_path(spec.notebook, spec.root),
        "grid_keys": list(spec.grid),
    }
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
    if claim:
        write_json(folder / OWNER_FILE, identity)

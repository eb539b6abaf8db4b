"""``manifest.jsonl``: an append-only log of every execution attempt of a sweep.

One JSON object per line, appended with flush + fsync and never rewritten, so a crash
can at worst tear the line being written. Reading skips unreadable lines with a warning.
Only one sweep process writes a manifest at a time (:func:`lock_manifest`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

try:  # POSIX only; elsewhere concurrent sweeps on one folder are not detected.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

logger = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
STATUSES = ("ok", "failed", "interrupted")


class ManifestLockedError(RuntimeError):
    """Another sweep process is writing this manifest."""


def now_iso() -> str:
    """The current UTC time, ISO 8601 with milliseconds."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def append_record(path: str | Path, record: dict[str, Any]) -> None:
    """Append one record as a JSON line, flushed and fsynced before returning.

    If the file ends in a torn line (a crash mid-write), a newline is written first so the
    new record stays readable and only the torn line is lost.
    """
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
    """All readable records, in file order; ``[]`` when the file does not exist.

    A line that is not a JSON object (a torn write, an editor accident) is skipped with a
    warning naming the file and line — never an exception.
    """
    path = Path(path)
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


def latest_records(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The last record of each ``run`` key (later lines win)."""
    latest: dict[str, dict[str, Any]] = {}
    for record in records:
        latest[record["run"]] = record
    return latest


@contextlib.contextmanager
def lock_manifest(path: str | Path) -> Iterator[IO[bytes]]:
    """Hold an exclusive advisory lock on the manifest for the whole sweep.

    Raises:
        ManifestLockedError: another process holds it (a sweep already running there).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as handle:
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                raise ManifestLockedError(
                    f"{path} is locked: another `python -m dmlkit.sweep` is running this sweep"
                ) from exc
        try:
            yield handle
        finally:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

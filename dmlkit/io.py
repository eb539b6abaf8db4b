"""Crash-safe file writes shared by the glyph cache, checkpoints, metrics and the sweep,
and the advisory lock that keeps two processes out of one run folder.

A write either lands whole or not at all: data goes to a temporary file in the same
folder, is flushed and fsynced, then renamed over the target (``os.replace`` is atomic
on POSIX and Windows). A crash between the two leaves the previous file intact.

The temporary file is ``.<name>.<pid>@<host>.<random>.tmp``. One left behind by a killed
writer is harmless (nothing reads it) and is deleted by the next successful write of the
same file on the same host, once its writer's pid is no longer running.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the run folder lock is then skipped
    fcntl = None

# mkstemp creates 0600 files; give finished files the permissions open() would have given.
_UMASK = os.umask(0)
os.umask(_UMASK)
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:64]


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary sibling of ``path``; on clean exit it replaces ``path``.

    On an exception (including ``OSError(ENOSPC)`` from a full disk) the temporary file is
    removed and ``path`` keeps its previous content. After a successful replace, temporary
    siblings of ``path`` left by killed writers on this host are deleted.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.{os.getpid()}@{_HOST}."
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    remove_stale_temporaries(path)


class LockHeldError(RuntimeError):
    """Another process holds the lock; the message names it (pid and host)."""


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, what: str, *, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive advisory lock (``flock``) on ``path`` for the block, or fail at once
    (``wait=True``: wait for the holder to finish).

    The lock file is created for the block and deleted at its end; the holder writes its
    pid and host into it, so that a refused process can say who holds it. A process that
    locked a file just deleted by the previous holder sees it is no longer at ``path`` and
    tries again, so two processes never both hold the lock.

    Raises:
        LockHeldError: another process holds it; ``what`` names the resource in the message.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            if _same_file(fd, path):
                break
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise LockHeldError(f"{what} is in use by another process ({holder})") from None
        os.close(fd)
    try:
        with contextlib.suppress(OSError):  # only for others' messages: a full disk may refuse
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # while still holding it: see above for who may have opened it
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary siblings of ``path`` whose writer (same host) is not running.

    A writer killed between its write and its rename (SIGKILL, power loss) leaves one.
    Temporaries of live processes (a concurrent writer of the same file) and of other
    hosts (a shared folder) are kept. Returns the paths deleted.
    """
    path = Path(path)
    start = f".{path.name}."
    removed = []
    with contextlib.suppress(OSError), os.scandir(path.parent) as entries:
        for entry in entries:
            rest = entry.name[len(start) :] if entry.name.startswith(start) else ""
            match = re.fullmatch(r"([0-9]+)@([A-Za-z0-9-]*)\.[A-Za-z0-9_]+\.tmp", rest)
            if match and match[2] == _HOST and not _running(int(match[1])):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def _running(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_writer(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON (keys in insertion order, trailing newline)."""
    atomic_write_bytes(path, json_bytes(obj))


def json_bytes(obj: Any) -> bytes:
    """``obj`` as the UTF-8 bytes ``write_json`` writes (numpy values and paths allowed)."""
    return (json.dumps(obj, indent=2, allow_nan=True, default=_jsonable) + "\n").encode("utf-8")


def _jsonable(value: Any) -> Any:
    # numpy scalars/arrays and paths appear in configs and metrics; everything else is a bug.
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON: {value!r}")


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not supported on every platform/filesystem.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def cache_root() -> Path:
    """``$DMLKIT_CACHE``, else ``~/.cache/dmlkit``: the glyphs and decoded-image caches."""
    return Path(os.environ.get("DMLKIT_CACHE") or Path.home() / ".cache" / "dmlkit")

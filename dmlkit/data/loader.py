"""Iterating a DataLoader without leaving worker processes behind on an error."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader


@contextlib.contextmanager
def loader_batches(loader: DataLoader) -> Iterator[Any]:
    """``iter(loader)``, whose worker processes are stopped when the loop fails.

    An exception out of the loop (an undecodable image, a NaN loss, Ctrl-C) would leave
    the workers running until garbage collection, when DataLoader's finaliser stalls ~5 s
    per worker. They are stopped on exit instead — after a complete pass too, unless the
    loader keeps them for the next epoch (``persistent_workers``; ``stop_workers`` ends them).
    """
    batches = iter(loader)
    try:
        yield batches
    except BaseException:
        stop_workers(loader, batches)
        raise
    if not loader.persistent_workers:
        stop_workers(loader, batches)


def stop_workers(loader: DataLoader, batches: Any = None) -> None:
    """Stop the worker processes of ``loader`` (or of its iterator ``batches``) now."""
    batches = batches if batches is not None else getattr(loader, "_iterator", None)
    # _shutdown_workers is private, but it is the one call that stops the workers now.
    getattr(batches, "_shutdown_workers", lambda: None)()
    if getattr(loader, "_iterator", None) is batches:
        loader._iterator = None  # a persistent loader starts fresh workers next time

"""What a sweep invocation did: one :class:`Outcome` per job and the overall result."""

from __future__ import annotations

import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .spec import SweepSpec

DONE = ("ok", "skipped", "submitted")


@dataclass(frozen=True)
class Outcome:
    """One job in this invocation.

    Attributes:
        key: manifest key.  kind: ``"run"``, ``"then-run"`` or ``"then-sweep"``.
        status: ``ok``, ``failed``, ``interrupted`` (stopped by a signal), ``skipped``
            (finished in an earlier invocation), ``pending`` (never started) or ``submitted``
            (a Slurm job left queued or running; the next invocation collects it).
        seconds: wall time of the execution (None unless it ran).
        error: ``"ExceptionName: message"`` for failures and interruptions; for a run that
            ``figures_only`` skipped because it is not finished, the reason.
        output: the executed notebook.
    """

    key: str
    kind: str
    status: str
    seconds: float | None
    error: str | None
    output: Path


@dataclass(frozen=True)
class SweepResult:
    """The outcomes of one ``run_sweep`` call, in the order they were settled."""

    spec: SweepSpec
    folder: Path
    outcomes: Sequence[Outcome]
    signal: int | None = None

    @property
    def ok(self) -> bool:
        """True iff nothing failed, nothing was interrupted and no signal stopped the sweep."""
        return self.signal is None and all(o.status in DONE for o in self.outcomes)

    @property
    def exit_code(self) -> int:
        """0 when ``ok``; 128 + signal number when stopped by a signal; 1 otherwise."""
        if self.signal is not None:
            return 128 + int(self.signal)
        return 0 if self.ok else 1

    @property
    def failed(self) -> list[Outcome]:
        """Jobs whose execution failed (error notebook kept, sweep went on)."""
        return [o for o in self.outcomes if o.status == "failed"]

    @property
    def unfinished(self) -> list[Outcome]:
        """Jobs a signal stopped or kept from starting; the next invocation runs them."""
        return [o for o in self.outcomes if o.status in ("interrupted", "pending")]

    def table(self) -> str:
        """A plain-text summary table: run, status, seconds, error."""
        rows = [("run", "status", "seconds", "error")]
        for o in self.outcomes:
            seconds = "" if o.seconds is None else f"{o.seconds:.1f}"
            rows.append((o.key, o.status, seconds, o.error or ""))
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = [
            f"{key:<{widths[0]}}  {status:<{widths[1]}}  {seconds:>{widths[2]}}  {error}".rstrip()
            for key, status, seconds, error in rows
        ]
        counts = {s: sum(o.status == s for o in self.outcomes) for s in _STATUS_ORDER}
        summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        if self.signal is not None:
            summary += f"; stopped by {signal.Signals(self.signal).name}"
        return "\n".join([*lines, "", f"{self.spec.name}: {summary or 'nothing to do'}"])


_STATUS_ORDER = ("ok", "skipped", "submitted", "failed", "interrupted", "pending")

"""The row every benchmark script emits with ``--json PATH``, and the one table they make.

A row is a plain dict (a JSON object); a script writes a JSON list of them:

- ``group``: what is compared and where, e.g. "losses (CPU, 1 thread)".
- ``case``: the row within the group, e.g. "triplet all, B = 512".
- ``dmlkit_s``: dmlkit's seconds (null when not run).
- ``reference``: what dmlkit is compared with ("—" for none).
- ``reference_s``: the reference's seconds (null when none or not run).
- ``ratio``: dmlkit_s / reference_s for times; fit / bare for training throughput (so
  larger is better there); null when there is no reference.
- ``target``: "≤ 1.0" / "≥ 0.85" bound the ratio; with a unit ("≤ 1 s") they bound
  ``dmlkit_s`` itself; "—" means no target (a row for information).
- ``ok``: whether the target is met; null when not run or without a target.
- ``note``: anything else (semantics, values compared, "not run: no CUDA").

Every script takes ``--gpu-only`` (its CUDA rows alone) and ``--gpu-dry-run`` (those rows'
code on the CPU at toy sizes, rows marked ``DRY_RUN`` without a target: what the tests run,
so that a session on a GPU machine only has to measure).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

FIELDS = ("group", "case", "dmlkit_s", "reference", "reference_s", "ratio", "target", "ok", "note")
NO_CUDA = "not run: no CUDA"
DRY_RUN = "dry run of the CUDA row on the CPU at toy size: the code ran; not a measurement"
GPU_OPTIONS_HELP = {
    "--gpu-only": "only the CUDA rows (for a short session on a GPU machine)",
    "--gpu-dry-run": "run the CUDA rows' code on the CPU at toy size (tests; no timing claim)",
}
_TARGET = re.compile(r"^\s*(≤|<=|≥|>=)\s*([0-9.]+)\s*(s?)\s*$")


def meets(target: str, ratio: float | None, dmlkit_s: float | None) -> bool | None:
    """Whether ``target`` holds: "≤ 1.0"/"≥ 0.85" on the ratio, "≤ 1 s" on dmlkit_s.

    None when the target is "—" (or unparsable) or the value it needs is missing.
    """
    match = _TARGET.match(target or "")
    if match is None:
        return None
    sign, bound, unit = match.groups()
    value = dmlkit_s if unit else ratio
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value <= float(bound) if sign in ("≤", "<=") else value >= float(bound)


def make_row(
    group: str,
    case: str,
    *,
    dmlkit_s: float | None = None,
    reference: str = "—",
    reference_s: float | None = None,
    ratio: float | None = None,
    target: str = "—",
    note: str = "",
) -> dict[str, Any]:
    """One row; ``ratio`` defaults to dmlkit_s / reference_s, ``ok`` follows the target."""
    if ratio is None and dmlkit_s is not None and reference_s:
        ratio = dmlkit_s / reference_s
    return {
        "group": group,
        "case": case,
        "dmlkit_s": dmlkit_s,
        "reference": reference,
        "reference_s": reference_s,
        "ratio": ratio,
        "target": target,
        "ok": meets(target, ratio, dmlkit_s),
        "note": note,
    }


def not_run(group: str, case: str, why: str, *, reference: str = "—", target: str = "—") -> dict:
    """A row for something this machine cannot run (e.g. ``NO_CUDA``)."""
    return make_row(group, case, reference=reference, target=target, note=why)


def failed(
    group: str, case: str, error: str | BaseException, *, reference: str = "—", target: str = "—"
) -> dict:
    """A row for a measurement that raised (the exception, or its text from a child process):
    the others in the script still run."""
    if isinstance(error, BaseException):
        error = f"{type(error).__name__}: {error}".splitlines()[0]
    row = make_row(group, case, reference=reference, target=target, note=f"failed: {error}")
    return {**row, "ok": False}


def write_json(rows: list[dict[str, Any]], path: str | Path) -> None:
    Path(path).write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _seconds(value: float | None) -> str:
    if value is None:
        return "—"
    if value >= 10:
        return f"{value:.1f} s"
    if value >= 1:
        return f"{value:.2f} s"
    return f"{1e3 * value:.3g} ms"


def verdict(row: dict[str, Any]) -> str:
    """The "met?" cell: from target and values when they decide it, else the row's ``ok``."""
    ok = meets(row.get("target", "—"), row.get("ratio"), row.get("dmlkit_s"))
    if ok is None:
        ok = row.get("ok")
    if ok is None:
        return "not run" if row.get("dmlkit_s") is None else "—"
    return "yes" if ok else "**NO**"


def markdown_table(rows: Iterable[dict[str, Any]]) -> str:
    """The rows as one Markdown table: group | case | dmlkit | reference | … | note."""
    lines = [
        "| group | case | dmlkit | reference | reference time | ratio | target | met? | note |",
        "| --- | --- | ---: | --- | ---: | ---: | --- | --- | --- |",
    ]
    for row in rows:
        ratio = row.get("ratio")
        cells = [
            row.get("group", ""),
            row.get("case", ""),
            _seconds(row.get("dmlkit_s")),
            row.get("reference") or "—",
            _seconds(row.get("reference_s")),
            "—" if ratio is None else f"{ratio:.2f}",
            row.get("target") or "—",
            verdict(row),
            row.get("note") or "",
        ]
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def add_gpu_options(parser) -> None:
    """``--gpu-only`` and ``--gpu-dry-run`` on a script's argparse parser."""
    for flag, text in GPU_OPTIONS_HELP.items():
        parser.add_argument(flag, action="store_true", help=text)


def cpu_rows_wanted(args) -> bool:
    """Whether a script parsed with ``add_gpu_options`` runs its CPU rows."""
    return not (args.gpu_only or args.gpu_dry_run)


def gpu_device(args):
    """Where the CUDA rows run: the GPU, the CPU for a dry run, None for "not run"."""
    import torch

    if args.gpu_dry_run:
        return torch.device("cpu")
    return torch.device("cuda") if torch.cuda.is_available() else None


def dry_run(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` as a dry run (a CUDA row whose code ran on the CPU): no target, no verdict."""
    return {**row, "target": "—", "ok": None, "note": DRY_RUN}

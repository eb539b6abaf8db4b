"""Every benchmark in one table: runs each ``benchmarks/bench_*.py --json`` and assembles it.

    .venv/bin/python benchmarks/report.py [--quick] [--out benchmarks/results.md]
    .venv/bin/python benchmarks/report.py --gpu-only      # → benchmarks/results-gpu.md

``make bench`` runs this (``make bench BENCH_ARGS=--quick`` for the smaller grids). Each
script runs in its own process, one after the other, so they never share the cores; inside
a script dmlkit and its reference are measured side by side (interleaved, same inputs).
The table (columns: ``rows.markdown_table``) is printed and written to ``--out`` under the
machine header (``machine.header()``) and the load average seen before and after, so a
table measured on a busy machine says so.

``--gpu-only`` runs only the CUDA rows of the scripts that have them (``make bench-gpu``;
minutes on a GPU machine, where the full CPU grid takes ~18) and writes
``benchmarks/results-gpu.md``; ``--gpu-dry-run`` runs those rows' code on the CPU at toy
sizes, as the tests do (rows.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from machine import header
from rows import make_row, markdown_table

HERE = Path(__file__).resolve().parent
BUSY = 0.5  # load average per core above which, before we start, the machine counts as busy


def scripts() -> list[Path]:
    return sorted(HERE.glob("bench_*.py"))


def _help(script: Path) -> str:
    done = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, check=False
    )
    return done.stdout


def run_script(script: Path, quick: bool, gpu: str | None = None) -> list[dict[str, Any]]:
    """The rows of one script; a row saying why when it has no --json or fails.

    gpu: "--gpu-only" or "--gpu-dry-run" — passed on; a script without it has no CUDA rows
    and is skipped (no rows).
    """
    options = _help(script)
    if gpu is not None and gpu not in options:
        return []
    if "--json" not in options:
        return [missing_json_row(script)]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        command = [sys.executable, str(script), "--json", str(out)]
        if quick and "--quick" in options:
            command.append("--quick")
        if gpu is not None:
            command.append(gpu)
        print(f"\n$ {' '.join(command[1:])}", flush=True)
        code = subprocess.run(command, check=False).returncode  # its table goes to our stdout
        if code != 0 or not out.exists():
            return [make_row(script.stem, "—", note=f"failed: exit status {code}")]
        return json.loads(out.read_text(encoding="utf-8"))


def missing_json_row(script: Path) -> dict[str, Any]:
    what = "kNN" if script.name == "bench_eval.py" else script.stem
    return make_row(what, "—", note=f"{what}: {script.name} has no --json yet")


def load_line(start: tuple[float, ...], end: tuple[float, ...]) -> str:
    """The header line on load: 1-minute load average before and after, and whether busy."""
    cores = os.cpu_count() or 1
    busy = start[0] > BUSY * cores
    verdict = (
        "**measured under load**\n  (above 0.5 per core before the run; ratios are side by side, "
        "absolute times may be inflated)"
        if busy
        else "quiet before the run"
    )
    return f"- load average (1 min): {start[0]:.2f} before, {end[0]:.2f} after — {verdict}"


def render(rows: list[dict[str, Any]], machine: str, load: str, command: str) -> str:
    return "\n".join(
        [
            "# dmlkit benchmarks",
            "",
            f"`{command}` — every row measured side by side in one run; regenerate with "
            f"`{command}` on a quiet machine.",
            "",
            machine,
            load,
            "",
            markdown_table(rows),
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller grids in every script")
    parser.add_argument("--out", help="Markdown file to write (default benchmarks/results.md)")
    parser.add_argument("--only", nargs="*", help="scripts whose name contains any of these")
    gpu = parser.add_mutually_exclusive_group()
    gpu.add_argument("--gpu-only", action="store_true", help="only the CUDA rows")
    gpu.add_argument("--gpu-dry-run", action="store_true", help="the CUDA rows' code on the CPU")
    args = parser.parse_args()
    flag = "--gpu-only" if args.gpu_only else "--gpu-dry-run" if args.gpu_dry_run else None
    out = args.out or str(HERE / ("results-gpu.md" if flag else "results.md"))
    before = os.getloadavg()
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for script in scripts():
        if args.only and not any(part in script.name for part in args.only):
            continue
        rows += run_script(script, args.quick, flag)
    load = load_line(before, os.getloadavg())
    command = "make bench" + (" BENCH_ARGS=--quick" if args.quick else "")
    if flag:
        command = "make bench-gpu" if args.gpu_only else "benchmarks/report.py --gpu-dry-run"
    text = render(rows, header(), load, command)
    text += f"\nTotal wall time: {time.perf_counter() - started:.0f} s.\n"
    print("\n" + text)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(text, encoding="utf-8")
    print(f"written to {out}")


if __name__ == "__main__":
    main()

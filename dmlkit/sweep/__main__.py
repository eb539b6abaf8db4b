"""``python -m dmlkit.sweep SPEC.yaml [--jobs N] [--smoke] [--only k=v ...] [--out DIR]
[--dry-run]``: run or resume a papermill sweep; exit 0 iff every run succeeded."""

from __future__ import annotations

import argparse
import logging
import sys

from tqdm.contrib.logging import logging_redirect_tqdm

from .manifest import MANIFEST, ManifestLockedError, latest_records
from .manifest import read_manifest as read_records
from .plan import plan, plan_steps, sweep_folder
from .runner import is_finished, run_sweep, threads_per_job
from .spec import SpecError, load_spec
from .worker import skip_slow_optional_imports


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dmlkit.sweep",
        description="Run a notebook once per grid point of a sweep spec (papermill), "
        "skipping runs that already finished. See docs/sweeps.md.",
    )
    parser.add_argument("spec", help="sweep spec (YAML), e.g. notebooks/sweeps/quickstart.yaml")
    parser.add_argument("--jobs", type=int, default=1, help="parallel runs (default 1)")
    parser.add_argument("--smoke", action="store_true", help="inject smoke=True (seconds per run)")
    parser.add_argument(
        "--only",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="run only grid points with these values (repeat a key for OR)",
    )
    parser.add_argument("--out", help="parent folder of the sweep folder (default papermill_runs)")
    parser.add_argument("--dry-run", action="store_true", help="show the plan, run nothing")
    return parser


def dry_run(args: argparse.Namespace) -> int:
    """Print what a real invocation would run or skip."""
    spec = load_spec(args.spec)
    jobs = plan(spec, only=args.only, smoke=args.smoke, out=args.out)
    folder = sweep_folder(spec, args.out)
    latest = latest_records(read_records(folder / MANIFEST))
    print(f"{spec.name}: {len(jobs)} of {spec.num_points} grid points -> {folder}")
    print(f"{threads_per_job(args.jobs)} thread(s) per run with --jobs {args.jobs}")
    for job in jobs:
        action = "skip (done)" if is_finished(job, latest) else "run"
        print(f"  {action:<11}  {job.key}")
        for step in plan_steps(spec, job, smoke=args.smoke, folder=folder):
            print(f"  {'then':<11}  {step.key}")
    for step in plan_steps(spec, None, smoke=args.smoke, folder=folder):
        print(f"  {'then':<11}  {step.key} (once, on the sweep)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    skip_slow_optional_imports()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    # papermill logs every notebook it inspects at INFO; the runner reports per run.
    logging.getLogger("papermill").setLevel(logging.WARNING)
    try:
        if args.dry_run:
            return dry_run(args)
        with logging_redirect_tqdm():
            result = run_sweep(
                args.spec, jobs=args.jobs, smoke=args.smoke, only=args.only, out=args.out
            )
    except (SpecError, ManifestLockedError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result.table())
    if result.unfinished:
        print(
            f"\nUnfinished ({len(result.unfinished)}): "
            + ", ".join(o.key for o in result.unfinished)
            + "\nRun the same command again to resume them."
        )
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())

"""Run a notebook once per grid point of a sweep spec (papermill), skipping runs that already
finished, or with --figures only redraw its `then` steps. See docs/sweeps.md."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

import yaml
from tqdm.contrib.logging import logging_redirect_tqdm

from . import manifest
from .manifest import ManifestLockedError, NoFinishedRunError
from .plan import plan, plan_steps, sweep_folder
from .runner import run_sweep
from .slurm import SlurmUnavailableError, resources_from
from .spec import EXECUTOR_KEYS, SpecError, load_spec
from .worker import gpu_slots, local_jobs, skip_slow_optional_imports, threads_per_job


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dmlkit.sweep", description=__doc__)
    parser.add_argument("spec", help="sweep spec (YAML), e.g. notebooks/sweeps/quickstart.yaml")
    parser.add_argument("--jobs", type=_positive, help="parallel runs (default: GPU slots, or 1)")
    parser.add_argument(
        "--gpus",
        metavar="0,1,...|0+1,...|all",
        help="give each concurrent run its own GPU(s) through CUDA_VISIBLE_DEVICES",
    )
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
    parser.add_argument("--figures", action="store_true", help="only redraw: rerun `then` steps")
    parser.add_argument("--dry-run", action="store_true", help="show the plan, run nothing")
    cluster = parser.add_argument_group("Slurm (see docs/sweeps.md, 'On a cluster')")
    cluster.add_argument("--executor", choices=("local", "slurm"), default="local")
    cluster.add_argument("--partition", help="Slurm partition (default: the spec's, else Slurm's)")
    cluster.add_argument("--gpus-per-run", type=int, help="GPUs of each run's job")
    cluster.add_argument("--cpus-per-run", type=int, help="CPUs of each run's job (its threads)")
    cluster.add_argument("--mem-gb", type=float, help="memory of each run's job")
    cluster.add_argument("--time-min", type=int, help="time limit of each run's job, minutes")
    cluster.add_argument(
        "--sbatch", action="extend", nargs="+", default=[], metavar="OPTION=VALUE",
        help="extra sbatch options, e.g. account=lab qos=high",
    )  # fmt: skip
    cluster.add_argument("--detach", action="store_true", help="submit, return; rerun to collect")
    return parser


RUN_OPTIONS = ("jobs", "gpus", "smoke", "only", "out", "executor", "detach")  # run_sweep's


def slurm_options(args: argparse.Namespace) -> dict[str, Any]:
    """The Slurm resources given on the command line (``None``: the spec's)."""
    sbatch = dict(option.partition("=")[::2] for option in args.sbatch) or None
    return {**{name: getattr(args, name) for name in EXECUTOR_KEYS}, "sbatch": sbatch}


def dry_run(args: argparse.Namespace) -> int:
    """Print what a real invocation would run or skip (with ``--figures``: redraw)."""
    spec = load_spec(args.spec)
    folder = sweep_folder(spec, args.out, smoke=args.smoke)
    manifest.check_owner(spec, folder)
    print(f"{spec.name}: {spec.num_points} grid points -> {folder}", flush=True)
    jobs = plan(spec, only=args.only, smoke=args.smoke, out=args.out)
    if args.figures:
        manifest.check_some_finished(spec, jobs, folder)
    latest = manifest.latest(folder)
    if args.executor == "slurm":
        resources = resources_from(spec.executor, spec.timeout_s, **slurm_options(args))
        print(f"{len(jobs)} selected; one Slurm job each: {resources}")
    else:
        threads = threads_per_job(args.jobs)
        gpus = f", GPUs {' | '.join(args.gpus)}" if args.gpus else ""
        print(f"{len(jobs)} selected; {threads} thread(s) per run with --jobs {args.jobs}{gpus}")
    for job in jobs:
        done = manifest.is_finished(job, latest)
        if args.figures:
            action = "finished" if done else "skip"
        elif latest.get(job.key, {}).get("status") == "submitted":
            action = "collect"  # a Slurm job submitted earlier: waited for, not resubmitted
        else:
            action = "skip (done)" if done else "run"
        flow = yaml.safe_dump(job.overrides, default_flow_style=True, sort_keys=False, width=10**6)
        overrides = f"  set {flow.strip()}" if job.overrides else ""  # what `overrides` set
        print(f"  {action:<11}  {job.key}{overrides}")
        if done or not args.figures:
            for step in plan_steps(spec, job, smoke=args.smoke, folder=folder):
                print(f"  {'then':<11}  {step.key}")
    for step in plan_steps(spec, None, smoke=args.smoke, folder=folder):
        print(f"  {'then':<11}  {step.key} (once, on the sweep)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.out is not None:  # a usage error, before anything is read, if it cannot be a folder
        path = Path(args.out).absolute()
        existing = next(p for p in (path, *path.parents) if p.exists() or p == p.parent)
        if not existing.is_dir():
            parser.error(f"--out {args.out}: {existing} is a file, not a folder")
    if args.gpus is not None and args.executor == "slurm":
        parser.error("--gpus is for local runs; with Slurm give --gpus-per-run")
    if args.executor == "local":
        try:
            args.gpus = None if args.gpus is None else gpu_slots(args.gpus)
            args.jobs = local_jobs(args.jobs, args.gpus)
        except ValueError as exc:
            parser.error(str(exc))
    skip_slow_optional_imports()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    # papermill logs every notebook it inspects at INFO; the runner reports per run.
    logging.getLogger("papermill").setLevel(logging.WARNING)
    try:
        if args.dry_run:
            try:
                return dry_run(args)
            except BrokenPipeError:  # a listing piped into `head`, which stopped reading
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error
                return 0
        options = {name: getattr(args, name) for name in RUN_OPTIONS}
        with logging_redirect_tqdm():
            result = run_sweep(
                args.spec, figures_only=args.figures, slurm=slurm_options(args), **options
            )
    except NoFinishedRunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (SpecError, ManifestLockedError, ValueError, SlurmUnavailableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result.table())
    if unfinished := [o.key for o in result.unfinished]:
        print(f"\nUnfinished ({len(unfinished)}): {', '.join(unfinished)}")
        print("Run the same command again to resume them.")
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())

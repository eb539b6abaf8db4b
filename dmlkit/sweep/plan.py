"""From a validated spec to jobs (one papermill execution each): run names, ``--only``,
injected parameters; see docs/sweeps.md, "Where things go"."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

from .spec import (
    RUN_PARAMETER,
    SMOKE_PARAMETER,
    STEP_PARAMETERS,
    SpecError,
    SweepSpec,
    load_spec,
    matches,
    same_value,
)

RUN_NOTEBOOK = "notebook.ipynb"
METRICS_FILE = "metrics.json"
RUNS_FOLDER = "papermill_runs"
SMOKE_SUFFIX = "-smoke"
FIGURES_PARAMETER = "figures_dir"  # a step notebook's output folder; smoke steps get their own
# Run folders must stay well under the usual 255-byte file-name limit.
_MAX_NAME_BYTES = 200

OnlyFilter = Mapping[str, Sequence[Any]] | Sequence[str] | None


@dataclass(frozen=True)
class Job:
    """One papermill execution: a grid point (``kind`` ``"run"``) or a ``then`` step on one run
    (``"then-run"``) or on the sweep (``"then-sweep"``): its manifest ``key``, what is injected
    (``parameters``; ``overrides``: what the spec's overrides set), its run (sweep) ``folder``."""

    key: str
    kind: str
    notebook: Path
    output: Path
    parameters: dict[str, Any]
    point: dict[str, Any] = field(default_factory=dict)
    folder: Path = Path()
    overrides: dict[str, Any] = field(default_factory=dict)


def format_value(value: Any) -> str:
    """A grid value as it appears in a run name (docs/sweeps.md, "Run names")."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, allow_unicode=True)
    text = text.removesuffix("\n...\n").rstrip("\n")
    return quote(text, safe="+@")


def run_name(point: Mapping[str, Any]) -> str:
    """``k=v`` pairs joined by commas in grid order (docs/sweeps.md, "Run names")."""
    return _cut(",".join(f"{key}={format_value(value)}" for key, value in point.items()))


def _cut(name: str) -> str:
    if len(name.encode()) > _MAX_NAME_BYTES:
        digest = hashlib.sha1(name.encode()).hexdigest()[:12]
        name = f"{name[: _MAX_NAME_BYTES - 20]}~{digest}"
    return name


def _named_points(spec: SweepSpec) -> Iterator[tuple[str, dict[str, Any]]]:
    # (run name, point) in grid order; each value is formatted once, not once per point
    # (YAML dumping is what made planning a 10^5-point grid slow).
    keys = list(spec.grid)
    parts = [[f"{key}={format_value(value)}" for value in spec.grid[key]] for key in keys]
    for indices in itertools.product(*(range(len(values)) for values in spec.grid.values())):
        point = {key: spec.grid[key][i] for key, i in zip(keys, indices, strict=True)}
        yield _cut(",".join(part[i] for part, i in zip(parts, indices, strict=True))), point


def sweep_folder(spec: SweepSpec, out: str | Path | None = None, *, smoke: bool = False) -> Path:
    """``<out>/<name>`` (``<out>/<name>-smoke``: smoke runs live apart); ``out`` defaults to
    ``<root>/papermill_runs``."""
    base = Path(out) if out is not None else spec.root / RUNS_FOLDER
    name = f"{spec.name}{SMOKE_SUFFIX}" if smoke else spec.name
    return base.resolve() / name


def parse_only(spec: SweepSpec, only: OnlyFilter) -> dict[str, list[Any]]:
    """``--only`` filters (``["loss=triplet", "seed=0"]`` or ``{"loss": ["triplet"]}``) as grid
    key -> allowed grid values; a :class:`SpecError` for a key or value not in the grid."""
    if not only:
        return {}
    pairs = list(only.items()) if isinstance(only, Mapping) else [_split(spec, o) for o in only]
    allowed: dict[str, list[Any]] = {}
    for key, raw in pairs:
        if key not in spec.grid:
            raise SpecError(
                f"{spec.path}: --only {key}: not a grid key; grid keys: {', '.join(spec.grid)}"
            )
        raws = raw if isinstance(only, Mapping) and isinstance(raw, (list, tuple)) else [raw]
        allowed.setdefault(key, []).extend(_grid_value(spec, key, value) for value in raws)
    return allowed


def _split(spec: SweepSpec, text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep:
        raise SpecError(f"{spec.path}: --only {text!r}: expected KEY=VALUE")
    return key.strip(), value.strip()


def _grid_value(spec: SweepSpec, key: str, raw: Any) -> Any:
    # A command-line value matches a grid value if it reads as the same YAML value or is
    # spelled exactly as in the run name ("--only lr=1.0e-05" and "--only lr=1e-5" both work).
    candidates = [raw]
    with contextlib.suppress(yaml.YAMLError):
        candidates += [yaml.safe_load(raw)] if isinstance(raw, str) else []
    for value in spec.grid[key]:
        if any(same_value(c, value) for c in candidates) or raw == format_value(value):
            return value
    choices = ", ".join(format_value(v) for v in spec.grid[key])
    raise SpecError(f"{spec.path}: --only {key}={raw}: not a value of grid.{key} ({choices})")


def plan(
    spec: SweepSpec | str | os.PathLike,
    *,
    only: OnlyFilter = None,
    smoke: bool = False,
    out: str | Path | None = None,
) -> list[Job]:
    """The grid jobs of a spec (or spec file), in grid order, restricted by ``only``; their
    parameters are ``fixed``, the point, matching overrides, ``out_dir``, ``smoke``."""
    if not isinstance(spec, SweepSpec):
        spec = load_spec(spec)
    allowed = parse_only(spec, only)
    for notebook, declared in spec.notebook_parameters.items() if smoke else ():
        if SMOKE_PARAMETER not in declared:
            raise SpecError(
                f"{spec.path}: --smoke: {notebook.name} declares no '{SMOKE_PARAMETER}' parameter"
            )
    folder = sweep_folder(spec, out, smoke=smoke)
    jobs: list[Job] = []
    names: dict[str, dict[str, Any]] = {}
    for name, point in _named_points(spec):
        if name in names:
            raise SpecError(
                f"{spec.path}: grid: points {names[name]} and {point} share the run name {name!r}"
            )
        names[name] = point
        if not matches(allowed, point):
            continue
        run_dir, overrides = folder / name, spec.overrides_for(point)
        parameters = {**spec.fixed, **point, **overrides}
        parameters[RUN_PARAMETER] = shown_path(run_dir, spec.root)
        if smoke:
            parameters[SMOKE_PARAMETER] = True
        output = run_dir / RUN_NOTEBOOK
        jobs.append(Job(name, "run", spec.notebook, output, parameters, point, run_dir, overrides))
    return jobs


def plan_steps(spec: SweepSpec, run: Job | None, *, smoke: bool, folder: Path) -> list[Job]:
    """The ``then`` jobs of one finished run, or of the sweep in ``folder`` (``run=None``)."""
    jobs = []
    per, target = ("sweep", folder) if run is None else ("run", run.folder)
    point = dict(run.point) if run is not None else {}
    for step in spec.then:
        if step.per != per or not matches(step.where, point):
            continue
        parameters = {**step.parameters, STEP_PARAMETERS[step.per]: shown_path(target, spec.root)}
        if smoke:
            parameters[SMOKE_PARAMETER] = True
            if FIGURES_PARAMETER in spec.notebook_parameters.get(step.notebook, ()):
                # Smoke figures stay in the smoke sweep's folder, never over the real ones.
                parameters[FIGURES_PARAMETER] = shown_path(folder / "figures", spec.root)
        key = f"{run.key}/{step.name}" if run is not None else step.name
        output = target / f"{step.name}.ipynb"
        jobs.append(Job(key, f"then-{per}", step.notebook, output, parameters, point, target))
    return jobs


def shown_path(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` (the notebooks' cwd) when inside it, else absolute: the
    executed notebooks embed no machine-specific paths."""
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else os.fspath(path)

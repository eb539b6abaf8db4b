"""From a validated spec to jobs: run names, ``--only`` filtering, injected parameters.

A *job* is one papermill execution: a grid point (kind ``"run"``) or a ``then`` step on
one run (``"then-run"``) or on the whole sweep (``"then-sweep"``). Its ``key`` is what
``manifest.jsonl`` records it under: the run name, ``<run name>/<step>``, or ``<step>``.
"""

from __future__ import annotations

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
    ThenStep,
    load_spec,
)
from .values import same_value

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
    """One papermill execution.

    Attributes:
        key: manifest key (run name, ``<run>/<step>`` or ``<step>``).
        kind: ``"run"``, ``"then-run"`` or ``"then-sweep"``.
        notebook: source notebook.  output: executed notebook written by papermill.
        parameters: everything injected (spec values + ``out_dir``/``run_dir``/``sweep_dir``
            + ``smoke``).
        point: the grid values of the run (empty for a per-sweep step).
        folder: the run folder (the sweep folder for a per-sweep step).
        overrides: the parameters the spec's ``overrides`` set on this run (already in
            ``parameters``; empty for steps).
    """

    key: str
    kind: str
    notebook: Path
    output: Path
    parameters: dict[str, Any]
    point: dict[str, Any] = field(default_factory=dict)
    folder: Path = Path()
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def required_outputs(self) -> tuple[Path, ...]:
        """Files that must exist after a successful execution (and for a rerun to skip)."""
        if self.kind == "run":
            return (self.output, self.folder / METRICS_FILE)
        return (self.output,)


def format_value(value: Any) -> str:
    """A grid value as it appears in a run name: YAML flow style, path-safe.

    ``True`` → ``true``, ``None`` → ``null``, ``1e-5`` → ``1.0e-05``, the string
    ``"true"`` → ``%27true%27`` (quoted, so it differs from the boolean); characters
    outside ``[A-Za-z0-9._~+@-]`` (``/``, ``,``, ``=``, spaces, …) are %-escaped.
    """
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, allow_unicode=True)
    text = text.removesuffix("\n...\n").rstrip("\n")
    return quote(text, safe="+@")


def run_name(point: Mapping[str, Any]) -> str:
    """``k=v`` pairs joined by commas in grid order, e.g. ``loss=triplet,density=true``.

    Names longer than 200 bytes are cut and end with a hash of the full name, so they
    stay unique and fit every file system.
    """
    return _cut(",".join(f"{key}={format_value(value)}" for key, value in point.items()))


def _cut(name: str) -> str:
    if len(name.encode()) > _MAX_NAME_BYTES:
        digest = hashlib.sha1(name.encode()).hexdigest()[:12]
        name = f"{name[: _MAX_NAME_BYTES - 20]}~{digest}"
    return name


def grid_points(spec: SweepSpec) -> list[dict[str, Any]]:
    """The cartesian product of the grid, in the spec's key and value order."""
    return [point for _, point in _named_points(spec)]


def _named_points(spec: SweepSpec) -> Iterator[tuple[str, dict[str, Any]]]:
    # (run name, point) in grid order; each value is formatted once, not once per point
    # (YAML dumping is what made planning a 10^5-point grid slow).
    keys = list(spec.grid)
    parts = [[f"{key}={format_value(value)}" for value in spec.grid[key]] for key in keys]
    for indices in itertools.product(*(range(len(values)) for values in spec.grid.values())):
        point = {key: spec.grid[key][i] for key, i in zip(keys, indices, strict=True)}
        yield _cut(",".join(part[i] for part, i in zip(parts, indices, strict=True))), point


def sweep_folder(spec: SweepSpec, out: str | Path | None = None, *, smoke: bool = False) -> Path:
    """``<out>/<name>`` (``<out>/<name>-smoke`` for a smoke sweep); ``out`` defaults to
    ``<root>/papermill_runs``."""
    # Smoke runs live apart, so that a later real sweep neither skips them as finished nor
    # finds their models in its folder.
    base = Path(out) if out is not None else spec.root / RUNS_FOLDER
    name = f"{spec.name}{SMOKE_SUFFIX}" if smoke else spec.name
    return (base if base.is_absolute() else Path.cwd() / base).resolve() / name


def parse_only(spec: SweepSpec, only: OnlyFilter) -> dict[str, list[Any]]:
    """Normalize ``--only`` filters to grid key -> allowed grid values.

    Accepts ``["loss=triplet", "seed=0"]`` (command line; values read as YAML) or a
    mapping ``{"loss": ["triplet"]}``. Repeating a key allows several values; different
    keys must all match.

    Raises:
        SpecError: an unknown key or a value not in that key's grid list.
    """
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
        for value in raws:
            allowed.setdefault(key, []).append(_grid_value(spec, key, value))
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
    if isinstance(raw, str):
        try:
            candidates.insert(0, yaml.safe_load(raw))
        except yaml.YAMLError:
            pass
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
    """The grid jobs of a sweep, in grid order, restricted by ``only``.

    A run's parameters are ``fixed``, then its grid point, then the ``set`` of every
    matching override (in spec order), then ``out_dir`` and ``smoke``.

    Args:
        spec: from :func:`load_spec`, or the path of a spec file (loaded and checked).
        only: see :func:`parse_only`.
        smoke: inject ``smoke=True`` (every notebook must declare ``smoke``).
        out: parent of the sweep folder (default ``<root>/papermill_runs``).
    Raises:
        SpecError: bad ``only``, ``smoke`` not declared, or two grid points with one name.
    """
    if not isinstance(spec, SweepSpec):
        spec = load_spec(spec)
    allowed = parse_only(spec, only)
    if smoke:
        _check_smoke(spec)
    folder = sweep_folder(spec, out, smoke=smoke)
    jobs: list[Job] = []
    names: dict[str, dict[str, Any]] = {}
    for name, point in _named_points(spec):
        if name in names:
            raise SpecError(
                f"{spec.path}: grid: points {names[name]} and {point} share the run name {name!r}"
            )
        names[name] = point
        if not all(any(same_value(point[k], v) for v in vals) for k, vals in allowed.items()):
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
    """The ``then`` jobs of one finished run (``run``) or of the sweep (``run=None``).

    Args:
        folder: the sweep folder (used for per-sweep steps).
    """
    jobs = []
    for step in spec.then:
        if (step.per == "run") != (run is not None):
            continue
        if run is not None and not step.matches(run.point):
            continue
        jobs.append(_step_job(spec, step, run, smoke=smoke, folder=folder))
    return jobs


def _step_job(
    spec: SweepSpec, step: ThenStep, run: Job | None, *, smoke: bool, folder: Path
) -> Job:
    target = run.folder if run is not None else folder
    parameters = {**step.parameters, STEP_PARAMETERS[step.per]: shown_path(target, spec.root)}
    if smoke:
        parameters[SMOKE_PARAMETER] = True
        if FIGURES_PARAMETER in spec.notebook_parameters.get(step.notebook, ()):
            # Smoke figures stay in the smoke sweep's folder, never over the real ones.
            parameters[FIGURES_PARAMETER] = shown_path(folder / "figures", spec.root)
    key = f"{run.key}/{step.name}" if run is not None else step.name
    kind = "then-run" if run is not None else "then-sweep"
    point = dict(run.point) if run is not None else {}
    return Job(key, kind, step.notebook, target / f"{step.name}.ipynb", parameters, point, target)


def _check_smoke(spec: SweepSpec) -> None:
    for notebook, names in spec.notebook_parameters.items():
        if SMOKE_PARAMETER not in names:
            raise SpecError(
                f"{spec.path}: --smoke: {notebook.name} declares no '{SMOKE_PARAMETER}' parameter"
            )


def shown_path(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` (POSIX form) when inside it, else absolute."""
    # Relative to the root (the notebooks' cwd) when possible, so executed notebooks do
    # not embed machine-specific absolute paths.
    try:
        return path.relative_to(root.resolve()).as_posix()
    except ValueError:
        return os.fspath(path)

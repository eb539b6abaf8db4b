"""Sweep specs: a YAML file, checked against its notebooks before anything runs; every problem
is a :class:`SpecError` naming the spec file and the key (docs/sweeps.md, "The spec")."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from jupyter_client.kernelspec import KernelSpecManager

TOP_LEVEL_KEYS = (
    "name", "notebook", "fixed", "grid", "overrides", "then", "kernel", "timeout_s", "executor"
)  # fmt: skip
# Slurm resources per execution (slurm.SlurmResources); the CLI overrides them.
EXECUTOR_KEYS = ("partition", "gpus_per_run", "cpus_per_run", "mem_gb", "time_min", "sbatch")
STEP_KEYS = ("notebook", "per", "name", "parameters", "where")
OVERRIDE_KEYS = ("where", "set")
DEFAULT_KERNEL = "dmlkit"
# Parameters the runner injects itself; a spec may not set them.
RUN_PARAMETER = "out_dir"
STEP_PARAMETERS = {"run": "run_dir", "sweep": "sweep_dir"}
SMOKE_PARAMETER = "smoke"
# Planning costs ~35 µs per point; a grid this large is a mistake, not an experiment.
MAX_GRID_POINTS = 100_000
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

Err = Callable[[str, str], Exception]


class SpecError(ValueError):
    """A sweep spec that cannot run: the message names the spec file and the key."""


def same_value(a: Any, b: Any) -> bool:
    """Equality that keeps YAML types apart (``True`` is not ``1``, ``1`` is not ``1.0``)."""
    return type(a) is type(b) and a == b


def matches(where: Mapping[str, list[Any]], point: Mapping[str, Any]) -> bool:
    """Whether a grid point's value of every ``where`` key is one of that key's values."""
    return all(any(same_value(point[k], v) for v in values) for k, values in where.items())


@dataclass(frozen=True)
class ThenStep:
    """A figure notebook run per finished run (``per="run"``, filtered by ``where``: grid
    key -> allowed values) or once on the sweep (``"sweep"``); see docs/sweeps.md, "`then`"."""

    name: str
    notebook: Path
    per: str
    parameters: dict[str, Any] = field(default_factory=dict)
    where: dict[str, list[Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Override:
    """Run parameters ``set`` on the grid points that match ``where``."""

    where: dict[str, list[Any]]
    set: dict[str, Any]


@dataclass(frozen=True)
class SweepSpec:
    """A validated spec: its keys (docs/sweeps.md, "The spec"), plus ``path``, ``root`` (the
    folder notebooks run in) and ``notebook_parameters`` (each notebook's declared names)."""

    path: Path
    root: Path
    name: str
    notebook: Path
    fixed: dict[str, Any]
    grid: dict[str, list[Any]]
    then: tuple[ThenStep, ...] = ()
    kernel: str = DEFAULT_KERNEL
    timeout_s: float | None = None
    notebook_parameters: dict[Path, frozenset[str]] = field(default_factory=dict, repr=False)
    overrides: tuple[Override, ...] = ()
    executor: dict[str, Any] = field(default_factory=dict)

    @property
    def num_points(self) -> int:
        """Size of the cartesian product of the grid."""
        return math.prod(len(values) for values in self.grid.values())

    def overrides_for(self, point: Mapping[str, Any]) -> dict[str, Any]:
        """The ``set`` parameters of every override matching ``point``, later ones winning."""
        return {k: v for o in self.overrides if matches(o.where, point) for k, v in o.set.items()}


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a sweep spec (:func:`safe_yaml`); see docs/sweeps.md, "Checked before
    anything runs". Raises :class:`SpecError` naming the file and the key."""
    path = Path(path)

    def err(key: str, problem: str) -> SpecError:
        return SpecError(f"{path}: {key}: {problem}" if key else f"{path}: {problem}")

    data = _read_yaml(path)
    _check_keys(err, "", data, TOP_LEVEL_KEYS)
    for key in ("name", "notebook"):
        if data.get(key) in (None, ""):
            raise err(key, "missing (required)")
    name = data["name"]
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name):
        raise err("name", f"must be a folder name of letters, digits, '.', '_', '-'; got {name!r}")
    root = find_root(path, _string(err, "notebook", data["notebook"])).resolve()
    fixed = _mapping(err, "fixed", data.get("fixed") or {})
    grid = _grid(err, data.get("grid"))
    both = sorted(fixed.keys() & grid.keys())
    if both:
        raise err(f"grid.{both[0]}", "also set in 'fixed'; set each parameter in one place")
    steps = data.get("then") or []
    if not isinstance(steps, list):
        raise err("then", f"must be a list of steps, got {type(steps).__name__}")
    steps = tuple(_step(err, f"then[{i}]", root, raw, grid) for i, raw in enumerate(steps))
    for i, step in enumerate(steps):
        if any((s.per, s.name) == (step.per, step.name) for s in steps[:i]):
            raise err(f"then[{i}].name", f"two per-{step.per} steps are named {step.name!r}")
    overrides = data.get("overrides") or []
    if not isinstance(overrides, list):
        raise err("overrides", f"must be a list of {{where: ..., set: ...}}, got {overrides!r}")
    overrides = tuple(_override(err, f"overrides[{i}]", o, grid) for i, o in enumerate(overrides))
    timeout = data.get("timeout_s")
    if timeout is not None and (type(timeout) not in (int, float) or not timeout > 0):  # no bool
        raise err("timeout_s", f"must be a positive number of seconds, got {timeout!r}")
    spec = SweepSpec(
        path=path,
        root=root,
        name=name,
        notebook=_notebook_path(err, "notebook", root, data["notebook"]),
        fixed=fixed,
        grid=grid,
        then=steps,
        overrides=overrides,
        kernel=_string(err, "kernel", data.get("kernel", DEFAULT_KERNEL)),
        timeout_s=None if timeout is None else float(timeout),
        executor=_mapping(err, "executor", data.get("executor") or {}),
    )
    _check_keys(err, "executor", spec.executor, EXECUTOR_KEYS)
    installed = KernelSpecManager().find_kernel_specs()
    if spec.kernel not in installed:
        raise err(
            "kernel",
            f"no Jupyter kernel named {spec.kernel!r} (installed: "
            f"{', '.join(sorted(installed)) or 'none'}); `make setup` installs 'dmlkit'",
        )
    return _check_parameters(err, spec)


def find_root(spec_path: Path, notebook: str) -> Path:
    """The first of the spec's folder, its ancestors and the current directory that contains
    ``notebook`` (the repository root); else the current directory."""
    spec_dir = spec_path.resolve().parent
    folders = (spec_dir, *spec_dir.parents, Path.cwd())
    return next((folder for folder in folders if (folder / notebook).is_file()), Path.cwd())


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses (:class:`SpecError`) a key given twice in one mapping,
    nested ones too; keys brought in by a merge (``<<: *base``) may be overridden."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            first_seen: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = first_seen.setdefault(key, key_node)
                except TypeError:  # an unhashable key: SafeLoader's own error says so
                    continue
                if first is not key_node:
                    raise SpecError(_duplicate_message(first, key_node))
        return super().construct_mapping(node, deep=deep)


def _duplicate_message(first: yaml.Node, second: yaml.Node) -> str:
    lines = first.start_mark.line + 1, second.start_mark.line + 1
    if first.value == second.value:
        what = f"key {first.value!r} is given twice, on line {lines[0]} and line {lines[1]}"
    else:  # e.g. 1 and true, or 1 and 1.0: one key once read
        what = (
            f"keys {first.value!r} (line {lines[0]}) and {second.value!r} (line {lines[1]}) "
            "are the same key"
        )
    return f"{what} (YAML would keep only the last value); remove one"


def safe_yaml(text: str) -> Any:
    """``yaml.safe_load(text)``, but a key given twice in a mapping is an error."""
    loader = UniqueKeyLoader(text)  # a SafeLoader; not yaml.load, which the audit refuses
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = safe_yaml(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: cannot read the spec: {exc}") from exc
    except SpecError as exc:  # a key given twice
        raise SpecError(f"{path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise SpecError(f"{path}: the spec must be a mapping, got {type(data).__name__}")
    return data


def _check_keys(err: Err, prefix: str, data: Mapping, allowed: tuple[str, ...]) -> None:
    for key in data:
        if key not in allowed:
            where = f"{prefix}.{key}" if prefix else str(key)
            raise err(where, f"unknown key; expected one of {', '.join(allowed)}")


def _string(err: Err, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise err(key, f"must be a non-empty string, got {value!r}")
    return value


def _mapping(err: Err, key: str, value: Any) -> dict[str, Any]:
    """A copy of a ``parameter: value`` mapping with identifier names and plain values."""
    if not isinstance(value, dict):
        raise err(key, f"must be a mapping of parameter: value, got {type(value).__name__}")
    for name, item in value.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise err(key, f"parameter names must be Python identifiers, got {name!r}")
        _check_plain(err, f"{key}.{name}", item)
    return dict(value)


def _check_plain(err: Err, key: str, value: Any) -> None:
    # Values are injected into notebooks as Python literals and written to JSON; YAML
    # dates, sets or tagged objects would survive neither.
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        value = list(value.values())
    if isinstance(value, list):
        for item in value:
            _check_plain(err, key, item)
    elif not (value is None or isinstance(value, (str, bool, int, float))):
        raise err(key, f"unsupported value {value!r} ({type(value).__name__}); use plain YAML")


def _where(err: Err, key: str, raw: Any, grid: Mapping[str, list[Any]]) -> dict[str, list[Any]]:
    """A ``where`` mapping (grid key -> value or list of values) as grid key -> values."""
    where = _mapping(err, key, raw)
    for grid_key, allowed in where.items():
        if grid_key not in grid:
            raise err(f"{key}.{grid_key}", f"not a grid key; grid keys: {', '.join(grid)}")
        allowed = allowed if isinstance(allowed, list) else [allowed]
        for value in allowed:
            if not any(same_value(value, v) for v in grid[grid_key]):
                raise err(f"{key}.{grid_key}", f"{value!r} is not one of {grid[grid_key]}")
        where[grid_key] = allowed
    return where


def _grid(err: Err, raw: Any) -> dict[str, list[Any]]:
    if raw is None or raw == {}:
        raise err("grid", "empty; give at least one parameter with a list of values")
    grid = _mapping(err, "grid", raw)
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise err(f"grid.{key}", f"must be a non-empty list of values, got {values!r}")
    sizes = [len(values) for values in grid.values()]
    if math.prod(sizes) > MAX_GRID_POINTS:
        raise err(
            "grid",
            f"{math.prod(sizes):,} points ({' × '.join(map(str, sizes))}), more than the "
            f"{MAX_GRID_POINTS:,} one sweep may run; split it into several specs",
        )
    return grid  # a value listed twice gives two points one run name, which plan() refuses


def _notebook_path(err: Err, key: str, root: Path, value: Any) -> Path:
    notebook = (root / _string(err, key, value)).resolve()
    if notebook.suffix != ".ipynb":
        raise err(key, f"expected a .ipynb notebook, got {value!r}")
    if not notebook.is_file():
        raise err(key, f"notebook not found: {notebook} (paths are relative to {root})")
    return notebook


def _step(err: Err, key: str, root: Path, raw: Any, grid: Mapping[str, list]) -> ThenStep:
    if isinstance(raw, str):
        raw = {"notebook": raw}
    if not isinstance(raw, dict):
        raise err(key, f"must be a mapping or a notebook path, got {raw!r}")
    _check_keys(err, key, raw, STEP_KEYS)
    notebook = _notebook_path(err, f"{key}.notebook", root, raw.get("notebook"))
    per = raw.get("per", "run")
    if per not in STEP_PARAMETERS:
        raise err(f"{key}.per", f"must be 'run' or 'sweep', got {per!r}")
    name = raw.get("name", notebook.stem)
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or name == "notebook":
        raise err(f"{key}.name", f"must be a file name other than 'notebook', got {name!r}")
    where = _where(err, f"{key}.where", raw.get("where") or {}, grid)
    if where and per == "sweep":
        raise err(f"{key}.where", "only per-run steps can filter runs")
    parameters = _mapping(err, f"{key}.parameters", raw.get("parameters") or {})
    if (injected := STEP_PARAMETERS[per]) in parameters:
        raise err(f"{key}.parameters.{injected}", "set by the runner; remove it")
    return ThenStep(name=name, notebook=notebook, per=per, parameters=parameters, where=where)


def _override(err: Err, key: str, raw: Any, grid: Mapping[str, list]) -> Override:
    if not isinstance(raw, dict):
        raise err(key, f"must be a mapping {{where: ..., set: ...}}, got {raw!r}")
    _check_keys(err, key, raw, OVERRIDE_KEYS)
    if not raw.get("where"):
        raise err(f"{key}.where", "missing (required); parameters of every run go in 'fixed'")
    if not raw.get("set"):
        raise err(f"{key}.set", "missing (required): the parameters to set on these runs")
    where = _where(err, f"{key}.where", raw["where"], grid)
    values = _mapping(err, f"{key}.set", raw["set"])
    for name in values:
        if name in grid:
            raise err(f"{key}.set.{name}", "a grid key; an override cannot change the grid point")
        if name in (RUN_PARAMETER, SMOKE_PARAMETER):
            raise err(f"{key}.set.{name}", "set by the runner; remove it")
    return Override(where=where, set=values)


def _check_parameters(err: Err, spec: SweepSpec) -> SweepSpec:
    """Check every parameter the spec sets against the notebooks' parameters cells."""
    import papermill  # deferred: only needed when a spec is actually loaded

    declared: dict[Path, frozenset[str]] = {}
    for notebook in {spec.notebook, *(step.notebook for step in spec.then)}:
        try:
            declared[notebook] = frozenset(papermill.inspect_notebook(str(notebook)))
        except Exception as exc:  # papermill raises many types for an unreadable notebook
            raise err("notebook", f"cannot inspect {notebook}: {exc}") from exc
    checks = [("fixed", spec.notebook, spec.fixed), ("grid", spec.notebook, spec.grid)]
    checks += [(f"overrides[{i}].set", spec.notebook, o.set) for i, o in enumerate(spec.overrides)]
    checks += [(f"then[{i}].parameters", s.notebook, s.parameters) for i, s in enumerate(spec.then)]
    for key, notebook, parameters in checks:
        names = declared[notebook]
        if not names:
            raise err(key, f"{notebook.name} has no cell tagged 'parameters'")
        unknown = sorted(set(parameters) - names)
        if unknown:
            raise err(
                f"{key}.{unknown[0]}",
                f"unknown parameter(s) {', '.join(unknown)} for {notebook.name}; "
                f"its parameters cell declares: {', '.join(sorted(names))}",
            )
    injected = [("notebook", spec.notebook, RUN_PARAMETER)]
    injected += [
        (f"then[{i}].notebook", s.notebook, STEP_PARAMETERS[s.per]) for i, s in enumerate(spec.then)
    ]
    for key, notebook, name in injected:
        if name not in declared[notebook]:
            problem = f"{notebook.name} must declare a {name!r} parameter (the runner sets it)"
            raise err(key, problem)
    if RUN_PARAMETER in spec.fixed or RUN_PARAMETER in spec.grid:
        raise err(RUN_PARAMETER, "set by the runner to the run folder; remove it from the spec")
    return dataclasses.replace(spec, notebook_parameters=declared)

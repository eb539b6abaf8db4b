"""Sweep specs: read a YAML file, check it against its notebooks before anything runs.

A spec names a notebook, fixed parameters, a grid (cartesian product) and optional
``then`` steps (figure notebooks run per finished run or once per sweep). Every problem
is a :class:`SpecError` naming the spec file and the offending key; nothing is executed
until the whole spec (and every notebook's ``parameters`` cell) checks out.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .values import mapping, matches, string, where_filter

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
# Planning costs ~0.1 ms per point; a grid this large is a mistake, not an experiment.
MAX_GRID_POINTS = 100_000
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class SpecError(ValueError):
    """A sweep spec that cannot run: the message names the spec file and the key."""


@dataclass(frozen=True)
class ThenStep:
    """A figure notebook run after the grid, once per finished run or once on the sweep.

    Attributes:
        name: step name; its executed notebook is ``<folder>/<name>.ipynb``.
        notebook: absolute path of the source notebook.
        per: ``"run"`` (gets ``run_dir``) or ``"sweep"`` (gets ``sweep_dir``).
        parameters: extra notebook parameters.
        where: per-run filter, grid key -> allowed values; empty = every run.
    """

    name: str
    notebook: Path
    per: str
    parameters: dict[str, Any] = field(default_factory=dict)
    where: dict[str, list[Any]] = field(default_factory=dict)

    def matches(self, point: Mapping[str, Any]) -> bool:
        """Whether a grid point passes this step's ``where`` filter."""
        return matches(self.where, point)


@dataclass(frozen=True)
class Override:
    """Run-notebook parameters for the grid points that match ``where``.

    Attributes:
        where: grid key -> allowed values (as a ``then`` step's ``where``).
        set: parameters added to / replacing the injected ones on those points.
    """

    where: dict[str, list[Any]]
    set: dict[str, Any]

    def matches(self, point: Mapping[str, Any]) -> bool:
        """Whether a grid point passes this override's ``where`` filter."""
        return matches(self.where, point)


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep spec.

    Attributes:
        path: the spec file.  root: the folder notebooks run in (repository root).
        name: sweep name, the folder under ``papermill_runs/``.
        notebook: absolute path of the notebook run once per grid point.
        fixed: parameters common to every run.  grid: key -> values, in spec order.
        overrides: per-point parameters, applied in order (later entries win).
        then: figure steps.  kernel: Jupyter kernel name.
        timeout_s: per-execution wall-clock limit (None = none).
        notebook_parameters: the names in each notebook's ``parameters`` cell.
        executor: Slurm resources of each execution (``EXECUTOR_KEYS``).
    """

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
        count = 1
        for values in self.grid.values():
            count *= len(values)
        return count

    def overrides_for(self, point: Mapping[str, Any]) -> dict[str, Any]:
        """The ``set`` parameters of every override matching ``point``, later ones winning."""
        merged: dict[str, Any] = {}
        for override in self.overrides:
            if override.matches(point):
                merged.update(override.set)
        return merged


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a sweep spec (``safe_yaml``: no tags, no key twice); see docs/sweeps.md.

    Raises:
        SpecError: naming the file and key, for unknown keys, a missing name/notebook, a
            notebook that does not exist, an empty grid, a grid value that is not a
            non-empty list, an override or ``where`` on a key or value not in the grid, or a
            parameter name absent from a notebook's parameters cell.
    """
    path = Path(path)
    data = _read_yaml(path)
    _check_keys(path, "", data, TOP_LEVEL_KEYS)
    err = _error_factory(path)
    name = _name(err, data)
    root = find_root(path, string(err, "notebook", data["notebook"])).resolve()
    fixed = mapping(err, "fixed", data.get("fixed") or {})
    grid = _grid(err, data.get("grid"))
    both = sorted(fixed.keys() & grid.keys())
    if both:
        raise err(f"grid.{both[0]}", "also set in 'fixed'; set each parameter in one place")
    raw_steps = enumerate(_list_of_steps(err, data))
    steps = tuple(_step(err, f"then[{i}]", root, raw, grid) for i, raw in raw_steps)
    _check_step_names(err, steps)
    spec = SweepSpec(
        path=path,
        root=root,
        name=name,
        notebook=_notebook_path(err, "notebook", root, data["notebook"]),
        fixed=fixed,
        grid=grid,
        then=steps,
        overrides=_overrides(err, data.get("overrides"), grid),
        kernel=string(err, "kernel", data.get("kernel", DEFAULT_KERNEL)),
        timeout_s=_timeout(err, data.get("timeout_s")),
        executor=mapping(err, "executor", data.get("executor") or {}),
    )
    _check_keys(path, "executor", spec.executor, EXECUTOR_KEYS)
    _check_kernel(err, spec.kernel)
    return _check_parameters(spec)


def find_root(spec_path: Path, notebook: str) -> Path:
    """The folder a spec's relative notebook paths start from (the repository root).

    The first of: the spec's folder and its ancestors, the git root of the spec, the
    current directory — that contains ``notebook``. Falls back to the current directory.
    """
    spec_dir = spec_path.resolve().parent
    candidates = [spec_dir, *spec_dir.parents]
    git_root = _git_root(spec_dir)
    if git_root is not None:
        candidates.append(git_root)
    candidates.append(Path.cwd())
    for folder in candidates:
        if (folder / notebook).is_file():
            return folder
    return git_root or Path.cwd()


def _git_root(folder: Path) -> Path | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return Path(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip() else None


def _error_factory(path: Path):
    def err(key: str, problem: str) -> SpecError:
        return SpecError(f"{path}: {key}: {problem}" if key else f"{path}: {problem}")

    return err


def _name(err, data: Mapping[str, Any]) -> str:
    for key in ("name", "notebook"):
        if data.get(key) in (None, ""):
            raise err(key, "missing (required)")
    name = data["name"]
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name):
        raise err("name", f"must be a folder name of letters, digits, '.', '_', '-'; got {name!r}")
    return name


class _DuplicateKeyError(yaml.YAMLError):
    """A mapping names the same key twice (plain YAML would keep the last value)."""


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping, nested ones too.

    Keys brought in by a merge (``<<: *base``) may be overridden, as YAML intends.
    """

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
                    raise _DuplicateKeyError(_duplicate_message(first, key_node))
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
    loader = UniqueKeyLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: cannot read the spec: {exc}") from exc
    try:
        data = safe_yaml(text)
    except _DuplicateKeyError as exc:
        raise SpecError(f"{path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise SpecError(f"{path}: the spec must be a mapping, got {type(data).__name__}")
    return data


def _check_keys(path: Path, prefix: str, data: Mapping, allowed: tuple[str, ...]) -> None:
    for key in data:
        if key not in allowed:
            where = f"{prefix}.{key}" if prefix else str(key)
            raise SpecError(f"{path}: {where}: unknown key; expected one of {', '.join(allowed)}")


def _grid(err, raw: Any) -> dict[str, list[Any]]:
    if raw is None or raw == {}:
        raise err("grid", "empty; give at least one parameter with a list of values")
    grid = mapping(err, "grid", raw)
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
    for key, values in grid.items():
        seen: set[tuple[type, str]] = set()
        for value in values:
            # The type keeps true, 1 and 1.0 apart, as same_value does.
            identity = (type(value), json.dumps(value, sort_keys=True))
            if identity in seen:
                raise err(f"grid.{key}", f"value {value!r} is listed twice")
            seen.add(identity)
    return grid


def _timeout(err, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise err("timeout_s", f"must be a positive number of seconds, got {value!r}")
    return float(value)


def _notebook_path(err, key: str, root: Path, value: Any) -> Path:
    notebook = (root / string(err, key, value)).resolve()
    if notebook.suffix != ".ipynb":
        raise err(key, f"expected a .ipynb notebook, got {value!r}")
    if not notebook.is_file():
        raise err(key, f"notebook not found: {notebook} (paths are relative to {root})")
    return notebook


def _list_of_steps(err, data: Mapping) -> list[Any]:
    steps = data.get("then") or []
    if not isinstance(steps, list):
        raise err("then", f"must be a list of steps, got {type(steps).__name__}")
    return steps


def _step(err, key: str, root: Path, raw: Any, grid: Mapping[str, list]) -> ThenStep:
    if isinstance(raw, str):
        raw = {"notebook": raw}
    if not isinstance(raw, dict):
        raise err(key, f"must be a mapping or a notebook path, got {raw!r}")
    for name in raw:
        if name not in STEP_KEYS:
            raise err(f"{key}.{name}", f"unknown key; expected one of {', '.join(STEP_KEYS)}")
    notebook = _notebook_path(err, f"{key}.notebook", root, raw.get("notebook"))
    per = raw.get("per", "run")
    if per not in STEP_PARAMETERS:
        raise err(f"{key}.per", f"must be 'run' or 'sweep', got {per!r}")
    name = raw.get("name", notebook.stem)
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or name == "notebook":
        raise err(f"{key}.name", f"must be a file name other than 'notebook', got {name!r}")
    where = where_filter(err, f"{key}.where", raw.get("where") or {}, grid)
    if where and per == "sweep":
        raise err(f"{key}.where", "only per-run steps can filter runs")
    parameters = mapping(err, f"{key}.parameters", raw.get("parameters") or {})
    return ThenStep(name=name, notebook=notebook, per=per, parameters=parameters, where=where)


def _overrides(err, raw: Any, grid: Mapping[str, list]) -> tuple[Override, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise err("overrides", f"must be a list of {{where: ..., set: ...}}, got {raw!r}")
    return tuple(_override(err, f"overrides[{i}]", item, grid) for i, item in enumerate(raw))


def _override(err, key: str, raw: Any, grid: Mapping[str, list]) -> Override:
    if not isinstance(raw, dict):
        raise err(key, f"must be a mapping {{where: ..., set: ...}}, got {raw!r}")
    for name in raw:
        if name not in OVERRIDE_KEYS:
            raise err(f"{key}.{name}", f"unknown key; expected one of {', '.join(OVERRIDE_KEYS)}")
    if not raw.get("where"):
        raise err(f"{key}.where", "missing (required); parameters of every run go in 'fixed'")
    if not raw.get("set"):
        raise err(f"{key}.set", "missing (required): the parameters to set on these runs")
    where = where_filter(err, f"{key}.where", raw["where"], grid)
    values = mapping(err, f"{key}.set", raw["set"])
    for name in values:
        if name in grid:
            raise err(f"{key}.set.{name}", "a grid key; an override cannot change the grid point")
        if name in (RUN_PARAMETER, SMOKE_PARAMETER):
            raise err(f"{key}.set.{name}", "set by the runner; remove it")
    return Override(where=where, set=values)


def _check_step_names(err, steps: tuple[ThenStep, ...]) -> None:
    seen: set[tuple[str, str]] = set()
    for i, step in enumerate(steps):
        if (step.per, step.name) in seen:
            raise err(f"then[{i}].name", f"two per-{step.per} steps are named {step.name!r}")
        seen.add((step.per, step.name))


def _check_kernel(err, kernel: str) -> None:
    from jupyter_client.kernelspec import KernelSpecManager

    installed = KernelSpecManager().find_kernel_specs()
    if kernel not in installed:
        raise err(
            "kernel",
            f"no Jupyter kernel named {kernel!r} (installed: "
            f"{', '.join(sorted(installed)) or 'none'}); `make setup` installs 'dmlkit'",
        )


def _check_parameters(spec: SweepSpec) -> SweepSpec:
    """Check every parameter the spec sets against the notebooks' parameters cells."""
    import papermill  # deferred: only needed when a spec is actually loaded

    err = _error_factory(spec.path)
    declared: dict[Path, frozenset[str]] = {}
    for notebook in {spec.notebook, *(step.notebook for step in spec.then)}:
        try:
            names = frozenset(papermill.inspect_notebook(str(notebook)))
        except Exception as exc:  # papermill raises many types for an unreadable notebook
            raise err("notebook", f"cannot inspect {notebook}: {exc}") from exc
        declared[notebook] = names
    checks = [("fixed", spec.notebook, spec.fixed), ("grid", spec.notebook, spec.grid)]
    checks += [(f"overrides[{i}].set", spec.notebook, o.set) for i, o in enumerate(spec.overrides)]
    checks += [(f"then[{i}].parameters", s.notebook, s.parameters) for i, s in enumerate(spec.then)]
    for key, notebook, parameters in checks:
        _check_names(err, key, notebook, declared[notebook], parameters)
    _check_injected(err, "notebook", spec.notebook, declared[spec.notebook], RUN_PARAMETER)
    for i, step in enumerate(spec.then):
        injected = STEP_PARAMETERS[step.per]
        names = declared[step.notebook]
        _check_injected(err, f"then[{i}].notebook", step.notebook, names, injected)
        if injected in step.parameters:
            raise err(f"then[{i}].parameters.{injected}", "set by the runner; remove it")
    if RUN_PARAMETER in spec.fixed or RUN_PARAMETER in spec.grid:
        raise err(RUN_PARAMETER, "set by the runner to the run folder; remove it from the spec")
    return dataclasses.replace(spec, notebook_parameters=declared)


def _check_names(err, key: str, notebook: Path, declared: frozenset[str], parameters) -> None:
    if not declared:
        raise err(key, f"{notebook.name} has no cell tagged 'parameters'")
    unknown = sorted(set(parameters) - declared)
    if unknown:
        raise err(
            f"{key}.{unknown[0]}",
            f"unknown parameter(s) {', '.join(unknown)} for {notebook.name}; "
            f"its parameters cell declares: {', '.join(sorted(declared))}",
        )


def _check_injected(err, key: str, notebook: Path, declared: frozenset[str], name: str) -> None:
    if name not in declared:
        raise err(key, f"{notebook.name} must declare a {name!r} parameter (the runner sets it)")

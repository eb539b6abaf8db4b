"""Sweep specs: read a YAML file, check it against its notebooks before anything runs.

A spec names a notebook, fixed parameters, a grid (cartesian product) and optional
``then`` steps (figure notebooks run per finished run or once per sweep). Every problem
is a :class:`SpecError` naming the spec file and the offending key; nothing is executed
until the whole spec (and every notebook's ``parameters`` cell) checks out.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

TOP_LEVEL_KEYS = ("name", "notebook", "fixed", "grid", "then", "kernel", "timeout_s")
STEP_KEYS = ("notebook", "per", "name", "parameters", "where")
DEFAULT_KERNEL = "dmlkit"
# Parameters the runner injects itself; a spec may not set them.
RUN_PARAMETER = "out_dir"
STEP_PARAMETERS = {"run": "run_dir", "sweep": "sweep_dir"}
SMOKE_PARAMETER = "smoke"
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
        return all(
            any(same_value(point[key], value) for value in values)
            for key, values in self.where.items()
        )


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep spec.

    Attributes:
        path: the spec file.  root: the folder notebooks run in (repository root).
        name: sweep name, the folder under ``papermill_runs/``.
        notebook: absolute path of the notebook run once per grid point.
        fixed: parameters common to every run.  grid: key -> values, in spec order.
        then: figure steps.  kernel: Jupyter kernel name.
        timeout_s: per-execution wall-clock limit (None = none).
        notebook_parameters: the names in each notebook's ``parameters`` cell.
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

    @property
    def num_points(self) -> int:
        """Size of the cartesian product of the grid."""
        count = 1
        for values in self.grid.values():
            count *= len(values)
        return count


def same_value(a: Any, b: Any) -> bool:
    """Equality that keeps YAML types apart (``True`` is not ``1``, ``1`` is not ``1.0``)."""
    return type(a) is type(b) and a == b


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a sweep spec (``yaml.safe_load``); see docs/sweeps.md.

    Raises:
        SpecError: naming the file and key, for unknown keys, a missing name/notebook, a
            notebook that does not exist, an empty grid, a grid value that is not a
            non-empty list, or a parameter name absent from a notebook's parameters cell.
    """
    path = Path(path)
    data = _read_yaml(path)
    _check_keys(path, "", data, TOP_LEVEL_KEYS)
    err = _error_factory(path)
    name = _name(err, data)
    root = find_root(path, _string(err, "notebook", data["notebook"])).resolve()
    fixed = _mapping(err, "fixed", data.get("fixed") or {})
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
        kernel=_string(err, "kernel", data.get("kernel", DEFAULT_KERNEL)),
        timeout_s=_timeout(err, data.get("timeout_s")),
    )
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


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: cannot read the spec: {exc}") from exc
    try:
        data = yaml.safe_load(text)
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


def _string(err, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise err(key, f"must be a non-empty string, got {value!r}")
    return value


def _mapping(err, key: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise err(key, f"must be a mapping of parameter: value, got {type(value).__name__}")
    for name, item in value.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise err(key, f"parameter names must be Python identifiers, got {name!r}")
        _check_plain(err, f"{key}.{name}", item)
    return dict(value)


def _check_plain(err, key: str, value: Any) -> None:
    # Values are injected into notebooks as Python literals and written to JSON; YAML
    # dates, sets or tagged objects would survive neither.
    if value is None or isinstance(value, (str, bool, int, float)):
        return
    if isinstance(value, list):
        for item in value:
            _check_plain(err, key, item)
        return
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        for item in value.values():
            _check_plain(err, key, item)
        return
    raise err(key, f"unsupported value {value!r} ({type(value).__name__}); use plain YAML")


def _grid(err, raw: Any) -> dict[str, list[Any]]:
    if raw is None or raw == {}:
        raise err("grid", "empty; give at least one parameter with a list of values")
    grid = _mapping(err, "grid", raw)
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise err(f"grid.{key}", f"must be a non-empty list of values, got {values!r}")
        for i, value in enumerate(values):
            if any(same_value(value, other) for other in values[:i]):
                raise err(f"grid.{key}", f"value {value!r} is listed twice")
    return grid


def _timeout(err, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise err("timeout_s", f"must be a positive number of seconds, got {value!r}")
    return float(value)


def _notebook_path(err, key: str, root: Path, value: Any) -> Path:
    notebook = (root / _string(err, key, value)).resolve()
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
    where = _mapping(err, f"{key}.where", raw.get("where") or {})
    if where and per == "sweep":
        raise err(f"{key}.where", "only per-run steps can filter runs")
    for grid_key, allowed in where.items():
        if grid_key not in grid:
            raise err(f"{key}.where.{grid_key}", f"not a grid key; grid keys: {', '.join(grid)}")
        allowed = allowed if isinstance(allowed, list) else [allowed]
        for value in allowed:
            if not any(same_value(value, v) for v in grid[grid_key]):
                raise err(f"{key}.where.{grid_key}", f"{value!r} is not one of {grid[grid_key]}")
        where[grid_key] = allowed
    parameters = _mapping(err, f"{key}.parameters", raw.get("parameters") or {})
    return ThenStep(name=name, notebook=notebook, per=per, parameters=parameters, where=where)


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

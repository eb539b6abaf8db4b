"""pyproject.toml, environment.yml and constraints.txt must describe the same environment."""

import re
from pathlib import Path

import yaml
from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_requirements() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] + project["optional-dependencies"]["dev"]
    return {_name(r.name): str(r.specifier) for r in map(Requirement, lines)}


def _environment_requirements() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    reqs = [Requirement(line) for line in pip if not line.startswith("-")]
    return {_name(r.name): str(r.specifier) for r in reqs}


def _name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_environment_yml_matches_pyproject():
    assert _environment_requirements() == _pyproject_requirements()


def test_environment_yml_pins_python_311_and_installs_the_package():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert "-e ." in pip


def test_constraints_satisfy_pyproject():
    """The lock file that `make setup` installs must satisfy every declared specifier."""
    pinned = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pinned[_name(name)] = version
    for name, spec in _pyproject_requirements().items():
        assert name in pinned, f"{name} missing from constraints.txt (run `make lock`)"
        assert Requirement(f"{name}{spec}").specifier.contains(pinned[name]), (
            f"constraints.txt pins {name}=={pinned[name]}, outside pyproject's {spec!r}"
        )

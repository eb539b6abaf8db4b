"""The package's import graph: no cycle inside dmlkit, and the rooms depend one way.

Every ``import`` counts: top-level, inside functions and under ``TYPE_CHECKING`` (a cycle
hidden in a function is still a cycle a reader has to untangle). An edge goes to the
module named; importing a submodule does not count as importing its package's
``__init__`` (Python runs it first, but the submodule's code does not depend on it).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import dmlkit

PACKAGE_DIR = Path(dmlkit.__file__).parent

# The one-way order (docs/architecture.md): a module may import its own layer and lower ones.
LAYERS = {
    "dmlkit": 0,
    "dmlkit.numerics": 0,
    "dmlkit.io": 0,
    "dmlkit.runtime": 0,
    "dmlkit.grouped": 0,
    "dmlkit.data": 1,
    "dmlkit.models": 1,
    "dmlkit.losses": 1,
    "dmlkit.samplers": 1,
    "dmlkit.train": 2,
    "dmlkit.evaluate": 2,
    "dmlkit.tsne": 2,
    "dmlkit.sweep": 3,
    "dmlkit.results": 3,
    "dmlkit.plotting": 3,
    "dmlkit.notebook": 3,
    "dmlkit.toy": 3,  # the 2-D teaching figures of losses_2d.ipynb
    "dmlkit.lab": 3,  # JupyterLab as `make lab` starts it
}


def module_files(root: Path = PACKAGE_DIR) -> dict[str, Path]:
    """Dotted module name → file, for every .py file of the package under ``root``."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules that ``name`` (at ``path``) imports anywhere in its code."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in known else base)
    return {module for module in found if module in known and module != name}


def import_graph(root: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    files = module_files(root)
    known = set(files)
    return {name: imported_modules(name, path, known) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def layer(module: str) -> int:
    parts = module.split(".")
    for size in range(len(parts), 0, -1):
        prefix = ".".join(parts[:size])
        if prefix in LAYERS:
            return LAYERS[prefix]
    raise KeyError(module)


def test_no_import_cycle_inside_dmlkit():
    assert cycles(import_graph()) == []


def test_every_module_has_a_layer_and_imports_only_its_own_or_lower_layers():
    graph = import_graph()
    upward = [
        f"{source} (layer {layer(source)}) imports {target} (layer {layer(target)})"
        for source, targets in graph.items()
        for target in sorted(targets)
        if layer(target) > layer(source)
    ]
    assert upward == []


@pytest.mark.parametrize(
    "files, expected",
    [
        # the two circles this test was written for, and a relative-import one
        (
            {
                "losses.py": "from pkg.daal import DAALLoss\n",
                "daal.py": "def f():\n    from pkg.losses import LOSSES\n",
            },
            [["pkg.daal", "pkg.losses"]],
        ),
        (
            {
                "loop.py": "from pkg.checkpoint import save\n",
                "checkpoint.py": "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from pkg.loop import _Run\n",
            },
            [["pkg.checkpoint", "pkg.loop"]],
        ),
        (
            {"a.py": "from . import b\n", "b.py": "from .a import x\n"},
            [["pkg.a", "pkg.b"]],
        ),
        ({"a.py": "from pkg import b\n", "b.py": "import os\n"}, []),
    ],
)
def test_the_cycle_finder_catches_function_local_type_checking_and_relative_imports(
    tmp_path, files, expected
):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name, source in files.items():
        (package / name).write_text(source)
    assert cycles(import_graph(package)) == expected

"""Checks of the plain YAML values in a sweep spec: parameter mappings and ``where`` filters.

Each checker takes ``err(key, problem) -> SpecError`` (made by the spec loader for one spec
file) so that every message names the file and the offending key.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

ErrorFactory = Callable[[str, str], Exception]


def same_value(a: Any, b: Any) -> bool:
    """Equality that keeps YAML types apart (``True`` is not ``1``, ``1`` is not ``1.0``)."""
    return type(a) is type(b) and a == b


def matches(where: Mapping[str, list[Any]], point: Mapping[str, Any]) -> bool:
    """Whether a grid point's value of every ``where`` key is one of that key's values."""
    return all(
        any(same_value(point[key], value) for value in values) for key, values in where.items()
    )


def string(err: ErrorFactory, key: str, value: Any) -> str:
    """``value`` if it is a non-empty string."""
    if not isinstance(value, str) or not value:
        raise err(key, f"must be a non-empty string, got {value!r}")
    return value


def mapping(err: ErrorFactory, key: str, value: Any) -> dict[str, Any]:
    """A copy of a ``parameter: value`` mapping with identifier names and plain values."""
    if not isinstance(value, dict):
        raise err(key, f"must be a mapping of parameter: value, got {type(value).__name__}")
    for name, item in value.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise err(key, f"parameter names must be Python identifiers, got {name!r}")
        check_plain(err, f"{key}.{name}", item)
    return dict(value)


def check_plain(err: ErrorFactory, key: str, value: Any) -> None:
    """Refuse anything but None, str, bool, int, float and lists/str-keyed dicts of them."""
    # Values are injected into notebooks as Python literals and written to JSON; YAML
    # dates, sets or tagged objects would survive neither.
    if value is None or isinstance(value, (str, bool, int, float)):
        return
    if isinstance(value, list):
        for item in value:
            check_plain(err, key, item)
        return
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        for item in value.values():
            check_plain(err, key, item)
        return
    raise err(key, f"unsupported value {value!r} ({type(value).__name__}); use plain YAML")


def where_filter(
    err: ErrorFactory, key: str, raw: Any, grid: Mapping[str, list[Any]]
) -> dict[str, list[Any]]:
    """A ``where`` mapping (grid key -> value or list of values) as grid key -> values.

    Raises (via ``err``): a key that is not a grid key, or a value not in that key's list.
    """
    where = mapping(err, key, raw)
    for grid_key, allowed in where.items():
        if grid_key not in grid:
            raise err(f"{key}.{grid_key}", f"not a grid key; grid keys: {', '.join(grid)}")
        allowed = allowed if isinstance(allowed, list) else [allowed]
        for value in allowed:
            if not any(same_value(value, v) for v in grid[grid_key]):
                raise err(f"{key}.{grid_key}", f"{value!r} is not one of {grid[grid_key]}")
        where[grid_key] = allowed
    return where

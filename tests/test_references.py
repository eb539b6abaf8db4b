"""Every reference in the repository resolves inside it.

A citation is ``docs/<file>.md#<anchor>`` (GitHub's heading anchor) or ``docs/<file>.md,
"Section"`` (a heading of that file that starts with "Section"), in code, notebooks, sweep
specs and Markdown. Nothing cites the developers' notes outside the repository, and
hand-written Markdown keeps its lines to 120 characters outside tables and code blocks.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_COLUMNS = 120

ANCHOR = re.compile(r"docs/([\w-]+)\.md#([\w-]+)")
# docs/x.md, "Section" — also `docs/x.md`, "…" and [docs/x.md](docs/x.md), "…"; the section
# may wrap onto the next line.
SECTION = re.compile(r'docs/([\w-]+)\.md`?(?:\]\([^)]*\))?,\s*"([^"]{1,100})"')
OUTSIDE = re.compile(r"METHODS\.md|\.\./shared")


def _sources() -> list[Path]:
    patterns = [
        "README.md",
        "Makefile",
        "pyproject.toml",
        "docs/*.md",
        "figures/*.md",
        "dmlkit/**/*.py",
        "tests/**/*.py",
        "benchmarks/*.py",
        "benchmarks/*.md",
        "notebooks/**/*.ipynb",
        "notebooks/**/*.yaml",
    ]
    found = {p for pattern in patterns for p in ROOT.glob(pattern)}
    return sorted(p for p in found if p.name != Path(__file__).name)


def _text(path: Path) -> str:
    """The prose of a file; a notebook's cells joined (its JSON escapes quotes)."""
    raw = path.read_text(encoding="utf-8")
    if path.suffix != ".ipynb":
        return raw
    cells = json.loads(raw)["cells"]
    return "\n".join("".join(cell["source"]) for cell in cells)


@cache
def _headings(name: str) -> list[str]:
    path = ROOT / "docs" / f"{name}.md"
    headings, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            headings.append(line.lstrip("#").strip())
    return headings


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces → '-'."""
    kept = re.sub(r"[^\w\- ]", "", heading.lower())
    return kept.replace(" ", "-")


def _citations() -> list[tuple[str, str, str, str]]:
    """(file, citation, doc name, anchor or section) for every citation in the repository."""
    found = []
    for path in _sources():
        relative = path.relative_to(ROOT).as_posix()
        text = _text(path)
        for match in ANCHOR.finditer(text):
            found.append((relative, match.group(0), match.group(1), "#" + match.group(2)))
        for match in SECTION.finditer(text):
            section = " ".join(match.group(2).split())
            found.append(
                (relative, f'docs/{match.group(1)}.md, "{section}"', match.group(1), section)
            )
    return found


def _resolves(name: str, target: str) -> bool:
    headings = _headings(name)
    if target.startswith("#"):
        return target[1:] in {github_anchor(h) for h in headings}
    return any(" ".join(h.split()).startswith(target) for h in headings)


def test_the_scan_finds_the_citations_it_checks():
    citations = _citations()
    kinds = {target.startswith("#") for *_, target in citations}
    assert len(citations) > 20 and kinds == {True, False}
    assert github_anchor("Transforms (`transforms(protocol, train, **kw)`)") == (
        "transforms-transformsprotocol-train-kw"
    )
    assert _resolves("methods", "Statistics over seeds")
    assert not _resolves("methods", "Statistics over weeks")


def test_every_cited_docs_section_exists():
    missing = [
        f"{file}: {citation}"
        for file, citation, name, target in _citations()
        if not _resolves(name, target)
    ]
    assert not missing, "citations of sections that do not exist:\n" + "\n".join(missing)


def test_nothing_cites_files_outside_the_repository():
    offenders = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in _sources()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert not offenders, "cite docs/<file>.md sections instead:\n" + "\n".join(offenders)


REPO_FILE = re.compile(
    r"`((?:dmlkit|tests|benchmarks|notebooks)/[\w/.-]+\.(?:py|ipynb|yaml|sh|md))`"
)


def test_every_repository_file_the_docs_name_exists():
    named = {
        (path.relative_to(ROOT).as_posix(), name)
        for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
        for name in REPO_FILE.findall(path.read_text(encoding="utf-8"))
    }
    missing = sorted(f"{doc}: {name}" for doc, name in named if not (ROOT / name).exists())
    assert len(named) > 20 and not missing, "\n".join(missing)


# figures/*.md and benchmarks/results*.md are written by code (to_markdown wraps its notes).
HAND_WRITTEN = [
    "README.md",
    "docs/*.md",
    "papermill_runs/README.md",
    "figures/*.md",
    "benchmarks/*.md",
]


@pytest.mark.parametrize("pattern", HAND_WRITTEN)
def test_markdown_lines_fit_120_columns_outside_tables_and_code(pattern):
    long = []
    for path in sorted(ROOT.glob(pattern)):
        fenced = False
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.startswith("```"):
                fenced = not fenced
            elif not fenced and not line.startswith("|") and len(line) > MAX_COLUMNS:
                long.append(f"{path.relative_to(ROOT)}:{number}: {len(line)} characters")
    assert not long, "\n".join(long)


# docs/reliability.md's short names for test files; "R" (the file before it was split by
# subject) stands for all five, so that a line written against it still resolves.
RELIABILITY = {
    "RD": "test_reliability_data.py",
    "RL": "test_reliability_losses.py",
    "RR": "test_reliability_run_folders.py",
    "RF": "test_reliability_faults.py",
    "RS": "test_reliability_sweeps.py",
    "G": "test_run_guards.py",
}


def test_every_test_the_reliability_docs_name_exists():
    section = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
    named = re.findall(r"`(R[DLRFS]?|G|test_\w+\.py)::(test_\w+)", section)
    missing = []
    for file, test in named:
        files = [RELIABILITY.get(file, file)] if file != "R" else RELIABILITY.values()
        sources = "".join((ROOT / "tests" / name).read_text(encoding="utf-8") for name in files)
        # A name ending in "_" is a prefix followed by *: several tests.
        found = re.search(rf"^def {test}{'' if test.endswith('_') else '[(]'}", sources, re.M)
        if not found:
            missing.append(f"{file}::{test}")
    assert len(named) > 40 and missing == []

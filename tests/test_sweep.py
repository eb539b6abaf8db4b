"""The papermill sweep runner: spec validation, naming, manifest, resume, faults, signals.

Executions use the toy notebooks in tests/notebooks/ (a kernel start costs ~2 s each), copied
into a throw-away project in tmp_path laid out like the repository (notebooks/,
notebooks/sweeps/), so the runner has to find the root itself.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nbformat
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from dmlkit.sweep import (
    ManifestLockedError,
    NoFinishedRunError,
    Outcome,
    SpecError,
    SweepResult,
    load_spec,
    plan,
    read_manifest,
    run_sweep,
    worker,
)
from dmlkit.sweep.__main__ import main as sweep_main
from dmlkit.sweep.manifest import append_record, is_finished, lock_manifest
from dmlkit.sweep.plan import format_value, plan_steps, run_name, sweep_folder
from dmlkit.sweep.worker import threads_per_job

NOTEBOOKS = Path(__file__).parent / "notebooks"
BASE = {"name": "toy", "notebook": "notebooks/toy_run.ipynb", "grid": {"x": [1, 2]}}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A repository-like folder with the toy notebooks under notebooks/."""
    (tmp_path / "notebooks" / "sweeps").mkdir(parents=True)
    for notebook in NOTEBOOKS.glob("*.ipynb"):
        shutil.copy(notebook, tmp_path / "notebooks" / notebook.name)
    return tmp_path


def write_spec(project: Path, spec: dict, name: str = "toy.yaml") -> Path:
    path = project / "notebooks" / "sweeps" / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def sweep_cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dmlkit.sweep", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def statuses(folder: Path) -> list[tuple[str, str]]:
    return [(r["run"], r["status"]) for r in read_manifest(folder / "manifest.jsonl")]


def process_gone(pid: int, wait_s: float = 5.0) -> bool:
    """True once ``pid`` no longer exists or is a zombie (dead, not yet reaped)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            os.kill(pid, 0)
            stat = Path(f"/proc/{pid}/stat")
            if stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except ProcessLookupError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


# ---------------------------------------------------------------- run names


@pytest.mark.parametrize(
    ("point", "name"),
    [
        ({"loss": "triplet", "density": True, "seed": 0}, "loss=triplet,density=true,seed=0"),
        ({"density": False, "weight": 0.5}, "density=false,weight=0.5"),
        ({"lr": 1e-5, "target": None}, "lr=1.0e-05,target=null"),
        ({"label": "true"}, "label=%27true%27"),  # the string, not the boolean
        ({"label": "a/b c"}, "label=a%2Fb%20c"),
        ({"label": "a,b=c"}, "label=a%2Cb%3Dc"),
        ({"ks": [1, 2]}, "ks=%5B1%2C%202%5D"),
        ({"label": "é"}, "label=%C3%A9"),
        ({"label": ".."}, "label=.."),
    ],
)
def test_run_name_formats_values_yaml_style_and_path_safe(point, name):
    assert run_name(point) == name


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.text(max_size=20),
            st.integers(),
            st.booleans(),
            st.none(),
            st.floats(allow_nan=False),
        ),
        min_size=2,
        max_size=2,
        unique_by=repr,
    )
)
def test_format_value_is_injective_and_never_contains_separators(values):
    a, b = (format_value(v) for v in values)
    if not (values[0] == values[1] and type(values[0]) is type(values[1])):
        assert a != b
    for text in (a, b):
        assert text and not set(text) & set("/,= \\\0")


def test_long_run_names_are_cut_and_stay_unique():
    names = {run_name({"label": "x" * 300 + suffix}) for suffix in "ab"}
    assert len(names) == 2
    assert all(len(name.encode()) <= 200 for name in names)


# ---------------------------------------------------------------- spec validation


def test_load_spec_finds_root_and_reads_everything(project):
    spec = load_spec(
        write_spec(
            project,
            {
                **BASE,
                "fixed": {"label": "b"},
                "timeout_s": 30,
                "then": [
                    {"notebook": "notebooks/toy_figure.ipynb", "where": {"x": 2}},
                    {
                        "notebook": "notebooks/toy_figure.ipynb",
                        "per": "sweep",
                        "name": "summary",
                        "parameters": {"tag": "all"},
                    },
                ],
            },
        )
    )
    assert spec.root == project.resolve()
    assert spec.notebook == project.resolve() / "notebooks" / "toy_run.ipynb"
    assert (spec.name, spec.fixed, spec.grid, spec.timeout_s) == (
        "toy",
        {"label": "b"},
        {"x": [1, 2]},
        30.0,
    )
    assert [(s.name, s.per, s.where, s.parameters) for s in spec.then] == [
        ("toy_figure", "run", {"x": [2]}, {}),
        ("summary", "sweep", {}, {"tag": "all"}),
    ]


FIGURE = "notebooks/toy_figure.ipynb"


def override(where, values, **extra) -> dict:
    """A spec change with one ``overrides`` entry (None leaves ``where``/``set`` out)."""
    entry = {k: v for k, v in (("where", where), ("set", values)) if v is not None}
    return {"overrides": [{**entry, **extra}]}


@pytest.mark.parametrize(
    ("change", "key", "message"),
    [
        ({"grdi": {}}, "grdi", "unknown key"),
        ({"name": None}, "name", "missing"),
        ({"notebook": None}, "notebook", "missing"),
        ({"name": "../escape"}, "name", "folder name"),
        ({"notebook": "notebooks/nope.ipynb"}, "notebook", "not found"),
        ({"grid": {}}, "grid", "empty"),
        ({"grid": None}, "grid", "empty"),
        ({"grid": {"x": 3}}, "grid.x", "non-empty list"),
        ({"grid": {"x": []}}, "grid.x", "non-empty list"),
        ({"grid": {"lr": [1]}}, "grid.lr", "unknown parameter"),
        ({"fixed": {"lr": 0.1, "label": "b"}}, "fixed.lr", "unknown parameter"),
        ({"fixed": {"x": 3}}, "grid.x", "also set in 'fixed'"),
        ({"fixed": {"out_dir": "elsewhere"}}, "out_dir", "set by the runner"),
        ({"fixed": {"label": datetime.date(2024, 1, 1)}}, "fixed.label", "plain YAML"),
        ({"timeout_s": 0}, "timeout_s", "positive"),
        ({"kernel": "no-such-kernel"}, "kernel", "no Jupyter kernel named 'no-such-kernel'"),
        (
            {"then": [{"notebook": FIGURE, "parameters": {"dpi": 3}}]},
            "then[0].parameters.dpi",
            "unknown parameter",
        ),
        (
            {"then": [{"notebook": FIGURE, "where": {"y": [1]}}]},
            "then[0].where.y",
            "not a grid key",
        ),
        ({"then": [{"notebook": FIGURE, "where": {"x": [7]}}]}, "then[0].where.x", "not one of"),
        ({"then": [{"notebook": FIGURE, "per": "epoch"}]}, "then[0].per", "'run' or 'sweep'"),
        ({"then": [{"notebook": FIGURE, "colour": 1}]}, "then[0].colour", "unknown key"),
        ({"then": [{"notebook": "notebooks/toy_run.ipynb"}]}, "then[0].notebook", "'run_dir'"),
        ({"then": [FIGURE, FIGURE]}, "then[1].name", "named"),
        ({"executor": {"nodes": 2}}, "executor.nodes", "unknown key"),
        ({"overrides": {"where": {"x": 1}}}, "overrides", "must be a list"),
        ({"overrides": ["x=1"]}, "overrides[0]", "must be a mapping"),
        (override({"x": 1}, {"label": "b"}, when=1), "overrides[0].when", "unknown key"),
        (override(None, {"label": "b"}), "overrides[0].where", "missing"),
        (override({"x": 1}, None), "overrides[0].set", "missing"),
        (override({"y": 1}, {"label": "b"}), "overrides[0].where.y", "not a grid key"),
        (override({"x": [1, 7]}, {"label": "b"}), "overrides[0].where.x", "7 is not one of"),
        (override({"x": True}, {"label": "b"}), "overrides[0].where.x", "not one of"),
        (override({"x": 1}, {"lr": 0.1}), "overrides[0].set.lr", "unknown parameter"),
        (override({"x": 1}, {"x": 2}), "overrides[0].set.x", "a grid key"),
        (override({"x": 1}, {"out_dir": "b"}), "overrides[0].set.out_dir", "set by the runner"),
        (override({"x": 1}, {"smoke": True}), "overrides[0].set.smoke", "set by the runner"),
        (
            override({"x": 1}, {"label": datetime.date(2024, 1, 1)}),
            "overrides[0].set.label",
            "plain YAML",
        ),
    ],
)
def test_bad_specs_raise_one_clear_error_naming_file_and_key(project, change, key, message):
    path = write_spec(project, {**BASE, **change})
    with pytest.raises(SpecError) as info:
        load_spec(path)
    text = str(info.value)
    assert text.startswith(f"{path}: {key}: ")
    if message is not None:
        assert message in text


def test_a_grid_value_listed_twice_is_refused_when_planning(project):
    spec = write_spec(project, {**BASE, "grid": {"x": [1, 1]}})
    message = "grid: points {'x': 1} and {'x': 1} share the run name 'x=1'"
    with pytest.raises(SpecError, match=re.escape(f"{spec}: {message}")):
        plan(load_spec(spec))
    done = sweep_cli(str(spec), "--dry-run", cwd=project)
    assert done.returncode == 2 and message in done.stderr


@pytest.mark.parametrize(
    "text", ["name: [unclosed", "- just\n- a list\n", "!!python/object:os.system {}"]
)
def test_spec_that_is_not_a_safe_yaml_mapping_is_a_spec_error(project, text):
    path = project / "notebooks" / "sweeps" / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match=str(path)):
        load_spec(path)


def test_unknown_parameter_stops_the_cli_before_anything_runs(project):
    spec = write_spec(project, {**BASE, "fixed": {"learning_rate": 0.1}})
    out = project / "out"
    done = sweep_cli(str(spec), "--out", str(out), cwd=project)
    assert done.returncode == 2
    assert f"{spec}: fixed.learning_rate: unknown parameter" in done.stderr
    assert not out.exists()


# ---------------------------------------------------------------- plan and --only


def test_plan_injects_fixed_point_out_dir_and_smoke(project):
    spec = load_spec(
        write_spec(
            project, {**BASE, "fixed": {"label": "b"}, "grid": {"x": [1, 2], "flag": [False, True]}}
        )
    )
    jobs = plan(spec, smoke=True)
    assert [j.key for j in jobs] == [
        "x=1,flag=false",
        "x=1,flag=true",
        "x=2,flag=false",
        "x=2,flag=true",
    ]
    assert jobs[1].parameters == {
        "label": "b",
        "x": 1,
        "flag": True,
        "out_dir": "papermill_runs/toy-smoke/x=1,flag=true",  # smoke runs live apart
        "smoke": True,
    }
    assert jobs[1].output == (
        project.resolve() / "papermill_runs/toy-smoke/x=1,flag=true/notebook.ipynb"
    )
    assert plan(spec)[1].parameters["out_dir"] == "papermill_runs/toy/x=1,flag=true"
    assert [j.key for j in plan(spec.path)] == [j.key for j in jobs]  # a path is loaded
    outside = plan(spec, out=project.parent / "elsewhere")[0]
    assert outside.parameters["out_dir"] == str(
        project.parent.resolve() / "elsewhere/toy/x=1,flag=false"
    )


def test_overrides_set_parameters_on_matching_points_later_entries_win(project):
    grid = {"x": [1, 2], "flag": [False, True]}
    overrides = [
        {"where": {"x": 2}, "set": {"label": "b", "mode": "normal"}},
        {"where": {"x": [2], "flag": True}, "set": {"label": "c"}},
        {"where": {"flag": [True]}, "set": {"mode": "no-metrics"}},
    ]
    spec = load_spec(
        write_spec(project, {**BASE, "fixed": {"label": "a"}, "grid": grid, "overrides": overrides})
    )
    assert [o.where for o in spec.overrides] == [
        {"x": [2]},
        {"x": [2], "flag": [True]},
        {"flag": [True]},
    ]
    jobs = {j.key: j for j in plan(spec, smoke=True)}
    assert list(jobs) == ["x=1,flag=false", "x=1,flag=true", "x=2,flag=false", "x=2,flag=true"]
    assert {key: job.overrides for key, job in jobs.items()} == {
        "x=1,flag=false": {},
        "x=1,flag=true": {"mode": "no-metrics"},
        "x=2,flag=false": {"label": "b", "mode": "normal"},
        "x=2,flag=true": {"label": "c", "mode": "no-metrics"},
    }
    assert jobs["x=1,flag=false"].parameters == {
        "label": "a",
        "x": 1,
        "flag": False,
        "out_dir": "papermill_runs/toy-smoke/x=1,flag=false",
        "smoke": True,
    }
    assert jobs["x=2,flag=true"].parameters == {
        "label": "c",
        "x": 2,
        "flag": True,
        "mode": "no-metrics",
        "out_dir": "papermill_runs/toy-smoke/x=2,flag=true",
        "smoke": True,
    }


@pytest.mark.parametrize(
    ("only", "keys"),
    [
        (["x=2"], ["x=2,flag=false", "x=2,flag=true"]),
        (["flag=true"], ["x=1,flag=true", "x=2,flag=true"]),
        (["x=1", "x=2", "flag=false"], ["x=1,flag=false", "x=2,flag=false"]),
        ({"x": [2], "flag": [True]}, ["x=2,flag=true"]),
    ],
)
def test_only_selects_grid_points(project, only, keys):
    spec = load_spec(write_spec(project, {**BASE, "grid": {"x": [1, 2], "flag": [False, True]}}))
    assert [j.key for j in plan(spec, only=only)] == keys


@pytest.mark.parametrize(
    ("only", "message"),
    [
        (["seed=0"], "--only seed: not a grid key"),
        (["x=3"], "--only x=3: not a value of grid.x"),
        (["flag=1"], "--only flag=1: not a value of grid.flag"),  # 1 is not True
        (["x"], "expected KEY=VALUE"),
    ],
)
def test_only_with_unknown_key_or_value_is_an_error(project, only, message):
    spec = load_spec(write_spec(project, {**BASE, "grid": {"x": [1, 2], "flag": [False, True]}}))
    with pytest.raises(SpecError, match=message):
        plan(spec, only=only)


def test_smoke_requires_a_smoke_parameter(project):
    notebook = nbformat.read(project / "notebooks" / "toy_run.ipynb", as_version=4)
    cell = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    cell.source = "\n".join(line for line in cell.source.splitlines() if "smoke" not in line)
    nbformat.write(notebook, project / "notebooks" / "toy_run.ipynb")
    spec = load_spec(write_spec(project, BASE))
    assert len(plan(spec)) == 2
    with pytest.raises(SpecError, match="declares no 'smoke' parameter"):
        plan(spec, smoke=True)


def test_smoke_steps_draw_their_figures_inside_the_smoke_folder():
    # The shipped demo spec: a smoke sweep must never overwrite the committed figures/.
    spec = load_spec(Path(__file__).parents[1] / "notebooks" / "sweeps" / "quickstart.yaml")
    triplet = next(j for j in plan(spec, smoke=True) if j.point["loss"] == "triplet")
    folder = sweep_folder(spec, smoke=True)
    assert folder.name == "quickstart-smoke" and triplet.folder.parent == folder
    steps = plan_steps(spec, triplet, smoke=True, folder=folder)
    steps += plan_steps(spec, None, smoke=True, folder=folder)
    assert [s.key.split("/")[-1] for s in steps] == ["tsne", "compare"]
    figures = {s.parameters["figures_dir"] for s in steps}
    assert figures == {"papermill_runs/quickstart-smoke/figures"}
    real = next(j for j in plan(spec) if j.point["loss"] == "triplet")
    real_steps = plan_steps(spec, real, smoke=False, folder=sweep_folder(spec))
    # The real demo draws into its own folder too (it never writes the committed figures/).
    real_figures = {s.parameters["figures_dir"] for s in real_steps}
    assert real_steps and real_figures == {"papermill_runs/quickstart/figures"}


@pytest.mark.parametrize(
    ("cores", "jobs", "threads"), [(2, 1, 2), (2, 2, 1), (2, 4, 1), (16, 3, 5)]
)
def test_threads_per_job_divides_the_cores(monkeypatch, cores, jobs, threads):
    monkeypatch.setattr(worker, "available_cores", lambda: cores)
    assert threads_per_job(jobs) == threads


# ---------------------------------------------------------------- manifest


def test_manifest_tolerates_a_torn_last_line_and_appends_after_it(tmp_path, caplog):
    path = tmp_path / "manifest.jsonl"
    append_record(path, {"run": "x=1", "status": "ok"})
    with open(path, "ab") as handle:
        handle.write(b'{"run": "x=2", "sta')  # a crash in the middle of a write
    with caplog.at_level(logging.WARNING):
        assert read_manifest(path) == [{"run": "x=1", "status": "ok"}]
    assert f"{path}:2: unreadable manifest line ignored" in caplog.text
    append_record(path, {"run": "x=2", "status": "failed"})
    assert [r["run"] for r in read_manifest(path)] == ["x=1", "x=2"]
    assert path.read_bytes().count(b"\n") == 3  # the torn line was closed, never rewritten


def test_manifest_skips_garbage_lines_and_missing_file(tmp_path, caplog):
    path = tmp_path / "manifest.jsonl"
    assert read_manifest(path) == []
    path.write_bytes(b'[1, 2]\n\xff\xfe\n{"status": "ok"}\n\n{"run": "a", "status": "ok"}\n')
    with caplog.at_level(logging.WARNING):
        assert read_manifest(path) == [{"run": "a", "status": "ok"}]
    assert caplog.text.count("unreadable manifest line") == 3


def test_is_finished_needs_an_ok_record_and_the_outputs(project):
    job = plan(load_spec(write_spec(project, BASE)))[0]
    job.folder.mkdir(parents=True)
    job.output.write_text("{}")
    ok = {job.key: {"run": job.key, "status": "ok"}}
    assert not is_finished(job, ok)  # metrics.json missing
    (job.folder / "metrics.json").write_text("{}")
    assert is_finished(job, ok)
    for status in ("failed", "interrupted"):
        assert not is_finished(job, {job.key: {"run": job.key, "status": status}})
    assert not is_finished(job, {})


def test_sweep_result_exit_codes_and_table(project):
    spec = load_spec(write_spec(project, BASE))
    done = [
        Outcome("x=1", "run", "ok", 1.25, None, Path()),
        Outcome("x=2", "run", "skipped", None, None, Path()),
    ]
    assert SweepResult(spec, project, done).exit_code == 0
    failed = [*done, Outcome("x=3", "run", "failed", 2.0, "ValueError: bad", Path())]
    result = SweepResult(spec, project, failed)
    assert result.exit_code == 1 and [o.key for o in result.failed] == ["x=3"]
    rows = [line.split(maxsplit=3) for line in result.table().splitlines()]
    assert rows[:4] == [
        ["run", "status", "seconds", "error"],
        ["x=1", "ok", "1.2"],
        ["x=2", "skipped"],
        ["x=3", "failed", "2.0", "ValueError: bad"],
    ]
    assert rows[-1] == ["toy:", "1", "ok,", "1 skipped, 1 failed"]
    stopped = SweepResult(
        spec, project, [Outcome("x=1", "run", "pending", None, None, Path())], signal.SIGINT
    )
    assert stopped.exit_code == 130 and [o.key for o in stopped.unfinished] == ["x=1"]
    assert SweepResult(spec, project, [], signal.SIGTERM).exit_code == 143


def test_a_second_sweep_on_the_same_folder_is_refused(project):
    spec = write_spec(project, BASE)
    with lock_manifest(project / "papermill_runs" / "toy" / "manifest.jsonl"):
        with pytest.raises(ManifestLockedError, match="another `python -m dmlkit.sweep`"):
            run_sweep(spec, progress=False)
    assert not (project / "papermill_runs" / "toy" / "x=1").exists()


def test_dry_run_lists_runs_and_steps_without_running(project):
    spec = write_spec(
        project,
        {
            **BASE,
            "then": [{"notebook": FIGURE, "where": {"x": 2}}, {"notebook": FIGURE, "per": "sweep"}],
        },
    )
    done = sweep_cli(str(spec), "--dry-run", "--only", "x=2", cwd=project)
    assert done.returncode == 0, done.stderr
    lines = [line.split() for line in done.stdout.splitlines()[2:]]
    assert lines == [
        ["run", "x=2"],
        ["then", "x=2/toy_figure"],
        ["then", "toy_figure", "(once,", "on", "the", "sweep)"],
    ]
    assert not (project / "papermill_runs").exists()


def test_a_huge_grid_is_refused_before_planning_with_its_size(project):
    grid = {"x": list(range(1001)), "label": [f"l{i}" for i in range(100)]}
    spec = write_spec(project, {**BASE, "grid": grid})
    with pytest.raises(SpecError, match=r"grid: 100,100 points \(1001 × 100\), more than"):
        load_spec(spec)
    done = sweep_cli(str(spec), "--dry-run", cwd=project)
    assert done.returncode == 2 and "100,100 points" in done.stderr
    assert load_spec(write_spec(project, {**BASE, "grid": {**grid, "x": list(range(1000))}}))


def test_a_dry_run_says_the_grid_size_before_planning(project, monkeypatch, capsys):
    spec = write_spec(project, {**BASE, "grid": {"x": list(range(300)), "label": ["a", "b"]}})

    def slow_plan(*args, **kwargs):
        raise KeyboardInterrupt  # a user giving up while a large grid is planned

    monkeypatch.setattr("dmlkit.sweep.__main__.plan", slow_plan)
    with pytest.raises(KeyboardInterrupt):
        sweep_main([str(spec), "--dry-run"])
    assert capsys.readouterr().out.startswith("toy: 600 grid points -> ")


def test_a_second_spec_with_the_same_name_is_refused_and_nothing_mixes(project):
    from dmlkit.results import load_runs

    first = write_spec(project, {**BASE, "grid": {"x": [1]}}, "first.yaml")
    folder = project / "papermill_runs" / "toy"
    assert run_sweep(first, progress=False).exit_code == 0
    assert json.loads((folder / "sweep.json").read_text()) == {
        "spec": "notebooks/sweeps/first.yaml",
        "notebook": "notebooks/toy_run.ipynb",
        "grid_keys": ["x"],
    }
    second = write_spec(project, {**BASE, "grid": {"label": ["b"]}}, "second.yaml")
    manifest = (folder / "manifest.jsonl").read_bytes()
    with pytest.raises(
        SpecError,
        match=r"second.yaml: the sweep folder .* another spec \(spec "
        r"notebooks/sweeps/first.yaml, grid_keys \['x'\]; this one: spec ",
    ):
        run_sweep(second, progress=False)
    done = sweep_cli(str(second), "--dry-run", cwd=project)
    assert done.returncode == 2 and "another name, or --out another folder" in done.stderr
    assert (folder / "manifest.jsonl").read_bytes() == manifest
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.jsonl", "sweep.json", "x=1"]
    assert load_runs(folder)["run"].tolist() == ["x=1"]
    # The same spec, with more values, is the same sweep; another --out is another folder.
    write_spec(project, {**BASE, "grid": {"x": [1, 2]}}, "first.yaml")
    assert sweep_cli(str(first), "--dry-run", cwd=project).returncode == 0
    assert sweep_cli(str(second), "--dry-run", "--out", "elsewhere", cwd=project).returncode == 0


def test_a_folder_from_before_sweep_json_is_judged_by_its_manifest(project):
    spec = write_spec(project, BASE)
    folder = project / "papermill_runs" / "toy"
    append_record(
        folder / "manifest.jsonl",
        {"run": "x=1", "kind": "run", "status": "ok", "notebook": "notebooks/toy_run.ipynb"},
    )
    assert sweep_cli(str(spec), "--dry-run", cwd=project).returncode == 0
    append_record(
        folder / "manifest.jsonl",
        {"run": "y=1", "kind": "run", "status": "ok", "notebook": "notebooks/other.ipynb"},
    )
    with pytest.raises(SpecError, match=r"another spec \(notebook notebooks/other.ipynb; "):
        run_sweep(spec, progress=False)
    assert not (folder / "sweep.json").exists()


@pytest.mark.parametrize(
    ("text", "visible", "slots"),
    [
        ("0,1,2,3", None, ["0", "1", "2", "3"]),
        ("0+1, 2+3", None, ["0,1", "2,3"]),
        ("all", "4,6", ["4", "6"]),
    ],
)
def test_gpu_slots_parse_lists_groups_and_all(monkeypatch, text, visible, slots):
    if visible is not None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert worker.gpu_slots(text) == slots


@pytest.mark.parametrize("text", ["0,0", "0,,1", "0+1,1", "all"])
def test_bad_gpu_lists_are_refused(monkeypatch, text):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # `all` on a machine with no GPU
    with pytest.raises(ValueError, match="--gpus"):
        worker.gpu_slots(text)


def test_gpus_sets_jobs_and_refuses_more_jobs_than_slots(project, capsys):
    spec = write_spec(project, BASE)
    assert sweep_main([str(spec), "--dry-run", "--gpus", "0,1+2"]) == 0
    assert capsys.readouterr().out.splitlines()[1].endswith("--jobs 2, GPUs 0 | 1,2")
    with pytest.raises(SystemExit) as stop:
        sweep_main([str(spec), "--dry-run", "--gpus", "0,1", "--jobs", "3"])
    assert stop.value.code == 2 and "2 GPU slot(s)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="2 GPU slot"):
        run_sweep(spec, jobs=3, gpus=["0", "1"], progress=False)


def test_each_concurrent_run_sees_only_its_own_gpus(project):
    # On the CPU: what the kernel sees in CUDA_VISIBLE_DEVICES, and what the manifest says.
    spec = write_spec(project, {**BASE, "grid": {"x": [1, 2, 3]}})
    for run in ("x=1", "x=2"):
        hold(project, run)
    folder = project / "papermill_runs" / "toy"
    thread = threading.Thread(
        target=run_sweep, args=(spec,), kwargs={"gpus": ["0", "1,2"], "progress": False}
    )
    thread.start()
    wait_for_kernel(project, "x=1")
    wait_for_kernel(project, "x=2")
    for run in ("x=1", "x=2"):
        (folder / run / "hold").unlink()
    thread.join(timeout=120)
    seen = {
        run: json.loads((folder / run / "metrics.json").read_text())["environment"]["gpus"]
        for run in ("x=1", "x=2", "x=3")
    }
    assert sorted([seen["x=1"], seen["x=2"]]) == ["0", "1,2"]  # both slots, at once
    assert seen["x=3"] in ("0", "1,2")
    assert {r["run"]: r["gpus"] for r in read_manifest(folder)} == seen


# ---------------------------------------------------------------- executions


def test_failure_is_isolated_recorded_and_retried_on_resume(project):
    spec = write_spec(
        project,
        {
            **BASE,
            "grid": {"x": [2, -1, 1]},  # x=2 first: its step then overlaps x=1
            "then": [
                {"notebook": FIGURE, "where": {"x": [2]}, "parameters": {"tag": "fig"}},
                {"notebook": FIGURE, "per": "sweep", "name": "summary"},
            ],
        },
    )
    folder = project / "papermill_runs" / "toy"
    result = run_sweep(spec, jobs=2, progress=False)
    assert result.exit_code == 1
    assert {o.key: o.status for o in result.outcomes} == {
        "x=1": "ok",
        "x=-1": "failed",
        "x=2": "ok",
        "x=2/toy_figure": "ok",
        "summary": "ok",
    }
    records = {r["run"]: r for r in read_manifest(folder)}
    assert records["x=-1"]["error"] == "ValueError: x must be non-negative, got -1"
    assert isinstance(records["x=-1"]["error_cell"], int)
    assert records["x=1"]["params"] == {"x": 1, "out_dir": "papermill_runs/toy/x=1"}
    for key in ("seconds", "started", "ended"):
        assert records["x=1"][key]
    error_notebook = nbformat.read(folder / "x=-1" / "notebook.ipynb", as_version=4)
    assert error_notebook.metadata.papermill.exception is True
    assert not (folder / "x=-1" / "metrics.json").exists()
    metrics = json.loads((folder / "x=2" / "metrics.json").read_text())
    assert metrics["environment"] == {
        "threads": str(threads_per_job(2)),
        "cwd": str(project.resolve()),
        "gpus": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
    assert (folder / "x=2" / "fig.txt").read_text() == "smoke=False\n"
    assert not (folder / "x=1" / "fig.txt").exists()  # filtered out by `where`
    assert (folder / "figure.txt").read_text().split() == ["smoke=False", "x=1", "x=2"]

    again = run_sweep(spec, jobs=2, progress=False)
    assert again.exit_code == 1
    assert [(o.key, o.status) for o in again.outcomes] == [
        ("x=2", "skipped"),
        ("x=2/toy_figure", "skipped"),
        ("x=-1", "failed"),
        ("x=1", "skipped"),
        ("summary", "ok"),
    ]
    assert statuses(folder)[5:] == [("x=-1", "failed"), ("summary", "ok")]


def test_cli_only_and_parallel_jobs(project):
    spec = write_spec(project, {**BASE, "grid": {"x": [1, 2, 3]}})
    out = project / "elsewhere"
    done = sweep_cli(
        str(spec), "--jobs", "2", "--only", "x=1", "x=3", "--out", str(out), "--smoke", cwd=project
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "x=1  ok" in done.stdout and "x=3  ok" in done.stdout and "x=2" not in done.stdout
    first, second = read_manifest(out / "toy-smoke")
    assert {first["run"], second["run"]} == {"x=1", "x=3"}
    assert second["started"] < first["ended"]  # both ran at once
    assert json.loads((out / "toy-smoke" / "x=3" / "metrics.json").read_text())["config"]["smoke"]


def test_overrides_reach_the_notebook_and_the_manifest_and_show_in_dry_run(project, capsys):
    overrides = [{"where": {"x": 2}, "set": {"label": "b", "flag": True}}]
    spec = write_spec(project, {**BASE, "fixed": {"label": "a"}, "overrides": overrides})
    assert sweep_main([str(spec), "--dry-run"]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert lines == [["run", "x=1"], ["run", "x=2", "set", "{label:", "b,", "flag:", "true}"]]

    assert run_sweep(spec, jobs=2, progress=False).exit_code == 0
    folder = project / "papermill_runs" / "toy"
    configs = {
        run: json.loads((folder / run / "metrics.json").read_text())["config"]
        for run in ("x=1", "x=2")
    }
    assert (configs["x=1"]["label"], configs["x=1"]["flag"]) == ("a", False)
    assert (configs["x=2"]["label"], configs["x=2"]["flag"]) == ("b", True)
    params = {r["run"]: r["params"] for r in read_manifest(folder)}
    assert params["x=2"] == {
        "label": "b",
        "x": 2,
        "flag": True,
        "out_dir": "papermill_runs/toy/x=2",
    }
    assert params["x=1"] == {"label": "a", "x": 1, "out_dir": "papermill_runs/toy/x=1"}


def pretend_ran(folder: Path, key: str, status: str = "ok", kind: str = "run") -> None:
    """Record ``key`` in the manifest (and write its outputs if ok) as an earlier run would."""
    append_record(folder / "manifest.jsonl", {"run": key, "kind": kind, "status": status})
    output = folder / (f"{key}/notebook.ipynb" if kind == "run" else f"{key}.ipynb")
    output.parent.mkdir(parents=True, exist_ok=True)
    if status == "ok":
        output.write_text("{}")
        if kind == "run":
            (output.parent / "metrics.json").write_text("{}")


def test_figures_reruns_the_steps_of_finished_runs_and_starts_no_run(project, capsys):
    steps = [
        {"notebook": FIGURE, "where": {"x": [1, -1, 2]}, "parameters": {"tag": "fig"}},
        {"notebook": FIGURE, "per": "sweep", "name": "summary"},
    ]
    spec = write_spec(project, {**BASE, "grid": {"x": [1, -1, 2, 3]}, "then": steps})
    folder = project / "papermill_runs" / "toy"
    pretend_ran(folder, "x=1")
    pretend_ran(folder, "x=1/toy_figure", kind="then-run")  # done: a resume would skip it
    pretend_ran(folder, "x=-1", status="failed")
    pretend_ran(folder, "x=3")  # finished, but the step's `where` leaves it out
    pretend_ran(folder, "summary", kind="then-sweep")
    assert sweep_main([str(spec), "--figures", "--dry-run"]) == 0
    lines = [line.split()[:2] for line in capsys.readouterr().out.splitlines()[2:]]
    assert lines == [
        ["finished", "x=1"],
        ["then", "x=1/toy_figure"],
        ["skip", "x=-1"],
        ["skip", "x=2"],
        ["finished", "x=3"],
        ["then", "summary"],
    ]

    result = run_sweep(spec, jobs=2, progress=False, figures_only=True)
    assert result.exit_code == 0
    assert [(o.key, o.status, o.error) for o in result.outcomes] == [
        ("x=1/toy_figure", "ok", None),
        ("x=-1", "skipped", "not finished (last attempt failed)"),
        ("x=2", "skipped", "not finished (never run)"),
        ("summary", "ok", None),
    ]
    assert statuses(folder)[5:] == [("x=1/toy_figure", "ok"), ("summary", "ok")]
    assert (folder / "x=1" / "fig.txt").read_text() == "smoke=False\n"
    assert (folder / "figure.txt").read_text().split() == ["smoke=False", "x=1", "x=3"]
    assert not (folder / "x=2").exists() and not (folder / "x=-1" / "notebook.ipynb").exists()


def test_figures_cli_exit_status_respects_only_and_needs_a_finished_run(project, capsys):
    failing = {"notebook": FIGURE, "parameters": {"tag": "no/such/folder"}}
    spec = write_spec(project, {**BASE, "then": [failing]})
    folder = project / "papermill_runs" / "toy"
    assert sweep_main([str(spec), "--figures"]) == 1
    assert "none of the 2 selected run(s) has finished" in capsys.readouterr().err
    assert not folder.exists()  # nothing created
    pretend_ran(folder, "x=1")
    with pytest.raises(NoFinishedRunError, match="run the sweep first"):
        run_sweep(spec, only=["x=2"], figures_only=True, progress=False)
    pretend_ran(folder, "x=2")
    assert sweep_main([str(spec), "--figures", "--only", "x=2", "--jobs", "2"]) == 1
    out = capsys.readouterr().out
    assert "x=2/toy_figure  failed" in out and "FileNotFoundError" in out
    assert "x=1" not in out
    assert statuses(folder)[2:] == [("x=2/toy_figure", "failed")]


def hold(project: Path, run: str, name: str = "toy") -> Path:
    """Make the toy notebook of ``run`` wait until the returned file is deleted."""
    path = project / "papermill_runs" / name / run / "hold"
    path.parent.mkdir(parents=True)
    path.touch()
    return path


def wait_for_kernel(project: Path, run: str, proc: subprocess.Popen | None = None) -> int:
    """The pid of ``run``'s kernel, once the toy notebook has written it."""
    pid_file = project / "papermill_runs" / "toy" / run / "kernel.pid"
    deadline = time.monotonic() + 60
    while not pid_file.exists():
        assert proc is None or proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return int(pid_file.read_text())


def test_crash_and_missing_metrics_fail_without_stopping_the_sweep(project):
    spec = write_spec(project, {**BASE, "grid": {"mode": ["crash", "no-metrics"]}})
    result = run_sweep(spec, jobs=2, progress=False)
    errors = {o.key: (o.status, (o.error or "").split(":")[0]) for o in result.outcomes}
    assert errors == {
        "mode=crash": ("failed", "DeadKernelError"),
        "mode=no-metrics": ("failed", "MissingOutput"),
    }
    assert result.exit_code == 1


def test_a_hanging_run_is_stopped_at_the_timeout(project):
    spec = write_spec(project, {**BASE, "grid": {"x": [1]}, "timeout_s": 3})
    hold(project, "x=1")
    (outcome,) = run_sweep(spec, progress=False).outcomes
    assert (outcome.status, outcome.error) == ("failed", "TimeoutError: exceeded 3 s")
    pid_file = project / "papermill_runs" / "toy" / "x=1" / "kernel.pid"
    assert not pid_file.exists() or process_gone(int(pid_file.read_text()))


def test_sigint_stops_the_kernel_records_interrupted_and_resumes_the_rest(project):
    spec = write_spec(project, {**BASE, "grid": {"x": [1, 2, 3]}})
    gate = hold(project, "x=2")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dmlkit.sweep", str(spec)],
        cwd=project,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    kernel = wait_for_kernel(project, "x=2", proc)
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Unfinished (2): x=2, x=3" in stdout
    assert process_gone(kernel)
    folder = project / "papermill_runs" / "toy"
    assert statuses(folder) == [("x=1", "ok"), ("x=2", "interrupted")]

    gate.unlink()
    result = run_sweep(spec, progress=False)  # the same spec, run again
    assert result.exit_code == 0
    assert [(o.key, o.status) for o in result.outcomes] == [
        ("x=1", "skipped"),
        ("x=2", "ok"),
        ("x=3", "ok"),
    ]
    assert statuses(folder)[2:] == [("x=2", "ok"), ("x=3", "ok")]


def test_sigterm_is_handled_like_sigint_by_the_api(project):
    spec = write_spec(project, {**BASE, "grid": {"x": [2]}})
    hold(project, "x=2")
    kernels: list[int] = []

    def terminate_once_running() -> None:
        kernels.append(wait_for_kernel(project, "x=2"))
        os.kill(os.getpid(), signal.SIGTERM)  # run_sweep's handler takes it, not pytest

    sender = threading.Thread(target=terminate_once_running)
    sender.start()
    result = run_sweep(spec, progress=False)
    sender.join()
    assert result.exit_code == 128 + signal.SIGTERM
    assert [(o.key, o.status, o.error) for o in result.outcomes] == [
        ("x=2", "interrupted", "Interrupted: stopped by SIGTERM")
    ]
    assert process_gone(kernels[0])
    assert statuses(project / "papermill_runs" / "toy") == [("x=2", "interrupted")]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored


@pytest.mark.slow
def test_eight_runs_with_two_jobs_keep_a_consistent_manifest(project):
    spec = write_spec(
        project,
        {
            **BASE,
            "grid": {"x": [0, 1, 2, 3], "flag": [False, True]},
            "then": [{"notebook": FIGURE, "per": "sweep"}],
        },
    )
    result = run_sweep(spec, jobs=2, smoke=True, progress=False)
    assert result.exit_code == 0
    folder = project / "papermill_runs" / "toy-smoke"
    assert not (project / "papermill_runs" / "toy").exists()  # the real sweep's folder
    records = read_manifest(folder)
    runs = [r["run"] for r in records if r["kind"] == "run"]
    assert sorted(runs) == sorted(j.key for j in plan(load_spec(spec))) and len(set(runs)) == 8
    assert all(r["status"] == "ok" and r["params"]["smoke"] is True for r in records)
    assert all(r["started"] <= r["ended"] for r in records)
    assert len(folder.joinpath("manifest.jsonl").read_text().splitlines()) == 9
    lines = (folder / "figure.txt").read_text().split()  # the step saw all 8 runs
    assert lines[0] == "smoke=True" and len(lines) == 9
    again = run_sweep(spec, jobs=2, smoke=True, progress=False).outcomes
    assert all(o.status == "skipped" for o in again)


@pytest.mark.parametrize("jobs", ["0", "-2", "two"])
def test_cli_rejects_a_bad_jobs_count_even_in_a_dry_run(project, capsys, jobs):
    spec = write_spec(project, BASE)
    with pytest.raises(SystemExit) as exit_info:
        sweep_main([str(spec), "--jobs", jobs, "--dry-run"])
    assert exit_info.value.code == 2
    assert f"--jobs: must be a whole number >= 1, got '{jobs}'" in capsys.readouterr().err
    assert not (project / "papermill_runs").exists()


SHIPPED_SPECS = sorted((Path(__file__).parents[1] / "notebooks" / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED_SPECS, ids=lambda p: p.name)
def test_every_shipped_spec_is_valid_and_plans_its_whole_grid(path):
    spec = load_spec(path)  # every parameter checked against its notebook
    jobs = plan(spec)
    assert spec.name == path.stem and len(jobs) == spec.num_points > 0
    assert len({job.key for job in jobs}) == len(jobs)
    assert all(job.folder.parent.name == spec.name for job in jobs)


def test_a_dry_run_piped_into_head_ends_quietly(project):
    # 5,000 lines overflow the pipe, so the listing is still writing when `head` exits.
    spec = write_spec(project, {**BASE, "grid": {"x": list(range(5000))}})
    done = subprocess.run(
        f"set -o pipefail; {sys.executable} -m dmlkit.sweep {spec} --dry-run | head -n 2",
        shell=True,
        executable="/bin/bash",
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("toy: 5000 grid points")
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "error",
    ["Kernel died before replying to kernel_info", "Kernel didn't respond in 60 seconds"],
)
def test_a_kernel_that_never_answers_before_any_cell_is_started_once_more(monkeypatch, error):
    # Kernels started at the same moment can die or stay silent at start-up (each seen in
    # clean-clone runs); such a run executed nothing, so a second start decides its outcome.
    import papermill

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) <= dying:
            raise RuntimeError(error)

    monkeypatch.setattr(papermill, "execute_notebook", flaky)
    job = {"notebook": "n.ipynb", "output": "o.ipynb", "parameters": {}, "kernel": "k", "cwd": "."}
    for dying, expected in ((1, "ok"), (2, "failed"), (0, "ok")):
        calls = []
        outcome = worker.execute(job)
        assert outcome["status"] == expected
        assert len(calls) == min(dying + 1, 2)
    assert outcome["error"] is None


def test_a_requeue_that_slurm_kills_midway_is_no_outcome_but_other_commands_fail(monkeypatch):
    # Slurm ends a job it requeues with SIGTERM, which can reach submitit's own `scontrol
    # requeue` first (seen once in four clean-clone runs): the job is requeued all the same,
    # so the worker leaves like submitit does instead of recording a failed run.
    import papermill

    def killed(command):
        def run(*args, **kwargs):
            raise subprocess.CalledProcessError(-signal.SIGTERM, command)

        return run

    job = {"notebook": "n.ipynb", "output": "o.ipynb", "parameters": {}, "kernel": "k", "cwd": "."}
    monkeypatch.setattr(papermill, "execute_notebook", killed(["scontrol", "requeue", "8"]))
    with pytest.raises(SystemExit, match="requeued by Slurm"):
        worker.execute(job)
    monkeypatch.setattr(papermill, "execute_notebook", killed(["scontrol", "show", "job"]))
    assert worker.execute(job)["status"] == "failed"


def test_an_executed_notebook_is_trusted_so_its_javascript_output_runs_when_opened(
    tmp_path, monkeypatch
):
    # explore.ipynb's Bokeh view is JavaScript: Jupyter runs it only in a trusted notebook.
    import nbformat
    from nbformat.sign import NotebookNotary

    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "jupyter"))  # the signature store
    source = tmp_path / "n.ipynb"
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1 + 1")])
    notebook.metadata["kernelspec"] = {"name": "dmlkit", "display_name": "Python (dmlkit)"}
    nbformat.write(notebook, source)
    job = {"notebook": str(source), "output": str(tmp_path / "o.ipynb"), "parameters": {},
           "kernel": "dmlkit", "cwd": str(tmp_path)}  # fmt: skip
    assert worker.execute(job)["status"] == "ok"
    notary = NotebookNotary()
    assert notary.check_signature(nbformat.read(job["output"], as_version=4))
    assert not notary.check_signature(nbformat.read(source, as_version=4))


def test_a_signature_store_that_cannot_be_written_leaves_the_run_ok(monkeypatch, caplog):
    import sqlite3

    import papermill
    from nbformat.sign import NotebookNotary

    def locked(self, notebook):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(papermill, "execute_notebook", lambda *args, **kwargs: None)
    monkeypatch.setattr(NotebookNotary, "sign", locked)
    monkeypatch.setattr("nbformat.read", lambda path, as_version: {})
    job = {"notebook": "n.ipynb", "output": "o.ipynb", "parameters": {}, "kernel": "k", "cwd": "."}
    with caplog.at_level("WARNING"):
        assert worker.execute(job) == {"status": "ok", "error": None, "error_cell": None}
    assert "could not mark o.ipynb trusted: database is locked" in caplog.text

"""Reliability, sweeps and results: spec errors, a failing notebook, real notebook runs under the
sweep runner.

Every case is listed in docs/reliability.md; the tiny real-JPEG runs and helpers are in
``tests/reliability_fixtures.py``.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dmlkit.data import get_dataset
from dmlkit.train import load_checkpoint
from tests.reliability_fixtures import (
    ROOT,
    assert_same_run,
)

# ---------------------------------------------------------------- configuration errors


@pytest.mark.slow  # a kernel start: ~8 s
def test_papermill_run_with_an_unknown_loss_fails_at_the_configuration_cell(tmp_path):
    import nbformat
    import papermill

    out_dir = tmp_path / "run"
    with pytest.raises(papermill.PapermillExecutionError) as info:
        papermill.execute_notebook(
            str(ROOT / "notebooks" / "train_eval.ipynb"),
            str(tmp_path / "executed.ipynb"),
            parameters={"loss": "arcface", "out_dir": str(out_dir), "smoke": True},
            kernel_name="dmlkit",
            cwd=str(ROOT),
            progress_bar=False,
        )
    assert info.value.ename == "ValueError"
    assert "loss: unknown value 'arcface'" in info.value.evalue
    executed = nbformat.read(tmp_path / "executed.ipynb", as_version=4)
    failed = [c for c in executed.cells if any(o.get("ename") for o in c.get("outputs", []))]
    assert len(failed) == 1 and "notebook.train_config(" in failed[0].source
    assert not out_dir.exists()


# ---------------------------------------------------------------- sweep specs: no key twice


SPEC_HEAD = "name: dup\nnotebook: notebooks/train_eval.ipynb\n"


DUPLICATE_KEYS = {
    "top level": (SPEC_HEAD + "name: other\ngrid: {seed: [0]}\n", "'name'", 1, 3),
    "grid": (SPEC_HEAD + "grid:\n  seed: [0]\n  loss: [triplet]\n  seed: [1]\n", "'seed'", 4, 6),
    "nested, flow style": (
        SPEC_HEAD + "fixed: {loss_params: {margin: 0.1, margin: 0.2}}\ngrid: {seed: [0]}\n",
        "'margin'",
        3,
        3,
    ),
    "an override's set": (
        SPEC_HEAD + "grid: {seed: [0]}\noverrides:\n  - where: {seed: 0}\n    set:\n"
        "      lr: 0.1\n      lr: 0.2\n",
        "'lr'",
        7,
        8,
    ),
}


@pytest.mark.parametrize(
    ("text", "key", "first", "second"), DUPLICATE_KEYS.values(), ids=list(DUPLICATE_KEYS)
)
def test_a_key_given_twice_in_a_sweep_spec_is_refused_naming_both_lines(
    tmp_path, capsys, text, key, first, second
):
    from dmlkit.sweep import SpecError, load_spec
    from dmlkit.sweep.__main__ import main as sweep_main

    spec = tmp_path / "dup.yaml"
    spec.write_text(text)
    expected = f"{spec}: key {key} is given twice, on line {first} and line {second} (YAML would"
    with pytest.raises(SpecError, match=re.escape(expected)):
        load_spec(spec)
    assert sweep_main([str(spec), "--out", str(tmp_path / "runs")]) == 2
    assert expected in capsys.readouterr().err and not (tmp_path / "runs").exists()


def test_the_spec_reader_allows_merge_keys_and_names_one_key_spelled_two_ways():
    from dmlkit.sweep.spec import safe_yaml

    merged = safe_yaml("base: &b {epochs: 3, seed: 0}\nfixed:\n  <<: *b\n  seed: 1\n")
    assert merged["fixed"] == {"epochs": 3, "seed": 1}  # an override of a merged key is meant
    with pytest.raises(Exception, match="keys '1' \\(line 1\\) and 'true' \\(line 2\\) are the"):
        safe_yaml("1: a\ntrue: b\n")  # equal keys once read (True == 1)


def test_sweep_out_that_is_a_file_is_a_usage_error(tmp_path, capsys):
    from dmlkit.sweep.__main__ import main as sweep_main

    spec = tmp_path / "s.yaml"
    spec.write_text(SPEC_HEAD + "grid: {seed: [0]}\n")
    (tmp_path / "taken").write_text("a file")
    for out in (tmp_path / "taken", tmp_path / "taken" / "below"):
        with pytest.raises(SystemExit) as stopped:
            sweep_main([str(spec), "--out", str(out), "--dry-run"])
        assert stopped.value.code == 2
        assert f"{tmp_path / 'taken'} is a file, not a folder" in capsys.readouterr().err


# ---------------------------------------------------------------- further probes (issue 14)


def test_results_name_a_metric_that_is_not_a_number_and_a_source_that_is_not_a_path(tmp_path):
    from dmlkit.results import load_runs

    run = tmp_path / "sweep" / "run"
    run.mkdir(parents=True)
    metrics = {"recall@1": "n/a", "map@r": True, "nmi": "0.5", "pi_ratio": math.nan}
    record = {"config": {"loss": "x"}, "metrics": metrics}
    (run / "metrics.json").write_text(json.dumps(record))
    with pytest.warns(UserWarning) as warned:
        table = load_runs(tmp_path / "sweep")
    assert math.isnan(table["recall@1"][0]) and math.isnan(table["map@r"][0])  # true was 1.0
    assert table["nmi"][0] == 0.5
    messages = " ".join(str(w.message) for w in warned)
    assert "metric 'recall@1' is 'n/a', not a number" in messages and "'map@r' is True" in messages
    assert len(warned) == 2  # a number written as text, or NaN, is read without a warning
    for source in (5, [tmp_path, 5]):
        with pytest.raises(ValueError, match="must be a path or a glob pattern|a path, a glob"):
            load_runs(source)


# ---------------------------------------------------------------- load (slow)


@pytest.fixture
def notebook_project(tmp_path, tmp_path_factory, monkeypatch) -> Path:
    """A repository-like folder with train_eval.ipynb, and glyphs-mini rendered in a private
    cache that the sweep's kernels use (``DMLKIT_CACHE`` is inherited)."""
    from tests.fixtures_datasets import glyph_cache_dir

    cache = glyph_cache_dir(tmp_path_factory)
    for split in ("train", "test"):
        get_dataset("glyphs-mini", split, cache_dir=cache)
    monkeypatch.setenv("DMLKIT_CACHE", str(cache))
    (tmp_path / "notebooks" / "sweeps").mkdir(parents=True)
    shutil.copy(ROOT / "notebooks" / "train_eval.ipynb", tmp_path / "notebooks")
    return tmp_path


def write_spec(project: Path, name: str, fixed: dict, grid: dict) -> Path:
    import yaml

    spec = {"name": name, "notebook": "notebooks/train_eval.ipynb", "fixed": fixed, "grid": grid}
    path = project / "notebooks" / "sweeps" / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.mark.slow  # 8 notebook executions, two at a time: ~2 min on 2 cores
def test_eight_real_notebook_runs_with_two_jobs_keep_a_consistent_manifest(notebook_project):
    from dmlkit.sweep import load_spec, plan, read_manifest, run_sweep

    spec = write_spec(
        notebook_project,
        "load",
        {"dataset": "glyphs-mini", "progress": False},
        {"loss": ["contrastive", "triplet", "ms", "proxy_anchor"], "density": [False, True]},
    )
    result = run_sweep(spec, jobs=2, smoke=True, progress=False)
    assert result.exit_code == 0, result.table()
    folder = notebook_project / "papermill_runs" / "load-smoke"
    lines = (folder / "manifest.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line whole JSON
    assert records == read_manifest(folder) and len(records) == 8
    assert sorted(r["run"] for r in records) == sorted(job.key for job in plan(load_spec(spec)))
    assert all(r["status"] == "ok" and r["params"]["smoke"] is True for r in records)
    for record in records:
        saved = json.loads((folder / record["run"] / "metrics.json").read_text())
        assert saved["config"]["loss"] == record["params"]["loss"]
        assert saved["config"]["density"] == record["params"]["density"]
        assert 0 <= saved["metrics"]["recall@1"] <= 1
        assert (folder / record["run"] / "notebook.ipynb").is_file()


@pytest.mark.slow  # three notebook executions: ~1.5 min on 2 cores
def test_sigint_during_a_real_training_notebook_keeps_the_checkpoint_and_resumes(
    notebook_project,
):
    import nbformat

    from dmlkit.sweep import read_manifest, run_sweep

    fixed = {
        "dataset": "glyphs-mini",
        "epochs": 4,
        "num_batches": 6,
        "p": 16,
        "eval_every": 0,
        "resume": True,
        "progress": False,
    }
    spec = write_spec(notebook_project, "stopped", fixed, {"seed": [0]})
    run = notebook_project / "papermill_runs" / "stopped" / "seed=0"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dmlkit.sweep", str(spec), "--jobs", "2"],
        cwd=notebook_project,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not (run / "checkpoint.pt").exists():  # epoch 1 is done: stop it in epoch 2
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    (record,) = read_manifest(run.parent)
    assert (record["status"], record["error"]) == ("interrupted", "Interrupted: stopped by SIGINT")
    kept = load_checkpoint(run / "checkpoint.pt")["epoch"]
    assert 1 <= kept < 4 and not (run / "metrics.json").exists()

    assert run_sweep(spec, jobs=2, progress=False).exit_code == 0  # the same command again
    executed = nbformat.read(run / "notebook.ipynb", as_version=4)
    text = "".join(o.get("text", "") for c in executed.cells for o in c.get("outputs", []))
    assert f"resuming from {Path('papermill_runs/stopped/seed=0/checkpoint.pt')}" in text
    assert f"after epoch {kept}" in text
    assert [r["status"] for r in read_manifest(run.parent)] == ["interrupted", "ok"]
    reference = write_spec(notebook_project, "reference", fixed, {"seed": [0]})
    assert run_sweep(reference, jobs=2, progress=False).exit_code == 0
    uninterrupted = notebook_project / "papermill_runs" / "reference" / "seed=0"
    assert_same_run(run, json.loads((uninterrupted / "metrics.json").read_text()))

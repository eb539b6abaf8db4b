"""The notebook collection: structure, parameters that mirror TrainConfig, and smoke runs.

Every notebook runs headlessly through papermill with ``smoke=True`` (kernel ``dmlkit``),
in the order a user would: train → t-SNE → compare → ablation, and the 2-D toys.
"""

import ast
import dataclasses
import json
import re
from pathlib import Path

import nbformat
import papermill as pm
import pytest

from dmlkit.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# Notebook defaults that differ from TrainConfig on purpose: an interactive run writes its
# folder so that tsne.ipynb can read it (TrainConfig's default writes nothing).
NOTEBOOK_ONLY_DEFAULTS = {"out_dir": "papermill_runs/interactive/train_eval"}


def test_the_collection_is_complete():
    names = {path.name for path in NOTEBOOKS}
    assert names == {
        "train_eval.ipynb",
        "tsne.ipynb",
        "compare.ipynb",
        "density_ablation.ipynb",
        "daal_study.ipynb",
        "losses_2d.ipynb",
    }


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_structure(path):
    notebook = nbformat.read(path, as_version=4)
    cells = notebook.cells
    assert notebook.metadata["kernelspec"]["name"] == "dmlkit"
    assert cells[0].cell_type == "markdown" and cells[0].source.startswith("# ")
    assert "Regenerate" in cells[0].source, "the title cell names the command that regenerates it"
    # ... and, for a first look, how long it takes here and how to run it headlessly.
    assert "**Time here**" in cells[0].source and re.search(r"\d+ s\b", cells[0].source)
    assert f"papermill notebooks/{path.name}" in cells[0].source
    code = [cell for cell in cells if cell.cell_type == "code"]
    assert not any(cell.outputs or cell.execution_count for cell in code), "strip outputs"
    tagged = [cell for cell in code if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1
    for cell in code:
        assert not re.search(r"^\s*(def|class)\s", cell.source, re.M), "no def/class in cells"
    parameters = pm.inspect_notebook(str(path))
    assert "smoke" in parameters and parameters["smoke"]["default"] == "False"
    lines = [line for line in tagged[0].source.splitlines() if line.strip()]
    assert len(parameters) == len(lines), "every parameter line must parse as name: type = value"
    for name, info in parameters.items():
        assert info["help"], f"{path.name}: parameter {name} has no help comment"


def test_train_eval_parameters_mirror_train_config():
    parameters = pm.inspect_notebook(str(ROOT / "notebooks" / "train_eval.ipynb"))
    defaults = TrainConfig()
    for item in dataclasses.fields(TrainConfig):
        assert item.name in parameters, f"train_eval.ipynb lacks TrainConfig.{item.name}"
        value = ast.literal_eval(parameters[item.name]["default"])
        expected = NOTEBOOK_ONLY_DEFAULTS.get(item.name, getattr(defaults, item.name))
        assert value == expected, f"{item.name}: notebook {value!r} != TrainConfig {expected!r}"
    assert set(parameters) - {f.name for f in dataclasses.fields(TrainConfig)} == {"smoke"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_a_parameter_named_like_a_train_config_field_has_its_default(path):
    # A name shared with TrainConfig must mean the same thing, with the same default.
    defaults = TrainConfig()
    for name, info in pm.inspect_notebook(str(path)).items():
        if name in TrainConfig.__dataclass_fields__:
            value = ast.literal_eval(info["default"])
            expected = NOTEBOOK_ONLY_DEFAULTS.get(name, getattr(defaults, name))
            assert value == expected, f"{path.name}: {name} = {value!r}, TrainConfig {expected!r}"


def _execute(name: str, output: Path, **parameters) -> nbformat.NotebookNode:
    pm.execute_notebook(
        str(ROOT / "notebooks" / name),
        str(output),
        parameters=parameters,
        kernel_name="dmlkit",
        cwd=str(ROOT),
        progress_bar=False,
    )
    return nbformat.read(output, as_version=4)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One smoke run of train_eval.ipynb (triplet + density) in a sweep-like folder."""
    sweep = tmp_path_factory.mktemp("runs") / "smoke_sweep"
    run_dir = sweep / "loss=triplet,density=true,seed=0"
    sweep.mkdir()
    _execute(
        "train_eval.ipynb",
        sweep / "train_eval.ipynb",
        smoke=True,
        loss="triplet",
        density=True,
        out_dir=str(run_dir),
        progress=False,
    )
    return run_dir


def test_train_eval_smoke_writes_the_run_folder(trained_run):
    data = json.loads((trained_run / "metrics.json").read_text())
    assert data["config"]["loss"] == "triplet" and data["config"]["density"] is True
    assert data["config"]["epochs"] == 1 and data["config"]["num_batches"] == 2
    assert 0.0 <= data["metrics"]["recall@1"] <= 1.0
    assert {"loss/R", "loss/tau", "loss/mean_r"} <= set(data["history"][0])
    assert (trained_run / "embeddings.npz").is_file()


def test_tsne_smoke_writes_reproducible_figures(trained_run, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    for figures in (first, second):
        _execute(
            "tsne.ipynb",
            tmp_path / f"tsne_{figures.name}.ipynb",
            smoke=True,
            run_dir=str(trained_run),
            figures_dir=str(figures),
        )
    stem = "smoke_sweep_triplet_density_seed-0"
    expected = {
        f"{stem}_tsne{part}.{ext}"
        for part in ("", "_thumbnails", "_families")
        for ext in ("png", "pdf")
    }
    assert {p.name for p in first.iterdir()} == expected
    for name in expected:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_compare_and_ablation_smoke(trained_run, tmp_path):
    sweep = trained_run.parent
    _execute(
        "compare.ipynb",
        tmp_path / "c.ipynb",
        smoke=True,
        sweep_dir=str(sweep),
        figures_dir=str(tmp_path),
    )
    table = (tmp_path / "smoke_sweep_table.md").read_text()
    assert "| triplet |" in table and "recall@1" in table and "recall@8" in table  # every K
    assert not (tmp_path / "smoke_sweep_papers.md").exists()  # glyphs: no paper numbers
    with pytest.raises(pm.PapermillExecutionError, match="no readable metrics.json"):
        _execute(
            "compare.ipynb",
            tmp_path / "typo.ipynb",
            sweep_dir=str(sweep.parent / "typo"),
            figures_dir=str(tmp_path / "typo"),
        )
    assert not (tmp_path / "typo").exists()  # nothing written
    assert (tmp_path / "smoke_sweep_density_gain.png").is_file()
    _execute(
        "density_ablation.ipynb",
        tmp_path / "d.ipynb",
        smoke=True,
        sweep_dir=str(sweep),
        figures_dir=str(tmp_path),
    )
    assert (tmp_path / "smoke_sweep_lambda.png").is_file()
    assert (tmp_path / "smoke_sweep_lambda_table.md").is_file()
    # The rule names the λ it chose (the smoke sweep has one: λ of the default config).
    gain = " ".join((tmp_path / "smoke_sweep_lambda_gain.md").read_text().split())  # unwrapped
    assert "Chosen λ (the highest mean recall@1 of the ema target" in gain


def _fake_run(folder, *, eval_split, seed, loss, label="", density=False, quality=0.0):
    """A metrics.json as fit writes it, with made-up metrics (the notebook only reads them)."""
    folder.mkdir(parents=True)
    config = {"dataset": "glyphs-mini", "loss": loss, "label": label, "density": density,
              "seed": seed, "eval_split": eval_split}  # fmt: skip
    metrics = {name: 0.3 + quality + 0.01 * seed for name in (
        "recall@1", "map@r", "subcluster_preservation", "subcluster_purity@5", "subcluster_ari",
        "subcluster_nmi")}  # fmt: skip
    metrics["subcluster_chance"] = 0.27
    (folder / "metrics.json").write_text(json.dumps({"config": config, "metrics": metrics}))


def test_daal_study_smoke_selects_on_validation_and_compares_on_test(tmp_path):
    validation, mini, chosen = tmp_path / "val", tmp_path / "mini", tmp_path / "chosen"
    for seed in range(3):
        for label, quality in (
            ("triplet", 0.2),
            ("daal", 0.1),
            ("daal-s2", 0.15),
            ("daal-wide", -0.2),
        ):
            loss = "triplet" if label == "triplet" else "daal"
            run = validation / f"label={label},seed={seed}"
            _fake_run(
                run, eval_split="validation", seed=seed, loss=loss, label=label, quality=quality
            )
        for loss in ("triplet", "daal"):
            _fake_run(mini / f"{loss}-{seed}", eval_split="test", seed=seed, loss=loss)
            _fake_run(
                mini / f"{loss}-d-{seed}", eval_split="test", seed=seed, loss=loss, density=True
            )
        _fake_run(chosen / f"s2-{seed}", eval_split="test", seed=seed, loss="daal", label="daal-s2")
    figures = tmp_path / "figures"
    _execute(
        "daal_study.ipynb",
        tmp_path / "s.ipynb",
        smoke=True,
        validation_dir=str(validation),
        baselines_dir=str(mini),
        sweep_dir=str(chosen),
        figures_dir=str(figures),
    )
    # daal-wide scores lowest; daal-s2 beats daal and keeps Recall@1: it is chosen
    table = " ".join((figures / "daal_study_table.md").read_text().split())  # note unwrapped
    assert "chosen variant (on validation): daal-s2" in table
    assert "| daal-s2 | 3 |" in table and "| triplet | 3 |" in table and "density" not in table
    validation_table = " ".join((figures / "daal_study_validation.md").read_text().split())
    assert "| daal-wide |" in validation_table
    assert "daal_study.yaml" in validation_table and "): daal-s2." in validation_table
    assert (figures / "daal_study.png").is_file()
    assert "| daal-s2 | recall@1 |" in (figures / "daal_study_differences.md").read_text()


def test_losses_2d_smoke(tmp_path):
    notebook = _execute(
        "losses_2d.ipynb", tmp_path / "l.ipynb", smoke=True, figures_dir=str(tmp_path)
    )
    assert (tmp_path / "losses_2d.png").is_file()
    final = ast.literal_eval(notebook.cells[-1].outputs[0]["data"]["text/plain"])
    assert set(final) == {
        "contrastive",
        "triplet",
        "triplet + density",
        "npair",
        "ms",
        "proxy_anchor",
        "daal",
    }

"""The reference results policy: the demo never writes to figures/, the committed tables rest
on at least 5 seeds per row, and choices are made on validation classes only."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dmlkit.sweep.spec import load_spec
from dmlkit.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
MAKEFILE = (ROOT / "Makefile").read_text()
REFERENCE_SWEEPS = re.search(r"^REFERENCE_SWEEPS := (.+)$", MAKEFILE, re.M).group(1).split()
SELECTION_SWEEPS = ("density_ablation", "daal_study")  # they choose λ and the DAAL variant


def recipe(target: str) -> str:
    """The commands of a Makefile target (its tab-indented lines)."""
    block = re.search(rf"^{target}:.*\n((?:\t.*\n)+)", MAKEFILE, re.M)
    assert block, f"no target {target!r} in the Makefile"
    return block.group(1)


def test_the_demo_writes_only_under_papermill_runs():
    demo = recipe("demo")
    assert "--sheet papermill_runs/" in demo  # the contact sheet too
    assert not re.search(r"(?<![\w/])figures/", demo), "the demo must not write to figures/"
    spec = load_spec(ROOT / "notebooks" / "sweeps" / "quickstart.yaml")
    for step in spec.then:
        assert step.parameters.get("figures_dir", "").startswith("papermill_runs/quickstart")


@pytest.mark.parametrize("name", REFERENCE_SWEEPS)
def test_every_reference_sweep_has_at_least_five_seeds(name):
    spec = load_spec(ROOT / "notebooks" / "sweeps" / f"{name}.yaml")
    assert len(spec.grid["seed"]) >= 5


@pytest.mark.parametrize("name", SELECTION_SWEEPS)
def test_selection_sweeps_never_evaluate_on_the_test_classes(name):
    spec = load_spec(ROOT / "notebooks" / "sweeps" / f"{name}.yaml")
    assert spec.fixed["eval_split"] == "validation"
    assert all("eval_split" not in o.set for o in spec.overrides)


def markdown_rows(path: Path) -> list[dict[str, str]]:
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [
        dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")), strict=True))
        for line in lines[2:]
    ]


TABLES = sorted((ROOT / "figures").glob("*_table.md")) + sorted(
    (ROOT / "figures").glob("daal_study_*.md")
)


@pytest.mark.parametrize("path", TABLES, ids=lambda p: p.name)
def test_every_committed_table_rests_on_at_least_five_seeds_per_row(path):
    rows = markdown_rows(path)
    counts = [int(row["n"]) for row in rows if "n" in row] or [
        int(row["n_pairs"]) for row in rows if "n_pairs" in row
    ]
    assert rows and counts and min(counts) >= 5, f"{path.name}: a row with fewer than 5 seeds"


def test_the_policy_checks_can_fail(tmp_path):
    one_seed = tmp_path / "x_table.md"
    one_seed.write_text("note\n\n| loss | n | recall@1 |\n|---|---:|---|\n| triplet | 1 | 0.6 |\n")
    assert [int(r["n"]) for r in markdown_rows(one_seed)] == [1]


def test_the_daal_test_sweep_runs_the_variant_chosen_on_validation():
    note = (ROOT / "figures" / "daal_study_validation.md").read_text().split("\n\n")[0]
    chosen = re.search(r"\): (\S+)\.$", " ".join(note.split())).group(1)
    spec = load_spec(ROOT / "notebooks" / "sweeps" / "daal_test.yaml")
    assert spec.grid["label"] == [chosen], f"daal_test.yaml must run {chosen}, the chosen variant"


def test_the_training_default_weight_is_the_one_chosen_on_validation():
    # The rule of density_ablation.yaml, applied to the committed 5-seed validation table:
    # the λ with the highest mean Recall@1 for the ema target.
    rows = markdown_rows(ROOT / "figures" / "density_ablation_lambda_table.md")
    ema = [r for r in rows if r["density_target"] == "ema"]
    best = max(ema, key=lambda r: float(r["recall@1"].split(" ± ")[0]))
    assert TrainConfig().density_weight == pytest.approx(float(best["density_weight"]))

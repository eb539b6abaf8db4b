"""dmlkit.results on synthetic metrics.json files: loading, summaries, gains, tables."""

from __future__ import annotations

import json
import math
import sys
from itertools import product
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dmlkit.results import (
    PAPER_NUMBERS,
    density_gain,
    gain_table,
    load_runs,
    mean_std_table,
    paper_comparison,
    per_run_table,
    seed_note,
    select_variant,
    summarize,
    to_markdown,
    variant_labels,
    write_csv,
    write_markdown,
)

LOSSES = ("triplet", "daal")
SEEDS = (0, 1, 2)


def recall(loss: str, density: bool, seed: int) -> float:
    """The synthetic Recall@1 of a run: distinct per loss, density and seed."""
    return 0.5 + 0.1 * (loss == "daal") + 0.05 * density + 0.01 * seed**2


def write_run(folder: Path, config: dict, metrics: dict, **extra) -> Path:
    folder.mkdir(parents=True)
    record = {
        "config": config,
        "metrics": metrics,
        "history": [{"epoch": 0}, {"epoch": 1}],
        "git_commit": "abc123",
        "device": "cpu",
        "wall_time_s": 30.5,
        "torch_threads": 1,
        "versions": {"torch": "2.14.1"},
        "eval_ks": [1, 2, 4, 8],
        **extra,
    }
    (folder / "metrics.json").write_text(json.dumps(record))
    return folder


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """A sweep folder of 2 losses × density off/on × 3 seeds on cub200."""
    root = tmp_path / "papermill_runs" / "paper"
    for loss, density, seed in product(LOSSES, (False, True), SEEDS):
        config = {
            "dataset": "cub200",
            "loss": loss,
            "density": density,
            "seed": seed,
            "epochs": 8,
            "eval_ks": [1, 2, 4, 8],
            "loss_params": {"margin": 0.2},
        }
        metrics = {
            "recall@1": recall(loss, density, seed),
            "map@r": 0.1 * seed,
            "nmi": 0.6,
            "pi_ratio": 0.3,
            "subcluster_preservation": 0.7,
            "per_class_r": [0.1, 0.2],
            "chance": {"family": 0.25},
        }
        write_run(root / f"loss={loss},density={str(density).lower()},seed={seed}", config, metrics)
    (root / "manifest.jsonl").write_text("")
    return root


def test_load_runs_flattens_config_and_metrics(sweep):
    df = load_runs(sweep)
    assert len(df) == 12
    assert list(df.columns[:2]) == ["sweep", "run"] and df.columns[-1] == "path"
    row = df[df["run"] == "loss=daal,density=true,seed=2"].iloc[0]
    assert (row["sweep"], row["dataset"], row["loss"], row["density"], row["seed"]) == (
        "paper",
        "cub200",
        "daal",
        True,
        2,
    )
    assert row["eval_ks"] == (1, 2, 4, 8)  # hashable, so it can be grouped on
    assert row["loss_params.margin"] == 0.2
    assert row["recall@1"] == pytest.approx(0.5 + 0.1 + 0.05 + 0.04)
    assert row["chance.family"] == 0.25
    assert "per_class_r" not in df.columns  # a list is not one number
    assert (row["epochs_run"], row["wall_time_s"], row["device"], row["git_commit"]) == (
        2,
        30.5,
        "cpu",
        "abc123",
    )
    assert math.isnan(row["images_per_s"])
    assert (row["epochs"], row["torch_threads"]) == (8, 1)  # config epochs kept, not the history
    assert "versions" not in df.columns
    assert Path(row["path"]) == sweep / row["run"]
    assert list(df["path"]) == sorted(df["path"])


def test_load_runs_accepts_globs_run_folders_files_and_lists(sweep):
    assert len(load_runs(str(sweep / "loss=daal,*"))) == 6
    assert len(load_runs(str(sweep.parent / "**" / "metrics.json"))) == 12
    one = sweep / "loss=triplet,density=false,seed=0"
    assert len(load_runs(one)) == 1 and len(load_runs(one / "metrics.json")) == 1
    assert len(load_runs([one, sweep / "loss=daal,density=true,seed=1"])) == 2


def test_missing_metrics_are_nan_and_bad_files_are_skipped_with_a_warning(tmp_path):
    write_run(tmp_path / "a", {"loss": "triplet"}, {"recall@1": 0.5, "nmi": None})
    write_run(tmp_path / "b", {"loss": "daal"}, {"recall@1": "n/a"})
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "metrics.json").write_text('{"config": {"loss": "trip')  # torn write
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "metrics.json").write_text("[1, 2]")
    write_run(tmp_path / "e", "not a dict", {"recall@1": 0.7})
    with pytest.warns(UserWarning) as caught:
        df = load_runs(tmp_path)
    messages = [str(w.message) for w in caught]
    assert any(
        str(tmp_path / "c" / "metrics.json") in m and "not valid JSON" in m for m in messages
    )
    assert any(str(tmp_path / "d" / "metrics.json") in m for m in messages)
    assert any("'config' is not an object" in m for m in messages)
    assert list(df["run"]) == ["a", "b", "e"]
    assert math.isnan(df.loc[0, "nmi"]) and math.isnan(df.loc[1, "recall@1"])
    assert df.loc[2, "recall@1"] == 0.7 and pd.isna(df.loc[2, "loss"])


def test_load_runs_of_nothing_warns_and_returns_an_empty_table(tmp_path):
    with pytest.warns(UserWarning, match="no readable metrics.json"):
        df = load_runs(tmp_path)
    assert df.empty and list(df.columns) == ["sweep", "run", "path"]


def test_load_runs_of_nothing_raises_when_runs_are_required(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no readable metrics.json under .*typo"):
        load_runs(tmp_path / "typo", missing_ok=False)


def test_summarize_reports_every_recall_column_by_k_by_default(tmp_path):
    metrics = {"recall@10": 0.8, "recall@2": 0.6, "recall@1": 0.5, "recall@100": 0.9, "nmi": 0.4}
    write_run(tmp_path / "run", {"dataset": "sop", "loss": "ms", "density": False}, metrics)
    summary = summarize(load_runs(tmp_path))
    means = [c for c in summary.columns if c.endswith("_mean")]
    assert means == [
        "recall@1_mean",
        "recall@2_mean",
        "recall@10_mean",
        "recall@100_mean",
        "map@r_mean",
        "nmi_mean",
        "pi_ratio_mean",
        "subcluster_preservation_mean",
        "subcluster_purity@5_mean",
        "subcluster_ari_mean",
    ]
    assert summary["recall@10_mean"].item() == 0.8 and summary["map@r_mean"].isna().all()


def test_summarize_matches_mean_and_sample_std_over_seeds(sweep):
    summary = summarize(load_runs(sweep), metrics=("recall@1", "map@r", "not_measured"))
    assert list(summary.columns) == [
        "dataset",
        "loss",
        "density",
        "n",
        "recall@1_n",
        "recall@1_mean",
        "recall@1_std",
        "recall@1_ci_low",
        "recall@1_ci_high",
        "map@r_n",
        "map@r_mean",
        "map@r_std",
        "map@r_ci_low",
        "map@r_ci_high",
        "not_measured_n",
        "not_measured_mean",
        "not_measured_std",
        "not_measured_ci_low",
        "not_measured_ci_high",
    ]
    assert len(summary) == 4 and (summary["n"] == 3).all()
    for _, row in summary.iterrows():
        values = np.array([recall(row["loss"], row["density"], s) for s in SEEDS], np.float64)
        assert row["recall@1_mean"] == pytest.approx(values.mean())
        assert row["recall@1_std"] == pytest.approx(values.std(ddof=1))
        half = 4.302652729911275 * values.std(ddof=1) / math.sqrt(3)  # t_{0.975, 2}
        assert row["recall@1_ci_low"] == pytest.approx(values.mean() - half)
        assert row["recall@1_ci_high"] == pytest.approx(values.mean() + half)
        assert row["map@r_mean"] == pytest.approx(0.1)
    assert summary["not_measured_mean"].isna().all() and (summary["not_measured_n"] == 0).all()


def test_summarize_without_grouping_columns_warns_and_uses_one_group(sweep):
    with pytest.warns(UserWarning, match="not grouped on: \\['backbone'\\]"):
        summary = summarize(load_runs(sweep), by=("backbone",), metrics=("nmi",))
    assert summary.to_dict("records") == [
        {
            "n": 12,
            "nmi_n": 12,
            "nmi_mean": pytest.approx(0.6),
            "nmi_std": pytest.approx(0.0),
            "nmi_ci_low": pytest.approx(0.6),
            "nmi_ci_high": pytest.approx(0.6),
        }
    ]


def test_mean_std_table_formats_cells():
    summary = pd.DataFrame(
        {
            "loss": ["a", "b"],
            "n": [3, 1],
            "recall@1_mean": [0.5, 0.25],
            "recall@1_std": [0.0125, math.nan],
            "recall@1_ci_low": [0.469, math.nan],
            "recall@1_ci_high": [0.531, math.nan],
        }
    )
    table = mean_std_table(summary, floatfmt=".1f", scale=100, intervals=("recall@1",))
    assert table.to_dict("records") == [
        {"loss": "a", "n": 3, "recall@1": "50.0 ± 1.2", "recall@1 95% CI": "[46.9, 53.1]"},
        {"loss": "b", "n": 1, "recall@1": "25.0", "recall@1 95% CI": "–"},
    ]


def test_density_gain_per_loss(sweep):
    gain = density_gain(load_runs(sweep), "recall@1")
    assert list(gain.columns) == [
        "dataset",
        "loss",
        "without",
        "with",
        "gain",
        "gain_ci_low",
        "gain_ci_high",
        "n_pairs",
        "verdict",
        "n_without",
        "n_with",
    ]
    assert list(gain["loss"]) == ["daal", "triplet"]
    for _, row in gain.iterrows():
        off = np.array([recall(row["loss"], False, s) for s in SEEDS])
        on = np.array([recall(row["loss"], True, s) for s in SEEDS])
        assert row["gain"] == pytest.approx(on.mean() - off.mean()) == pytest.approx(0.05)
        # every seed gains exactly 0.05: the paired interval has no width
        assert row["gain_ci_low"] == pytest.approx(0.05) == row["gain_ci_high"]
        assert row["verdict"] == "higher" and row["n_pairs"] == 3
        assert (row["n_without"], row["n_with"]) == (3, 3)


@pytest.mark.parametrize(("off", "on"), [(False, True), ("false", "true"), (0, 1), (0.0, 0.5)])
def test_density_gain_reads_truthy_flags_and_leaves_one_sided_groups_nan(off, on):
    df = pd.DataFrame(
        {"loss": ["x", "x", "y"], "density": [off, on, off], "recall@1": [0.5, 0.75, 0.4]}
    )
    gain = density_gain(df, by=("loss",)).set_index("loss")
    assert gain.loc["x", "gain"] == pytest.approx(0.25)
    assert math.isnan(gain.loc["x", "gain_ci_low"])  # one run per side: no interval
    assert gain.loc["x", "verdict"] == "no interval (one seed)"
    assert math.isnan(gain.loc["y", "gain"]) and gain.loc["y", "n_with"] == 0


def test_paper_numbers_are_the_methods_md_table():
    numbers = {(p.dataset, p.method, p.density): p.value for p in PAPER_NUMBERS}
    assert numbers == {
        ("cars196", "DML-DA", False): 67.95,
        ("cars196", "DML-DA", True): 77.62,
        ("cub200", "DML-DA", False): 52.01,
        ("cub200", "DML-DA", True): 55.64,
        ("sop", "DML-DA", False): 68.20,
        ("sop", "DML-DA", True): 70.56,
        ("cub200", "Multi-Similarity", None): 65.7,
        ("cars196", "Multi-Similarity", None): 84.1,
        ("sop", "Multi-Similarity", None): 78.2,
        ("cub200", "Proxy-Anchor", None): 68.4,
        ("cars196", "Proxy-Anchor", None): 86.1,
        ("sop", "Proxy-Anchor", None): 79.1,
    }
    assert all(p.source and p.metric == "recall@1" for p in PAPER_NUMBERS)
    assert all("1909.03909" in p.source for p in PAPER_NUMBERS if p.method == "DML-DA")


def test_paper_comparison_puts_ours_in_percent_beside_the_papers(sweep):
    table = paper_comparison(load_runs(sweep))
    assert list(table["method"]) == [
        "DML-DA (paper)",
        "Multi-Similarity (paper)",
        "Proxy-Anchor (paper)",
        "daal (ours)",
        "triplet (ours)",
    ]
    assert (table["dataset"] == "cub200").all()
    dmlda = table.iloc[0]
    assert (dmlda["without"], dmlda["with"]) == (52.01, 55.64)
    assert dmlda["gain"] == pytest.approx(3.63)
    assert math.isnan(table.iloc[1]["with"]) and table.iloc[1]["without"] == 65.7
    ours = table.iloc[4]
    off = np.mean([recall("triplet", False, s) for s in SEEDS]) * 100
    assert ours["without"] == pytest.approx(off) and ours["gain"] == pytest.approx(5.0)
    assert ours["n"] == "3/3" and ours["source"].startswith("this repository")


def test_paper_comparison_without_paper_datasets_lists_all_papers(sweep):
    df = load_runs(sweep).assign(dataset="glyphs-mini")
    table = paper_comparison(df)
    assert set(table["dataset"]) == {"cars196", "cub200", "sop"}
    assert not table["method"].str.endswith("(ours)").any()
    assert len(paper_comparison(df, datasets=["sop"])) == 3


def test_to_markdown_renders_without_tabulate(monkeypatch):
    monkeypatch.setitem(sys.modules, "tabulate", None)  # importing it would now fail
    df = pd.DataFrame(
        {
            "loss": ["tri|plet", "daal"],
            "density": [True, False],
            "n": [3, 1],
            "recall@1": [0.51234, math.nan],
            "note": ["a\nb", None],
        }
    )
    assert to_markdown(df) == (
        "| loss | density | n | recall@1 | note |\n"
        "|---|---|---:|---:|---|\n"
        "| tri\\|plet | true | 3 | 0.512 | a b |\n"
        "| daal | false | 1 | – | – |\n"
    )
    assert "| 51.2340 |" in to_markdown(
        df.assign(**{"recall@1": df["recall@1"] * 100}), floatfmt={"recall@1": ".4f"}, na_rep=""
    )


def test_to_markdown_with_index():
    df = pd.DataFrame({"v": [1.5]}, index=pd.Index(["a"], name="k"))
    assert to_markdown(df, ".1f", index=True) == "| k | v |\n|---|---:|\n| a | 1.5 |\n"


def test_write_csv_and_markdown_round_trip(tmp_path, sweep):
    summary = summarize(load_runs(sweep))
    write_csv(summary, tmp_path / "out" / "summary.csv")
    back = pd.read_csv(tmp_path / "out" / "summary.csv")
    pd.testing.assert_frame_equal(back, summary, check_dtype=False)
    write_markdown(summary, tmp_path / "out" / "summary.md", floatfmt=".2f")
    text = (tmp_path / "out" / "summary.md").read_text()
    assert text == to_markdown(summary, floatfmt=".2f")
    assert len(text.splitlines()) == 2 + len(summary)


def test_gain_table_signs_the_gain_and_writes_its_interval():
    gain = pd.DataFrame(
        {
            "loss": ["a", "b", "c"],
            "without": [0.5, 0.6, 0.4],
            "with": [0.52, 0.58, 0.41],
            "gain": [0.02, -0.02, 0.01],
            "gain_ci_low": [0.001, -0.05, math.nan],
            "gain_ci_high": [0.04, 0.01, math.nan],
            "n_pairs": [5, 5, 1],
            "verdict": ["higher", "no measurable effect", "no interval (one seed)"],
            "n_without": [5, 5, 1],
            "n_with": [5, 5, 1],
        }
    )
    table = gain_table(gain)
    assert list(table.columns) == [
        "loss",
        "without",
        "with",
        "gain",
        "95% CI",
        "n_pairs",
        "verdict",
    ]
    assert table["gain"].tolist() == ["+0.020", "−0.020", "+0.010"]
    assert table["95% CI"].tolist() == ["[+0.001, +0.040]", "[−0.050, +0.010]", "–"]


def test_seed_note_says_one_seed_is_not_evidence_and_names_the_seed_count():
    assert "not evidence" in seed_note(pd.DataFrame({"n": [1, 1]}))
    assert seed_note(pd.DataFrame({"n": [5, 5]})).startswith("Mean ± sample std over 5 seeds")
    assert "over 3–5 seeds" in seed_note(pd.DataFrame({"n": [3, 5]}))


def test_per_run_table_keeps_one_row_per_run_with_its_seed(sweep):
    table = per_run_table(load_runs(sweep), metrics=("recall@1",))
    assert list(table.columns) == ["run", "dataset", "loss", "density", "seed", "recall@1"]
    assert len(table) == 12 and table["run"].is_monotonic_increasing


def test_variant_labels_use_the_label_or_the_loss_and_density():
    runs = pd.DataFrame(
        {
            "loss": ["daal", "triplet", "triplet", "daal"],
            "density": [False, True, False, False],
            "label": ["daal-s4", "", None, ""],
        }
    )
    assert variant_labels(runs).tolist() == ["daal-s4", "triplet + density", "triplet", "daal"]


def test_select_variant_applies_the_constraint_then_the_score():
    summary = pd.DataFrame(
        {
            "label": ["daal", "a", "b", "c"],
            "recall@1_mean": [0.60, 0.50, 0.59, 0.585],
            "subcluster_ari_mean": [0.10, 0.40, 0.20, 0.20],
        }
    )
    rule = dict(score="subcluster_ari", constraint="recall@1", reference="daal", tolerance=0.02)
    # "a" scores best but loses 0.10 Recall@1; "b" and "c" tie: the first listed wins
    assert select_variant(summary, candidates=["daal", "a", "b", "c"], **rule) == "b"
    assert select_variant(summary, candidates=["daal", "a", "c", "b"], **rule) == "c"
    assert select_variant(summary, candidates=["daal"], **rule) == "daal"
    with pytest.raises(ValueError, match="no runs for \\['x'\\]"):
        select_variant(summary, candidates=["x"], **rule)


def test_a_run_with_a_nan_metric_is_counted_and_shown_not_silently_dropped(tmp_path):
    for seed, value in enumerate([0.5, 0.6, float("nan")]):
        folder = tmp_path / f"seed={seed}"
        folder.mkdir()
        config = {"dataset": "glyphs-mini", "loss": "triplet", "density": False, "seed": seed}
        record = {"config": config, "metrics": {"recall@1": value, "map@r": 0.1}}
        (folder / "metrics.json").write_text(json.dumps(record))
    with pytest.warns(UserWarning, match=r"recall@1: some runs have no value.*2 of 3"):
        summary = summarize(load_runs(tmp_path), metrics=("recall@1", "map@r"))
    row = summary.iloc[0]
    assert (row["n"], row["recall@1_n"], row["map@r_n"]) == (3, 2, 3)
    assert row["recall@1_mean"] == pytest.approx(0.55)
    table = mean_std_table(summary)
    assert table["recall@1"][0] == "0.550 ± 0.071 (2 of 3 runs)"
    assert table["map@r"][0] == "0.100 ± 0.000"

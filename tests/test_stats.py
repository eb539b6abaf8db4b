"""dmlkit.results.stats: intervals over seeds and paired differences, against hand-computed
values; and real seed noise: two seeds of one cell differ, and the table still renders."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from dmlkit.results import (
    density_gain,
    load_runs,
    mean_interval,
    mean_std_table,
    paired_difference,
    summarize,
    to_markdown,
    verdict,
)
from dmlkit.train import fit
from tests.test_train import tiny, tiny_config  # noqa: F401 - tiny: the fixture, used by name

T_975_4 = 2.7764451051977987  # Student's t quantile 0.975 with 4 degrees of freedom


def test_t_interval_of_one_to_five_by_hand():
    # mean 3, s = sqrt(2.5), s/sqrt(5) = sqrt(0.5), half-width 2.7764 * 0.70711 = 1.96324
    mean, low, high = mean_interval([1, 2, 3, 4, 5])
    assert mean == 3
    assert low == pytest.approx(3 - 1.9632432, abs=1e-6)
    assert high == pytest.approx(3 + 1.9632432, abs=1e-6)


def test_interval_needs_two_values_and_drops_nan():
    assert mean_interval([0.4])[0] == 0.4 and math.isnan(mean_interval([0.4])[1])
    assert all(math.isnan(v) for v in mean_interval([]))
    assert mean_interval([1.0, math.nan, 3.0])[0] == 2.0


def test_bootstrap_of_two_values_is_their_range():
    # Resamples of {0, 1}: means 0 (p = 1/4), 0.5 (1/2), 1 (1/4); the 2.5 % and 97.5 %
    # percentiles of that distribution are exactly 0 and 1.
    mean, low, high = mean_interval([0.0, 1.0], method="bootstrap")
    assert (mean, low, high) == (0.5, 0.0, 1.0)


def test_bootstrap_matches_the_enumerated_distribution_and_is_seeded():
    values = np.array([0.1, 0.4, 0.7])
    # All 27 equally likely resamples of 3 values: the exact bootstrap distribution.
    grid = np.array(np.meshgrid(values, values, values)).reshape(3, -1).mean(0)
    exact = np.quantile(np.repeat(grid, 1000), [0.025, 0.975])
    first = mean_interval(values, method="bootstrap", resamples=50_000, seed=3)
    assert first[1:] == pytest.approx(tuple(exact), abs=0.02)
    assert mean_interval(values, method="bootstrap", resamples=50_000, seed=3) == first


def test_unknown_method_and_bad_confidence_are_refused():
    with pytest.raises(ValueError, match="unknown interval method 'z'"):
        mean_interval([1, 2], method="z")
    with pytest.raises(ValueError, match="confidence must be in"):
        mean_interval([1, 2], confidence=95)


def runs_table(control, treatment, seeds=(0, 1, 2, 3, 4)):
    rows = [
        {"run": f"density={d},seed={s}", "loss": "triplet", "density": d, "seed": s, "recall@1": v}
        for d, values in ((False, control), (True, treatment))
        for s, v in zip(seeds, values, strict=True)
    ]
    return pd.DataFrame(rows).sample(frac=1, random_state=0)  # pairing must not rely on order


def test_paired_difference_by_hand():
    control = [0.50, 0.52, 0.48, 0.51, 0.49]
    treatment = [0.53, 0.52, 0.50, 0.55, 0.50]
    # per-seed differences 0.03, 0, 0.02, 0.04, 0.01: mean 0.02, s = sqrt(0.001 / 4)
    row = paired_difference(runs_table(control, treatment), by=("loss",)).iloc[0]
    half = T_975_4 * math.sqrt(0.001 / 4) / math.sqrt(5)  # 0.0196324
    assert row["difference"] == pytest.approx(0.02)
    assert row["std"] == pytest.approx(math.sqrt(0.001 / 4))
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((0.02 - half, 0.02 + half))
    assert (row["control"], row["treatment"]) == pytest.approx((0.50, 0.52))
    assert row["n_pairs"] == 5 and row["unpaired"] == 0 and row["verdict"] == "higher"


def test_pairing_removes_the_seed_effect_that_an_unpaired_comparison_keeps():
    # The seed moves both settings by up to 0.08; the setting itself adds 0.01 +- 0.002.
    seed_effect = np.array([0.0, 0.08, -0.05, 0.03, -0.02])
    control = 0.5 + seed_effect
    treatment = control + np.array([0.010, 0.012, 0.008, 0.011, 0.009])
    row = paired_difference(runs_table(control, treatment), by=("loss",)).iloc[0]
    assert row["verdict"] == "higher" and row["ci_low"] > 0.007
    unpaired = mean_interval(treatment)[1] - mean_interval(control)[2]
    assert unpaired < 0  # the two per-setting intervals overlap widely


def test_no_measurable_effect_when_the_interval_contains_zero():
    table = runs_table([0.5, 0.6, 0.4, 0.5, 0.55], [0.52, 0.57, 0.43, 0.49, 0.55])
    row = paired_difference(table).iloc[0]
    assert row["ci_low"] < 0 < row["ci_high"]
    assert row["verdict"] == "no measurable effect" == verdict(-0.01, 0.02)


def test_runs_without_a_partner_are_counted_not_used():
    lone = pd.DataFrame(
        [{"run": "x", "loss": "triplet", "density": False, "seed": 9, "recall@1": 0.1}]
    )
    table = pd.concat([runs_table([0.5, 0.6], [0.55, 0.62], seeds=(0, 1)), lone])
    row = paired_difference(table, by=("loss",)).iloc[0]
    assert row["n_pairs"] == 2 and row["unpaired"] == 1
    assert row["difference"] == pytest.approx(0.035) and row["control"] == pytest.approx(0.55)


def test_two_runs_of_one_side_with_one_seed_are_refused_naming_them():
    table = runs_table([0.5, 0.6], [0.55, 0.62], seeds=(0, 0))
    with pytest.raises(ValueError, match="several runs share \\['seed'\\]"):
        paired_difference(table, by=("loss",))


def test_density_gain_is_the_paired_difference():
    control = [0.50, 0.52, 0.48, 0.51, 0.49]
    treatment = [0.53, 0.52, 0.50, 0.55, 0.50]
    table = runs_table(control, treatment)
    gain = density_gain(table, by=("loss",)).iloc[0]
    paired = paired_difference(table, by=("loss",)).iloc[0]
    assert gain["gain"] == pytest.approx(paired["difference"])
    assert (gain["gain_ci_low"], gain["gain_ci_high"]) == (paired["ci_low"], paired["ci_high"])


@pytest.mark.usefixtures("tiny")
def test_two_real_seeds_of_one_cell_differ_and_the_table_still_renders(tmp_path):
    sweep = tmp_path / "papermill_runs" / "noise"
    for seed in (0, 1):
        fit(tiny_config(seed=seed, epochs=2, out_dir=str(sweep / f"seed={seed}")))
    runs = load_runs(sweep)
    assert len(runs) == 2
    assert runs.loc[0, "map@r"] != runs.loc[1, "map@r"]  # the seed alone moves the result
    summary = summarize(runs)
    assert summary["n"].tolist() == [2]
    assert summary["map@r_std"].item() > 0
    table = mean_std_table(summary, intervals=("recall@1", "subcluster_preservation"))
    text = to_markdown(table, note="mean ± std over 2 seeds")
    assert text.startswith("mean ± std over 2 seeds\n\n| dataset | loss | density | n |")
    assert " ± " in text.splitlines()[-1] and "[" in text.splitlines()[-1]

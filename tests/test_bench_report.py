"""benchmarks/report.py and rows.py: the one table assembled from the scripts' JSON rows.

Fake rows, and the CUDA rows' code run on the CPU at toy sizes (``--gpu-dry-run``); no
timing is judged here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    """The benchmarks' ``rows`` and ``report`` modules (the folder is not a package)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import report
        import rows

        yield rows, report
    finally:
        sys.path.remove(str(BENCHMARKS))


def _cells(table: str, case: str) -> list[str]:
    """The cells of the table line whose case column is ``case``."""
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 1 and cells[1] == case:
            return cells
    raise AssertionError(f"no row {case!r} in\n{table}")


MET = 7  # index of the "met?" column


def test_ratio_and_target_decide_met(bench):
    rows, _ = bench
    table = rows.markdown_table(
        [
            rows.make_row(
                "losses", "fast", dmlkit_s=0.9, reference="PML", reference_s=1.0, target="≤ 1.0"
            ),
            rows.make_row(
                "losses", "slow", dmlkit_s=1.04, reference="PML", reference_s=1.0, target="≤ 1.0"
            ),
            rows.make_row(
                "training",
                "throughput low",
                dmlkit_s=1.0,
                reference="bare",
                reference_s=0.8,
                ratio=0.80,
                target="≥ 0.85",
            ),
            rows.make_row(
                "training",
                "throughput ok",
                dmlkit_s=1.0,
                reference="bare",
                reference_s=0.9,
                ratio=0.90,
                target="≥ 0.85",
            ),
            rows.make_row("t-SNE", "cache hit", dmlkit_s=0.3, target="≤ 1 s"),
            rows.make_row("t-SNE", "slow cache hit", dmlkit_s=1.5, target="≤ 1 s"),
            rows.make_row("losses", "no reference", dmlkit_s=0.02),
        ]
    )
    assert _cells(table, "fast")[5:8] == ["0.90", "≤ 1.0", "yes"]
    assert _cells(table, "slow")[5:8] == ["1.04", "≤ 1.0", "**NO**"]
    assert _cells(table, "throughput low")[MET] == "**NO**"
    assert _cells(table, "throughput ok")[MET] == "yes"
    assert _cells(table, "cache hit")[MET] == "yes"
    assert _cells(table, "slow cache hit")[MET] == "**NO**"
    assert _cells(table, "no reference")[3:8] == ["—", "—", "—", "—", "—"]
    assert _cells(table, "fast")[2] == "900 ms" and _cells(table, "slow")[2] == "1.04 s"


def test_json_rows_without_ok_or_with_a_stale_ok_are_judged_from_the_values(bench):
    rows, _ = bench
    row = {
        "group": "g",
        "case": "c",
        "dmlkit_s": 2.0,
        "reference": "r",
        "reference_s": 1.0,
        "ratio": 2.0,
        "target": "≤ 1.0",
        "ok": True,
        "note": "",
    }
    assert rows.verdict(row) == "**NO**"
    assert rows.meets("≥ 0.85", 0.85, None) is True
    assert rows.meets("—", 0.5, 1.0) is None
    assert rows.meets("≤ 1.0", None, 1.0) is None


def test_not_run_rows_say_why(bench, tmp_path):
    rows, report = bench
    no_cuda = rows.not_run("losses (CUDA)", "every loss", rows.NO_CUDA, target="≤ 1.0")
    assert no_cuda["ok"] is None and no_cuda["dmlkit_s"] is None
    path = tmp_path / "rows.json"
    rows.write_json([no_cuda], path)
    loaded = json.loads(path.read_text(encoding="utf-8"))
    assert list(loaded[0]) == list(rows.FIELDS)
    text = report.render(loaded, "- cpu: test", "- load average: test", "make bench")
    cells = _cells(text, "every loss")
    assert cells[MET] == "not run" and cells[-1] == "not run: no CUDA"
    assert text.startswith("# dmlkit benchmarks") and "- cpu: test" in text


def test_a_measurement_that_raised_is_a_failed_row(bench):
    rows, _ = bench
    row = rows.failed("losses (CUDA)", "npair, B = 128", ValueError("bad shape\nmore"))
    assert row["ok"] is False and row["note"] == "failed: ValueError: bad shape"
    assert rows.verdict(row) == "**NO**"
    from_child = rows.failed("kNN", "N=1000", "MemoryError", target="≤ 1.0")
    assert from_child["note"] == "failed: MemoryError" and from_child["target"] == "≤ 1.0"


def test_a_script_without_json_gets_a_row_saying_so(bench, tmp_path):
    _, report = bench
    script = tmp_path / "bench_eval.py"
    script.write_text("import argparse\nargparse.ArgumentParser().parse_args()\n")
    (row,) = report.run_script(script, quick=True)
    assert row["note"] == "kNN: bench_eval.py has no --json yet" and row["ok"] is None


def test_the_report_collects_each_scripts_json_and_passes_quick(bench, tmp_path):
    _, report = bench
    script = tmp_path / "bench_fake.py"
    script.write_text(
        "import argparse, sys\n"
        f"sys.path.insert(0, {str(BENCHMARKS)!r})\n"
        "from rows import make_row, write_json\n"
        "p = argparse.ArgumentParser()\n"
        "p.add_argument('--json'); p.add_argument('--quick', action='store_true')\n"
        "a = p.parse_args()\n"
        "case = 'quick' if a.quick else 'full'\n"
        "row = make_row('fake', case, dmlkit_s=1.0, reference='x', reference_s=2.0,\n"
        "               target='≤ 1.0')\n"
        "write_json([row], a.json)\n"
    )
    (row,) = report.run_script(script, quick=True)
    assert row["case"] == "quick" and row["ratio"] == 0.5 and row["ok"] is True
    (row,) = report.run_script(script, quick=False)
    assert row["case"] == "full"


def test_load_line_marks_a_busy_machine(bench, monkeypatch):
    _, report = bench
    monkeypatch.setattr(report.os, "cpu_count", lambda: 2)
    assert "measured under load" in report.load_line((3.5, 3.0, 2.0), (3.9, 3.0, 2.0))
    assert "quiet" in report.load_line((0.1, 0.1, 0.1), (1.0, 0.5, 0.2))


def test_a_script_without_the_gpu_flag_has_no_cuda_rows_and_is_skipped(bench, tmp_path):
    _, report = bench
    script = tmp_path / "bench_cpu_only.py"
    script.write_text("import argparse\nargparse.ArgumentParser().parse_args()\n")
    assert report.run_script(script, quick=False, gpu="--gpu-only") == []


def test_the_cuda_rows_code_runs_on_the_cpu_as_a_dry_run(bench, tmp_path):
    """What ``make bench-gpu`` runs on a GPU machine, here on the CPU at toy sizes: the kNN,
    loss and training rows (JPEG folder, DataLoader workers, bf16 autocast) all run."""
    rows, _ = bench
    out = tmp_path / "results-gpu.md"
    report = [sys.executable, str(BENCHMARKS / "report.py"), "--gpu-dry-run", "--out", str(out)]
    done = subprocess.run(report, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    table = [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in out.read_text(encoding="utf-8").splitlines()
        if line.startswith("| ") and "(CUDA)" in line
    ]
    groups = {cells[0] for cells in table}
    assert groups == {"kNN (CUDA)", "losses (CUDA)", "training (CUDA)"}, groups
    import bench_losses

    # one kNN size, every loss case at B = 128, one backbone
    assert len(table) == 1 + len(bench_losses.CASES) + 1
    for cells in table:
        assert cells[-1] == rows.DRY_RUN, cells  # not "failed: …" nor "not run: no CUDA"
        assert cells[2] != "—" and cells[6] == "—", cells  # timed, judged by no target

"""Results of sweeps as tables: read ``metrics.json`` files, summarize, compare, render.

``load_runs("papermill_runs/quickstart")`` gives one row per run (config, metrics,
provenance); :func:`summarize` gives mean, std and a 95 % interval over seeds;
:func:`paired_difference` the per-seed difference between two settings with its interval,
and :func:`density_gain` that for the density regularizer per loss (``stats`` says how the
intervals are made); :func:`paper_comparison` puts ours beside :data:`PAPER_NUMBERS`;
:func:`to_markdown` / :func:`write_markdown` / :func:`write_csv` write them out (Markdown
without the ``tabulate`` package that ``DataFrame.to_markdown`` needs).
"""

from .markdown import to_markdown, write_csv, write_markdown
from .papers import PAPER_NUMBERS, PaperNumber, paper_comparison, paper_numbers
from .runs import (
    DEFAULT_BY,
    DEFAULT_METRICS,
    density_gain,
    gain_table,
    load_runs,
    mean_std_table,
    per_run_table,
    seed_note,
    select_variant,
    summarize,
    variant_labels,
)
from .stats import interval_text, mean_interval, paired_difference, verdict

__all__ = [
    "DEFAULT_BY",
    "interval_text",
    "mean_interval",
    "paired_difference",
    "verdict",
    "DEFAULT_METRICS",
    "PAPER_NUMBERS",
    "PaperNumber",
    "density_gain",
    "gain_table",
    "load_runs",
    "mean_std_table",
    "paper_comparison",
    "paper_numbers",
    "per_run_table",
    "seed_note",
    "select_variant",
    "summarize",
    "to_markdown",
    "variant_labels",
    "write_csv",
    "write_markdown",
]

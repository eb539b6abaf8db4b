# dmlkit — every target sets up .venv itself when it is missing or older than
# pyproject.toml / constraints.txt, so `make demo` and `make test` work on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dmlkit-installed
JOBS ?= 2
DATA ?= $(DMLKIT_DATA)

.PHONY: setup test test-all demo lint format lab browser-deps slurm-deps bench bench-gpu figures reference reproduce lock clean

setup: $(STAMP)

# A venv whose interpreter no longer runs (its Python removed or upgraded, the folder copied
# from elsewhere) is stale as well: forget the stamp so that the recipe below rebuilds it.
ifneq ($(shell $(PY) -c "" 2>/dev/null && echo ok),ok)
$(shell rm -f $(STAMP))
endif

# constraints.txt is the lock of the tested Python (3.11: CI, the demo, the committed
# figures); another Python gets pyproject.toml's ranges instead.
$(STAMP): pyproject.toml constraints.txt
	@$(PY) -c "" 2>/dev/null || $(PYTHON) -m venv --clear $(VENV)
	@if $(PY) -c "import sys; sys.exit(sys.version_info[:2] != (3, 11))"; then \
	  echo "$(PY) -m pip install --quiet -c constraints.txt -e .[dev]"; \
	  $(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"; \
	else \
	  echo "note: constraints.txt locks Python 3.11; installing pyproject.toml's ranges"; \
	  $(PY) -m pip install --quiet -e ".[dev]"; \
	fi
	$(PY) -m ipykernel install --sys-prefix --name dmlkit --display-name "Python (dmlkit)"
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n $(JOBS) -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest -n $(JOBS)

# The main job: glyphs-mini rendered once (and its contact sheet), the quickstart sweep
# (6 losses × density off/on, one seed, t-SNE maps, comparison), then its table. Everything
# it writes is under papermill_runs/ (git-ignored): the committed reference results in
# figures/ are made by `make reference` / `make figures`, never by the demo.
demo: $(STAMP)
	$(PY) -m dmlkit.data glyphs-mini --split both --sheet papermill_runs/glyphs-mini_contact_sheet.png
	$(PY) -m dmlkit.sweep notebooks/sweeps/quickstart.yaml --jobs $(JOBS)
	@echo; cat papermill_runs/quickstart/figures/quickstart_table.md; echo
	@echo "Figures:"; ls -1 papermill_runs/quickstart/figures/quickstart_* papermill_runs/glyphs-mini_contact_sheet.png

# The sweeps behind the committed reference results (5 seeds each; docs/results.md), in
# the order their choices depend on: the validation sweeps that choose λ and the DAAL
# variant, then the test-class sweeps. Finished runs are skipped, so an
# interrupted `make reference` continues where it stopped. About 4 h on 2 cores.
REFERENCE_SWEEPS := density_ablation daal_study glyphs_mini daal_test glyphs_full
reference: $(STAMP)
	for name in $(REFERENCE_SWEEPS); do \
	  $(PY) -m dmlkit.sweep notebooks/sweeps/$$name.yaml --jobs $(JOBS) || exit 1; \
	done
	$(MAKE) figures

# Re-draw every committed reference figure from the runs in papermill_runs/ (no training):
# the 2-D loss toys, the glyphs-mini contact sheet, and the figure notebooks of each sweep
# whose folder exists (byte-identical on the same machine and library versions).
figures: $(STAMP)
	$(PY) -m papermill notebooks/losses_2d.ipynb papermill_runs/losses_2d.ipynb -k dmlkit --cwd .
	$(PY) -m dmlkit.data glyphs-mini --split both --sheet figures/glyphs-mini_contact_sheet.png
	for name in $(REFERENCE_SWEEPS); do \
	  if [ -d papermill_runs/$$name ]; then \
	    $(PY) -m dmlkit.sweep notebooks/sweeps/$$name.yaml --figures --jobs $(JOBS) || exit 1; \
	  else echo "make figures: no papermill_runs/$$name (run: make reference); its figures are left as they are"; fi; \
	done

# The paper sweeps on real data: DATA holds CUB_200_2011/, cars196/, Stanford_Online_Products/.
reproduce: $(STAMP)
	@test -n "$(DATA)" || { echo "usage: make reproduce DATA=/path/to/datasets"; exit 2; }
	@test -d "$(DATA)" || { echo "make reproduce: DATA=$(DATA) is not a folder"; exit 2; }
	@# Both sweeps run even when a run of the first fails; the exit status is the worse one.
	status=0; \
	for spec in dmlda_table daal_table; do \
	  DMLKIT_DATA=$(DATA) $(PY) -m dmlkit.sweep notebooks/sweeps/$$spec.yaml --jobs 1 || status=1; \
	done; \
	exit $$status

lint: $(STAMP)
	$(PY) -m ruff check dmlkit tests benchmarks notebooks
	$(PY) -m ruff format --check dmlkit tests benchmarks

format: $(STAMP)
	$(PY) -m ruff check --fix dmlkit tests benchmarks notebooks
	$(PY) -m ruff format dmlkit tests benchmarks

# JupyterLab on 127.0.0.1 serving the repository, kernel `dmlkit` (registered by setup), each
# kernel started in the repository root like papermill's --cwd (dmlkit/lab.py says why).
lab: $(STAMP)
	$(PY) -m dmlkit.lab --ServerApp.root_dir=.

# Headless Chromium + chromedriver for tests/test_lab.py (JupyterLab in a real browser): Debian's
# packages, installed with apt-get when missing (as root, else through sudo). Without apt it
# only says so, and that test is skipped. .ci/run calls it before `make test`.
CHROMIUM := $(or $(DMLKIT_CHROMIUM),/usr/bin/chromium)
CHROMEDRIVER := $(or $(DMLKIT_CHROMEDRIVER),/usr/bin/chromedriver)
browser-deps:
	@if [ -x $(CHROMIUM) ] && [ -x $(CHROMEDRIVER) ]; then \
	  echo "browser-deps: $$($(CHROMIUM) --version 2>/dev/null); $$($(CHROMEDRIVER) --version)"; \
	elif command -v apt-get >/dev/null; then \
	  sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  echo "browser-deps: $${sudo:+sudo }apt-get install -y chromium chromium-driver"; \
	  $$sudo apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends \
	    chromium chromium-driver >/dev/null; \
	else \
	  echo "browser-deps: no apt-get here: install Chromium and chromedriver yourself and set"; \
	  echo "  DMLKIT_CHROMIUM and DMLKIT_CHROMEDRIVER, or tests/test_lab.py is skipped"; \
	fi

# Slurm and munge for tests/test_sweep_slurm.py (a real one-node cluster the tests start and
# stop themselves): Debian's slurm-wlm and munge, installed like browser-deps. Without apt it
# only says so, and those tests are skipped. .ci/run calls it before `make test`.
slurm-deps:
	@if command -v sbatch >/dev/null && [ -x /usr/sbin/slurmctld ] && [ -x /usr/sbin/munged ]; then \
	  echo "slurm-deps: $$(/usr/sbin/slurmctld -V)"; \
	elif command -v apt-get >/dev/null; then \
	  sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  echo "slurm-deps: $${sudo:+sudo }apt-get install -y slurm-wlm munge"; \
	  $$sudo apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq slurm-wlm munge >/dev/null; \
	else \
	  echo "slurm-deps: no apt-get here: install Slurm and munge yourself, or"; \
	  echo "  tests/test_sweep_slurm.py is skipped"; \
	fi

# Every benchmark in one table (benchmarks/report.py runs each benchmarks/bench_*.py with
# --json): printed and written to benchmarks/results.md under the machine header.
# `make bench BENCH_ARGS=--quick` runs the smaller grids.
BENCH_ARGS ?=
bench: $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,bench]"
	$(PY) benchmarks/report.py $(BENCH_ARGS)

# Only the CUDA rows (kNN, losses, training at 224 px with JPEG decoding, AMP), written to
# benchmarks/results-gpu.md: minutes on a GPU machine, where the CPU grid takes ~18.
bench-gpu: $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,bench]"
	$(PY) benchmarks/report.py --gpu-only

lock: $(STAMP)
	{ echo "# Exact versions used by 'make setup' on Python 3.11, CI, the demo and the committed figures (pip -c)."; \
	  echo "# Regenerate: make lock"; \
	  $(PY) -m pip freeze --exclude-editable | sort -f; } > constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache

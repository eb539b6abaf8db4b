# dmlkit — every target sets up .venv itself when it is missing or older than
# pyproject.toml / constraints.txt, so `make demo` and `make test` work on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dmlkit-installed
JOBS ?= 2
DATA ?= $(DMLKIT_DATA)

.PHONY: setup test test-all demo lint format lab bench figures reproduce lock clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name dmlkit --display-name "Python (dmlkit)"
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n $(JOBS) -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest -n $(JOBS)

demo: $(STAMP)
	$(PY) -m dmlkit.demo

lint: $(STAMP)
	$(PY) -m ruff check dmlkit tests benchmarks notebooks
	$(PY) -m ruff format --check dmlkit tests benchmarks

format: $(STAMP)
	$(PY) -m ruff check --fix dmlkit tests benchmarks notebooks
	$(PY) -m ruff format dmlkit tests benchmarks

lab: $(STAMP)
	$(VENV)/bin/jupyter lab --notebook-dir=.

bench: $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,bench]"
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

lock: $(STAMP)
	{ echo "# Exact versions used by 'make setup', CI, the demo and the committed figures (pip -c)."; \
	  echo "# Regenerate: make lock"; \
	  $(PY) -m pip freeze --exclude-editable | sort -f; } > constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache

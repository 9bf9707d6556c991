# Everyday commands. Each target that runs code first makes sure .venv exists and
# holds the package with its dev extra, re-installing when pyproject.toml changes.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LINT_PATHS := $(wildcard elbo_core tests bench notebooks)
BENCH_SCRIPTS := $(sort $(wildcard bench/*.py))

.DEFAULT_GOAL := help
.PHONY: help setup test figures quick lab lint format bench clean

help:
	@echo "make figures   regenerate figures/ with the cpu preset"
	@echo "make test      run the test suite"
	@echo "make quick     run every notebook at smoke-test scale into build/quick"
	@echo "make lab       open the notebooks in JupyterLab"
	@echo "make lint      ruff check and ruff format --check"
	@echo "make format    ruff format and fix what ruff check can"
	@echo "make bench     run every bench/*.py"
	@echo "make clean     remove build products (keeps figures/ and .venv)"
	@echo "make setup     create .venv and install the package (done by the above)"

# The stamp is older than pyproject.toml, or missing with a fresh or absent .venv.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests/

figures: $(STAMP)
	$(PY) -m elbo_core.reproduce --preset cpu

quick: $(STAMP)
	$(PY) -m elbo_core.reproduce --preset quick

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

format: $(STAMP)
	$(VENV)/bin/ruff check --fix $(LINT_PATHS)
	$(VENV)/bin/ruff format $(LINT_PATHS)

# Runs every script even when one fails, then fails if any did.
bench: $(STAMP)
	@failed=""; \
	for script in $(BENCH_SCRIPTS); do \
		echo "== $$script"; \
		$(PY) $$script || failed="$$failed $$script"; \
	done; \
	if [ -n "$$failed" ]; then echo "failed:$$failed"; exit 1; fi

clean:
	rm -rf build .pytest_cache .ruff_cache
	find . -path ./$(VENV) -prune -o -type d \
		\( -name __pycache__ -o -name .ipynb_checkpoints \) -prune -exec rm -rf {} +

# Quick start: `make demo` (set up and run the demo) and `make test` (set up and run every test).
# Each creates its own virtual environment in .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e ".[test,server]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/medsam-slicer demo --force

test: $(VENV)/.installed
	$(BIN)/ruff check MedSAMSlicer MedSAMSegmentEffect Testing benchmarks
	$(BIN)/python -m pytest -q

bench: $(VENV)/.installed
	$(BIN)/medsam-slicer bench

clean:
	rm -rf $(VENV) demo-output .pytest_cache

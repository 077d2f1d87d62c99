# Everything runs from a project-local virtual environment that `make` builds on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo demo-traffic test lint audit bench soak clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch is pinned to the CPU build; a looser pin would pull several GB of CUDA wheels.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)  ## build the digits teacher/student if missing and serve them on :8000
	$(BIN)/kdguard demo

demo-traffic: $(STAMP)  ## the same, with a drifting traffic generator
	$(BIN)/kdguard demo --traffic

test: $(STAMP)  ## the whole test suite (unit, integration, end-to-end)
	$(BIN)/python -m pytest

lint: $(STAMP)  ## ruff, mypy --strict and bandit
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/bandit --quiet --configfile pyproject.toml --recursive service

audit: $(STAMP)  ## pip-audit of the installed packages (needs the PyPI JSON API or OSV: not in CI)
	$(BIN)/pip install --quiet pip-audit
	$(BIN)/pip-audit --skip-editable

soak: $(STAMP)  ## minutes of steady traffic; memory must stay flat (KDGUARD_SOAK_SECONDS, default 300)
	$(BIN)/python -m pytest -m soak -s tests/soak

bench: $(STAMP)  ## side-by-side serving benchmark against ../shared/bench/naive_peer.py
	$(BIN)/python bench/serving.py

clean:
	rm -rf $(VENV) .kdguard .mypy_cache .ruff_cache .pytest_cache

# The README's two commands: `make run` (the demo job) and `make test` (lint, then the test suite).
# Both create .venv if missing and install the project into it. On this CPU machine torch comes from
# `pip install torch==2.13.0` (a CPU build); GPU users install their CUDA torch first (see README).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: run test install lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/kdcache demo

test: install lint
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check kdcache tests jobs bench
	$(VENV)/bin/ruff format --check kdcache tests jobs bench

clean:
	rm -rf .kdcache

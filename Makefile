# The README's two commands: `make run` (the demo job) and `make test` (lint, then the test suite).
# Both create .venv if missing and install the project into it, saying what they install as they go (pip's own
# output: every package as it is collected, downloaded and installed). On this CPU machine torch comes from
# `pip install torch==2.13.0` (a CPU build); GPU users install their CUDA torch first (see README).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PIP_FLAGS ?= --progress-bar on --disable-pip-version-check

.PHONY: run test install lint clean

$(VENV)/.installed: pyproject.toml
	@echo "[make $$(date +%T)] 1/4 creating $(VENV) (first run only; later runs skip the install)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "[make $$(date +%T)] 2/4 upgrading pip"
	$(PY) -m pip install $(PIP_FLAGS) --upgrade pip
	@echo "[make $$(date +%T)] 3/4 torch: $(TORCH_SPEC) unless $(VENV) has one (the CPU wheel is ~190 MB)"
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(PIP_FLAGS) "$(TORCH_SPEC)"
	@echo "[make $$(date +%T)] 4/4 kdcache and its dependencies (ray, transformers, pyarrow, ...; tests: moto, ruff, ...)"
	$(PY) -m pip install $(PIP_FLAGS) -e ".[dev]"
	@echo "[make $$(date +%T)] installed"
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

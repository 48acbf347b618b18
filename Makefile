# The README's two commands, each doing its own set-up on a fresh machine:
#   make bench   the benchmark suite on whatever device is present (CPU by default)
#   make test    the test suite (what CI runs)
# Set-up: a virtualenv in .venv/ unless one is active; torch==2.13.0 (the CPU wheel) if torch is
# missing; requirements-dev.txt; the editable build of fusedformer._C (redone when csrc/ changes).

SHELL := /bin/bash
ENV_DIR := $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),.venv)
PY := $(ENV_DIR)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
SOURCES := setup.py pyproject.toml $(shell find csrc -name '*.cpp' -o -name '*.h')
BENCH_ARGS ?=
TEST_ARGS ?=

.PHONY: setup bench test clean

$(PY):
	python3 -m venv $(ENV_DIR)

$(ENV_DIR)/.fusedformer-deps: requirements-dev.txt | $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -r requirements-dev.txt
	@touch $@

$(ENV_DIR)/.fusedformer-ext: $(SOURCES) $(ENV_DIR)/.fusedformer-deps
	$(PIP) install --no-build-isolation --no-deps -e .
	@touch $@

setup: $(ENV_DIR)/.fusedformer-ext

bench: setup
	$(PY) -m fusedformer.bench $(BENCH_ARGS)

test: setup
	$(PY) -m pytest tests benchmarks --benchmark-disable $(TEST_ARGS)

clean:
	rm -rf build *.egg-info fusedformer/_C*.so fusedformer/_build_info.py $(ENV_DIR)/.fusedformer-ext

# The README's two commands, each doing its own set-up on a fresh machine:
#   make bench   the benchmark suite on whatever device is present (CPU by default)
#   make test    the test suite (what CI runs)
#   make gpu-check   on one CUDA GPU, <= 5 min: the gpu-marked tests, then Triton vs torch timings into
#                bench-results/gpu/; without a GPU it stops in seconds saying why. Not part of CI.
#                On a machine with torch, triton and pytest already there and no network (no setup to run,
#                fusedformer._C not needed): `python3 -m fusedformer.bench.gpu_check` from the checkout.
# Set-up: a virtualenv in .venv/ unless one is active; torch==2.13.0 (the CPU wheel) if torch is
# missing; requirements-dev.txt; the editable build of fusedformer._C (redone when csrc/ changes).

SHELL := /bin/bash
ENV_DIR := $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),.venv)
PY := $(ENV_DIR)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
SOURCES := setup.py pyproject.toml $(shell find csrc -name '*.cpp' -o -name '*.h')
BENCH_ARGS ?=
GPU_CHECK_ARGS ?=
TEST_ARGS ?=

.PHONY: setup bench test gpu-check clean

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

# nvidia-smi first: no GPU, no set-up (seconds); the script then checks torch's view of the GPU.
gpu-check:
	@command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 || { \
		echo "make gpu-check: cannot run here: no NVIDIA GPU (nvidia-smi is missing or lists no device). It needs one CUDA GPU." >&2; \
		exit 2; }
	@$(MAKE) --no-print-directory setup
	$(PY) -m fusedformer.bench.gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf build *.egg-info fusedformer/_C*.so fusedformer/_build_info.py $(ENV_DIR)/.fusedformer-ext

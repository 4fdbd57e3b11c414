# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast lint env

$(BIN)/fmcache: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(BIN)/fmcache

# The official implementations the conformance tests compare against (tests/test_conformance.py); test-only, never
# imported by fmcache itself. Their own pins are years old (torchvision 0.15, xformers, CUDA-only builds), so they go
# in without their dependencies, with the few small ones they import named here.
CONFORMANCE = dinov2==0.0.1.dev2 segment-anything==1.0 hydra-core==1.3.8 omegaconf==2.3.1 \
	antlr4-python3-runtime==4.9.3 iopath==0.1.10 portalocker==2.10.1
$(VENV)/.conformance: $(BIN)/fmcache Makefile
	$(BIN)/pip install --quiet --no-deps $(CONFORMANCE)
	$(BIN)/pip install --quiet --no-deps --no-build-isolation sam2==1.1.0
	touch $@

env: $(BIN)/fmcache

demo: env
	$(BIN)/fmcache demo

lint: env
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

test: lint $(VENV)/.conformance
	$(BIN)/pytest -q --durations=15

test-fast: lint $(VENV)/.conformance
	$(BIN)/pytest -q -m "not slow"

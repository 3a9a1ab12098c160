# make test   set up .venv, build the extension, run the whole test suite
# make bench  set up .venv, build the extension, run the fused-vs-eager benchmark
# Both are idempotent: a second run rebuilds only what changed.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
DEPS   := $(VENV)/.deps-installed
BUILT  := $(VENV)/.extension-built
SOURCES := $(shell find csrc -type f) setup.py pyproject.toml
JOBS   ?= $(shell nproc)

.PHONY: setup build test bench host-overhead clean

setup: $(DEPS)

# nvidia-cutlass: CUTLASS's C++ headers, for the `cutlass` backend's sm_90a GEMM (its Python side
# and that side's dependencies are not needed, hence --no-deps).
$(DEPS): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -r requirements.txt
	$(PIP) install --quiet --no-deps "nvidia-cutlass==4.2.0.0"
	touch $@

# --no-build-isolation: build against the torch in .venv (isolation would fetch a second one).
$(BUILT): $(DEPS) $(SOURCES)
	MAX_JOBS=$(JOBS) $(PIP) install --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILT)

test: build
	$(PY) -m pytest tests -q -ra

bench: build
	$(PY) -m fusedskip.bench --model

host-overhead: build
	$(PY) benchmarks/host_overhead.py --out benchmarks/results

clean:
	rm -rf build *.egg-info fusedskip/_C*.so $(BUILT)

# hvtune: every target sets up what it needs. `make demo` runs the whole appliance on a tiny model; `make test` tests it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)

.PHONY: venv test test-fast demo check lint bench clean help
.DEFAULT_GOAL := help

help:
	@echo "make demo | test | test-fast | check | lint | bench | build-cpu | build-cuda | build-rocm | cache | train | clean"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and exact: this machine holds the CPU wheel; a bare `torch` would pull GBs of CUDA wheels.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-*; touch $@

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q --durations=25

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not container"

demo: $(STAMP)
	$(VENV)/bin/hvtune demo --dir demo

check: $(STAMP)
	cd examples/seed-project && ../../$(VENV)/bin/hvtune check --config config/config.json

# python (ruff) here; docker/docker.mk adds hadolint + shellcheck (from the venv's test extra, so a fresh clone lints)
lint: $(STAMP)
	$(PY) -m ruff check app tests benchmarks
	$(PY) -m ruff format --check app tests benchmarks

# every benchmark prints its table and writes benchmarks/results/*.json; docs/PERFORMANCE.md quotes them (~15 min here)
# (scripts, not a package: each imports benchmarks/common.py from its own folder, and hvtune from app/)
bench: $(STAMP)
	PYTHONPATH=app $(PY) benchmarks/bench_train.py
	PYTHONPATH=app $(PY) benchmarks/bench_cache.py
	PYTHONPATH=app $(PY) benchmarks/bench_seqlen.py
	PYTHONPATH=app $(PY) benchmarks/bench_gpu.py $(if $(shell $(PY) -c "import torch; print(torch.cuda.is_available() or '')" 2>/dev/null),,--cpu-smoke)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache demo

include docker/docker.mk

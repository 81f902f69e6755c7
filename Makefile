# frep-lightning — `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP) ## create .venv (if missing) and install the package with dev tools

train: $(STAMP) ## run the default experiment (small, CPU, offline CIFAR-10 pack); ARGS="..." adds Hydra overrides
	$(BIN)/frep-train $(ARGS)

smoke: $(STAMP) ## the <1-minute CPU smoke experiment (about 20 s on 2 cores)
	$(BIN)/frep-train experiment=smoke $(ARGS)

bench: $(STAMP) ## step times eager vs fast (experiments/bench.py; reduced without a GPU); ARGS="..." adds options
	$(BIN)/python experiments/bench.py $(ARGS)

test: $(STAMP) ## run the test-suite
	$(BIN)/python -m pytest -q $(ARGS)

lint: $(STAMP) ## ruff lint + format check
	$(BIN)/ruff check src tests experiments
	$(BIN)/ruff format --check src tests experiments

format: $(STAMP) ## ruff autofix + format
	$(BIN)/ruff check --fix src tests experiments
	$(BIN)/ruff format src tests experiments

clean: ## remove run outputs and caches (keeps .venv)
	rm -rf outputs multirun .pytest_cache .ruff_cache

.PHONY: help install train smoke bench test lint format clean

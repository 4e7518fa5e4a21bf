# Two entry points (README): `make demo` (set up + main job) and `make test` (set up + tests).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast clean

# torch is pinned and installed first: an unpinned torch resolves to a CUDA build with
# gigabytes of CUDA packages; 2.13.0 is the CPU wheel the machines here provide.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

# The main job: fetch SmolLM2-135M, evaluate it, train it with GRPO, evaluate again,
# print the before/after table and write outputs/arithmetic_grpo/reward_curve.png.
demo: setup
	$(BIN)/python -m rl.models fetch smollm2-135m
	$(BIN)/python -m rl.train recipes/arithmetic_grpo.yaml
	cat outputs/arithmetic_grpo/eval_results.md

test: setup
	$(BIN)/python -m pytest -q --durations=15

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) outputs

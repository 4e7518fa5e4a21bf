"""The vLLM engines' GPU-only paths: sleep mode, and the CUDA IPC weight push to a server.

Skipped without a CUDA GPU (CI has none); run on a GPU machine with
`python -m pytest -q tests/test_vllm_gpu.py` after `pip install -e .[test,vllm]`. One GPU is
enough: the server shares the trainer's GPU, which is what the "ipc" sync is for (NCCL
cannot put two ranks on one device, so "nccl" needs a second GPU and is not tested here).
Not yet run: no GPU has been lent to this project's sessions so far.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from rl.engines import SamplingParams, build_engine
from test_vllm_engines import _VLLM_ERROR, flat_logprobs, prompts_of, teacher_forced, vllm_server

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or _VLLM_ERROR is not None,
    reason="needs a CUDA GPU and vLLM (`pip install -e .[vllm]`)",
)


@pytest.fixture(scope="module")
def hf(vdir):  # conftest's `hf`, on the GPU
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(vdir).cuda().eval(), AutoTokenizer.from_pretrained(vdir)


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    policy = copy.deepcopy(model)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return policy


def test_sleep_frees_the_kv_cache_and_wake_loads_the_current_policy(hf):
    """Between rollout and training the engine gives its memory back; weights synced while asleep
    are the ones it samples from after waking."""
    model, tok = hf
    eng = build_engine("vllm", model, tok, 64, kv_cache_gb=1.0, max_model_len=512, dtype="float32")
    try:
        assert eng.sleep_mode
        prompts = prompts_of(tok, [4, 7, 5], seed=4)
        params = SamplingParams(max_new_tokens=10, temperature=1.0)
        eng.generate(prompts, params)
        torch.cuda.synchronize()
        free_awake = torch.cuda.mem_get_info()[0]
        eng.sleep()
        torch.cuda.synchronize()
        freed = torch.cuda.mem_get_info()[0] - free_awake
        assert freed > 0.8 * (1 << 30), f"sleep freed only {freed / 2**30:.2f} GiB of a 1 GiB KV cache"
        policy = _perturbed(model)
        eng.update_weights(policy)  # deferred: loaded at wake
        eng.wake()
        gens = eng.generate(prompts, params)
        with torch.no_grad():
            torch.testing.assert_close(flat_logprobs(gens), teacher_forced(policy, prompts, gens, 1.0).cpu(),
                                       rtol=1e-3, atol=1e-3)
    finally:
        eng.close()


def test_ipc_weight_sync_to_a_server_on_the_same_gpu(vdir, hf, tmp_path):
    model, tok = hf
    env = {"VLLM_SERVER_DEV_MODE": "1", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
    with vllm_server(vdir, tmp_path, "--gpu-memory-utilization", "0.2",
                     "--weight-transfer-config", json.dumps({"backend": "ipc"}), env=env, start_timeout=300) as url:
        eng = build_engine("vllm_server", model, tok, 16, base_url=url, timeout=120, weight_sync="ipc")
        prompts = [p for p in prompts_of(tok, [2, 7, 12], seed=6) for _ in range(2)]
        params = SamplingParams(max_new_tokens=8, temperature=1.0)
        for _ in range(2):  # the first sync opens the transfer, the second reuses it
            policy = _perturbed(model)
            eng.update_weights(policy)
            gens = eng.generate(prompts, params)
            with torch.no_grad():
                torch.testing.assert_close(flat_logprobs(gens), teacher_forced(policy, prompts, gens, 1.0).cpu(),
                                           rtol=1e-3, atol=1e-3)
        assert eng.stats["weight_syncs"] == 2
        eng.close()

"""A bf16 colocate engine fed by an fp32 trainer (the GPU setting, run on this CPU's avx512_bf16).

Its own module: vLLM's parallel state is global to the process, so closing a second engine
would break test_vllm_engines.py's shared engine; pytest closes that one before this module starts.
"""

from __future__ import annotations

import copy

import torch

from rl.engines import SamplingParams, build_engine
from test_vllm_engines import flat_logprobs, needs_vllm, prompts_of, teacher_forced


@needs_vllm
def test_bf16_engine_syncs_from_an_fp32_trainer(vdir, hf):
    """A bf16 engine (the GPU setting; this CPU has avx512_bf16) fed an fp32 policy: the reload casts,
    and after a step + sync its log-probs are the new policy's up to bf16 rounding (measured: mean
    0.004, max 0.013), while the stale samples' are far off (mean 0.9)."""
    model, tok = hf
    eng = build_engine("vllm", model, tok, 64, kv_cache_gb=0.05, max_model_len=512, dtype="bfloat16")
    try:
        assert eng.llm.llm_engine.model_config.dtype == torch.bfloat16
        policy = copy.deepcopy(model).train()
        opt = torch.optim.AdamW(policy.parameters(), lr=5e-2)
        prompts = prompts_of(tok, [4, 7, 5], seed=4)
        params = SamplingParams(max_new_tokens=10, temperature=1.0)
        for _ in range(2):
            ids = torch.tensor([prompts[0] + list(range(10, 20))])
            policy(ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        policy.eval()
        old = eng.generate(prompts, params)
        eng.update_weights(policy)
        new = eng.generate(prompts, params)
        with torch.no_grad():
            gap = (flat_logprobs(new) - teacher_forced(policy, prompts, new, 1.0)).abs()
            stale = (flat_logprobs(old) - teacher_forced(policy, prompts, old, 1.0)).abs()
        assert gap.mean() < 0.02 and gap.max() < 0.1, (gap.mean(), gap.max())
        assert stale.mean() > 0.2, stale.mean()
    finally:
        eng.close()

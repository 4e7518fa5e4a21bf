"""A bf16 colocate engine fed by an fp32 trainer (the GPU setting, run on this CPU's avx512_bf16).

Its own module: vLLM's parallel state is global to the process, so closing a second engine
would break test_vllm_engines.py's shared engine; pytest closes that one before this module starts.
"""

from __future__ import annotations

import copy

import torch

from rl.engines import build_engine
from test_vllm_engines import needs_vllm, prompts_of, step_and_sync


@needs_vllm
def test_bf16_engine_syncs_from_an_fp32_trainer(vdir, hf):
    """A bf16 engine (the GPU setting; this CPU has avx512_bf16) fed an fp32 policy: the reload casts,
    and after a step + sync its log-probs are the new policy's up to bf16 rounding (measured: mean
    0.004, max 0.013), while the stale samples' are far off (mean 0.9)."""
    model, tok = hf
    eng = build_engine("vllm", model, tok, 64, kv_cache_gb=0.05, max_model_len=512, dtype="bfloat16")
    try:
        assert eng.llm.llm_engine.model_config.dtype == torch.bfloat16
        old, new = step_and_sync(copy.deepcopy(model).train(), eng, prompts_of(tok, [4, 7, 5], seed=4))
        gap, stale = (new[0] - new[1]).abs(), (old[0] - old[1]).abs()
        assert gap.mean() < 0.02 and gap.max() < 0.1, (gap.mean(), gap.max())
        assert stale.mean() > 0.2, stale.mean()
    finally:
        eng.close()

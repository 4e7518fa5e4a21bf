"""RL runs with a vision-language policy on the vLLM colocate engine (`rollout.engine: vllm`): 2 GRPO
steps on tiny LLaVA (full, and LoRA on the tower + decoder) and tiny Qwen2-VL, the rollouts' log-probs
measured against the trainer's recomputed ones every step (rollout correction on). Its own module: each
run starts its own engine and no other engine of this module is alive meanwhile.
"""

from __future__ import annotations

import pytest
import torch
from test_vllm_multimodal import needs_vllm
from test_vlm_rl import vlm_dirs, vlm_recipe, vqa_rows  # noqa: F401  (fixtures and the recipe)

from rl.config import config_from_dict
from rl.trainer import train


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("family,overrides", [
    ("llava", {}),
    ("llava", {"model__lora": True, "model__lora_target_modules": ["q_proj", "v_proj", "linear_1"]}),
    ("qwen2_vl", {}),
], ids=["llava", "llava-lora", "qwen2_vl"])
def test_two_step_vlm_run_on_vllm(vlm_dirs, vqa_rows, tmp_path, colocate_engines, family, overrides):  # noqa: F811
    built = colocate_engines
    cfg = vlm_recipe(vlm_dirs[family], vqa_rows, tmp_path, rollout__engine="vllm",
                     rollout__engine_kwargs={"kv_cache_gb": 0.05, "max_model_len": 512},
                     algorithm__rollout_correction="token", **overrides)
    try:
        result = train(config_from_dict(cfg))
    finally:
        for eng in built:
            eng.close()
    steps = [h for h in result["history"] if "reward/mean" in h]
    assert [h["step"] for h in steps] == [1, 2]
    assert all(torch.isfinite(torch.tensor(h["grad_norm"])) for h in steps)
    for h in steps:  # vLLM's log-probs (images, banned placeholders) vs the trainer's: measured, small
        assert 0 <= h["rollout/logp_abs_diff"] < 1e-3 and h["rollout/token_ratio_max"] < 1.01, h
    (eng,) = built
    assert eng.stats["samples"] >= 2 * 2 * 2 and eng.stats["weight_syncs"] == 1 + 2

"""Images on the `vllm_server` engine: a real vLLM server (started through `rl.engines.vllm_serve`, which
prepares vLLM's LLaVA / Qwen2-VL for a machine without torchvision) against a teacher-forced HF forward,
before and after a disk weight sync. Its own module: its server never runs next to another module's vLLM engine.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_vllm_engines import vllm_server
from test_vllm_multimodal import batch, flat, needs_vllm
from tiny_vlm import save_tiny_llava, save_tiny_qwen2_vl

from rl.engines import SamplingParams, build_engine


def vlm_server(model_dir: str, tmp_path, start_timeout: float = 300):
    """`python -m rl.engines.vllm_serve` (test_vllm_engines' `vllm_server`) with the scale-out route
    (images with token prompts) and the dev endpoints."""
    return vllm_server(model_dir, tmp_path, "--kv-cache-memory-bytes", str(64 << 20), "--enable-scale-out",
                       "--limit-mm-per-prompt", '{"image": 4}', env={"VLLM_SERVER_DEV_MODE": "1"},
                       start_timeout=start_timeout, module="rl.engines.vllm_serve")


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_server_engine_images_match_hf_and_sync_weights(tmp_path, family):
    import test_vllm_multimodal
    import test_vllm_qwen2_vl

    from rl.multimodal import load_pretrained_model, load_tokenizer_and_processor

    if family == "llava":
        path = save_tiny_llava(tmp_path / family)
        moved = ("multi_modal_projector", "vision_tower.encoder")  # projector and tower: the server reloads both
        teacher_forced = test_vllm_multimodal.teacher_forced
    else:
        path = save_tiny_qwen2_vl(tmp_path / family)
        moved = ("visual.",)
        teacher_forced = test_vllm_qwen2_vl.teacher_forced
    tok, processor = load_tokenizer_and_processor(path)
    model = load_pretrained_model(path, torch.float32, "sdpa").eval()
    # 1 image, 2 images, none; each twice in a row (one request with n=2 each)
    prompts, images = batch(processor) if family == "llava" else test_vllm_qwen2_vl.prompts_and_images(processor)
    params = SamplingParams(max_new_tokens=8, temperature=1.0)
    with vlm_server(path, tmp_path) as url:
        (tmp_path / "sync").mkdir()
        eng = build_engine("vllm_server", model, tok, 16, base_url=url, timeout=120, weight_sync="disk",
                           sync_dir=str(tmp_path / "sync"))
        try:
            gens = eng.generate(prompts, params, images=images)
            assert eng.stats["requests"] == 3
            torch.testing.assert_close(flat(gens), teacher_forced(model, processor, prompts, images, gens, 1.0),
                                       rtol=1e-4, atol=2e-4)
            policy = copy.deepcopy(model)
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for name, p in policy.named_parameters():
                    if any(m in name for m in moved):
                        p.add_(torch.randn(p.shape, generator=g) * 0.2)
            eng.update_weights(policy)
            gens = eng.generate(prompts, params, images=images)
            torch.testing.assert_close(flat(gens), teacher_forced(policy, processor, prompts, images, gens, 1.0),
                                       rtol=1e-4, atol=2e-4)
            assert not torch.allclose(flat(gens), teacher_forced(model, processor, prompts, images, gens, 1.0),
                                      atol=1e-3)
        finally:
            eng.close()

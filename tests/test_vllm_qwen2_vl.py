"""Qwen2-VL on the vLLM colocate engine without torchvision (rl/engines/vllm_vision.py's image-only path):
log-probs of sampled tokens against a teacher-forced HF forward, before and after a weight sync (full, LoRA).

Its own module so that its engine never runs next to test_vllm_multimodal.py's LLaVA engine.
"""

from __future__ import annotations

import copy

import pytest
import torch

from rl.engines import SamplingParams, build_engine
from rl.engines.vllm_vision import (
    Placeholders,
    VisionModelUnsupported,
    banned_ids,
    placeholders,
    prepare_vllm_for_vlm,
)
from test_vllm_multimodal import draw, flat, needs_vllm, trainer_logprobs
from tiny_vlm import save_tiny_qwen2_vl


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    from rl.multimodal import load_pretrained_model, load_tokenizer_and_processor

    path = save_tiny_qwen2_vl(tmp_path_factory.mktemp("vllm_qwen2_vl") / "qwen2_vl")
    tok, processor = load_tokenizer_and_processor(path)
    return load_pretrained_model(path, torch.float32, "sdpa").eval(), tok, processor


@pytest.fixture(scope="module")
def engine(qwen):
    model, tok, _ = qwen
    eng = build_engine("vllm", model, tok, 16, kv_cache_gb=0.05, max_model_len=512)
    yield eng
    eng.close()


def prompts_and_images(processor):
    """Each of three prompts twice: 2 images of different sizes, 1 image, no image."""
    out_p, out_i = [], []
    for ims in ([draw("red", size=(64, 48)), draw("blue", "rectangle", (40, 80))], [draw("green")], []):
        content = [*({"type": "image", "image": im} for im in ims), {"type": "text", "text": "What color is it?"}]
        ids = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"][0]
        out_p += [list(ids)] * 2
        out_i += [ims, ims]
    return out_p, out_i


def teacher_forced(model, processor, prompts, images, gens, temperature=1.0):
    """HF log-probs of the sampled tokens, image and video placeholders masked as the trainer masks them.
    Image features and M-RoPE image positions cover the prompt's placeholders only."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    image_id = base.config.image_token_id
    out = []
    for p, ims, g in zip(prompts, images, gens):
        if not g.token_ids:
            continue
        ids = torch.tensor([p + g.token_ids])
        with torch.no_grad():
            embeds = base.get_input_embeddings()(ids)
            kwargs = {}
            if ims:
                enc = processor.image_processor(images=ims, return_tensors="pt")
                feats = base.model.get_image_features(enc["pixel_values"], enc["image_grid_thw"]).pooler_output
                slots = (ids[0] == image_id) & (torch.arange(ids.shape[1]) < len(p))
                embeds[0, slots] = torch.cat(list(feats)).to(embeds.dtype)
                kwargs["position_ids"], _ = base.model.get_rope_index(
                    ids, mm_token_type_ids=slots[None].int(), image_grid_thw=enc["image_grid_thw"])
            base.model.rope_deltas = None  # cached by an earlier forward (another batch): not for this one
            logits = model(inputs_embeds=embeds, **kwargs).logits[0, len(p) - 1 : -1].float()
            logits[:, banned_ids(base.config)] = float("-inf")  # never sampled: the trainer masks them too
        logp = (logits / temperature).log_softmax(-1)
        out.append(logp.gather(-1, torch.tensor(g.token_ids)[:, None])[:, 0])
    return torch.cat(out)


def test_placeholders_and_unsupported_families(qwen):
    model, _, _ = qwen
    assert placeholders(model.config) == Placeholders(frozenset({model.config.image_token_id}), None)
    assert banned_ids(model.config) == sorted({model.config.image_token_id, model.config.video_token_id})
    from transformers import Qwen2_5_VLConfig
    from transformers.utils import is_torchvision_available

    if not is_torchvision_available():
        with pytest.raises(VisionModelUnsupported, match="qwen2_5_vl.*torchvision.*Fix: install torchvision"):
            prepare_vllm_for_vlm(Qwen2_5_VLConfig())


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_match_teacher_forcing(engine, qwen, temperature):
    model, tok, processor = qwen
    prompts, images = prompts_and_images(processor)
    requests = engine.stats["requests"]
    gens = engine.generate(prompts, SamplingParams(max_new_tokens=8, temperature=temperature), images=images)
    assert engine.stats["requests"] - requests == 3
    torch.testing.assert_close(flat(gens), teacher_forced(model, processor, prompts, images, gens, temperature),
                               rtol=1e-4, atol=2e-4)
    torch.testing.assert_close(flat(gens), trainer_logprobs(model, tok, processor, prompts, images, gens, temperature),
                               rtol=1e-4, atol=2e-4)


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_update_weights_matches_the_new_policy(engine, qwen, lora):
    model, _, processor = qwen
    prompts, images = prompts_and_images(processor)
    if lora:
        from peft import LoraConfig, get_peft_model

        # the vision blocks' fused qkv and the decoder's q/v projections
        policy = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8,
                                                                 target_modules=["qkv", "q_proj", "v_proj"]))
        with torch.no_grad():
            for n, p in policy.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.2)
    else:
        policy = copy.deepcopy(model)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in policy.named_parameters():
                if any(k in name for k in ("visual.merger", "visual.blocks.0.mlp", "language_model.layers.1.")):
                    p.add_(torch.randn(p.shape, generator=g) * 0.2)
    policy.eval()
    try:
        engine.update_weights(policy)
        gens = engine.generate(prompts, SamplingParams(max_new_tokens=8, temperature=1.0), images=images)
        torch.testing.assert_close(flat(gens), teacher_forced(policy, processor, prompts, images, gens),
                                   rtol=1e-4, atol=2e-4)
        assert not torch.allclose(flat(gens), teacher_forced(model, processor, prompts, images, gens), atol=1e-3)
    finally:
        engine.update_weights(model)

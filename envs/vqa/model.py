"""A tiny Qwen2-VL (random init) with a locally built tokenizer and processor.

Nothing is downloaded: the tokenizer is a byte-level BPE trained in-process on the
given texts (for easy-vqa: its questions and answers), the processor is transformers'
Qwen2-VL processor with the PIL image processor (`sft.vlm.image_only_processor_class`:
no torchvision needed) and the Qwen2-VL chat template, the model is
`Qwen2VLForConditionalGeneration` from a small config: the same architecture as
Qwen2-VL-2B (ViT with 14x14 patches and 2x2 patch merging, M-RoPE decoder), sized for
a CPU.

    python -m envs.vqa init-model --data data/easy_vqa/train.jsonl --out outputs/vqa_tiny_init

Images are resized to exactly `image_side` x `image_side` pixels (a multiple of 28):
64x64 easy-vqa images at `image_side=112` become 8x8 patches -> 16 image tokens.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "SPECIAL_TOKENS",
    "TEMPLATE_TEXTS",
    "build_model",
    "build_processor",
    "build_tokenizer",
    "save_tiny_vlm",
]

# Qwen2-VL's special tokens (same strings; ids are this tokenizer's own)
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# what the chat template itself writes around the messages
TEMPLATE_TEXTS = ["system\nYou are a helpful assistant.\n", "user\n", "assistant\n"]


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """Byte-level BPE (round-trips any text) trained on `texts` + the template's words;
    eos = <|im_end|>, pad = unk = <|endoftext|>, the Qwen2-VL chat template attached."""
    from transformers import PreTrainedTokenizerFast

    from rl.models import train_byte_level_bpe
    from sft.vlm import qwen2_vl_chat_template

    bpe = train_byte_level_bpe([*TEMPLATE_TEXTS * 4, *texts], vocab_size, SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = qwen2_vl_chat_template()
    return tok


def build_processor(tokenizer, image_side: int = 112):
    """Qwen2-VL processor (image-only variant, PIL image processor): every image is
    resized to `image_side` x `image_side` (a multiple of patch 14 x merge 2 = 28)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from sft.vlm import image_only_processor_class, qwen2_vl_chat_template

    if image_side % 28:
        raise ValueError(f"image_side must be a multiple of 28 (patch 14 x merge 2), got {image_side}")
    pixels = image_side * image_side
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=pixels, max_pixels=pixels, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    return image_only_processor_class("Qwen2VLProcessor")(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=qwen2_vl_chat_template()
    )


def _mrope_section(head_dim: int) -> list[int]:
    # temporal / height / width split of the rotary frequencies (Qwen2-VL: [16, 24, 24] of 64)
    half = head_dim // 2
    side = half * 3 // 8
    return [half - 2 * side, side, side]


def build_model(
    tokenizer,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    vision_depth: int = 2,
    vision_dim: int = 64,
    vision_heads: int = 4,
    seed: int = 0,
):
    """A randomly initialised fp32 `Qwen2VLForConditionalGeneration` sized for `tokenizer`."""
    import torch
    from transformers import GenerationConfig, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = hidden_size // num_heads
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=intermediate_size or 2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _mrope_section(head_dim)},
            bos_token_id=ids["<|im_start|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=vision_depth,
            embed_dim=vision_dim,
            hidden_size=hidden_size,  # the patch merger projects to the decoder width
            num_heads=vision_heads,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]
    )
    return model


def save_tiny_vlm(
    out: str | os.PathLike, texts: Iterable[str], *, vocab_size: int = 512, image_side: int = 112, **model_kwargs
) -> Path:
    """Build tokenizer + processor + model and `save_pretrained` them (safetensors) into `out`."""
    out = Path(out)
    tokenizer = build_tokenizer(texts, vocab_size)
    processor = build_processor(tokenizer, image_side)
    model = build_model(tokenizer, **model_kwargs)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out

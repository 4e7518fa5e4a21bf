"""Tiny, deterministic, download-free vision-language checkpoints for tests (vLLM's CPU build runs them).

    save_tiny_llava(out)      # LLaVA: CLIP tower + projector + tiny Llama, tests/tiny.py's tokenizer + <image>
    save_tiny_qwen2_vl(out)   # Qwen2-VL (envs/vqa/model.py), its own BPE tokenizer

Both decoders have head_dim 32 (vLLM's CPU attention takes head sizes 32..512, see conftest's `vdir`),
and both checkpoints reload with
`AutoModelForImageTextToText.from_pretrained`; the LLaVA processor with `AutoProcessor`, the Qwen2-VL one
with `sft.vlm.load_processor` (AutoProcessor needs torchvision for Qwen2-VL's video processor).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
for _p in (str(_ROOT), str(_ROOT / "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from tiny import make_tiny_llama, make_tiny_tokenizer  # noqa: E402

__all__ = ["LLAVA_IMAGE_SIDE", "QWEN2_VL_IMAGE_SIDE", "QWEN2_VL_TEXTS", "save_tiny_llava", "save_tiny_qwen2_vl"]

LLAVA_IMAGE_SIDE = 56  # patch 14 -> 4 x 4 = 16 image tokens
QWEN2_VL_IMAGE_SIDE = 56  # patch 14 -> 4 x 4 patches, merged 2 x 2 -> 4 image tokens
QWEN2_VL_TEXTS = [
    "What color is the shape? red blue green yellow black white gray",
    "What shape is it? circle square triangle rectangle",
    "Is there a red circle? yes no",
    "What is in the image? How many shapes are there? one two three",
]


def save_tiny_llava(out_dir: str | os.PathLike, seed: int = 0, *, image_side: int = LLAVA_IMAGE_SIDE,
                    patch_size: int = 14, **llama_overrides) -> str:
    """A tiny LLaVA checkpoint: tests/tiny.py's tokenizer (+ `<image>`), a 2-layer Llama with hidden 64,
    2 heads of 32 (1 kv head), a 1-layer CLIP tower (width 32, 2 heads); `(image_side // patch_size)**2`
    tokens per image. Returns `str(out_dir)`."""
    from envs.vqa.llava import build_llava, build_llava_processor, save_llava

    tok = make_tiny_tokenizer()
    text = make_tiny_llama(tok, seed=seed, **{"num_attention_heads": 2, "num_key_value_heads": 1, **llama_overrides})
    processor = build_llava_processor(tok, image_side=image_side, patch_size=patch_size)
    model = build_llava(text, tok, image_side=image_side, patch_size=patch_size, vision_hidden=32, vision_layers=1,
                        vision_heads=2, seed=seed)
    save_llava(model, processor, out_dir)
    return str(out_dir)


def save_tiny_qwen2_vl(out_dir: str | os.PathLike, seed: int = 0, *, image_side: int = QWEN2_VL_IMAGE_SIDE) -> str:
    """A tiny Qwen2-VL checkpoint (envs/vqa/model.py): BPE tokenizer trained on `QWEN2_VL_TEXTS`, 2 decoder
    layers with hidden 64 and 2 heads of 32 (1 kv head), a 1-block vision tower (width 32, 2 heads); a
    56 x 56 image is 4 x 4 patches merged 2 x 2 -> 4 image tokens. Returns `str(out_dir)`."""
    from envs.vqa.model import build_model, build_processor, build_tokenizer

    out = Path(out_dir)
    tok = build_tokenizer(QWEN2_VL_TEXTS, vocab_size=320)
    processor = build_processor(tok, image_side=image_side)
    model = build_model(tok, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, vision_depth=1,
                        vision_dim=32, vision_heads=2, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return str(out)

"""A LLaVA-style VLM in transformers' own classes: CLIP vision tower + LLaVA projector + Llama.

    model = build_llava(text_model_or_config, tokenizer, image_side=112, patch_size=14,
                        vision_hidden=128, vision_layers=2, vision_heads=4, seed=0)
    processor = build_llava_processor(tokenizer, image_side=112, patch_size=14)
    save_llava(model, processor, "outputs/llava")    # AutoProcessor / AutoModelForImageTextToText reload it

Why LLaVA's classes (and not a custom module): `LlavaForConditionalGeneration`,
`LlavaProcessor` and `CLIPVisionModel` are what vLLM's LLaVA implementation, PEFT and TRL's
vision collator already know, so the built model is served, LoRA-adapted and SFT'd without any
code of ours in between.

Choices, and why:
- Every image is resized to exactly `image_side` x `image_side` (no shortest-edge resize followed
  by a centre crop, CLIP's default, which silently cuts the sides of non-square images) and becomes
  `(image_side // patch_size) ** 2` `<image>` tokens: the CLS token is dropped
  (`vision_feature_select_strategy="default"`) and the features are the vision tower's LAST layer
  (`vision_feature_layer=-1`; LLaVA-1.5 takes the penultimate one, which would leave the last layer's
  parameters without gradients, and DDP / weight sync would carry dead weights). The CLIP config's
  `image_size` equals `image_side`: vLLM counts image tokens from the vision config, not from the
  processor, so the two must agree.
- The tokenizer gets `<image>` as a special token if it lacks one; the text model's embedding (and an
  untied head) grows by the new rows, initialised to the mean of the existing rows (the row itself
  is never read: image features replace it, but a resized vocabulary must not hold garbage).
- The chat template is ChatML (SmolLM2's, same default system prompt) and renders content parts:
  `{"type": "image"}` -> `<image>` (the processor expands it to the image's token count),
  `{"type": "text"}` -> its text. Assistant replies and their `<|im_end|>` are inside
  `{% generation %}` markers, so TRL's assistant-only loss finds them.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["IMAGE_TOKEN", "LLAVA_CHAT_TEMPLATE", "build_llava", "build_llava_processor", "save_llava"]

IMAGE_TOKEN = "<image>"

_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# ChatML with content parts; the macro renders a string content or a list of image/text parts.
LLAVA_CHAT_TEMPLATE = (
    "{% macro render(content) %}"
    "{% if content is string %}{{ content }}"
    "{% else %}{% for part in content %}"
    "{% if part['type'] == 'image' %}{{ '" + IMAGE_TOKEN + "' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% endmacro %}"
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + _DEFAULT_SYSTEM + "<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ render(message['content']) }}{{ '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ render(message['content']) }}{{ '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _check_geometry(image_side: int, patch_size: int) -> None:
    if image_side <= 0 or patch_size <= 0 or image_side % patch_size:
        raise ValueError(f"image_side ({image_side}) must be a positive multiple of patch_size ({patch_size})")


def _ensure_image_token(tokenizer) -> int:
    """The id of `<image>`, added to `tokenizer` (in place) as a special token when missing."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def build_llava_processor(tokenizer, image_side: int, patch_size: int):
    """`LlavaProcessor`: `tokenizer` (gets `<image>` if missing; eos/pad kept), a PIL CLIP image
    processor that resizes to exactly `image_side` x `image_side` (no crop), the ChatML template."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    _check_geometry(image_side, patch_size)
    _ensure_image_token(tokenizer)
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    side = {"height": image_side, "width": image_side}
    image_processor = CLIPImageProcessorPil(size=side, crop_size=side, do_center_crop=False, do_resize=True)
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        chat_template=LLAVA_CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped again by the "default" strategy
    )


def _text_model(text_model_or_config):
    """(config, pretrained LlamaForCausalLM or None) from a model, a config, or a checkpoint path."""
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel

    if isinstance(text_model_or_config, (str, os.PathLike)):
        text_model_or_config = AutoModelForCausalLM.from_pretrained(text_model_or_config, dtype="float32")
    if isinstance(text_model_or_config, PreTrainedModel):
        if text_model_or_config.config.model_type != "llama":
            raise ValueError(
                f"build_llava: the text model must be a Llama (LlamaForCausalLM), got model_type="
                f"{text_model_or_config.config.model_type!r}"
            )
        return text_model_or_config.config, text_model_or_config
    if isinstance(text_model_or_config, LlamaConfig):
        return text_model_or_config, None
    raise TypeError(
        "build_llava: text_model_or_config must be a LlamaForCausalLM, a LlamaConfig or a checkpoint path, "
        f"got {type(text_model_or_config).__name__}"
    )


def _grown(weight, rows: int):
    """`weight` with extra rows (mean of the existing ones) up to `rows`."""
    import torch

    if weight.shape[0] > rows:
        raise ValueError(f"the text model has {weight.shape[0]} vocabulary rows but the tokenizer only {rows}")
    extra = weight.mean(dim=0, keepdim=True).expand(rows - weight.shape[0], -1)
    return torch.cat([weight, extra], dim=0)


def build_llava(
    text_model_or_config,
    tokenizer,
    *,
    image_side: int,
    patch_size: int,
    vision_hidden: int,
    vision_layers: int,
    vision_heads: int,
    seed: int = 0,
):
    """A fp32 `LlavaForConditionalGeneration`: a randomly initialised CLIP vision tower and projector
    (from `seed`) and a Llama text model: a pretrained `LlamaForCausalLM` (or its path) whose weights
    are copied in (not modified), or a `LlamaConfig` for random init. `tokenizer` gets `<image>` if
    missing; the vocabulary is `len(tokenizer)`."""
    import torch
    from transformers import CLIPVisionConfig, GenerationConfig, LlavaConfig, LlavaForConditionalGeneration

    _check_geometry(image_side, patch_size)
    if vision_hidden % vision_heads:
        raise ValueError(f"vision_hidden ({vision_hidden}) must be divisible by vision_heads ({vision_heads})")
    image_id = _ensure_image_token(tokenizer)
    base_config, pretrained = _text_model(text_model_or_config)
    text_config = base_config.to_dict()
    text_config.update(vocab_size=len(tokenizer))
    for key in ("architectures", "dtype", "torch_dtype", "_name_or_path", "transformers_version"):
        text_config.pop(key, None)
    tied = bool(getattr(base_config, "tie_word_embeddings", False))
    vision_config = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=4 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_side,
        patch_size=patch_size,
        projection_dim=vision_hidden,
        hidden_act="quick_gelu",  # CLIP's
    )
    n_image_tokens = (image_side // patch_size) ** 2
    config = LlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config,
        image_token_index=image_id,
        image_seq_length=n_image_tokens,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        tie_word_embeddings=tied,
    )
    config.text_config.tie_word_embeddings = tied
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).to(torch.float32)
    if pretrained is not None:
        state = {k: v.detach().to(torch.float32) for k, v in pretrained.model.state_dict().items()}
        state["embed_tokens.weight"] = _grown(state["embed_tokens.weight"], len(tokenizer))
        missing, unexpected = model.model.language_model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"build_llava: text weights do not fit: missing {missing}, unexpected {unexpected}")
        if tied:
            model.tie_weights()
        else:
            head = _grown(pretrained.lm_head.weight.detach().to(torch.float32), len(tokenizer))
            with torch.no_grad():
                model.lm_head.weight.copy_(head)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    eos = eos if eos is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    model.config.text_config.eos_token_id = eos
    model.config.text_config.pad_token_id = pad
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=eos, pad_token_id=pad)
    model.eval()
    return model


def save_llava(model, processor, out_dir: str | os.PathLike) -> Path:
    """`save_pretrained` model (safetensors) + processor (tokenizer, image processor, template) into
    `out_dir`, written to a temporary sibling first and renamed into place, so a crash never leaves a
    half-written checkpoint that loads. An existing `out_dir` is an error (nothing is overwritten)."""
    import shutil
    import tempfile

    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"save_llava: {out} already exists (remove it or choose another directory)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out

"""The LLaVA builder (envs/vqa/llava.py) and the tiny VLM checkpoints of tests/tiny_vlm.py."""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw

from tiny import make_tiny_llama, make_tiny_tokenizer
from tiny_vlm import save_tiny_llava, save_tiny_qwen2_vl


def _image(color, shape="ellipse", size=(64, 48)):
    im = Image.new("RGB", size, "white")
    getattr(ImageDraw.Draw(im), shape)((8, 8, size[0] - 8, size[1] - 8), fill=color)
    return im


def _messages(images, text="What color is it?"):
    return [{"role": "user", "content": [*({"type": "image", "image": im} for im in images),
                                         {"type": "text", "text": text}]}]


def test_build_llava_copies_the_text_model_and_adds_the_image_token():
    from envs.vqa.llava import IMAGE_TOKEN, build_llava

    tok = make_tiny_tokenizer()
    text = make_tiny_llama(tok, num_attention_heads=2, num_key_value_heads=1)
    n = len(tok)
    before = {k: v.clone() for k, v in text.state_dict().items()}
    model = build_llava(text, tok, image_side=28, patch_size=14, vision_hidden=32, vision_layers=1, vision_heads=2)
    assert len(tok) == n + 1 and model.config.image_token_index == tok.convert_tokens_to_ids(IMAGE_TOKEN)
    emb = model.model.language_model.embed_tokens.weight
    assert emb.shape[0] == n + 1
    assert torch.equal(emb[:n], text.model.embed_tokens.weight)
    assert torch.allclose(emb[n], text.model.embed_tokens.weight.mean(0))
    assert model.lm_head.weight.data_ptr() == emb.data_ptr()  # tied, as the text model
    for k, v in model.model.language_model.state_dict().items():
        if k != "embed_tokens.weight":
            assert torch.equal(v, before[f"model.{k}"]), k
    assert all(torch.equal(v, text.state_dict()[k]) for k, v in before.items())  # the text model is untouched
    # a prompt without images runs the copied text model unchanged
    ids = torch.tensor([tok("What is 2 plus 3?")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits[..., :n], text(input_ids=ids).logits, atol=1e-5)


def test_build_llava_from_an_untied_config_and_bad_geometry():
    from transformers import LlamaConfig

    from envs.vqa.llava import build_llava

    tok = make_tiny_tokenizer()
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                      intermediate_size=128, vocab_size=len(tok), tie_word_embeddings=False)
    model = build_llava(cfg, tok, image_side=28, patch_size=14, vision_hidden=32, vision_layers=1, vision_heads=2)
    assert model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr()
    with pytest.raises(ValueError, match="multiple of patch_size"):
        build_llava(cfg, tok, image_side=30, patch_size=14, vision_hidden=32, vision_layers=1, vision_heads=2)


def test_tiny_llava_reloads_and_renders_expanded_placeholders(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from envs.vqa.llava import save_llava

    out = save_tiny_llava(tmp_path / "llava")
    processor = AutoProcessor.from_pretrained(out)
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    image_id = model.config.image_token_index
    # non-square images of different sizes: each is resized to 56 x 56 (no crop) -> 16 tokens
    images = [_image("red", size=(80, 40)), _image("blue", "rectangle", size=(30, 60))]
    batch = processor.apply_chat_template(_messages(images), add_generation_prompt=True, tokenize=True,
                                          return_dict=True, return_tensors="pt")
    assert tuple(batch["pixel_values"].shape) == (2, 3, 56, 56)
    ids = batch["input_ids"][0].tolist()
    assert ids.count(image_id) == 32
    first = ids.index(image_id)
    assert ids[first:first + 32] == [image_id] * 32  # two images, back to back, each expanded in place
    assert processor.tokenizer.decode(ids).endswith("What color is it?<|im_end|>\n<|im_start|>assistant\n")
    with torch.no_grad():
        logits = model(**batch).logits
        other = model(**{**batch, "pixel_values": batch["pixel_values"].flip(0)}).logits
    assert not torch.allclose(logits[0, -1], other[0, -1])  # the images reach the decoder
    # TRL's assistant-only loss: the generation markers cover the reply and its <|im_end|>
    convo = _messages(images[:1]) + [{"role": "assistant", "content": "red"}]
    r = processor.apply_chat_template(convo, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    trained = [i for i, m in zip(r["input_ids"][0], r["assistant_masks"][0]) if m]
    assert processor.tokenizer.decode(trained) == "red<|im_end|>"
    with pytest.raises(FileExistsError, match="already exists"):
        save_llava(model, processor, out)


def test_tiny_qwen2_vl_reloads_and_renders_expanded_placeholders(tmp_path):
    from transformers import AutoModelForImageTextToText

    from sft.vlm import load_processor

    out = save_tiny_qwen2_vl(tmp_path / "qwen2_vl")
    processor = load_processor(out)
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert model.config.text_config.hidden_size // model.config.text_config.num_attention_heads == 32
    batch = processor.apply_chat_template(_messages([_image("red"), _image("green")]), add_generation_prompt=True,
                                          tokenize=True, return_dict=True, return_tensors="pt")
    assert batch["input_ids"][0].tolist().count(model.config.image_token_id) == 2 * 4
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 4]]
    with torch.no_grad():
        assert model(**batch).logits.shape[1] == batch["input_ids"].shape[1]

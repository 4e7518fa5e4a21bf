"""Images on the vLLM engines (rl/engines/vllm_colocate.py, vllm_server.py, vllm_vision.py) against a
teacher-forced HF forward of the same vision-language model.

The model is tests/tiny_vlm.py's tiny LLaVA (CLIP tower + projector + Llama with head_dim 32, 16 tokens per
56 x 56 image). Prompts are what the HF processor renders (placeholders expanded), images are drawn here.
One colocate engine per module; tests that start vLLM or a server process are `@pytest.mark.slow`
(the whole module: ~25 s on 2 CPU cores).
"""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image, ImageDraw

from rl.engines import SamplingParams, build_engine
from rl.engines.base import group_prompts
from rl.engines.vllm_vision import (
    Placeholders,
    banned_ids,
    check_images,
    collapse_placeholders,
    placeholders,
)
from rl.multimodal import ImageError, image_key
from rl.weights import export_weights
from tiny_vlm import save_tiny_llava

try:
    import vllm  # noqa: F401

    _VLLM_ERROR = None
except Exception as e:  # ImportError, or a broken install
    _VLLM_ERROR = f"{type(e).__name__}: {e}"

needs_vllm = pytest.mark.skipif(_VLLM_ERROR is not None, reason=f"vLLM is not importable ({_VLLM_ERROR})")


def draw(color, shape="ellipse", size=(64, 48)):
    im = Image.new("RGB", size, "white")
    getattr(ImageDraw.Draw(im), shape)((6, 6, size[0] - 6, size[1] - 6), fill=color)
    return im


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> str:
    return save_tiny_llava(tmp_path_factory.mktemp("vllm_mm") / "llava")


@pytest.fixture(scope="module")
def llava(llava_dir):
    """(model, tokenizer with its processor attached, processor), loaded as the trainer loads a VLM."""
    from rl.multimodal import load_pretrained_model, load_tokenizer_and_processor

    tok, processor = load_tokenizer_and_processor(llava_dir)
    model = load_pretrained_model(llava_dir, torch.float32, "sdpa").eval()
    return model, tok, processor


@pytest.fixture(scope="module")
def engine(llava):
    model, tok, _ = llava
    eng = build_engine("vllm", model, tok, 16, kv_cache_gb=0.05, max_model_len=512)
    yield eng
    eng.close()


def render(processor, images, text="What color is it?"):
    """(prompt ids, pixel_values) as the HF processor renders a one-turn chat with `images`."""
    content = [*({"type": "image", "image": im} for im in images), {"type": "text", "text": text}]
    out = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True, return_tensors="pt")
    return out["input_ids"][0].tolist(), out.get("pixel_values")


def teacher_forced(model, processor, prompts, images, gens, temperature):
    """The HF model's log-probs of every generated token (one forward per sample), flattened, with the
    image placeholder masked (-inf) as the trainer masks it: no engine samples it (`banned_ids`).

    The image features go into the prompt's placeholder positions only (`inputs_embeds`), so the helper stays
    valid for responses that contain the placeholder (engines before the ban sampled it: a random policy does)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    out = []
    for p, ims, g in zip(prompts, images, gens):
        if not g.token_ids:
            continue
        ids = torch.tensor([p + g.token_ids])
        with torch.no_grad():
            embeds = base.get_input_embeddings()(ids)
            if ims:
                pixel_values = processor.image_processor(images=ims, return_tensors="pt")["pixel_values"]
                feats = base.model.get_image_features(
                    pixel_values=pixel_values, vision_feature_layer=cfg.vision_feature_layer,
                    vision_feature_select_strategy=cfg.vision_feature_select_strategy).pooler_output
                slots = (ids[0] == cfg.image_token_index) & (torch.arange(ids.shape[1]) < len(p))
                embeds[0, slots] = torch.cat(list(feats)).to(embeds.dtype)
            logits = model(inputs_embeds=embeds).logits[0, len(p) - 1 : -1].float()
            logits[:, banned_ids(cfg)] = float("-inf")
        logp = (logits / temperature).log_softmax(-1)
        out.append(logp.gather(-1, torch.tensor(g.token_ids)[:, None])[:, 0])
    return torch.cat(out)


def trainer_logprobs(model, tok, processor, prompts, images, gens, temperature):
    """The trainer's log-probs of every generated token: `rl.packing.make_micro_batch` (packed, with the
    policy's `VisionInputs`) and `rl.forward.forward_logprobs`, as an RL step computes them; flattened."""
    from rl.forward import forward_logprobs
    from rl.multimodal import VisionInputs
    from rl.packing import make_micro_batch, scatter_rows
    from rl.trajectory import Trajectory

    trajs = [Trajectory(p, g.token_ids, [1] * len(g.token_ids), g.logprobs, i, {}, images=list(ims) or None,
                        prompt_images=len(ims)) for i, (p, ims, g) in enumerate(zip(prompts, images, gens))]
    mb = make_micro_batch(trajs, list(range(len(trajs))), True, tok.pad_token_id, 4096, VisionInputs(processor, model))
    with torch.no_grad():
        logp, _ = forward_logprobs(model, mb, temperature, False)
    full = scatter_rows(logp, mb, len(trajs), max(len(t.response_ids) for t in trajs))
    return torch.cat([full[i, : len(t.response_ids)] for i, t in enumerate(trajs)])


def flat(gens):
    return torch.tensor([x for g in gens for x in g.logprobs])


def batch(processor):
    """Three prompts, each twice in a row (grouped into n=2 requests): 1 image, 2 images, no image."""
    one, two = [draw("red")], [draw("blue", "rectangle", (40, 70)), draw("green")]
    prompts, images = [], []
    for ims in (one, two, []):
        p, _ = render(processor, ims) if ims else (processor.tokenizer("What is 2 plus 3?")["input_ids"], None)
        prompts += [p, p]
        images += [ims, ims]
    return prompts, images


# ----------------------------------------------------------------------------- no vLLM needed


def test_placeholders_collapse_and_image_checks(llava):
    model, _, processor = llava
    spec = placeholders(model.config)
    image_id = model.config.image_token_index
    assert spec == Placeholders(frozenset({image_id}), 16)
    ids, _ = render(processor, [draw("red"), draw("blue")])
    assert ids.count(image_id) == 32
    collapsed = collapse_placeholders(ids, spec)
    assert collapsed.count(image_id) == 2 and len(collapsed) == len(ids) - 30  # adjacent images: 2 x 16 -> 2
    # the processor's own template text has exactly those ids (one <image> per image)
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                          {"type": "text", "text": "What color is it?"}]}], add_generation_prompt=True)
    assert collapsed == processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    # Qwen2-VL style (count per image not fixed): each run -> one token
    assert collapse_placeholders([5, 9, 9, 9, 6, 9, 9, 7], Placeholders(frozenset({9}))) == [5, 9, 6, 9, 7]

    one = [draw("red")]
    assert check_images([ids, [1, 2]], [[draw("red"), draw("blue")], []], spec) is not None
    assert check_images([[1, 2]], [[]], spec) is None  # no prompt has images
    with pytest.raises(ImageError, match=r"prompt 1: 1 image\(s\) need 16 image placeholder tokens .* have 32"):
        check_images([[1, 2], ids], [[], one], spec)
    with pytest.raises(ImageError, match="prompt 0 has image placeholder tokens but no images"):
        check_images([ids], None, spec)
    with pytest.raises(ImageError, match=r"prompt 0: images\[0\]\[0\] is a str"):
        check_images([ids], [["red.png", draw("red")]], spec)
    with pytest.raises(ImageError, match="2 image lists for 1 prompts"):
        check_images([ids], [one, one], spec)
    with pytest.raises(ImageError, match="prompt 0: 1 image.*not a vision-language model"):
        check_images([[1, 2]], [one], Placeholders())
    with pytest.raises(ImageError, match=r"prompt 0: 1 image\(s\) but 2 image placeholder run"):
        check_images([[5, 9, 9, 6, 9, 7]], [one], Placeholders(frozenset({9})))


def test_group_prompts_keys_on_image_content():
    red, red_again, blue = draw("red"), draw("red"), draw("blue")
    assert image_key([red]) == image_key([red_again]) != image_key([blue])
    p = [1, 2, 3]
    # same ids, different images: never one request; same ids, equal images (other objects): one
    assert group_prompts([p, p, p, p], [[red], [red_again], [blue], []]) == [(p, 2), (p, 1), (p, 1)]
    assert group_prompts([p, p], [[red, blue], [red, blue]]) == [(p, 2)]
    assert group_prompts([p, p], [[red, blue], [blue, red]]) == [(p, 1), (p, 1)]  # order matters
    assert group_prompts([p, p]) == [(p, 2)]


def test_export_weights_names_are_the_hf_llava_names(llava):
    model, _, _ = llava
    names = [n for n, _ in export_weights(model)]
    assert names == list(model.state_dict())
    assert {n.split(".")[0] + "." + n.split(".")[1] if n.startswith("model.") else n.split(".")[0] for n in names} == {
        "model.language_model", "model.vision_tower", "model.multi_modal_projector", "lm_head"}


# ----------------------------------------------------------------------------- colocate engine


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_match_teacher_forcing(engine, llava, temperature):
    model, tok, processor = llava
    prompts, images = batch(processor)
    requests = engine.stats["requests"]
    gens = engine.generate(prompts, SamplingParams(max_new_tokens=8, temperature=temperature), images=images)
    assert engine.stats["requests"] - requests == 3  # each prompt twice in a row: one request with n=2
    assert sum(len(g.token_ids) for g in gens) > 20
    torch.testing.assert_close(flat(gens), teacher_forced(model, processor, prompts, images, gens, temperature),
                               rtol=1e-4, atol=2e-4)
    torch.testing.assert_close(flat(gens), trainer_logprobs(model, tok, processor, prompts, images, gens, temperature),
                               rtol=1e-4, atol=2e-4)


@needs_vllm
@pytest.mark.slow
def test_image_placeholders_are_never_sampled(engine, llava):
    """The placeholder is banned (as in the HF engine and the trainer): with its logit raised far above the
    rest in the policy, the other tokens still come out, and their log-probs exclude it."""
    model, _, processor = llava
    policy = copy.deepcopy(model)
    image_id = model.config.image_token_index
    prompts, images = batch(processor)
    with torch.no_grad():  # point the placeholder's head row (tied: its embedding, unused) along the last hidden state
        h = policy(input_ids=torch.tensor([prompts[4]]), output_hidden_states=True).hidden_states[-1][0, -1]
        policy.lm_head.weight[image_id] = h / h.norm() ** 2 * 30.0  # its logit there: 30
    with torch.no_grad():  # unbanned, the policy's favourite next token is the placeholder
        assert int(policy(input_ids=torch.tensor([prompts[4]])).logits[0, -1].argmax()) == image_id
    try:
        engine.update_weights(policy)
        gens = engine.generate(prompts, SamplingParams(max_new_tokens=6, temperature=1.0), images=images)
        assert all(image_id not in g.token_ids for g in gens)
        torch.testing.assert_close(flat(gens), teacher_forced(policy, processor, prompts, images, gens, 1.0),
                                   rtol=1e-4, atol=2e-4)
    finally:
        engine.update_weights(model)


@needs_vllm
@pytest.mark.slow
def test_greedy_equals_hf_engine(engine, llava):
    from rl.engines import HFEngine

    model, tok, processor = llava
    prompts, images = batch(processor)
    params = SamplingParams(max_new_tokens=8, temperature=0)
    v = engine.generate(prompts[::2], params, images=images[::2])
    h = HFEngine(model, tok).generate(prompts[::2], params, images=images[::2])
    assert [g.token_ids for g in v] == [g.token_ids for g in h]
    torch.testing.assert_close(flat(v), flat(h), rtol=1e-4, atol=1e-4)


@needs_vllm
@pytest.mark.slow
def test_same_ids_with_different_images_are_different_prompts(engine, llava):
    model, _, processor = llava
    red, blue = [draw("red")], [draw("blue", "rectangle")]
    p, _ = render(processor, red)
    assert p == render(processor, blue)[0]  # the ids cannot tell the images apart
    requests = engine.stats["requests"]
    greedy = SamplingParams(max_new_tokens=6, temperature=0)
    gens = engine.generate([p, p], greedy, images=[red, blue])
    assert engine.stats["requests"] - requests == 2
    assert not torch.allclose(flat(gens[:1])[:1], flat(gens[1:])[:1], atol=1e-3)  # the first token's log-prob
    torch.testing.assert_close(flat(gens), teacher_forced(model, processor, [p, p], [red, blue], gens, 1.0),
                               rtol=1e-4, atol=1e-4)


@needs_vllm
@pytest.mark.slow
def test_image_count_mismatch_names_the_prompt(engine, llava):
    _, _, processor = llava
    p1, _ = render(processor, [draw("red")])
    p2, _ = render(processor, [draw("red"), draw("blue")])
    with pytest.raises(ImageError, match=r"prompt 1: 1 image\(s\) need 16 image placeholder tokens .* have 32"):
        engine.generate([p1, p2], SamplingParams(max_new_tokens=2), images=[[draw("red")], [draw("red")]])
    with pytest.raises(ImageError, match="prompt 0 has image placeholder tokens but no images"):
        engine.generate([p1], SamplingParams(max_new_tokens=2))


def _perturbed(model):
    """A copy whose projector, one vision layer and one decoder layer moved (the three parts vLLM loads)."""
    policy = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if any(k in name for k in ("multi_modal_projector", "vision_tower.encoder.layers.0.mlp",
                                       "language_model.layers.1.")):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return policy


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_update_weights_matches_the_new_policy(engine, llava, lora):
    model, _, processor = llava
    prompts, images = batch(processor)
    params = SamplingParams(max_new_tokens=8, temperature=1.0)
    if lora:
        from peft import LoraConfig, get_peft_model

        # q_proj / v_proj in the CLIP tower and in the decoder, and the projector's first linear
        policy = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=[
            "q_proj", "v_proj", "linear_1"]))
        with torch.no_grad():
            for n, p in policy.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.2)
    else:
        policy = _perturbed(model)
    policy.eval()
    try:
        engine.update_weights(policy)
        gens = engine.generate(prompts, params, images=images)
        new = teacher_forced(policy, processor, prompts, images, gens, 1.0)
        torch.testing.assert_close(flat(gens), new, rtol=1e-4, atol=2e-4)
        old = teacher_forced(model, processor, prompts, images, gens, 1.0)
        assert not torch.allclose(flat(gens), old, atol=1e-3)  # the sync did change vLLM's weights
    finally:
        engine.update_weights(model)  # the module's other tests sample from the original weights


# ----------------------------------------------------------------------------- server engine (stand-in server)


@pytest.mark.slow  # spawns the stand-in server (no vLLM needed)
def test_server_engine_sends_images_through_the_token_in_route(llava, tmp_path):
    """No vLLM: tests/fake_vllm_server.py records what the engine sends. Prompts with images go to
    /inference/v1/generate with one placeholder per image and the images as lossless PNG data URLs, grouped
    by ids + image content; text prompts still go to /v1/completions; a sync also resets the encoder cache."""
    import base64
    import io
    import subprocess
    import sys
    import time
    from pathlib import Path

    import httpx

    import socket

    model, tok, processor = llava
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fake = str(Path(__file__).with_name("fake_vllm_server.py"))
    proc = subprocess.Popen([sys.executable, fake, "--port", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
            assert time.time() < deadline and proc.poll() is None, "the stand-in server did not start"
        (tmp_path / "sync").mkdir()
        eng = build_engine("vllm_server", model, tok, 8, base_url=url, timeout=30, weight_sync="disk",
                           sync_dir=str(tmp_path / "sync"))
        red, red_again, blue = draw("red"), draw("red"), draw("blue", "rectangle", (30, 70))
        p1, _ = render(processor, [red])
        p2, _ = render(processor, [red, blue])
        text = tok("What is 2 plus 3?")["input_ids"]
        gens = eng.generate([p1, p1, p1, p2, text], SamplingParams(max_new_tokens=3),
                            images=[[red], [red_again], [blue], [red, blue], []])
        seen = httpx.get(f"{url}/inflight").json()
        # the requests are concurrent: order them as sent (n=2 first, then by prompt length)
        bodies = sorted(seen["generate"], key=lambda b: (-b["sampling_params"]["n"], len(b["token_ids"])))
        assert [b["sampling_params"]["n"] for b in bodies] == [2, 1, 1]  # red twice: one request; blue: another
        assert seen["served"] == 1  # the text prompt, through /v1/completions
        banned = {str(model.config.image_token_index): -100.0}  # never sampled, on both routes
        assert all(b["sampling_params"]["logit_bias"] == banned for b in bodies)
        spec = placeholders(model.config)
        assert [b["token_ids"] for b in bodies] == [collapse_placeholders(p, spec) for p in (p1, p1, p2)]
        sent = [[part["url"] for part in b["content_parts"]] for b in bodies]
        assert all(u.startswith("data:image/png;base64,") for us in sent for u in us)
        decoded = Image.open(io.BytesIO(base64.b64decode(sent[2][1].split(",", 1)[1])))
        assert decoded.tobytes() == blue.tobytes() and decoded.size == blue.size  # lossless
        assert [len(g.token_ids) for g in gens] == [3] * 5
        assert [g.logprobs[0] for g in gens] == [-0.25] * 4 + [-0.5]  # image route x 4, completions x 1
        with pytest.raises(ImageError, match="prompt 0: 2 image"):
            eng.generate([p1], SamplingParams(max_new_tokens=2), images=[[red, blue]])
        eng.update_weights(model)
        seen = httpx.get(f"{url}/inflight").json()
        assert (seen["reset_prefix_cache"], seen["reset_encoder_cache"]) == (1, 1)
        eng.close()
    finally:
        proc.kill()
        proc.wait()

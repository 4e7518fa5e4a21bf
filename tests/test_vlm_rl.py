"""Vision-language policies in the RL loop (rl/multimodal.py), on the tiny LLaVA and Qwen2-VL of
tests/tiny_vlm.py: prompts with images through the HF engine, engine log-probs = the trainer's
teacher-forced ones (packed and padded), packing keyed on ids + image content, multi-turn image
observations token-exact against the processor's rendering, 2-step runs of every algorithm, LoRA and
a frozen vision tower, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from agents.environment import Environment, StepResult
from rl.config import config_from_dict
from rl.engines import BaseEngine, Generation, HFEngine, SamplingParams
from rl.forward import batch_forward
from rl.multimodal import (
    ImageError,
    VisionInputs,
    expand_image_tokens,
    load_pretrained_model,
    load_tokenizer_and_processor,
    render_chat,
)
from rl.packing import build_micro_batches, make_micro_batch
from rl.trainer import train
from rl.trajectory import Trajectory
from tiny import with_overrides
from tiny_vlm import save_tiny_llava, save_tiny_qwen2_vl

COLORS = ["red", "blue", "green", "yellow"]


def shape_image(color: str, shape: str = "circle", side: int = 64) -> Image.Image:
    im = Image.new("RGB", (side, side), "white")
    draw = ImageDraw.Draw(im)
    (draw.ellipse if shape == "circle" else draw.rectangle)([side // 5, side // 5, side - side // 5, side - side // 5],
                                                            fill=color)
    return im


@pytest.fixture(scope="module")
def vlm_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny_vlms")
    return {"llava": save_tiny_llava(root / "llava"), "qwen2_vl": save_tiny_qwen2_vl(root / "qwen2_vl")}


def _load(path):
    tok, processor = load_tokenizer_and_processor(path)
    model = load_pretrained_model(path, torch.float32, "sdpa").eval()
    return tok, processor, model


def _question(image, text="What color is the shape?"):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


def _trajectories(tok, model, images_per_prompt, group=3, seed=0):
    rendered = [render_chat(tok, _question(im)) for im in images_per_prompt]
    prompts = [ids for ids, _ in rendered for _ in range(group)]
    images = [ims for _, ims in rendered for _ in range(group)]
    torch.manual_seed(seed)
    gens = HFEngine(model, tok).generate(prompts, SamplingParams(max_new_tokens=6, temperature=1.0), images=images)
    return [Trajectory(p, g.token_ids, [1] * len(g.token_ids), g.logprobs, k // group, {}, images=list(ims),
                       prompt_images=len(ims)) for k, (p, g, ims) in enumerate(zip(prompts, gens, images))]


def _engine_logprobs(trajs):
    T = max(len(t.response_ids) for t in trajs)
    out = torch.zeros(len(trajs), T)
    for i, t in enumerate(trajs):
        out[i, : len(t.rollout_logprobs)] = torch.tensor(t.rollout_logprobs)
    return out


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_prompt_ids_are_the_processors_rendering(vlm_dirs, family):
    tok, processor, _ = _load(vlm_dirs[family])
    images = [shape_image("red"), shape_image("blue", "square")]
    messages = [{"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "text", "text": "and"},
                                             {"type": "image", "image": images[1]}, {"type": "text", "text": "?"}]}]
    ids, got_images = render_chat(tok, messages)
    plain = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"},
                                          {"type": "text", "text": "?"}]}]
    text = processor.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
    assert ids == list(processor(text=[text], images=images)["input_ids"][0])
    assert got_images == images
    vision = VisionInputs(processor)
    assert ids.count(vision.image_token_id) == sum(vision.num_tokens(im) for im in images) > 2
    # the expansion rule on ids is the processor's
    unexpanded = tok(text, add_special_tokens=False)["input_ids"]
    assert expand_image_tokens(unexpanded, vision.image_token_id, [vision.num_tokens(im) for im in images]) == ids


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_engine_logprobs_match_trainer_forward(vlm_dirs, family, packed):
    tok, processor, model = _load(vlm_dirs[family])
    trajs = _trajectories(tok, model, [shape_image("red"), shape_image("blue", "square")])
    vision = VisionInputs(processor, model)
    B, T = len(trajs), max(len(t.response_ids) for t in trajs)
    mbs = build_micro_batches(trajs, list(range(B)), 4096, packed, tok.pad_token_id, 256, vision)
    trainer = batch_forward(model, mbs, B, T, 1.0)
    mask = torch.zeros(B, T)
    for i, t in enumerate(trajs):
        mask[i, : len(t.response_ids)] = 1
    diff = ((trainer - _engine_logprobs(trajs)) * mask).abs().max().item()
    assert diff < 1e-4, diff  # tests/test_engines.py's tolerance for the HF engine
    assert all(mb.vision_inputs["pixel_values"].shape[0] > 0 for mb in mbs)
    if family == "qwen2_vl":  # M-RoPE: laid out padded, positions computed by the model
        assert all(mb.position_ids is None and not mb.packed for mb in mbs)


def test_packing_never_shares_a_prompt_across_different_images(vlm_dirs):
    """Two groups whose prompt ids are identical but whose images differ: keyed on ids alone, packing
    would lay out one prompt copy (with one image) for both groups, and the second group's log-probs
    would be those of the wrong image."""
    tok, processor, model = _load(vlm_dirs["llava"])
    red, blue = shape_image("red"), shape_image("blue", "square")
    trajs = _trajectories(tok, model, [red, blue], group=2)
    assert trajs[0].prompt_ids == trajs[2].prompt_ids  # the collision: same ids, different images
    vision = VisionInputs(processor, model)
    mb = make_micro_batch(trajs, list(range(4)), True, tok.pad_token_id, 4096, vision)
    p = len(trajs[0].prompt_ids)
    n_resp = sum(len(t.response_ids) for t in trajs)
    assert mb.input_ids.shape == (1, 2 * p + n_resp)  # two prompt copies in the row, one per image
    assert mb.vision_inputs["pixel_values"].shape[0] == 2
    B, T = 4, max(len(t.response_ids) for t in trajs)
    packed = batch_forward(model, [mb], B, T)
    one_by_one = torch.zeros(B, T)
    for r in range(B):
        one_by_one += batch_forward(model, [make_micro_batch(trajs, [r], False, tok.pad_token_id, 4096, vision)], B, T)
    assert torch.allclose(packed, one_by_one, atol=1e-5)
    # identical images (equal content, distinct objects) do share one prompt copy
    same = _trajectories(tok, model, [red, red.copy()], group=2)
    mb_same = make_micro_batch(same, list(range(4)), True, tok.pad_token_id, 4096, vision)
    assert mb_same.input_ids.shape[1] == p + sum(len(t.response_ids) for t in same)


# ----------------------------------------------------------------------------- multi-turn images


class _ScriptedEngine(BaseEngine):
    """Replies with fixed texts, turn by turn (log-prob 0); records the images it was given."""

    def __init__(self, tok, replies):
        self.tok, self.replies, self.calls, self.images = tok, replies, 0, []

    def generate(self, prompts, params, images=None):
        self.images.append(images)
        ids = self.tok(self.replies[self.calls], add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
        self.calls += 1
        return [Generation(list(ids), [0.0] * len(ids), "eos") for _ in prompts]

    def update_weights(self, model):
        pass


class _NewScreenEnv(Environment):
    """Each turn answers with a new image as a user turn."""

    loop_defaults = {"max_turns": 3, "stop_on_eos": False}
    screens = [shape_image("green", "square"), shape_image("yellow")]

    def reset(self, rows):
        return [None] * len(rows)

    def step(self, turns):
        return [StepResult(message={"role": "user", "content": f"screen {t.turn + 2}: what now?"},
                           images=[self.screens[t.turn]]) if t.turn < 2 else StepResult(done=True) for t in turns]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_multi_turn_image_observations_are_token_exact(vlm_dirs, family):
    from agents.multi_turn import multi_turn

    tok, processor, _ = _load(vlm_dirs[family])
    first = shape_image("red")
    replies = ["red", "green", "yellow"]
    engine = _ScriptedEngine(tok, replies)
    [traj] = multi_turn(engine, tok, [{"q": 1}], prompt_builder=lambda row: _question(first), group_size=1,
                        params=SamplingParams(max_new_tokens=8), env=_NewScreenEnv)
    # the whole conversation, rendered by the processor with all three images
    convo = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the shape?"}]}]
    for turn, reply in enumerate(replies):
        convo.append({"role": "assistant", "content": [{"type": "text", "text": reply}]})
        if turn < 2:
            convo.append({"role": "user", "content": [{"type": "image"},
                                                      {"type": "text", "text": f"screen {turn + 2}: what now?"}]})
    text = processor.apply_chat_template(convo, tokenize=False)
    images = [first, *_NewScreenEnv.screens]
    expected = list(processor(text=[text], images=images)["input_ids"][0])
    ids = traj.prompt_ids + traj.response_ids
    assert ids == expected[: len(ids)] and tok.decode(expected[len(ids):]).strip() == ""
    assert traj.images == images and traj.prompt_images == 1
    # the engine saw each turn's images so far; policy tokens only carry loss
    assert [len(call[0]) for call in engine.images] == [1, 2, 3]
    vision = VisionInputs(processor)
    masked = [t for t, m in zip(traj.response_ids, traj.loss_mask) if m]
    assert vision.image_token_id not in masked
    assert traj.response_ids.count(vision.image_token_id) == sum(vision.num_tokens(im) for im in images[1:])


# ----------------------------------------------------------------------------- bad input


def test_unreadable_image_and_placeholder_mismatch_are_clear_errors(vlm_dirs, tmp_path):
    tok, processor, model = _load(vlm_dirs["llava"])
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    with pytest.raises(ImageError, match="broken.png"):
        render_chat(tok, _question(str(broken)), where="row 3")
    ids, images = render_chat(tok, _question(shape_image("red")))
    engine = HFEngine(model, tok)
    with pytest.raises(ImageError, match="prompt 1: .* image token"):
        engine.generate([ids, ids], SamplingParams(max_new_tokens=2), images=[images, images + images])
    text_tok, _, _ = _load(vlm_dirs["llava"])
    with pytest.raises(ImageError, match="placeholder"):
        expand_image_tokens([1, 2], VisionInputs(processor).image_token_id, [4])


# ----------------------------------------------------------------------------- training runs


@pytest.fixture(scope="module")
def vqa_rows(tmp_path_factory) -> Path:
    """A JSONL of questions about drawn shapes (SFT's row format: messages + images, relative paths)."""
    root = tmp_path_factory.mktemp("vqa_rows")
    (root / "img").mkdir()
    rows = []
    for k, color in enumerate(COLORS * 2):
        name = f"img/{k}.png"
        shape_image(color, "circle" if k % 2 else "square").save(root / name)
        rows.append({"messages": [{"role": "user", "content": "What color is the shape?"}], "images": [name],
                     "answer": color})
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def token_parity(row, traj) -> float:
    """A reward that differs within groups of a random policy (so every algorithm has advantages)."""
    return float(sum(traj.response_ids) % 2)


def vlm_recipe(model_dir, data: Path, out: Path, **overrides) -> dict:
    base = {
        "model": {"name_or_path": model_dir},
        "data": {"train": str(data), "eval": str(data), "eval_size": 2, "required_columns": ["messages", "images"]},
        "rollout": {"group_size": 2, "max_new_tokens": 4},
        "rewards": [{"name": "test_vlm_rl:token_parity"}],
        "algorithm": {"name": "grpo"},
        "optim": {"lr": 1e-2},
        "steps": 2,
        "prompts_per_step": 2,
        "micro_batch_tokens": 256,
        "output_dir": str(out),
        "seed": 3,
    }
    return with_overrides(base, **overrides)


ALGOS = {
    "reinforce": {"algorithm__name": "reinforce", "algorithm__baseline": "batch"},
    "rloo": {"algorithm__name": "rloo"},
    "grpo_kl": {"algorithm__name": "grpo", "algorithm__kl_coef": 0.05},
    "ppo": {"algorithm__name": "ppo", "ppo_epochs": 2},
    "stages": {"algorithm__name": "grpo", "stages": [{"steps": 1}, {"steps": 1, "kl_coef": 0.05}]},
}


@pytest.mark.parametrize("algo", list(ALGOS), ids=list(ALGOS))
def test_two_step_vlm_run_each_algorithm(vlm_dirs, vqa_rows, tmp_path, algo):
    family = "qwen2_vl" if algo in ("rloo", "ppo") else "llava"  # both families, without doubling the runs
    result = train(config_from_dict(vlm_recipe(vlm_dirs[family], vqa_rows, tmp_path, **ALGOS[algo])))
    steps = [h for h in result["history"] if "reward/mean" in h]
    assert [h["step"] for h in steps] == [1, 2]
    assert all(h["nan_skipped_steps"] == 0 for h in steps)
    before = load_file(str(Path(vlm_dirs[family]) / "model.safetensors"))
    after = load_file(str(tmp_path / "final" / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # final/ is a vision-language checkpoint again: processor and model reload, and it generates from an image
    tok, processor, model = _load(str(tmp_path / "final"))
    assert processor is not None
    ids, images = render_chat(tok, _question(shape_image("red")))
    assert HFEngine(model, tok).generate([ids], SamplingParams(max_new_tokens=2), images=[images])[0].token_ids


def test_vlm_lora_with_frozen_vision_tower(vlm_dirs, vqa_rows, tmp_path):
    result = train(config_from_dict(vlm_recipe(vlm_dirs["llava"], vqa_rows, tmp_path, model__lora=True,
                                               model__freeze_vision_tower=True,
                                               model__lora_target_modules=["q_proj", "v_proj"])))
    assert [h["step"] for h in result["history"] if "reward/mean" in h] == [1, 2]
    before = load_file(str(Path(vlm_dirs["llava"]) / "model.safetensors"))
    after = load_file(str(tmp_path / "final" / "model.safetensors"))  # LoRA merged
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("language_model" in k for k in changed), sorted(changed)[:5]
    assert not any("vision_tower" in k for k in changed)


def test_full_finetune_with_frozen_vision_tower_trains_only_the_rest(vlm_dirs, vqa_rows, tmp_path):
    train(config_from_dict(vlm_recipe(vlm_dirs["llava"], vqa_rows, tmp_path, model__freeze_vision_tower=True)))
    before = load_file(str(Path(vlm_dirs["llava"]) / "model.safetensors"))
    after = load_file(str(tmp_path / "final" / "model.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any("multi_modal_projector" in k for k in changed) and any("language_model" in k for k in changed)
    assert not any("vision_tower" in k for k in changed)


def test_an_sft_vlm_checkpoint_is_an_rl_start_as_is(vlm_dirs, vqa_rows, tmp_path):
    """SFT and RL load VLMs through one loader: sft.train's final/ (Qwen2-VL, processor without
    torchvision) starts an RL run unchanged, and the RL run's final/ is a VLM checkpoint again."""
    from sft.config import recipe_from_dict
    from sft.trainer import train as sft_train

    rows = [json.loads(line) for line in vqa_rows.read_text().splitlines()]
    sft_data = tmp_path / "sft.jsonl"
    sft_data.write_text("".join(json.dumps({"messages": r["messages"] + [{"role": "assistant", "content": r["answer"]}],
                                            "images": [str(vqa_rows.parent / r["images"][0])]}) + "\n" for r in rows))
    sft_train(recipe_from_dict({
        "model": {"name_or_path": vlm_dirs["qwen2_vl"]}, "data": {"train": str(sft_data), "format": "messages"},
        "training": {"per_device_batch_size": 2, "num_threads": 1}, "steps": 2, "output_dir": str(tmp_path / "sft"),
    }))
    result = train(config_from_dict(vlm_recipe(str(tmp_path / "sft" / "final"), vqa_rows, tmp_path / "rl", steps=1)))
    assert [h["step"] for h in result["history"] if "reward/mean" in h] == [1]
    tok, processor, _ = _load(str(tmp_path / "rl" / "final"))
    assert type(processor).__name__ == "Qwen2VLProcessor"

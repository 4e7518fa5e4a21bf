"""recipes/vlm_vqa_grpo.yaml (GRPO on easy-vqa from the SFT'd SmolLM2 VLM) as written, on the tiny LLaVA build and
fake easy-vqa rows: 2 steps train LoRA on the decoder and projector (tower frozen); and the before/after table of
benchmarks/vlm_grpo_seeds.py (mean, spread, the gain-vs-spread verdict)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_vlm_build import TINY_VISION, fake_easy_vqa

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory) -> Path:
    from envs.vqa.build_vlm import build_smollm2_vlm
    from tiny import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("grpo_vlm")
    llama = save_tiny_checkpoint(root / "llama", seed=0, num_attention_heads=2, num_key_value_heads=1)
    return build_smollm2_vlm(root / "vlm", text_model=llama, seed=0, **TINY_VISION)[0]


@pytest.mark.slow  # a 2-step RL run: ~100 s on the shared 2-core CPU
def test_recipe_trains_lora_on_decoder_and_projector_not_the_tower(tiny_vlm, tmp_path):
    from envs.vqa.data import convert
    from rl.config import RewardSpec, load_config
    from rl.trainer import train

    rows = convert(fake_easy_vqa(tmp_path / "easy"), tmp_path / "rows", train_size=0, test_size=0)
    cfg = load_config(REPO / "recipes" / "vlm_vqa_grpo.yaml", [
        f"model.name_or_path={tiny_vlm}", f"data.train={rows['train']}", "steps=2", "prompts_per_step=2",
        "rollout.group_size=4", "micro_batch_tokens=512", "optim.lr=1e-2",
        "logging_steps=1", f"output_dir={tmp_path / 'run'}"])
    assert cfg.model.lora and cfg.model.freeze_vision_tower and cfg.algorithm.name == "grpo"
    # the recipe's exact-answer reward is 0 for every sample of a random tiny model (zero advantages, no
    # update): a reward that differs within groups makes the 2 steps move the weights
    cfg.rewards = [RewardSpec(name="test_vlm_rl:token_parity")]
    result = train(cfg)
    steps = [h for h in result["history"] if "reward/mean" in h]
    assert [h["step"] for h in steps] == [1, 2]
    before = load_file(str(tiny_vlm / "model.safetensors"))
    after = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # LoRA (merged into final/) on the decoder and the projector; the tower never changes
    assert any(k.startswith("language_model.") for k in changed) and any(k.startswith("multi_modal_projector.")
                                                                          for k in changed), sorted(changed)[:5]
    assert not any(k.startswith("vision_tower.") for k in changed)


def _bench():
    spec = importlib.util.spec_from_file_location("vlm_grpo_seeds", REPO / "benchmarks" / "vlm_grpo_seeds.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _result(acc: float, color: float, shape: float, yes_no: float) -> dict:
    per = {t: {"accuracy": a, "majority_per_question_accuracy": 0.5}
           for t, a in (("color", color), ("shape", shape), ("yes/no", yes_no))}
    return {"accuracy": acc, "per_type": per, "majority_per_question": {"accuracy": 0.667}}


def test_table_reports_mean_spread_and_whether_the_gain_exceeds_it():
    bench = _bench()
    start = _result(0.70, 0.5, 0.4, 0.8)
    text = bench.table(start, {0: _result(0.80, 0.7, 0.6, 0.85), 1: _result(0.76, 0.6, 0.5, 0.85)}, {"0": 12.0, "1": 13.5})
    assert "| GRPO mean of 2 seeds | 0.780 | 0.650 | 0.550 | 0.850 |" in text
    assert "| seed spread (max - min) | 0.040 | 0.100 | 0.100 | 0.000 |" in text
    assert "| gain of the mean over the start | +0.080 | +0.150 | +0.150 | +0.050 |" in text
    assert "the gain exceeds the spread" in text and "12.0" in text
    text = bench.table(start, {0: _result(0.80, 0.7, 0.6, 0.85), 1: _result(0.66, 0.6, 0.5, 0.85)}, {})
    assert "does NOT exceed the spread" in text and "not every seed improved" in text

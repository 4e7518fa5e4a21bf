"""The next-query recipes load, and quality-gated GRPO runs 2 steps on the tiny model."""

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOW = 1_700_000_000


def rows(n=4):
    out = []
    for k in range(n):
        hist = [{"item_id": f"i{k}{j}", "title": f"tent {j}", "category": "tents", "brand": "B", "tags": ["tents", "B"],
                 "action": "click" if j else "cart", "time": NOW - 600 * (4 - j)} for j in range(4)]
        out.append({"id": f"r{k}", "user_id": f"u{k}", "time": NOW, "history": hist, "query": "tent 2",
                    "next_items": [f"i{k}2"], "source": "synthetic", "target_kind": "behaviour",
                    "intent": {"category": "tents"}, "token_budget": 10 + k})
    return out


def test_recipes_load():
    from rl.config import config_from_dict, read_recipe_mapping
    from sft.config import recipe_from_dict

    cfg = config_from_dict(read_recipe_mapping(REPO / "recipes" / "nextquery_grpo.yaml", []), "g", check_files=False)
    assert cfg.data.prompt_builder == "nextquery_adaptive" and cfg.algorithm.name == "grpo"
    assert [r.name for r in cfg.rewards] == ["nextquery_gated"] and cfg.rewards[0].kwargs["bar"] == 0.7
    sft = recipe_from_dict(read_recipe_mapping(REPO / "recipes" / "nextquery_sft.yaml", []), "s", check_files=False)
    assert sft.model.lora and sft.data.format == "messages" and sft.steps > 0


@pytest.mark.slow  # ~25 s: a real (tiny) training run
def test_gated_grpo_two_steps_on_the_tiny_model(tiny_model_dir, tmp_path):
    from rl.config import config_from_dict
    from rl.trainer import train

    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    recipe = {
        "plugins": ["envs.nextquery"],
        "model": {"name_or_path": tiny_model_dir, "lora": True, "lora_r": 4},
        "data": {"train": str(train_file), "prompt_builder": "nextquery_adaptive",
                 "required_columns": ["time", "history", "query"]},
        "rollout": {"group_size": 4, "max_new_tokens": 6, "temperature": 1.0},
        # f1, not emb_sim: no sentence model in a fast test (the recipe's emb_sim is tested in test_nextquery_rewards)
        "rewards": [{"name": "nextquery_gated", "kwargs": {"metric": "f1", "bar": 0.0, "budget_tokens": 4}}],
        "algorithm": {"name": "grpo"},
        "optim": {"lr": 1e-2},
        "steps": 2, "prompts_per_step": 2, "micro_batch_tokens": 1024, "pack_row_tokens": 512,
        "eval_before_training": False, "output_dir": str(tmp_path / "out"), "seed": 0,
    }
    result = train(config_from_dict(recipe))
    steps = [h for h in result["history"] if "reward/mean" in h]
    assert [h["step"] for h in steps] == [1, 2]
    # bar 0: every answer is gated; the rows' own budgets (10..13 tokens, not the kwarg's 4) are used, and
    # answers of at most 6 tokens are within them: no penalty
    for h in steps:
        assert 0.0 <= h["reward/mean"] <= 1.0
        assert 10.0 <= h["reward/nextquery_gated/budget"] <= 13.0
        assert h["reward/nextquery_gated/penalty"] == 1.0 and h["reward/nextquery_gated/gated"] == 1.0
    assert (tmp_path / "out" / "final").is_dir()

"""envs.gui through the trainer: 2 GRPO steps in the live browser (the multi-turn loop over the `miniwob`
environment, MiniWoB's task reward) and 2 on static steps (the SecAgent reward), on the tiny model."""

from __future__ import annotations

import importlib.util
import json

import pytest

from envs.gui.browser import browser_missing

MISSING = browser_missing() or next((f"{m} is not installed (pip install -e '.[gui]')" for m in ("miniwob", "selenium")
                                     if importlib.util.find_spec(m) is None), None)


@pytest.fixture(scope="module")
def pools():
    if MISSING:
        pytest.skip(f"no browser: {MISSING}")
    yield
    from envs.gui.env import close_pools

    close_pools()


def test_live_grpo_two_steps_in_the_browser(pools, tiny_model_dir, tmp_path, recorded_trajectories):
    """Every rollout is a real episode: the loop's trajectories carry the environment's info (steps,
    success, milestones), the browser's observations are loss-masked, and the run finishes."""
    from rl.config import config_from_dict
    from rl.trainer import train

    recipe = {
        "plugins": ["envs.gui"],
        "model": {"name_or_path": tiny_model_dir},
        "data": {"train": "miniwob_tasks", "train_kwargs": {"split": "train", "tasks": ["click-button"],
                                                            "seeds": "0-3"},
                 "prompt_builder": "miniwob_task"},
        "rollout": {"agent": "multi_turn", "group_size": 2, "max_new_tokens": 24, "temperature": 1.0,
                    "agent_kwargs": {"env": "miniwob", "env_kwargs": {"pool_size": 2, "max_steps": 2},
                                     "max_turns": 2, "max_obs_tokens": 2048}},
        "rewards": [{"name": "miniwob_task"}],
        "algorithm": {"name": "grpo"},
        "optim": {"lr": 1e-3},
        "steps": 2, "prompts_per_step": 2, "micro_batch_tokens": 8192, "eval_before_training": False,
        "output_dir": str(tmp_path / "out"), "seed": 0,
    }
    result = train(config_from_dict(recipe))
    steps = [h for h in result["history"] if "reward/mean" in h]
    assert [h["step"] for h in steps] == [1, 2]
    assert len(recorded_trajectories) == 2 * 4  # 2 steps x 2 prompts x 2 samples
    for t in recorded_trajectories:
        assert t.info["steps"] >= 1 and "success" in t.info and "milestones" in t.info
        assert t.row["task"] == "click-button" and 0 <= t.row["seed"] <= 3
        if t.info["turns"] > 1:  # an observation (the next screen / a correction) follows the first turn
            assert 0 in t.loss_mask[t.loss_mask.index(1):]


def test_static_grpo_two_steps_with_the_secagent_reward(tiny_model_dir, tmp_path):
    """Static steps (prompt + every valid action) train with 0.5 format + 1.0 correct action, logged per step."""
    from envs.gui.secagent import render_step_prompt
    from rl.config import config_from_dict
    from rl.trainer import train

    rows = []
    for k in range(4):
        elements = [{"ref": 3 + k, "tag": "button", "text": "ok", "box": [10, 10, 40, 20], "value": ""}]
        msgs = render_step_prompt("Click the ok button.", f'[{3 + k}] button "ok" box=(10,10,40,20)',
                                  history="none")
        rows.append({"messages": msgs, "valid_actions": [f"click(element={3 + k})"], "elements": elements,
                     "action": f"click(element={3 + k})", "episode_id": f"click-button/seed{k}", "step": 0,
                     "n_steps": 1, "task": "click-button"})
    data = tmp_path / "static_train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {
        "plugins": ["envs.gui"],
        "model": {"name_or_path": tiny_model_dir},
        "data": {"train": str(data), "required_columns": ["messages", "valid_actions", "elements"]},
        "rollout": {"group_size": 2, "max_new_tokens": 16, "temperature": 1.0},
        "rewards": [{"name": "secagent"}],
        "algorithm": {"name": "grpo"},
        "optim": {"lr": 1e-3},
        "steps": 2, "prompts_per_step": 2, "micro_batch_tokens": 8192, "eval_before_training": False,
        "output_dir": str(tmp_path / "out"), "seed": 0,
    }
    result = train(config_from_dict(recipe))
    steps = [h for h in result["history"] if "reward/mean" in h]
    assert [h["step"] for h in steps] == [1, 2]
    assert all(0.0 <= h["reward/secagent"] <= 1.5 for h in steps)  # 0.5 format + 1.0 action at most

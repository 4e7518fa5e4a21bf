"""Samples files, metric names (numbers only, the same set every step), TensorBoard hparams and the run
report, on the tiny model (seconds)."""

from __future__ import annotations

import glob
import json
import math
from pathlib import Path

import pytest

from rl.config import config_from_dict
from rl.trajectory import Trajectory
from tiny import arithmetic_recipe

CALLS = {"n": 0}
FREE_TEXT = "Henrietta<br>\n sleighgren"


def varying_agent(engine, tokenizer, rows, **kwargs):
    """The single-turn agent, with info whose keys vary between calls (a string answer always, a number on
    every other call) and two tokens in the middle of each longer response marked as environment tokens."""
    from agents.single_turn import single_turn

    CALLS["n"] += 1
    trajs = single_turn(engine, tokenizer, rows, **kwargs)
    for i, t in enumerate(trajs):
        t.info["answer"] = FREE_TEXT
        if CALLS["n"] % 2 == 0:
            t.info["searches"] = i
        if len(t.response_ids) >= 4:
            t.loss_mask[1:3] = [0, 0]
    return trajs


def varying_dict(row, traj):
    """A dict reward: its extra "length" always, "late" only from step 2 on (a name first seen later)."""
    CALLS["reward"] = CALLS.get("reward", 0) + 1
    out = {"score": float(len(traj.response_ids) % 2), "length": float(len(traj.response_ids))}
    if CALLS["reward"] > 12:  # after the eval before training (4 samples) and step 1 (8)
        out["late"] = 1.0
    return out


@pytest.fixture(scope="module")
def tb_run(tiny_model_dir, tmp_path_factory):
    from rl.trainer import train

    CALLS.clear()
    CALLS["n"] = 0
    out = tmp_path_factory.mktemp("run")
    cfg = config_from_dict(arithmetic_recipe(
        tiny_model_dir, out, steps=3, log_samples=3, report_to=["tensorboard"],
        rollout__agent="test_samples_metrics:varying_agent",
        rewards=[{"name": "helpers_rewards:digit_fraction"}, {"name": "test_samples_metrics:varying_dict"}],
    ))
    return out, train(cfg)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_samples_file_per_step_and_eval(tb_run):
    out, _ = tb_run
    for step in (1, 2, 3):
        records = _lines(out / "samples" / f"step_{step}.jsonl")
        assert len(records) == 3  # log_samples
        for r in records:
            assert r["step"] == step and r["stage"] == 0 and isinstance(r["group_id"], int)
            assert r["prompt"].startswith("<|im_start|>") and isinstance(r["response_text"], str)
            assert set(r["reward_parts"]) >= {"helpers_rewards:digit_fraction", "test_samples_metrics:varying_dict",
                                              "test_samples_metrics:varying_dict/length"}
            assert r["info"]["answer"] == FREE_TEXT  # strings live here, not in the metrics
            assert {s["role"] for s in r["response"]} <= {"policy", "env"}
        assert any([s["role"] for s in r["response"]][:3] == ["policy", "env", "policy"] for r in records)
    for step in (0, 3):  # before and after training: every eval sample
        records = _lines(out / "samples" / f"eval_step_{step}.jsonl")
        assert len(records) == 4 and all(r["stage"] == "eval" for r in records)


def test_metrics_are_numbers_with_stable_names(tb_run):
    out, result = tb_run
    lines = _lines(out / "metrics.jsonl")
    train_lines = [x for x in lines if "reward/mean" in x]
    eval_lines = [x for x in lines if "eval/reward" in x]
    assert [x["step"] for x in train_lines] == [1, 2, 3] and [x["step"] for x in eval_lines] == [0, 3]
    for group in (train_lines, eval_lines):
        assert all(set(x) == set(group[0]) for x in group)
    for x in lines:
        for k, v in x.items():
            assert "\n" not in k and "answer" not in k and "Henrietta" not in k
            assert isinstance(v, (int, float)), (k, v)
    first = train_lines[0]
    # a dict reward's extras are logged; a name first seen later is not (it is in the samples files)
    assert "reward/test_samples_metrics:varying_dict/length" in first
    assert not any(k.endswith("/late") for x in lines for k in x)
    assert any("late" in k for k in _lines(out / "samples" / "step_3.jsonl")[0]["reward_parts"])
    assert "eval/test_samples_metrics:varying_dict/length" in eval_lines[0]
    # info keys present in some steps only: the eval before training (call 1) had no "searches", the
    # first step (call 2) had, the second (call 3) not: logged as 0
    assert "info/searches" in first and train_lines[1]["info/searches"] == 0.0 and first["info/searches"] > 0
    assert all(x["reward_errors/helpers_rewards:digit_fraction"] == 0 for x in train_lines)
    assert [x["episodes"] for x in train_lines] == [8, 16, 24]  # 2 prompts x 4 samples per step
    assert result["history"] == lines


def test_tensorboard_has_hparams(tb_run):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    out, _ = tb_run
    contents = b""
    for f in glob.glob(str(out / "**" / "events.out.tfevents.*"), recursive=True):
        for event in EventFileLoader(f).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "hparams":
                    contents += value.metadata.plugin_data.content
    assert b"optim.lr" in contents and b"rollout.group_size" in contents and b"model.name_or_path" in contents


def test_report_png_has_four_panels(tb_run):
    from rl.report import report_figure

    out, result = tb_run
    assert (out / "report.png").stat().st_size > 10000 and (out / "reward_curve.png").stat().st_size > 1000
    fig, axes = report_figure(result["history"], "run")
    assert [a.get_title() for a in axes.flat] == ["reward", "held-out metrics", "response length", "KL / loss"]
    labels = axes[0, 0].get_legend_handles_labels()[1]
    assert {"total (train)", "total (held-out)", "helpers_rewards:digit_fraction",
            "test_samples_metrics:varying_dict"} <= set(labels)
    assert any(c.get_xlabel() == "episodes" for c in axes[0, 0].child_axes)
    assert all(a.get_xlabel() == "step" for a in axes.flat)
    assert "test_samples_metrics:varying_dict/length" in axes[0, 1].get_legend_handles_labels()[1]


def test_segments_reproduce_the_response(tiny_tokenizer):
    from rl.samples import segments

    ids = tiny_tokenizer("The answer is 5. <information> Paris </information> ok 12", add_special_tokens=False)["input_ids"]
    ids = ids + [tiny_tokenizer.eos_token_id]
    mask = [1] * 4 + [0] * (len(ids) - 7) + [1] * 3
    segs = segments(tiny_tokenizer, ids, mask)
    assert [s["role"] for s in segs] == ["policy", "env", "policy"]
    assert "".join(s["text"] for s in segs) == tiny_tokenizer.decode(ids, skip_special_tokens=False)
    assert segments(tiny_tokenizer, [], []) == []


def test_info_means_numbers_only():
    from accelerate import Accelerator

    from rl.metrics import info_means

    trajs = [Trajectory([0], [1], [1], [0.0], 0, {}, info={"answered": i % 2 == 0, "termination": "eos",
                                                              "answer": f"free\\ntext {i}", **({"n": 3} if i else {})})
             for i in range(4)]
    assert info_means(Accelerator(cpu=True), trajs, "info") == {"info/answered": 0.5, "info/n": 9 / 4}


def test_flatten_config():
    from rl.config import TrainConfig, config_to_dict
    from rl.metrics import flatten_config

    flat = flatten_config(config_to_dict(TrainConfig(rewards=[{"name": "x"}])))
    assert flat["optim.lr"] == 1e-6 and flat["rollout.group_size"] == 4 and flat["algorithm.clip_ratio_high"] == "None"
    assert flat["model.lora_target_modules"] == json.dumps(["q_proj", "k_proj", "v_proj", "o_proj"])
    assert flat["rollout.engine_kwargs"] == "{}" and json.loads(flat["rewards"]) == [{"name": "x"}]
    assert all(isinstance(v, (bool, int, float, str)) and not (isinstance(v, float) and math.isnan(v))
               for v in flat.values())

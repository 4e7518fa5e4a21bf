"""Config parsing, rewards, prompt sampler, data sources and checkpoint pieces."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from rl import checkpoint
from rl.config import ConfigError, RewardSpec, config_from_dict, load_config
from rl.data import PromptSampler, check_columns, load_source
from rl.rewards import build_rewards, final_number, numeric_exact, score_trajectories
from rl.trajectory import Trajectory, outcome_token_rewards, to_response_tensors

REPO = Path(__file__).resolve().parents[1]


def traj(text="", reason="eos", ids=(1, 2, 3), mask=None, row=None):
    mask = list(mask) if mask is not None else [1] * len(ids)
    return Trajectory([0], list(ids), mask, [0.0] * len(ids), 0, row or {}, response_text=text,
                      info={"finish_reason": reason})


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_parses(path):
    # check_files=False: data files such as data/wiki10k_qa/*.jsonl are written by `make demo`;
    # every name (plugins, rewards, datasets given as module:function, ...) is still resolved
    if "training" in yaml.safe_load(path.read_text()):  # an SFT recipe (sft.config)
        from sft.config import read_recipe_mapping, recipe_from_dict

        rec = recipe_from_dict(read_recipe_mapping(path), str(path), check_files=False)
        assert rec.steps > 0 or rec.training.epochs > 0
        return
    cfg = load_config(path, check_files=False)
    assert cfg.total_steps >= 1 and cfg.rewards


def test_info_means_numbers_only():
    from accelerate import Accelerator

    from rl.metrics import info_means

    n = 16
    trajs = [
        Trajectory([0], [1], [1], [0.0], 0, {}, info={"searches": i % 3, "answered": i % 2 == 0,
                   "termination": "eos" if i < 4 else "answered", "answer": f"free text {i}"})
        for i in range(n)
    ]  # fmt: skip
    m = info_means(Accelerator(cpu=True), trajs, "info")
    assert m["info/searches"] == pytest.approx(sum(i % 3 for i in range(n)) / n)
    assert m["info/answered"] == 0.5
    # strings (free text, categories alike) are never metric names: they are in the samples files
    assert set(m) == {"info/searches", "info/answered"}


def test_overrides_are_typed_and_strict(tmp_path):
    path = REPO / "recipes" / "arithmetic_grpo.yaml"
    cfg = load_config(path, ["algorithm.name=rloo", "steps=3", "algorithm.clip_ratio_high=0.28", "report_to=[tensorboard]"])
    assert (cfg.algorithm.name, cfg.steps, cfg.algorithm.clip_ratio_high, cfg.report_to) == ("rloo", 3, 0.28, ["tensorboard"])
    with pytest.raises(ConfigError, match="unknown key 'algorithm.nmae'.*did you mean 'name'"):
        load_config(path, ["algorithm.nmae=grpo"])
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(path, ["steps"])
    with pytest.raises(ConfigError, match="expected true/false"):
        load_config(path, ["packing=maybe"])


def test_nested_list_sections_are_checked(tmp_path):
    data = yaml.safe_load((REPO / "recipes" / "arithmetic_progressive.yaml").read_text())
    data["stages"][1]["kl_coeficient"] = 0.1
    with pytest.raises(ConfigError, match=r"stages\[1\]\.kl_coeficient.*kl_coef"):
        config_from_dict(data, "x.yaml")
    data["stages"][1].pop("kl_coeficient")
    data["stages"][0]["steps"] = 0
    with pytest.raises(ConfigError, match=r"stages\[0\].steps must be >= 1"):
        config_from_dict(data, "x.yaml")


def test_missing_recipe_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="recipe not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1,\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)


# ----------------------------------------------------------------------------- rewards


def test_final_number_reward():
    row = {"answer": "12"}
    assert final_number(row, traj("9 + 3 = 12")) == 1.0
    assert final_number(row, traj("12")) == 1.0
    assert final_number(row, traj("The answer is 1,2")) == 1.0  # thousands separators dropped
    assert final_number(row, traj("12 is not 13")) == 0.0
    assert final_number(row, traj("9 + 3 = 12", reason="length")) == 0.0  # cut off: not an answer
    assert final_number(row, traj("no number")) == 0.0
    assert numeric_exact(row, traj(" 12\n")) == 1.0 and numeric_exact(row, traj("= 12")) == 0.0


def test_weighted_rewards_parts_and_errors():
    fns = build_rewards([RewardSpec("final_number", 2.0), RewardSpec("helpers_rewards:returns_dict", 1.0),
                         RewardSpec("helpers_rewards:returns_nan", 1.0)])
    trajs = [traj("= 5", row={"answer": "5"}), traj("= 4", row={"answer": "5"})]
    errors = score_trajectories(trajs, fns, fallback=-0.5)
    assert [t.reward for t in trajs] == [2.0 + 0.5 - 0.5, 0.5 - 0.5]
    assert trajs[0].reward_parts["helpers_rewards:returns_dict/length"] == 3.0
    assert errors["helpers_rewards:returns_nan"] == 2


def test_unknown_reward_names_are_clear():
    with pytest.raises(ValueError, match="unknown reward function 'nope'"):
        build_rewards([RewardSpec("nope")])
    with pytest.raises(ValueError, match="cannot import module 'no_such_pkg.mod'"):
        build_rewards([RewardSpec("no_such_pkg.mod:f")])
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        build_rewards([RewardSpec("helpers_rewards:missing")])


# ----------------------------------------------------------------------------- trajectories


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.booleans(), min_size=1, max_size=9), min_size=1, max_size=5))
def test_outcome_reward_sits_on_the_last_policy_token(masks):
    trajs = [traj(ids=list(range(len(m))), mask=[int(x) for x in m]) for m in masks]
    for i, t in enumerate(trajs):
        t.reward = float(i + 1)
    resp = to_response_tensors(trajs)
    rewards = outcome_token_rewards(trajs, resp.response_ids.shape[1])
    for i, m in enumerate(masks):
        policy = [j for j, x in enumerate(m) if x]
        assert rewards[i].sum().item() == (float(i + 1) if policy else 0.0)
        if policy:
            assert rewards[i, policy[-1]].item() == float(i + 1)
        # padding and environment tokens are masked out
        assert resp.response_mask[i, len(m):].sum() == 0
        assert resp.response_mask[i, : len(m)].tolist() == [float(x) for x in m]


def test_trajectory_lengths_must_agree():
    with pytest.raises(ValueError, match="lengths disagree"):
        Trajectory([0], [1, 2], [1], [0.0, 0.0], 0, {})


# ----------------------------------------------------------------------------- data


@settings(max_examples=25, deadline=None)
@given(size=st.integers(1, 20), n=st.integers(1, 30), cut=st.integers(0, 5), seed=st.integers(0, 99))
def test_sampler_resume_draws_the_same_prompts(size, n, cut, seed):
    a = PromptSampler(size, seed)
    expected = [a.next(n) for _ in range(6)]
    b = PromptSampler(size, seed)
    got = [b.next(n) for _ in range(cut)]
    c = PromptSampler(size, seed)
    c.load_state_dict(json.loads(json.dumps(b.state_dict())))
    got += [c.next(n) for _ in range(6 - cut)]
    assert got == expected
    # every epoch is a permutation: each prompt is seen once before any is repeated
    flat = [i for batch in expected for i in batch]
    for k in range(0, len(flat) - size + 1, size):
        assert sorted(flat[k : k + size]) == list(range(size))


def test_sampler_rejects_a_different_dataset():
    s = PromptSampler(10, 0)
    with pytest.raises(ValueError, match="10 rows but the checkpoint was taken with 12"):
        s.load_state_dict({"epoch": 0, "offset": 0, "size": 12, "seed": 0})


def test_data_sources(tmp_path):
    rows = [{"question": f"q{i}", "answer": str(i)} for i in range(3)]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    ds = load_source(str(jsonl))
    assert ds["question"] == ["q0", "q1", "q2"]
    with pytest.raises(ValueError, match=r"d.jsonl: missing column\(s\) \['messages'\]"):
        check_columns(ds, ["messages", "answer"], str(jsonl))
    split = load_source("envs.arithmetic:make_dataset", {"n_train": 5, "n_test": 2}, split="test")
    assert len(split) == 2
    with pytest.raises(ValueError, match="no split 'validation'"):
        load_source("envs.arithmetic:make_dataset", {"n_train": 5, "n_test": 2}, split="validation")
    with pytest.raises(FileNotFoundError, match="dataset source not found"):
        load_source(str(tmp_path / "none.parquet"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="unsupported data file type"):
        load_source(str(tmp_path / "x.txt"))


def test_broken_jsonl_line_is_one_error_naming_file_and_line(tmp_path):
    from rl.data import DataError

    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "q0", "answer": "0"}\n\n{"question": "q1", "answer": \n')
    with pytest.raises(DataError) as err:
        load_source(str(path))
    assert str(err.value).startswith(f"{path} row 1 (line 3): invalid JSON (Expecting value")
    assert "\n" not in str(err.value)
    path.write_text('{"question": "q0"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"d.jsonl row 1 \(line 2\): expected a JSON object, got list"):
        load_source(str(path))


def test_jsonl_columns_are_the_union_of_the_rows_keys(tmp_path):
    from rl.data import DataError

    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"question": "q0"}) + "\n" + json.dumps({"question": "q1", "answer": "1"}) + "\n")
    ds = load_source(str(path))
    assert ds.column_names == ["question", "answer"] and ds["answer"] == [None, "1"]
    with pytest.raises(DataError, match=r"d.jsonl row 0 \(line 1\): missing column 'answer'"):
        check_columns(ds, ["answer"], str(path))
    path.write_text(json.dumps({"answer": "1"}) + "\n" + json.dumps({"answer": 2}) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl: column 'answer' mixes value types"):
        load_source(str(path))


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_empty_data_file_is_one_line(tmp_path, suffix):
    from rl.data import DataError

    path = tmp_path / f"empty{suffix}"
    path.write_text("\n" if suffix == ".jsonl" else "")
    with pytest.raises(DataError) as err:
        load_source(str(path))
    assert str(err.value) == f"{path}: no rows"


def test_row_missing_a_required_column_is_rejected_with_its_row(tmp_path):
    from rl.data import DataError

    rows = [{"question": f"q{i}", "answer": str(i)} for i in range(20)]
    del rows[17]["answer"]
    rows[19]["answer"] = None
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    ds = load_source(str(path))
    check_columns(ds, ["question"], str(path))  # only the required columns are checked
    with pytest.raises(DataError) as err:
        check_columns(ds, ["question", "answer"], str(path))
    assert str(err.value) == f"{path} row 17 (line 18): missing column 'answer'"
    from rl.common import is_user_error

    assert isinstance(err.value, ValueError) and is_user_error(err.value)  # rl.train prints one error: line
    rows[17]["answer"] = "17"
    path.write_text("\n".join(json.dumps(r) for r in rows))  # None counts as missing, too
    with pytest.raises(DataError, match=r"row 19 \(line 20\): missing column 'answer'"):
        check_columns(load_source(str(path)), ["answer"], str(path))


def test_arithmetic_splits_are_disjoint():
    from envs.arithmetic import make_dataset

    d = make_dataset(n_train=300, n_test=100, low=1, high=30)
    assert not set(d["train"]["question"]) & set(d["test"]["question"])
    for q, a in zip(d["test"]["question"], d["test"]["answer"]):
        x, y = q.split("What is ")[1].split("?")[0].split(" + ")
        assert int(x) + int(y) == int(a)


# ----------------------------------------------------------------------------- checkpoint


def test_optimizer_and_rng_round_trip(tmp_path):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    checkpoint.save_optimizer(opt, tmp_path, "optimizer")
    fresh = torch.optim.AdamW(model.parameters(), lr=0.5)
    checkpoint.load_optimizer(fresh, tmp_path, "optimizer")
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for k in a["state"]:
        for name, v in a["state"][k].items():
            assert torch.equal(v, b["state"][k][name])
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    checkpoint.save_rng(tmp_path, 0)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    checkpoint.load_rng(tmp_path, 0)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


def test_checkpoints_are_renamed_into_place_and_pruned(tmp_path):
    for step in (2, 4, 6):
        tmp = checkpoint.temp_dir(tmp_path, step)
        tmp.mkdir()
        (tmp / "trainer_state.json").write_text("{}")
        checkpoint.finalize(tmp_path, step, keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-6"]
    assert not list(tmp_path.glob(".tmp-*"))
    assert checkpoint.find_checkpoint("latest", tmp_path).name == "checkpoint-6"
    # a half-written temp dir is never picked up by --resume latest
    checkpoint.temp_dir(tmp_path, 8).mkdir()
    assert checkpoint.find_checkpoint("latest", tmp_path).name == "checkpoint-6"
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        checkpoint.find_checkpoint(str(tmp_path / "nope"), tmp_path)


def test_truncated_critic_keeps_the_first_layers_and_reloads(tiny_model_dir, tmp_path):
    from rl.critic import ValueModel

    full = ValueModel.from_pretrained(tiny_model_dir)
    critic = ValueModel.from_pretrained(tiny_model_dir, num_layers=1)
    assert len(critic.backbone.layers) == 1 and critic.backbone.config.num_hidden_layers == 1
    # the kept layer is the pretrained first layer, not a fresh one
    for a, b in zip(full.backbone.layers[0].parameters(), critic.backbone.layers[0].parameters()):
        assert torch.equal(a, b)
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.nn.init.normal_(critic.v_head.weight)  # zero-initialised: make the values depend on the backbone
    assert critic(ids).shape == (1, 4) and critic(ids).abs().sum() > 0
    critic.save_pretrained(str(tmp_path / "critic"))
    again = ValueModel.from_pretrained(str(tmp_path / "critic"))
    assert len(again.backbone.layers) == 1
    torch.testing.assert_close(again(ids), critic(ids))
    with pytest.raises(ValueError, match="critic_layers=9, but .* has only 2 layers"):
        ValueModel.from_pretrained(tiny_model_dir, num_layers=9)
    with pytest.raises(ConfigError, match="critic_layers must be >= 0"):
        config_from_dict({"data": {"train": "x"}, "rewards": [{"name": "numeric_exact"}],
                          "algorithm": {"name": "ppo", "critic_layers": -1}})

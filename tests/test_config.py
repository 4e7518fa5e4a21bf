"""Recipe validation at load, before any model: bad numbers, unknown pluggable names and missing
datasets are one ConfigError naming the key; SFT and RL share one schema (model.lora*, optim.*,
top-level steps/seed/report_to/...), and the older SFT names point to the new ones."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import yaml

from rl.config import ConfigError, config_from_dict, load_config
from sft.config import RENAMED, load_recipe, recipe_from_dict
from tiny import arithmetic_recipe, with_overrides

NAN = math.nan


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model load fails the test: validation must reject the recipe before one."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the recipe was validated")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def rl_recipe(tmp_path, **overrides) -> dict:
    return arithmetic_recipe("unused-model", tmp_path / "out", **overrides)


def sft_recipe(tmp_path, **overrides) -> dict:
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "1+1?"},
                                             {"role": "assistant", "content": "2"}]}) + "\n")
    base = {"model": {"name_or_path": "unused-model"}, "data": {"train": str(data)}, "steps": 2,
            "output_dir": str(tmp_path / "out")}
    return with_overrides(base, **overrides)


# ----------------------------------------------------------------------------- bad numbers (RL)

RL_BAD_VALUES = [
    # (override key, value, the key the error must name)
    ("optim__lr", -1e-5, "optim.lr"),
    ("optim__lr", NAN, "optim.lr"),
    ("optim__lr", 0.0, "optim.lr"),
    ("optim__lr", "nan", "optim.lr"),  # YAML reads `nan` as a string; float fields accept it
    ("algorithm__critic_lr", -1.0, "algorithm.critic_lr"),
    ("algorithm__critic_lr", NAN, "algorithm.critic_lr"),
    ("optim__weight_decay", -0.1, "optim.weight_decay"),
    ("optim__max_grad_norm", 0.0, "optim.max_grad_norm"),
    ("optim__adam_betas", [0.9, 1.0], "optim.adam_betas"),
    ("optim__adam_eps", 0.0, "optim.adam_eps"),
    ("optim__lr_scheduler", "cosin", "optim.lr_scheduler"),
    ("optim__warmup_steps", -1, "optim.warmup_steps"),
    ("optim__warmup_ratio", 1.0, "optim.warmup_ratio"),
    ("model__dtype", "fp17", "model.dtype"),
    ("model__lora_dropout", 1.0, "model.lora_dropout"),
    ("rollout__temperature", -0.5, "rollout.temperature"),
    ("rollout__eval_temperature", -1.0, "rollout.eval_temperature"),
    ("rollout__max_new_tokens", 0, "rollout.max_new_tokens"),
    ("rollout__top_p", 0.0, "rollout.top_p"),
    ("rollout__top_p", 1.5, "rollout.top_p"),
    ("rollout__top_k", -1, "rollout.top_k"),
    ("rollout__generation_batch_size", 0, "rollout.generation_batch_size"),
    ("algorithm__clip_ratio", 0.0, "algorithm.clip_ratio"),
    ("algorithm__clip_ratio_high", -0.1, "algorithm.clip_ratio_high"),
    ("algorithm__dual_clip", 1.0, "algorithm.dual_clip"),
    ("algorithm__kl_coef", -0.1, "algorithm.kl_coef"),
    ("algorithm__gamma", 1.5, "algorithm.gamma"),
    ("algorithm__lam", -0.1, "algorithm.lam"),
    ("algorithm__value_loss_coef", NAN, "algorithm.value_loss_coef"),
    ("save_total_limit", -1, "save_total_limit"),
    ("save_steps", -1, "save_steps"),
    ("eval_steps", -1, "eval_steps"),
    ("logging_steps", 0, "logging_steps"),
    ("data__eval_size", -1, "data.eval_size"),
    ("micro_batch_tokens", 0, "micro_batch_tokens"),
    ("pack_row_tokens", 0, "pack_row_tokens"),
    ("reward_fallback", NAN, "reward_fallback"),
    ("output_dir", "", "output_dir"),
]


@pytest.mark.parametrize(("key", "value", "named"), RL_BAD_VALUES, ids=lambda v: str(v))
def test_rl_bad_values_fail_at_load_naming_the_key(tmp_path, key, value, named):
    with pytest.raises(ConfigError) as err:
        config_from_dict(rl_recipe(tmp_path, **{key: value}), "r.yaml")
    message = str(err.value)
    assert message.startswith(f"r.yaml: {named}") and "\n" not in message


def test_warmup_steps_and_ratio_are_exclusive(tmp_path):
    with pytest.raises(ConfigError, match="optim.warmup_steps and optim.warmup_ratio are both set"):
        config_from_dict(rl_recipe(tmp_path, optim__warmup_steps=2, optim__warmup_ratio=0.1), "r.yaml")


def test_warmup_with_the_constant_schedule_is_refused(tmp_path):
    # transformers' "constant" schedule ignores num_warmup_steps: the asked-for warmup would not happen
    with pytest.raises(ConfigError, match="'constant' has no warmup: use 'constant_with_warmup'"):
        config_from_dict(rl_recipe(tmp_path, optim__warmup_steps=2), "r.yaml")


def test_stage_kl_coef_and_reward_weight_are_checked(tmp_path):
    stages = [{"name": "a", "steps": 1, "kl_coef": -1.0}]
    with pytest.raises(ConfigError, match=r"stages\[0\].kl_coef must be >= 0"):
        config_from_dict(rl_recipe(tmp_path, stages=stages), "r.yaml")
    rewards = [{"name": "final_number", "weight": NAN}]
    with pytest.raises(ConfigError, match=r"rewards\[0\].weight must be a finite number"):
        config_from_dict(rl_recipe(tmp_path, rewards=rewards), "r.yaml")


def test_the_defaults_and_good_edge_values_pass(tmp_path):
    cfg = config_from_dict(rl_recipe(tmp_path, rollout__temperature=0.0, rollout__top_p=1.0, rollout__top_k=0,
                                     optim__warmup_ratio=0.5, optim__lr_scheduler="constant_with_warmup",
                                     save_total_limit=0, algorithm__dual_clip=3.0))
    assert cfg.optim.resolved_warmup_steps(10) == 5


# ----------------------------------------------------------------------------- bad numbers (SFT)

SFT_BAD_VALUES = [
    ("optim__lr", -1e-5, "optim.lr"),
    ("optim__lr", NAN, "optim.lr"),
    ("optim__lr_scheduler", "cosin", "optim.lr_scheduler"),
    ("optim__weight_decay", -1.0, "optim.weight_decay"),
    ("model__dtype", "fp17", "model.dtype"),
    ("model__lora", True, "model.lora_r"),  # with lora_r below
    ("logging_steps", 0, "logging_steps"),
    ("save_total_limit", -1, "save_total_limit"),
    ("data__eval_size", -1, "data.eval_size"),
    ("data__max_length", 0, "data.max_length"),
    ("training__mixed_precision", "fp8", "training.mixed_precision"),
    ("steps", -1, "nothing to train"),
]


@pytest.mark.parametrize(("key", "value", "named"), SFT_BAD_VALUES, ids=lambda v: str(v))
def test_sft_bad_values_fail_at_load_naming_the_key(tmp_path, key, value, named):
    extra = {"model__lora_r": 0} if key == "model__lora" else {}
    with pytest.raises(ConfigError) as err:
        recipe_from_dict(sft_recipe(tmp_path, **{key: value}, **extra), "s.yaml")
    message = str(err.value)
    assert message.startswith(f"s.yaml: {named}") and "\n" not in message


# ----------------------------------------------------------------------------- one schema, old SFT names


def test_sft_and_rl_share_the_model_and_optim_sections(tmp_path):
    from rl.config import ModelConfig, OptimConfig

    rec = recipe_from_dict(sft_recipe(tmp_path, model__lora=True, model__lora_r=4, optim__lr=3e-4, seed=7,
                                      report_to=["tensorboard"], save_total_limit=1))
    cfg = config_from_dict(rl_recipe(tmp_path, model__lora=True, model__lora_r=4, optim__lr=3e-4, seed=7,
                                     report_to=["tensorboard"], save_total_limit=1))
    # the same classes (SFT's optim section is RL's with SFT's defaults: a subclass, same keys)
    assert type(rec.model) is type(cfg.model) is ModelConfig and type(cfg.optim) is OptimConfig
    assert isinstance(rec.optim, OptimConfig) and [f.name for f in dataclasses.fields(rec.optim)] == [f.name for f in dataclasses.fields(cfg.optim)]
    for key in ("model.lora", "model.lora_r", "optim.lr", "seed", "report_to", "save_total_limit", "output_dir"):
        section, _, name = key.rpartition(".")
        get = (lambda c: getattr(getattr(c, section), name)) if section else (lambda c: getattr(c, name))
        assert get(rec) == get(cfg), key


@pytest.mark.parametrize("old", sorted(RENAMED))
def test_old_sft_names_point_to_the_new_ones(tmp_path, old):
    section, key = old.split(".")
    value = {"enabled": True, "target_modules": ["q_proj"], "report_to": [], "lr_scheduler": "linear"}.get(key, 1)
    data = sft_recipe(tmp_path)
    data[section] = {key: value}
    with pytest.raises(ConfigError, match=rf"^s.yaml: {old} was renamed {RENAMED[old]}$"):
        recipe_from_dict(data, "s.yaml")


def test_old_sft_names_in_a_file_and_in_overrides(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(sft_recipe(tmp_path)))
    load_recipe(path)
    with pytest.raises(ConfigError, match=rf"^{path}: training.max_steps was renamed steps$"):
        load_recipe(path, ["training.max_steps=4"])
    with pytest.raises(ConfigError, match=rf"^{path}: lora.enabled was renamed model.lora$"):
        load_recipe(path, ["lora.enabled=true"])
    path.write_text(yaml.safe_dump({**sft_recipe(tmp_path), "training": {"epochs": 1, "seed": 3}}))
    with pytest.raises(ConfigError, match=rf"^{path}: training.seed was renamed seed$"):
        load_recipe(path)
    path.write_text(yaml.safe_dump({**sft_recipe(tmp_path), "lora": {}}))
    with pytest.raises(ConfigError, match="the lora section was merged into model: model.lora, model.lora_r"):
        load_recipe(path)


# ----------------------------------------------------------------------------- fast failure per pluggable kind

PLUGGABLE = [
    # (override, the key the one-line error names)
    ({"rewards": [{"name": "no_such_reward"}]}, r"rewards\[0\]\.name"),
    ({"rollout__agent": "no_such_agent"}, "rollout.agent"),
    ({"rollout__agent": "multi_turn", "rollout__agent_kwargs": {"env": "no_such_env"}}, "rollout.agent_kwargs"),
    ({"rollout__engine": "no_such_engine"}, "rollout.engine"),
    ({"algorithm__name": "no_such_estimator"}, "algorithm.name"),
    ({"algorithm__policy_loss": "no_such_loss"}, "algorithm.policy_loss"),
    ({"algorithm__kl_estimator": "k9"}, "algorithm.kl_estimator"),
    ({"data__prompt_builder": "no_such_builder"}, "data.prompt_builder"),
    ({"data__train": "envs.arithmetic:no_such_function"}, "data.train"),
    ({"data__eval": "no_such_dataset"}, "data.eval"),
    ({"stages": [{"name": "a", "steps": 1, "train": "envs.arithmetic:nope"}]}, r"stages\[0\]\.train"),
    ({"data__train": "data/no_such_file.jsonl"}, "data.train: dataset source not found: 'data/no_such_file.jsonl'"),
    ({"rewards": [{"name": "no_such_package.module:fn"}]}, r"rewards\[0\]\.name.*cannot import module"),
    ({"plugins": ["no_such_plugin_package"]}, "no_such_plugin_package"),
]


@pytest.mark.parametrize(("overrides", "named"), PLUGGABLE, ids=lambda v: str(v)[:60])
def test_unknown_pluggable_names_fail_before_any_model_loads(tmp_path, no_model_loads, overrides, named):
    data = rl_recipe(tmp_path)
    for key, value in overrides.items():
        with_overrides(data, **{key: value})
    with pytest.raises(ConfigError, match=named) as err:
        config_from_dict(data, "r.yaml")
    assert "\n" not in str(err.value)


def test_dataset_function_is_resolved_not_called(tmp_path, monkeypatch):
    import envs.arithmetic

    def expensive(**kwargs):
        raise AssertionError("the dataset was loaded at validation")

    monkeypatch.setattr(envs.arithmetic, "make_dataset", expensive)
    config_from_dict(rl_recipe(tmp_path), "r.yaml")


def test_settings_only_load_skips_missing_data_files(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(rl_recipe(tmp_path, data__train="data/not_yet.jsonl")))
    with pytest.raises(ConfigError, match="data.train: dataset source not found"):
        load_config(path)
    assert load_config(path, check_files=False).data.train == "data/not_yet.jsonl"
    with pytest.raises(ConfigError, match="data.train"):  # a function is resolved either way
        load_config(path, ["data.train=envs.arithmetic:nope"], check_files=False)
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(ConfigError, match="data.train: .*unsupported data file type '.txt'"):
        load_config(path, [f"data.train={tmp_path / 'd.txt'}"])


def test_sft_dataset_sources_are_checked_at_load(tmp_path, no_model_loads):
    with pytest.raises(ConfigError, match="data.train: dataset file not found: data/missing.jsonl"):
        recipe_from_dict(sft_recipe(tmp_path, data__train="data/missing.jsonl"), "s.yaml")
    with pytest.raises(ConfigError, match="data.eval: .*has no attribute 'nope'"):
        recipe_from_dict(sft_recipe(tmp_path, data__eval="envs.arithmetic:nope"), "s.yaml")

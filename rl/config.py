"""Recipe YAML -> typed config.

A recipe is a YAML mapping whose keys are the fields of `TrainConfig` below (nested
sections are dataclasses). Parsing is strict: an unknown or misspelled key is an
error that names the file, the full key path and the closest valid key, because a
silently ignored `kl_coeff: 0.1` is a run wasted.

Command-line overrides use dotted paths: `algorithm.kl_coef=0.01 train.steps=10`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A recipe that cannot be run as written; the message names the key."""


@dataclass
class ModelConfig:
    name_or_path: str = "smollm2-135m"  # a short name from `rl.models`, a local dir or a hub id
    dtype: str = "auto"  # auto = bfloat16 on GPU, float32 on CPU (bf16 is >15x slower on AVX2 CPUs)
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    # LoRA through PEFT; the LoRA-disabled base model then serves as the KL reference.
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # LoRA runs: <output_dir>/final/ holds the adapter (+ tokenizer) instead of the merged model
    # (smaller; loading it needs the base model, named portably in adapter_config.json)
    save_adapter_only: bool = False
    # vision-language models: no gradients for the vision encoder (under LoRA: no adapters in it) /
    # for the language model (trains the vision path only, e.g. projector pre-training)
    freeze_vision_tower: bool = False
    freeze_language_model: bool = False
    # Added vocabulary (rl/vocab.py, docs/added_tokens.md): new tokens (e.g. semantic IDs <a_12>) added to
    # the tokenizer, with new embedding (and untied head) rows that train (LoRA: only those rows, through
    # PEFT's trainable_token_indices). A list of tokens (or of {token, description}), or a .txt file (one
    # token per line) or .jsonl file ({"token": ..., "description": ...} per line).
    added_tokens: Any = field(default_factory=list)
    added_tokens_init: str = "mean"  # mean (of the existing rows) | description (mean of its description's rows)


@dataclass
class DataConfig:
    # A dataset source: "module:function" returning a datasets.Dataset (or DatasetDict),
    # a .jsonl/.json/.parquet/.csv file, or a directory saved with `save_to_disk`.
    train: str = ""
    train_kwargs: dict[str, Any] = field(default_factory=dict)
    eval: str = ""
    eval_kwargs: dict[str, Any] = field(default_factory=dict)
    eval_size: int = 0  # 0 = the whole eval split
    # Turns a dataset row into chat messages: a registered name or "module:function".
    prompt_builder: str = "messages"
    # Columns every row must have (checked up front, so a typo fails before any compute).
    required_columns: list[str] = field(default_factory=list)
    shuffle: bool = True


@dataclass
class RolloutConfig:
    engine: str = "hf"  # registered engine name (rl.engines) or package.module:Class: hf | vllm | vllm_server
    # passed to the engine's constructor, e.g. {base_url: http://127.0.0.1:8000} for vllm_server,
    # {kv_cache_gb: 2, max_model_len: 4096} for vllm (see rl/engines/vllm_colocate.py)
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    agent: str = "single_turn"  # registered agent loop (agents) or "module:function"
    agent_kwargs: dict[str, Any] = field(default_factory=dict)  # passed to the agent (env settings, turns, ...)
    group_size: int = 4  # samples per prompt (G)
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    generation_batch_size: int = 64  # sequences per engine call; bounds KV-cache memory
    # dynamic sampling (DAPO): roll out oversample x prompts_per_step prompts per step and train
    # on prompts_per_step of their groups, those whose rewards differ first
    # (rl.algorithms.select_groups); 1 = train on every group rolled out
    oversample: int = 1
    eval_temperature: float = 0.0  # 0 = greedy
    # constrained decoding (rl/constraints.py, docs/engines.md): only these token sequences may be sampled,
    # in rollouts and evals, and the trainer renormalises its log-probs over the same allowed ids. A text
    # file (one allowed sequence per line), a .jsonl file (a string, or {text} / {ids}, per line) or
    # "module:function" returning a list of strings or a TokenTrie; null = unconstrained
    constraint: str | None = None


@dataclass
class RewardSpec:
    name: str = ""  # a registered reward or "package.module:function"
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class AlgorithmConfig:
    # reinforce | rloo | grpo | ppo (= gae advantages with a learned critic), or any advantage
    # estimator by name (rl.algorithms.ADVANTAGE_ESTIMATORS) or "module:function"; an estimator that
    # declares needs_values gets a critic
    name: str = "grpo"
    # advantage-estimator options (each estimator takes the ones it declares)
    baseline: str = "group"  # reinforce: none | batch | group
    whiten: bool = False  # reinforce
    normalize_by_std: bool = True  # grpo; False = Dr.GRPO
    gamma: float = 1.0
    lam: float = 1.0
    # policy loss: clipped | vanilla, or "module:function"
    policy_loss: str = "clipped"
    clip_ratio: float = 0.2
    clip_ratio_high: float | None = None
    dual_clip: float | None = None
    loss_agg_mode: str = "token-mean"
    entropy_coef: float = 0.0
    # KL to the reference policy; off (0) means no reference model is loaded at all
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    kl_in_reward: bool = False  # True: -kl_coef*KL in the token rewards (PPO style); False: a loss term (GRPO style)
    # critic (estimators that need values, e.g. ppo's gae)
    value_loss: str = "clipped"  # rl.algorithms.VALUE_LOSSES name or "module:function"
    value_loss_coef: float = 0.5
    value_clip: float | None = 0.5
    critic_lr: float = 1e-5
    # > 0: the critic is the policy's first `critic_layers` transformer layers + a value
    # head (cheaper per step: its cost scales with its depth); 0: the full backbone
    critic_layers: int = 0
    # rollout correction (truncated importance sampling between the engine's log-probs and the
    # trainer's): none | token | sequence (rl.algorithms.ROLLOUT_CORRECTIONS). Anything but none
    # makes the trainer recompute pi_old with its own forward (as old_logprobs: recompute does).
    rollout_correction: str = "none"
    rollout_correction_cap: float = 2.0  # the truncation: weights are min(pi_old / mu, cap)
    # options of the estimator / losses that have no field above (e.g. a user's estimator's own
    # keyword-only options); validated at recipe load against the functions' signatures
    options: dict[str, Any] = field(default_factory=dict)

    def function_options(self) -> dict[str, Any]:
        """Every field and `options` entry, by name: each function takes the ones it declares."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "options"}
        return {**fields, **self.options}


@dataclass
class OptimConfig:
    lr: float = 1e-6
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    lr_scheduler: str = "constant"  # any transformers SchedulerType: constant, linear, cosine, ...
    warmup_steps: int = 0
    # a fraction of the total optimizer steps, in [0, 1); set warmup_steps or warmup_ratio, not both
    warmup_ratio: float = 0.0

    def resolved_warmup_steps(self, total_steps: int) -> int:
        """Warmup in optimizer steps: `warmup_steps`, or `warmup_ratio` of `total_steps` (rounded up,
        as transformers' `TrainingArguments.get_warmup_steps` does)."""
        return self.warmup_steps or math.ceil(self.warmup_ratio * total_steps)


@dataclass
class StageConfig:
    """One curriculum stage; Progressive GRPO is GRPO over several of these."""

    name: str = ""
    steps: int = 0
    prompt_builder: str | None = None  # overrides data.prompt_builder
    train: str | None = None  # overrides data.train
    train_kwargs: dict[str, Any] | None = None
    kl_coef: float | None = None  # overrides algorithm.kl_coef


@dataclass
class TrainConfig:
    # modules imported before any name is looked up: the papers whose environments, rewards,
    # prompt builders, datasets and metrics the recipe uses (e.g. [envs.search]); see rl/plugins.py
    plugins: list[str] = field(default_factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rewards: list[RewardSpec] = field(default_factory=list)
    reward_fallback: float = 0.0  # score given when a reward function raises (the error is counted)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    stages: list[StageConfig] = field(default_factory=list)

    steps: int = 10  # total optimizer-phase steps when no stages are given
    prompts_per_step: int = 4  # across all processes
    ppo_epochs: int = 1
    mini_batches_per_step: int = 1  # optimizer steps per rollout batch and epoch
    micro_batch_tokens: int = 4096  # packed tokens per forward/backward
    packing: bool = True  # packed rows sharing each prompt across its samples; False = one padded row per sample
    pack_row_tokens: int = 256  # packed row width: attention costs O(width^2) without a varlen kernel
    # rollout (engine log-probs) | recompute (extra forward; also reports the engine/trainer mismatch)
    old_logprobs: str = "rollout"

    seed: int = 0
    output_dir: str = "outputs/run"
    overwrite_output_dir: bool = False
    logging_steps: int = 1
    # samples/step_<N>.jsonl: the first log_samples samples of every step (eval: all); 0 = no samples files
    log_samples: int = 8
    report_to: list[str] = field(default_factory=list)  # e.g. [tensorboard] or [wandb]
    save_steps: int = 0  # 0 = only at the end
    save_total_limit: int = 2
    eval_steps: int = 0  # 0 = only before and after training
    eval_before_training: bool = True

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages) if self.stages else self.steps

    def resolved_stages(self) -> list[StageConfig]:
        return self.stages or [StageConfig(name="main", steps=self.steps)]


# ----------------------------------------------------------------------------- parsing


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads `1e-5` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    raise ConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def _build(cls, data: dict, where: str):
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in types_:
            close = difflib.get_close_matches(str(key), list(types_), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (valid keys: {', '.join(types_)})"
            raise ConfigError(f"unknown key '{path}'{hint}")
        kwargs[key] = _coerce(value, types_[key], path)
    return cls(**kwargs)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{k}' is not a section")
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.path=value")
        key, raw = item.split("=", 1)
        parsed.append((key.strip(), yaml.safe_load(raw)))
    return parsed


def build_dataclass(cls, data: dict, source: str = "<dict>"):
    """`cls` from a nested mapping, strictly: errors name `source`, the key path and the nearest valid key."""
    try:
        return _build(cls, data, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def read_recipe_mapping(path: str | Path, overrides: list[str] | None = None) -> dict:
    """A recipe file's mapping with dotted `key.path=value` overrides applied (shared by RL and SFT recipes)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of keys, got {type(data).__name__}")
    for key, value in parse_overrides(overrides or []):
        _set_dotted(data, key, value)
    return data


def config_from_dict(data: dict, source: str = "<dict>", check_files: bool = True) -> TrainConfig:
    """`check_files=False`: data files need not exist yet (a recipe read only for its settings,
    e.g. by `eval.run --recipe`, which brings its own data)."""
    cfg = build_dataclass(TrainConfig, data, source)
    validate(cfg, source, check_files=check_files)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None, check_files: bool = True) -> TrainConfig:
    return config_from_dict(read_recipe_mapping(path, overrides), str(path), check_files=check_files)


def config_to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def _check_agent_kwargs(agents, name: str, agent_kwargs: dict, fail) -> None:
    """`rollout.agent_kwargs` against the agent: every key is a parameter it takes, and an agent that
    offers `resolved_kwargs(agent_kwargs)` (the multi-turn agent: it resolves the environment name and
    the loop options) validates its own settings, so a typo fails before any model loads."""
    import inspect

    agent = agents.get(name)
    params = inspect.signature(agent).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        reserved = {"engine", "tokenizer", "rows", "prompt_builder", "params", "group_size", "first_group_id"}
        takes = [k for k, p in params.items() if p.kind is p.KEYWORD_ONLY and k not in reserved]
        for key in agent_kwargs:
            if key not in takes:
                close = difflib.get_close_matches(str(key), takes, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                fail(f"rollout.agent_kwargs.{key}: agent '{name}' takes no such option{hint}; it takes {takes}")
    resolve = agents.meta(name, "resolved_kwargs")
    if callable(resolve):
        try:
            resolve(dict(agent_kwargs))
        except (ValueError, TypeError) as e:
            fail(f"rollout.agent_kwargs: {e}")


# ----------------------------------------------------------------------------- value checks
# Shared by RL recipes (`validate`) and SFT recipes (`sft.config.validate_recipe`), which use the
# same sections for the same things. `fail(msg)` raises the ConfigError naming the recipe.
# Written as `not (x > 0)` rather than `x <= 0` so that NaN fails too.


def check_model(m: ModelConfig, fail, check_files: bool = True) -> None:
    from rl.common import DTYPES  # local: parsing stays importable without torch

    if not m.name_or_path:
        fail("model.name_or_path: no model given")
    if m.dtype not in DTYPES:
        fail(f"model.dtype '{m.dtype}' is not one of {list(DTYPES)}")
    if m.lora:
        if m.lora_r < 1 or m.lora_alpha < 1:
            fail(f"model.lora_r and model.lora_alpha must be >= 1, got {m.lora_r} and {m.lora_alpha}")
        if not m.lora_target_modules:
            fail("model.lora_target_modules: empty (e.g. [q_proj, v_proj], or [all-linear])")
    if not 0.0 <= m.lora_dropout < 1.0:
        fail(f"model.lora_dropout must be in [0, 1), got {m.lora_dropout}")
    if getattr(m, "save_adapter_only", False) and not m.lora:
        fail("model.save_adapter_only: true needs model.lora: true (there is no adapter to save)")
    from rl.vocab import read_added_tokens  # the list or file: readable, no duplicates, descriptions if needed

    if not check_files and isinstance(m.added_tokens, str) and not Path(m.added_tokens).expanduser().is_file():
        return  # a token file a data-build step writes (like a data file): checked when the run starts
    try:
        read_added_tokens(m)
    except ValueError as e:
        fail(str(e))


def check_optim(o: OptimConfig, fail) -> None:
    if not (math.isfinite(o.lr) and o.lr > 0):
        fail(f"optim.lr must be a number > 0, got {o.lr}")
    if not (math.isfinite(o.weight_decay) and o.weight_decay >= 0):
        fail(f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    if len(o.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in o.adam_betas):
        fail(f"optim.adam_betas must be two numbers in [0, 1), got {o.adam_betas}")
    if not (math.isfinite(o.adam_eps) and o.adam_eps > 0):
        fail(f"optim.adam_eps must be > 0, got {o.adam_eps}")
    if not o.max_grad_norm > 0:  # inf = no clipping; 0 would scale every gradient to zero
        fail(f"optim.max_grad_norm must be > 0, got {o.max_grad_norm}")
    if o.warmup_steps < 0:
        fail(f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    if not 0.0 <= o.warmup_ratio < 1.0:
        fail(f"optim.warmup_ratio must be in [0, 1), got {o.warmup_ratio}")
    if o.warmup_steps and o.warmup_ratio:
        fail("optim.warmup_steps and optim.warmup_ratio are both set; set one")
    if (o.warmup_steps or o.warmup_ratio) and o.lr_scheduler == "constant":
        # transformers' "constant" schedule ignores warmup: the warmup asked for would silently not happen
        fail("optim.lr_scheduler 'constant' has no warmup: use 'constant_with_warmup' (or another schedule) "
             "with optim.warmup_steps / warmup_ratio")
    from transformers.trainer_utils import SchedulerType  # local: keeps parsing light

    schedulers = [t.value for t in SchedulerType]
    if o.lr_scheduler not in schedulers:
        close = difflib.get_close_matches(o.lr_scheduler, schedulers, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        fail(f"optim.lr_scheduler '{o.lr_scheduler}' is not one of {schedulers}{hint}")


def check_run_keys(cfg, fail) -> None:
    """The top-level run keys RL and SFT recipes share: output_dir and the logging / eval / save cadence."""
    if not cfg.output_dir:
        fail("output_dir: empty")
    if cfg.logging_steps < 1:
        fail(f"logging_steps must be >= 1, got {cfg.logging_steps}")
    for key in ("eval_steps", "save_steps", "save_total_limit"):
        if getattr(cfg, key) < 0:
            fail(f"{key} must be >= 0, got {getattr(cfg, key)}")


def check_source(key: str, source: str, fail, check_files: bool = True) -> None:
    """A dataset source (`rl.data.source_kind`): a registered dataset or "module:function" is
    resolved (imported, not called: loading may be expensive); a file or directory must exist
    unless `check_files` is False."""
    from rl.data import DATASETS, source_kind

    try:
        if check_files:
            source_kind(source)
        elif ":" in source or source in DATASETS:
            DATASETS.get(source)
    except (ValueError, TypeError, FileNotFoundError) as e:
        fail(f"{key}: {e}")


# Numbers with a range, checked for every RL recipe: (key, test, what the value must be).
_RL_RANGES: list[tuple[str, Any, str]] = [
    ("rollout.temperature", lambda v: math.isfinite(v) and v >= 0, ">= 0 (0 = greedy)"),
    ("rollout.eval_temperature", lambda v: math.isfinite(v) and v >= 0, ">= 0 (0 = greedy)"),
    ("rollout.max_new_tokens", lambda v: v >= 1, ">= 1"),
    ("rollout.top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("rollout.top_k", lambda v: v >= 0, ">= 0 (0 = off)"),
    ("rollout.generation_batch_size", lambda v: v >= 1, ">= 1"),
    ("algorithm.clip_ratio", lambda v: math.isfinite(v) and v > 0, "> 0"),
    ("algorithm.clip_ratio_high", lambda v: v is None or (math.isfinite(v) and v > 0), "> 0 (or null)"),
    ("algorithm.dual_clip", lambda v: v is None or v > 1, "> 1 (or null)"),
    ("algorithm.critic_lr", lambda v: math.isfinite(v) and v > 0, "a number > 0"),
    ("algorithm.kl_coef", lambda v: math.isfinite(v) and v >= 0, ">= 0"),
    ("algorithm.entropy_coef", math.isfinite, "a finite number"),
    ("algorithm.value_loss_coef", lambda v: math.isfinite(v) and v >= 0, ">= 0"),
    ("algorithm.value_clip", lambda v: v is None or v > 0, "> 0 (or null)"),
    ("algorithm.gamma", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("algorithm.lam", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("data.eval_size", lambda v: v >= 0, ">= 0 (0 = the whole eval split)"),
    ("micro_batch_tokens", lambda v: v >= 1, ">= 1"),
    ("pack_row_tokens", lambda v: v >= 1, ">= 1"),
    ("reward_fallback", math.isfinite, "a finite number"),
]


def _check_constraint(r: RolloutConfig, fail, check_files: bool) -> None:
    """`rollout.constraint` names an existing file or an importable "module:function" (not called: it
    may need the tokenizer's work); the trie itself is built, and checked, once the tokenizer exists."""
    import importlib

    spec = str(r.constraint)
    from rl.constraints import is_function_spec

    if not is_function_spec(spec):
        if check_files and not Path(spec).is_file():
            fail(f"rollout.constraint: file not found: {spec}")
        return
    module, _, attr = spec.partition(":")
    try:
        if not callable(getattr(importlib.import_module(module), attr)):
            fail(f"rollout.constraint: {spec} is not a function")
    except (ImportError, AttributeError) as e:
        fail(f"rollout.constraint: cannot import {spec!r}: {e}")


def _get(cfg, dotted: str):
    for k in dotted.split("."):
        cfg = getattr(cfg, k)
    return cfg


def validate(cfg: TrainConfig, source: str, check_files: bool = True) -> None:
    """Everything a recipe names is checked here, before any model loads: plugins import, every
    registered name resolves (datasets included, without loading them), algorithm options match
    the selected functions' signatures, numbers are in range, data files exist (`check_files`)."""
    # local imports: parsing stays importable without torch; validation needs the registries
    from rl import algorithms
    from rl.data import PROMPT_BUILDERS
    from rl.engines import ENGINES
    from rl.plugins import PluginError, load_plugins
    from rl.registry import AGENTS
    from rl.rewards import REWARDS

    def fail(msg: str):
        raise ConfigError(f"{source}: {msg}")

    try:
        load_plugins(cfg.plugins, source)  # papers register their names before any lookup
    except PluginError as e:
        raise ConfigError(str(e)) from None

    def check_name(registry, key: str, name: str):
        try:
            registry.get(name)
        except (ValueError, TypeError) as e:
            fail(f"{key}: {e}")

    check_name(AGENTS, "rollout.agent", cfg.rollout.agent)
    _check_agent_kwargs(AGENTS, cfg.rollout.agent, cfg.rollout.agent_kwargs, fail)
    check_name(ENGINES, "rollout.engine", cfg.rollout.engine)
    check_name(PROMPT_BUILDERS, "data.prompt_builder", cfg.data.prompt_builder)
    for i, spec in enumerate(cfg.rewards):
        check_name(REWARDS, f"rewards[{i}].name", spec.name)
    for i, stage in enumerate(cfg.stages):
        if stage.prompt_builder is not None:
            check_name(PROMPT_BUILDERS, f"stages[{i}].prompt_builder", stage.prompt_builder)

    algo = cfg.algorithm

    def resolve(registry, key: str, name: str):
        try:
            return registry.get(name)
        except (ValueError, TypeError) as e:
            fail(f"algorithm.{key} '{name}': {e}")

    estimator = algorithms.estimator_for(algo.name)
    if ":" not in estimator and estimator not in algorithms.ADVANTAGE_ESTIMATORS:
        fail(f"algorithm.name '{algo.name}' is not an algorithm ({', '.join(algorithms.ALGORITHMS)}) or a registered "
             f"advantage estimator {algorithms.ADVANTAGE_ESTIMATORS.names()} (or 'module:function')")
    functions = {
        "name": resolve(algorithms.ADVANTAGE_ESTIMATORS, "name", estimator),
        "policy_loss": resolve(algorithms.POLICY_LOSSES, "policy_loss", algo.policy_loss),
        "kl_estimator": resolve(algorithms.KL_ESTIMATORS, "kl_estimator", algo.kl_estimator),
    }
    resolve(algorithms.LOSS_AGGREGATIONS, "loss_agg_mode", algo.loss_agg_mode)  # takes the trainer's counts only
    if algorithms.needs_values(estimator):
        functions["value_loss"] = resolve(algorithms.VALUE_LOSSES, "value_loss", algo.value_loss)
    if algo.rollout_correction != "none":
        resolve(algorithms.ROLLOUT_CORRECTIONS, "rollout_correction", algo.rollout_correction)
    # options: every key of algorithm.options is declared by a function the recipe selects, and every
    # option a selected function requires (no default) is given, so a typo fails before any model loads
    declared = {}
    for key, fn in functions.items():
        for opt, param in algorithms.options_of(fn).items():
            declared.setdefault(opt, []).append(getattr(algo, key))
            given = opt in algo.options or any(f.name == opt for f in dataclasses.fields(algo))
            if param.default is param.empty and not given:
                fail(f"algorithm.options.{opt}: required by {key} '{getattr(algo, key)}' and not given")
    for opt in algo.options:
        if any(f.name == opt for f in dataclasses.fields(algo)):
            fail(f"algorithm.options.{opt}: set it as algorithm.{opt}")
        if opt not in declared:
            close = difflib.get_close_matches(opt, list(declared), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            fail(f"algorithm.options.{opt}: no selected function takes it{hint}; the selected functions take "
                 f"{sorted(declared)}")
    if algo.critic_layers < 0:
        fail(f"algorithm.critic_layers must be >= 0 (0 = the full backbone), got {algo.critic_layers}")
    if not algo.rollout_correction_cap >= 1.0:
        fail(f"algorithm.rollout_correction_cap must be >= 1, got {algo.rollout_correction_cap}")
    if cfg.old_logprobs not in ("rollout", "recompute"):
        fail(f"old_logprobs must be 'rollout' or 'recompute', got '{cfg.old_logprobs}'")
    if not cfg.rewards:
        fail("rewards: at least one reward function is required")
    if not cfg.data.train and not any(s.train for s in cfg.stages):
        fail("data.train: no training dataset given")
    if cfg.prompts_per_step < 1 or cfg.rollout.group_size < 1:
        fail("prompts_per_step and rollout.group_size must be >= 1")
    if cfg.mini_batches_per_step < 1 or cfg.ppo_epochs < 1:
        fail("mini_batches_per_step and ppo_epochs must be >= 1")
    if cfg.rollout.constraint is not None:
        if AGENTS.get(cfg.rollout.agent) is not AGENTS.get("single_turn"):
            fail(f"rollout.constraint: constrained decoding is single-turn only (agent '{cfg.rollout.agent}' does "
                 f"not carry the constraint to the trainer's log-probs)")
        if cfg.rollout.engine == "vllm_server":
            fail("rollout.constraint: the vllm_server engine cannot apply a token trie yet (use engine hf or vllm; "
                 "docs/engines.md#constrained-decoding)")
        _check_constraint(cfg.rollout, fail, check_files)
    if cfg.rollout.oversample < 1:
        fail(f"rollout.oversample must be >= 1 (1 = no dynamic sampling), got {cfg.rollout.oversample}")
    if cfg.rollout.oversample > 1 and cfg.rollout.group_size < 2:
        fail("rollout.oversample > 1 needs rollout.group_size >= 2: it keeps the groups whose rewards differ, "
             "and a one-sample group never differs")
    if cfg.total_steps < 1:
        fail("nothing to train: steps (or the sum of stage steps) must be >= 1")
    for i, stage in enumerate(cfg.stages):
        if stage.steps < 1:
            fail(f"stages[{i}].steps must be >= 1")
        if stage.kl_coef is not None and not (math.isfinite(stage.kl_coef) and stage.kl_coef >= 0):
            fail(f"stages[{i}].kl_coef must be >= 0, got {stage.kl_coef}")
    check_model(cfg.model, fail, check_files)
    check_optim(cfg.optim, fail)
    check_run_keys(cfg, fail)
    for key, ok, what in _RL_RANGES:
        value = _get(cfg, key)
        if not ok(value):
            fail(f"{key} must be {what}, got {value}")
    for i, spec in enumerate(cfg.rewards):
        if not math.isfinite(spec.weight):
            fail(f"rewards[{i}].weight must be a finite number, got {spec.weight}")
    # datasets last: a file check is the one a settings-only load (check_files=False) skips
    if cfg.data.train:
        check_source("data.train", cfg.data.train, fail, check_files)
    if cfg.data.eval:
        check_source("data.eval", cfg.data.eval, fail, check_files)
    for i, stage in enumerate(cfg.stages):
        if stage.train:
            check_source(f"stages[{i}].train", stage.train, fail, check_files)


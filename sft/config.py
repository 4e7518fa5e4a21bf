"""SFT recipe YAML -> typed `SFTRecipe`.

Same rules as RL recipes (`rl.config`, whose parser this module reuses): an unknown
or misspelled key is an error naming the file, the full key path and the closest
valid key; float fields accept YAML 1.1 strings such as `1e-5`; command-line
overrides use dotted paths (`training.lr=1e-4 data.max_length=512`).

    model:    {name_or_path, dtype, attn_implementation, gradient_checkpointing}
    data:     {train, train_split, eval, eval_split, eval_size, max_train_rows, format,
               messages_column, max_length, end_of_turn}
    lora:     {enabled, r, alpha, dropout, target_modules}
    training: {epochs, max_steps, per_device_batch_size, gradient_accumulation_steps, lr,
               warmup_ratio, lr_scheduler, weight_decay, max_grad_norm, packing,
               logging_steps, eval_steps, save_steps, save_total_limit, seed, report_to,
               mixed_precision, num_threads, dataloader_workers}
    output_dir, overwrite_output_dir
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from rl.common import DTYPES

# The strict recipe parser is the RL recipes' own: same errors, same overrides.
from rl.config import ConfigError, build_dataclass, read_recipe_mapping

__all__ = [
    "DATA_FORMATS",
    "ConfigError",
    "LoraConfigSection",
    "SFTDataConfig",
    "SFTModelConfig",
    "SFTRecipe",
    "SFTTrainingConfig",
    "load_recipe",
    "recipe_from_dict",
    "recipe_to_dict",
    "validate_recipe",
]

DATA_FORMATS = ("messages", "tokenized")
MIXED_PRECISION = ("auto", "bf16", "fp16", "no")


@dataclass
class SFTModelConfig:
    name_or_path: str = "smollm2-135m"  # a short name from `rl.models`, a local dir or a hub id
    # dtype of the loaded weights (`rl.common.resolve_dtype`, as in RL recipes and eval):
    # auto = bfloat16 on a GPU that has it, float32 on CPU. float32 keeps fp32 master
    # weights on GPU (the forward then runs in bf16 through training.mixed_precision=auto).
    dtype: str = "auto"
    # sdpa / eager / flash_attention_2 / ...; all three keep packed examples separate
    # (see sft.trainer, "Packing").
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False


@dataclass
class SFTDataConfig:
    # A .jsonl/.json/.parquet/.csv file, a `save_to_disk` directory, "module:function"
    # returning a datasets.Dataset, or a Hugging Face hub dataset name.
    train: str = ""
    train_split: str = "train"  # for hub datasets / DatasetDicts
    eval: str = ""  # empty: no eval set, unless eval_size > 0 (then split off from train)
    eval_split: str = "test"
    eval_size: int = 0  # rows of eval (0 = all of data.eval); without data.eval, rows held out of train
    # > 0: train on a seeded subset of exactly this many rows (after eval_size rows are
    # held out), nested across sizes: the 32-row subset is inside the 64-row one (the
    # data-scale runner, `sft.scale`, relies on it). 0 = all rows.
    max_train_rows: int = 0
    # messages: chat rows (loss on assistant turns only); tokenized: input_ids + completion_mask
    format: str = "messages"
    messages_column: str = "messages"
    max_length: int | None = 2048  # tokens per example (truncated, keep-start); packed row width with packing
    # Token that closes an assistant turn and is trained with it (the model must learn
    # to stop). Empty = tokenizer.eos_token (<|im_end|> for ChatML models).
    end_of_turn: str = ""


@dataclass
class LoraConfigSection:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # ["all-linear"] = every linear layer but the output head (PEFT's shorthand)


@dataclass
class SFTTrainingConfig:
    epochs: float = 1.0
    max_steps: int = 0  # > 0: train exactly this many optimizer steps (overrides epochs)
    per_device_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    lr: float = 2e-5
    warmup_ratio: float = 0.0  # fraction of the total steps, in [0, 1)
    lr_scheduler: str = "linear"  # any transformers SchedulerType: linear, cosine, constant, ...
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    packing: bool = False  # best-fit-decreasing packing into rows of data.max_length tokens
    logging_steps: int = 10
    eval_steps: int = 0  # 0 = evaluate only after training (when there is an eval set)
    save_steps: int = 0  # 0 = no intermediate checkpoints (final/ is always written)
    save_total_limit: int = 2  # checkpoints kept (0 = all)
    seed: int = 0
    report_to: list[str] = field(default_factory=list)  # e.g. [tensorboard] or [wandb]
    mixed_precision: str = "auto"  # auto = bf16 on a GPU that supports it, none on CPU | bf16 | fp16 | no
    # CPU knobs. num_threads > 0: torch intra-op threads (1 is fastest for tiny models and on
    # a shared CPU, where 2 spinning threads wait on each other); 0 = torch's default.
    # dataloader_workers > 0: collate in worker processes, overlapping the VLM collator's
    # image loading with the model's step.
    num_threads: int = 0
    dataloader_workers: int = 0


@dataclass
class SFTRecipe:
    model: SFTModelConfig = field(default_factory=SFTModelConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    lora: LoraConfigSection = field(default_factory=LoraConfigSection)
    training: SFTTrainingConfig = field(default_factory=SFTTrainingConfig)
    output_dir: str = "outputs/sft"
    overwrite_output_dir: bool = False


def recipe_from_dict(data: dict, source: str = "<dict>") -> SFTRecipe:
    recipe = build_dataclass(SFTRecipe, data, source)
    validate_recipe(recipe, source)
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> SFTRecipe:
    """Read, override (dotted `key.path=value` strings) and validate a recipe file."""
    return recipe_from_dict(read_recipe_mapping(path, overrides), str(path))


def recipe_to_dict(recipe: SFTRecipe) -> dict:
    return dataclasses.asdict(recipe)


def validate_recipe(recipe: SFTRecipe, source: str) -> None:
    def fail(msg: str):
        raise ConfigError(f"{source}: {msg}")

    m, d, lo, t = recipe.model, recipe.data, recipe.lora, recipe.training
    if not m.name_or_path:
        fail("model.name_or_path: no model given")
    if m.dtype not in DTYPES:
        fail(f"model.dtype '{m.dtype}' is not one of {list(DTYPES)}")
    if not d.train:
        fail("data.train: no training dataset given")
    if d.format not in DATA_FORMATS:
        fail(f"data.format '{d.format}' is not one of {list(DATA_FORMATS)}")
    if d.max_length is not None and d.max_length < 1:
        fail("data.max_length must be >= 1 (or null for no truncation)")
    if d.eval_size < 0:
        fail("data.eval_size must be >= 0")
    if d.max_train_rows < 0:
        fail("data.max_train_rows must be >= 0 (0 = all rows)")
    if lo.enabled and (lo.r < 1 or lo.alpha < 1 or not lo.target_modules):
        fail("lora: r and alpha must be >= 1 and target_modules non-empty")
    if not 0.0 <= lo.dropout < 1.0:
        fail("lora.dropout must be in [0, 1)")
    if t.max_steps < 0 or (t.max_steps == 0 and t.epochs <= 0):
        fail("nothing to train: set training.max_steps > 0 or training.epochs > 0")
    if t.per_device_batch_size < 1 or t.gradient_accumulation_steps < 1:
        fail("training.per_device_batch_size and training.gradient_accumulation_steps must be >= 1")
    if not 0.0 <= t.warmup_ratio < 1.0:
        fail(f"training.warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
    if t.lr <= 0:
        fail("training.lr must be > 0")
    if t.logging_steps < 1:
        fail("training.logging_steps must be >= 1")
    if t.eval_steps < 0 or t.save_steps < 0 or t.save_total_limit < 0:
        fail("training.eval_steps, save_steps and save_total_limit must be >= 0")
    if t.mixed_precision not in MIXED_PRECISION:
        fail(f"training.mixed_precision '{t.mixed_precision}' is not one of {list(MIXED_PRECISION)}")
    if t.num_threads < 0 or t.dataloader_workers < 0:
        fail("training.num_threads and training.dataloader_workers must be >= 0")
    if t.packing and d.max_length is None:
        fail("training.packing needs data.max_length (the packed row width)")
    if not recipe.output_dir:
        fail("output_dir: empty")
    # local import: keeps `import sft.config` light
    from transformers.trainer_utils import SchedulerType

    schedulers = [s.value for s in SchedulerType]
    if t.lr_scheduler not in schedulers:
        fail(f"training.lr_scheduler '{t.lr_scheduler}' is not one of {schedulers}")

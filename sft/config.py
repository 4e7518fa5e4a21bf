"""SFT recipe YAML -> typed `SFTRecipe`.

SFT and RL recipes share one schema wherever a key means the same thing: the `model`
section (`rl.config.ModelConfig`, LoRA included), the `optim` section
(`rl.config.OptimConfig`) and the top-level run keys, parsed by the same strict parser
(`rl.config`): an unknown or misspelled key is an error naming the file, the full key
path and the closest valid key; float fields accept YAML 1.1 strings such as `1e-5`;
command-line overrides use dotted paths (`optim.lr=1e-4 data.max_length=512`).

    model:    {name_or_path, dtype, attn_implementation, gradient_checkpointing,
               lora, lora_r, lora_alpha, lora_dropout, lora_target_modules}   (as in RL)
    optim:    {lr, weight_decay, adam_betas, adam_eps, max_grad_norm, lr_scheduler,
               warmup_steps, warmup_ratio}                                     (as in RL)
    data:     {train, train_split, eval, eval_split, eval_size, max_train_rows, format,
               messages_column, max_length, end_of_turn}
    training: {epochs, per_device_batch_size, gradient_accumulation_steps, packing,
               mixed_precision, num_threads, dataloader_workers}               (SFT only)
    steps, seed, output_dir, overwrite_output_dir, logging_steps, report_to,
    eval_steps, save_steps, save_total_limit                                   (as in RL)

Keys of the older SFT layout (`training.lr`, `lora.enabled`, `training.max_steps`, ...)
are errors that name the new key (`training.lr was renamed optim.lr`), in the file as in
overrides. Defaults differ from RL where the task does: `optim.lr` 2e-5 with a linear
schedule (RL: 1e-6, constant), `logging_steps` 10, `steps` 0 (= `training.epochs`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

# The strict recipe parser and the shared sections are the RL recipes' own: same keys, same errors.
from rl.config import (
    ConfigError,
    ModelConfig,
    OptimConfig,
    build_dataclass,
    check_model,
    check_optim,
    check_run_keys,
    read_recipe_mapping,
)
from sft.rows import looks_like_local

__all__ = [
    "DATA_FORMATS",
    "RENAMED",
    "ConfigError",
    "ModelConfig",
    "OptimConfig",
    "SFTOptimConfig",
    "SFTDataConfig",
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
    # tokens per example; packed row width with packing. A longer example is truncated (keep-start)
    # and one left with no trained token is dropped, both counted in a warning (`sft.data`).
    max_length: int | None = 2048
    # Token that closes an assistant turn and is trained with it (the model must learn
    # to stop). Empty = tokenizer.eos_token (<|im_end|> for ChatML models).
    end_of_turn: str = ""


@dataclass
class SFTTrainingConfig:
    """The keys only SFT has (RL batches by prompts and tokens, see `rl.config.TrainConfig`)."""

    epochs: float = 1.0  # used when steps is 0
    per_device_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    packing: bool = False  # best-fit-decreasing packing into rows of data.max_length tokens
    mixed_precision: str = "auto"  # auto = bf16 on a GPU that supports it, none on CPU | bf16 | fp16 | no
    # CPU knobs. num_threads > 0: torch intra-op threads (1 is fastest for tiny models and on
    # a shared CPU, where 2 spinning threads wait on each other); 0 = torch's default.
    # dataloader_workers > 0: collate in worker processes, overlapping the VLM collator's
    # image loading with the model's step.
    num_threads: int = 0
    dataloader_workers: int = 0


@dataclass
class SFTOptimConfig(OptimConfig):
    """RL's optim section with SFT's defaults as field defaults: a recipe that writes an `optim:`
    section (say, only `lr`) keeps them, where a default_factory would be bypassed and the
    schedule silently become RL's constant one."""

    lr: float = 2e-5
    lr_scheduler: str = "linear"


@dataclass
class SFTRecipe:
    # model: the RL section, LoRA included (model.lora: true trains an adapter; final/ holds the
    # merged full model, or the adapter alone with model.save_adapter_only). ["all-linear"] as
    # lora_target_modules = every linear layer but the head. model.dtype: float32 keeps fp32
    # master weights on GPU (the forward then runs in bf16 through training.mixed_precision=auto).
    model: ModelConfig = field(default_factory=ModelConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    # optim: the RL section, with SFT's defaults (RL's 1e-6 is far too small for SFT)
    optim: SFTOptimConfig = field(default_factory=SFTOptimConfig)
    training: SFTTrainingConfig = field(default_factory=SFTTrainingConfig)
    steps: int = 0  # > 0: train exactly this many optimizer steps; 0 = training.epochs
    seed: int = 0
    output_dir: str = "outputs/sft"
    overwrite_output_dir: bool = False
    logging_steps: int = 10
    report_to: list[str] = field(default_factory=list)  # e.g. [tensorboard] or [wandb]
    eval_steps: int = 0  # 0 = evaluate only after training (when there is an eval set)
    save_steps: int = 0  # 0 = no intermediate checkpoints (final/ is always written)
    save_total_limit: int = 2  # checkpoints kept (0 = all)


# Keys of the older SFT layout -> where they live now (`lora` and `training` sections).
RENAMED = {
    "lora.enabled": "model.lora",
    "lora.r": "model.lora_r",
    "lora.alpha": "model.lora_alpha",
    "lora.dropout": "model.lora_dropout",
    "lora.target_modules": "model.lora_target_modules",
    "training.lr": "optim.lr",
    "training.max_steps": "steps",
    "training.seed": "seed",
    "training.report_to": "report_to",
    "training.warmup_ratio": "optim.warmup_ratio",
    "training.lr_scheduler": "optim.lr_scheduler",
    "training.weight_decay": "optim.weight_decay",
    "training.max_grad_norm": "optim.max_grad_norm",
    "training.logging_steps": "logging_steps",
    "training.eval_steps": "eval_steps",
    "training.save_steps": "save_steps",
    "training.save_total_limit": "save_total_limit",
}


def _check_renamed(data: dict, source: str) -> None:
    """One line naming the new key for a key of the older layout (before the strict parser,
    which would only say 'unknown key')."""
    lora = data.get("lora")
    if "lora" in data:
        old = next((f"lora.{k}" for k in lora), None) if isinstance(lora, dict) and lora else None
        if old in RENAMED:
            raise ConfigError(f"{source}: {old} was renamed {RENAMED[old]}")
        raise ConfigError(f"{source}: the lora section was merged into model: model.lora, model.lora_r, "
                          "model.lora_alpha, model.lora_dropout, model.lora_target_modules (as in RL recipes)")
    training = data.get("training")
    if isinstance(training, dict):
        for key in training:
            old = f"training.{key}"
            if old in RENAMED:
                raise ConfigError(f"{source}: {old} was renamed {RENAMED[old]}")


def recipe_from_dict(data: dict, source: str = "<dict>", check_files: bool = True) -> SFTRecipe:
    """`check_files=False`: local data files need not exist yet (reading a recipe for its settings)."""
    _check_renamed(data, source)
    recipe = build_dataclass(SFTRecipe, data, source)
    validate_recipe(recipe, source, check_files=check_files)
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> SFTRecipe:
    """Read, override (dotted `key.path=value` strings) and validate a recipe file."""
    return recipe_from_dict(read_recipe_mapping(path, overrides), str(path))


def recipe_to_dict(recipe: SFTRecipe) -> dict:
    return dataclasses.asdict(recipe)


def _check_data_source(key: str, source: str, fail, check_files: bool) -> None:
    """As `sft.data.load_rows` will read it: a "module:function" is resolved (not called), a
    local-looking path must exist; any other name is a hub dataset, checked when it loads."""
    from rl.config import check_source

    path = Path(source).expanduser()
    if ":" in source and not looks_like_local(source) and not path.exists():
        check_source(key, source, fail)
    elif check_files and looks_like_local(source) and not path.exists():
        hint = f" (create it with `python -m sft.data smoke {source}`)" if "smoke" in source else ""
        fail(f"{key}: dataset file not found: {source}{hint}")


def validate_recipe(recipe: SFTRecipe, source: str, check_files: bool = True) -> None:
    def fail(msg: str):
        raise ConfigError(f"{source}: {msg}")

    d, t = recipe.data, recipe.training
    check_model(recipe.model, fail, check_files)
    check_optim(recipe.optim, fail)
    check_run_keys(recipe, fail)
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
    if recipe.steps < 0 or (recipe.steps == 0 and not t.epochs > 0):
        fail("nothing to train: set steps > 0 or training.epochs > 0")
    if t.per_device_batch_size < 1 or t.gradient_accumulation_steps < 1:
        fail("training.per_device_batch_size and training.gradient_accumulation_steps must be >= 1")
    if t.mixed_precision not in MIXED_PRECISION:
        fail(f"training.mixed_precision '{t.mixed_precision}' is not one of {list(MIXED_PRECISION)}")
    if t.num_threads < 0 or t.dataloader_workers < 0:
        fail("training.num_threads and training.dataloader_workers must be >= 0")
    if t.packing and d.max_length is None:
        fail("training.packing needs data.max_length (the packed row width)")
    # datasets last: the file check is the one a settings-only load (check_files=False) skips
    _check_data_source("data.train", d.train, fail, check_files)
    if d.eval:
        _check_data_source("data.eval", d.eval, fail, check_files)

"""Recipe -> TRL `SFTConfig` + `SFTTrainer` -> `<output_dir>/final/`.

Output layout of `<output_dir>/`::

    config.json          the resolved recipe
    metrics.jsonl        one JSON object per log event: step, loss, lr, grad_norm, entropy,
                         mean_token_accuracy, eval_loss, ... (besides TRL's own trackers)
    checkpoint-<step>/   transformers/TRL checkpoints (weights or LoRA adapter, optimizer,
                         scheduler, RNG, trainer_state.json), every save_steps
    latest               the name of the newest checkpoint (as in RL runs)
    agentrl/             TensorBoard events with report_to: [tensorboard] (the directory RL
                         runs write theirs to: accelerate's tracker named agentrl under
                         output_dir); W&B (report_to: [wandb]) logs to the project agentrl,
                         as RL runs do, unless WANDB_PROJECT says otherwise
    final/               the trained model with LoRA merged (or, with model.save_adapter_only,
                         the adapter alone) + tokenizer, safetensors, written
                         as .tmp-final/ and renamed: `AutoModelForCausalLM.from_pretrained`
                         and RL recipes (`model.name_or_path: <output_dir>/final`) load it
                         (VLMs: model + processor; `AutoModelForImageTextToText` and
                         `sft.vlm.load_processor` load them)

Loss masks: the datasets reach TRL already tokenized, with `input_ids` and `labels`
(see `sft.data`), so TRL's pre-tokenized path uses our labels as they are. TRL's own
`assistant_only_loss=True` needs `{% generation %}` markers in the chat template;
TRL 1.16 can patch only the templates it knows, and SmolLM2's ChatML template is not
one of them (`get_training_chat_template` raises), hence `sft.data.tokenize_conversation`.

Vision-language models (checkpoints with a vision tower, see `sft.vlm`): the processor
replaces the tokenizer, the datasets keep `messages` + `images`, and TRL's vision collator
with `assistant_only_loss=True` builds input ids, pixel values and assistant-only labels
per batch (TRL patches the Qwen2-VL template with generation markers); the collator is
wrapped in `sft.vlm.AssistantTurnLabels` so the trained positions match the text path.

Packing (`training.packing: true`): TRL packs examples best-fit-decreasing into rows of
`data.max_length` tokens and switches to padding-free batches: one flattened row per
batch, `position_ids` restarting at 0 at every example and no `attention_mask`. From
those position ids transformers (`masking_utils.find_packed_sequence_indices`) builds a
block-diagonal causal mask for `sdpa` and `eager` attention, and flash-attention
kernels get the same boundaries as `cu_seq_lens`: packed examples never attend to each
other, on CPU (sdpa/eager) as on GPU (tests/test_sft.py::test_packing_keeps_examples_separate
checks sdpa and eager logits against unpacked forwards). On sdpa/eager that mask is a
dense L x L tensor per packed row (memory grows with max_length^2); flash_attention_2
avoids it. A model whose attention does not build its mask through transformers'
masking utilities (custom remote code) would see the whole row: do not pack for those.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import sys
from pathlib import Path

import torch

from rl.checkpoint import publish_dir
from rl.common import CHECKPOINT_PREFIX, find_checkpoint, prepare_output_dir, resolve_dtype
from sft.config import ConfigError, SFTRecipe, recipe_to_dict

__all__ = [
    "build_peft_config",
    "build_sft_config",
    "build_trainer",
    "load_model",
    "load_tokenizer",
    "save_final",
    "train",
]

logger = logging.getLogger("sft.trainer")


def _mixed_precision(mode: str) -> tuple[bool, bool]:
    """(bf16, fp16) for TrainingArguments."""
    if mode == "auto":
        return (torch.cuda.is_available() and torch.cuda.is_bf16_supported(), False)
    return (mode == "bf16", mode == "fp16")


# ----------------------------------------------------------------------------- model, args, callbacks


def load_tokenizer(model_path: str):
    """The tokenizer; for a vision-language model its processor (`rl.multimodal`, the loader RL uses too)."""
    from rl.multimodal import load_tokenizer_and_processor

    tokenizer, processor = load_tokenizer_and_processor(model_path)
    return processor if processor is not None else tokenizer


def load_model(recipe: SFTRecipe, model_path: str, vocab=None):
    """`AutoModelForCausalLM`, or `AutoModelForImageTextToText` for a vision-language model (with
    `model.freeze_vision_tower` / `model.freeze_language_model` applied): `rl.multimodal`'s loader."""
    from rl.multimodal import apply_freezing, load_pretrained_model

    from rl.vocab import prepare_model

    model = load_pretrained_model(model_path, resolve_dtype(recipe.model.dtype), recipe.model.attn_implementation)
    # model.added_tokens (rl/vocab.py): rows for the added tokens, before freezing (a resize replaces modules)
    prepare_model(model, vocab, recipe.model, source=model_path)
    apply_freezing(model, recipe.model.freeze_vision_tower, recipe.model.freeze_language_model)
    return model


def build_peft_config(recipe: SFTRecipe, trainable_token_indices: dict | None = None):
    """`trainable_token_indices`: the added tokens' rows (`rl.vocab.trainable_token_indices`), trained
    under LoRA besides the adapters."""
    m = recipe.model
    if not m.lora:
        return None
    from peft import LoraConfig

    from rl.multimodal import lora_exclude_modules

    modules = list(m.lora_target_modules)
    return LoraConfig(
        r=m.lora_r,
        lora_alpha=m.lora_alpha,
        lora_dropout=m.lora_dropout,
        target_modules="all-linear" if modules == ["all-linear"] else modules,
        exclude_modules=lora_exclude_modules(m),
        trainable_token_indices=trainable_token_indices,
        task_type="CAUSAL_LM",
    )


def build_sft_config(recipe: SFTRecipe, has_eval: bool, vlm: bool = False):
    """`vlm`: rows are messages + images for TRL's vision collator, which masks the labels to
    the assistant turns itself (`assistant_only_loss`, see `sft.vlm`)."""
    from trl import SFTConfig

    r, t, o, d = recipe, recipe.training, recipe.optim, recipe.data
    bf16, fp16 = _mixed_precision(t.mixed_precision)
    return SFTConfig(
        output_dir=r.output_dir,
        num_train_epochs=t.epochs,
        max_steps=r.steps if r.steps > 0 else -1,
        per_device_train_batch_size=t.per_device_batch_size,
        per_device_eval_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=o.lr,
        adam_beta1=o.adam_betas[0],
        adam_beta2=o.adam_betas[1],
        adam_epsilon=o.adam_eps,
        # an int is steps, a float in [0, 1) a ratio of the total steps (validation allows one of them)
        warmup_steps=o.warmup_steps or o.warmup_ratio,
        lr_scheduler_type=o.lr_scheduler,
        weight_decay=o.weight_decay,
        max_grad_norm=o.max_grad_norm,
        logging_steps=r.logging_steps,
        eval_strategy="steps" if has_eval and r.eval_steps else "no",
        eval_steps=r.eval_steps if has_eval and r.eval_steps else None,
        save_strategy="steps" if r.save_steps else "no",
        save_steps=r.save_steps or 500,
        save_total_limit=r.save_total_limit or None,
        seed=r.seed,
        data_seed=r.seed,
        report_to=list(r.report_to) or "none",
        # off a terminal (a log file, CI) tqdm's bars write carriage returns and escape codes; the
        # Trainer then prints each log dict as a line instead (PrinterCallback)
        disable_tqdm=not sys.stderr.isatty(),
        # without a GPU, accelerate forms a gloo (MULTI_CPU) group under `accelerate launch`
        # only when told it is on CPU; otherwise each process would train alone
        use_cpu=not torch.cuda.is_available(),
        dataloader_pin_memory=torch.cuda.is_available(),
        dataloader_num_workers=t.dataloader_workers,
        # text models use every trainable parameter; a VLM's vision tower gets no gradient from a
        # batch without images, so DDP must look for unused parameters (TRL turns it on for None)
        ddp_find_unused_parameters=None if vlm else False,
        bf16=bf16,
        fp16=fp16,
        gradient_checkpointing=recipe.model.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if recipe.model.gradient_checkpointing else None,
        max_length=d.max_length,
        packing=t.packing,
        packing_strategy="bfd",  # keeps examples whole and separate (padding-free + position_ids)
        # text: the rows arrive as input_ids + labels: TRL's pre-tokenized path, labels used as given.
        # VLM: TRL's vision collator renders each batch and keeps the assistant tokens only.
        assistant_only_loss=vlm,
        completion_only_loss=False,
    )


def _run_files_callback(output_dir: Path):
    from transformers import TrainerCallback

    class RunFiles(TrainerCallback):
        """metrics.jsonl (one object per log event) and the `latest` checkpoint pointer."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            record = {"step": state.global_step}
            for key, value in logs.items():
                record["lr" if key == "learning_rate" else key] = value
            with open(output_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                (output_dir / "latest").write_text(f"{CHECKPOINT_PREFIX}{state.global_step}\n")

    return RunFiles()


def _share_tracker_locations(trainer, output_dir: Path) -> None:
    """TensorBoard and W&B where RL runs log: `<output_dir>/agentrl/` (transformers' default is
    `<output_dir>/runs/<date>_<host>/`) and the W&B project `agentrl` (transformers': huggingface),
    so one `tensorboard --logdir` or W&B project shows SFT and RL runs alike. Environment
    variables (TENSORBOARD_LOGGING_DIR, WANDB_PROJECT) still win, as transformers documents."""
    import os

    from transformers.integrations import TensorBoardCallback

    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, TensorBoardCallback) and cb.logging_dir is None:
            cb.logging_dir = str(output_dir / "agentrl")
    if "wandb" in trainer.args.report_to:
        os.environ.setdefault("WANDB_PROJECT", "agentrl")


def build_trainer(recipe: SFTRecipe, extra_callbacks: list | None = None):
    """(trainer, tokenizer, model_path): data is validated and tokenized before the model loads."""
    from transformers import set_seed
    from trl import SFTTrainer

    from rl.models import resolve_model
    from rl.vocab import add_to_tokenizer, expose_head_bias, trainable_token_indices
    from sft.data import build_datasets

    from sft.vlm import AssistantTurnLabels, is_processor, text_tokenizer

    set_seed(recipe.seed)
    if recipe.training.num_threads:
        torch.set_num_threads(recipe.training.num_threads)
    model_path = resolve_model(recipe.model.name_or_path)
    tokenizer = load_tokenizer(model_path)  # a processor for vision-language models
    vocab = add_to_tokenizer(tokenizer, recipe.model)  # model.added_tokens, before the data is tokenized
    vlm = is_processor(tokenizer)
    if vlm and recipe.training.packing:
        raise ConfigError(
            f"training.packing: not supported for vision-language models ({model_path}); TRL 1.16 packs text only"
        )
    train_ds, eval_ds = build_datasets(recipe.data, tokenizer, seed=recipe.seed)
    model = load_model(recipe, model_path, vocab)
    trainer = SFTTrainer(
        model=model,
        args=build_sft_config(recipe, has_eval=eval_ds is not None, vlm=vlm),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=build_peft_config(recipe, trainable_token_indices(model, vocab)),
        callbacks=[_run_files_callback(Path(recipe.output_dir)), *(extra_callbacks or [])],
    )
    _share_tracker_locations(trainer, Path(recipe.output_dir))
    if vocab is not None and recipe.model.lora:  # TRL's fused LM head reads lm_head.bias (rl.vocab.expose_head_bias)
        expose_head_bias(trainer.model)
    if vlm:  # train the reply + end-of-turn token, not the template's glue after it (as the text path)
        tok = text_tokenizer(tokenizer)
        eot = recipe.data.end_of_turn or tok.eos_token
        eot_id = tok.convert_tokens_to_ids(eot)
        if eot_id is None or eot_id == tok.unk_token_id:
            raise ConfigError(f"data.end_of_turn: {eot!r} is not a single token of the tokenizer of {model_path}")
        trainer.data_collator = AssistantTurnLabels(trainer.data_collator, eot_id)
    return trainer, tokenizer, model_path


# ----------------------------------------------------------------------------- final model


def save_final(trainer, recipe: SFTRecipe, tokenizer, model_path: str) -> Path:
    """Write `<output_dir>/final/` (full model, LoRA merged, + tokenizer) atomically.

    Every process calls this (gathering sharded FSDP/ZeRO-3 weights is collective); the
    main process writes `.tmp-final/` and renames it over `final/`. Under LoRA the
    adapter is saved, then merged into a freshly loaded base on the main process."""
    out = Path(recipe.output_dir)
    final, tmp, adapter = out / "final", out / ".tmp-final", out / ".tmp-final-adapter"
    acc = trainer.accelerator
    is_main = acc.is_main_process
    if is_main:
        for leftover in (tmp, adapter):  # from a crash mid-save: never merge into it
            shutil.rmtree(leftover, ignore_errors=True)
    acc.wait_for_everyone()
    if recipe.model.lora and recipe.model.save_adapter_only:
        trainer.save_model(str(tmp))  # the PEFT adapter + tokenizer (processing_class)
        if is_main:  # the base the adapter applies to, as the recipe named it (an absolute local path
            # means nothing on another machine: its last component, as RL's final/ does)
            name = recipe.model.name_or_path
            config_file = tmp / "adapter_config.json"
            adapter_config = json.loads(config_file.read_text(encoding="utf-8"))
            adapter_config["base_model_name_or_path"] = Path(name).name if Path(name).is_absolute() else name
            config_file.write_text(json.dumps(adapter_config, indent=2) + "\n", encoding="utf-8")
    elif recipe.model.lora:
        trainer.save_model(str(adapter))
        if is_main:
            from peft import PeftModel

            from rl.vocab import vocab_of

            base = load_model(recipe, model_path, vocab_of(tokenizer, recipe.model))  # the added rows' shape
            merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
            trained = acc.unwrap_model(trainer.model)
            trained_base = trained.get_base_model() if hasattr(trained, "get_base_model") else trained
            merged.generation_config = copy.deepcopy(trained_base.generation_config)
            merged.config.get_text_config().pad_token_id = getattr(tokenizer, "tokenizer", tokenizer).pad_token_id
            merged.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
            shutil.rmtree(adapter)
    else:
        trainer.save_model(str(tmp))
    if is_main:
        (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; the recipe is in config.json
        publish_dir(tmp, final)
    acc.wait_for_everyone()
    return final


# ----------------------------------------------------------------------------- the run


def train(recipe: SFTRecipe, resume: str | None = None) -> dict:
    """Run SFT; returns global_step, train_loss, eval metrics, final_dir and log_history."""
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())  # see use_cpu in build_sft_config
    out = Path(recipe.output_dir)
    # the run-directory rules of RL runs (rl.common): resume from the newest complete checkpoint;
    # refuse a non-empty output_dir unless resuming or overwrite_output_dir (which deletes only a
    # directory that holds a previous run)
    ckpt = find_checkpoint(resume, out) if resume is not None else None
    if state.is_main_process:
        prepare_output_dir(out, overwrite=recipe.overwrite_output_dir, resume=ckpt is not None)
    state.wait_for_everyone()

    trainer, tokenizer, model_path = build_trainer(recipe)
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(recipe_to_dict(recipe), indent=2))
    result = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    eval_metrics: dict = {}
    if trainer.eval_dataset is not None:
        last = trainer.state.log_history[-2:] if trainer.state.log_history else []
        done = [e for e in last if "eval_loss" in e and e.get("step") == trainer.state.global_step]
        eval_metrics = done[0] if done else trainer.evaluate()
    final = save_final(trainer, recipe, tokenizer, model_path)
    if state.is_main_process:
        logger.info("final model: %s", final)
    return {
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss,
        "eval": eval_metrics,
        "final_dir": str(final),
        "log_history": list(trainer.state.log_history),
    }

"""Supervised fine-tuning of text LLMs on TRL's SFTTrainer.

    python -m sft.data smoke data/sft_smoke.jsonl       # a small chat dataset
    python -m sft.train recipes/sft_smoke.yaml [key.path=value ...] [--resume latest|DIR]
    accelerate launch -m sft.train recipe.yaml          # DDP / FSDP / DeepSpeed

Modules:

* `sft.config`: the `SFTRecipe` dataclasses (model, data, lora, training, output_dir,
  overwrite_output_dir), parsed as strictly as RL recipes (`rl.config`'s parser):
  unknown keys are errors that name the key and suggest the nearest one.
* `sft.data`: loads .jsonl/.json/.parquet files, `save_to_disk` dirs, "module:function"
  or hub datasets; validates every row up front (one error naming the file and the
  rows); tokenizes to `input_ids` + `labels`. `messages` rows: loss on the assistant
  replies and their end-of-turn token only, located by rendering the chat template
  prefix by prefix (`tokenize_conversation`); `tokenized` rows (agent trajectories):
  `labels` = `input_ids` with -100 where `completion_mask` is 0 (prompt and
  environment tokens).
* `sft.trainer`: recipe -> `trl.SFTConfig` + `trl.SFTTrainer` (pre-tokenized datasets,
  optional padding-free packing, LoRA through PEFT); writes config.json,
  metrics.jsonl, checkpoint-<step>/ (+ `latest`) and `final/`: the full model (LoRA
  merged) + tokenizer in safetensors, loadable by `AutoModelForCausalLM` and by RL
  recipes (`model.name_or_path: <output_dir>/final`).
* `sft.train`: the CLI.

Vision-language models are not supported yet: rows with `images` are validated (every
path must exist) and then refused. The hooks are `sft.trainer.load_tokenizer` /
`load_model` (an AutoProcessor and an image-text model) and `sft.data.build_datasets`
(keep the messages and images for TRL's vision collator instead of tokenizing).
"""

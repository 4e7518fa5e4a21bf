"""Supervised fine-tuning of text LLMs and vision-language models on TRL's SFTTrainer.

    python -m sft.data smoke data/sft_smoke.jsonl       # a small chat dataset
    python -m sft.train recipes/sft_smoke.yaml [key.path=value ...] [--resume latest|DIR]
    accelerate launch -m sft.train recipe.yaml          # DDP / FSDP / DeepSpeed
    python -m sft.scale recipe.yaml --sizes 32,64,128 --out DIR   # the same recipe at several data sizes

Modules:

* `sft.config`: the `SFTRecipe` dataclasses (model and optim: the RL recipes' sections;
  data; training: the SFT-only keys; steps, seed, output_dir, report_to, ... as in RL),
  parsed as strictly as RL recipes (`rl.config`'s parser): unknown keys are errors that
  name the key and suggest the nearest one; older SFT names point to the new ones.
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
* `sft.scale`: the data-scale runner: trains the recipe once per size with
  `data.max_train_rows=n` (seeded, nested subsets drawn after the held-out rows) into
  `DIR/n<size>/`, evaluates each final model (`heldout_loss`, or a
  `package.module:function` evaluator `f(model_dir, recipe) -> {metric: value}`) and
  writes one table, `DIR/results.md` + `results.json` (+ `results.png`), atomically.
* `sft.rows`: what `sft.data` and `sft.vlm` share (`RawRows`, `SFTDataError`,
  `format_problems`, `IGNORE_INDEX`); imports point one way: data -> vlm -> rows.
* `sft.vlm`: vision-language models (Qwen2-VL / Qwen2.5-VL style), chosen automatically
  when the checkpoint has a vision tower. Rows are `messages` + `images` (paths;
  content a string or `{type: text|image}` parts, images in user turns); the model
  loads with `AutoModelForImageTextToText`, the processor with `load_processor`, which
  works without torchvision (PIL image processor; an image-only variant of the Qwen2-VL
  processor, because transformers 5.19 otherwise insists on a torchvision video
  processor). Rows are validated up front like text rows (image files readable, image
  parts match the images, no row longer than `data.max_length`), then TRL's
  `DataCollatorForVisionLanguageModeling` renders, loads images and masks labels per
  batch with `assistant_only_loss` (TRL's training variant of the Qwen2-VL template);
  `AssistantTurnLabels` trims the template's newline after `<|im_end|>`, so the trained
  tokens are exactly the replies + end-of-turn token, as on the text path. `final/`
  holds the model + processor (safetensors), reloadable by `load_processor` +
  `AutoModelForImageTextToText`. No packing for VLMs (TRL 1.16 packs text only).
  Example: easy-vqa (`envs.vqa`, `recipes/vqa_sft_cpu.yaml`).

MathSpatial-style structured reasoning traces (validator, renderer, parser, the
`srt_format` / `srt_answer` rewards, SFT rows) live with their paper's environment:
`envs.spatial.srt` (CLI: `python -m envs.spatial.srt check|build|synth`).
"""

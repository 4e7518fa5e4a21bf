"""SFT (sft/) on the tiny random Llama: loss masks, data validation, recipes, and
2-step CPU training runs (seconds each)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from rl.common import read_jsonl
from sft.config import ConfigError, SFTDataConfig, load_recipe, recipe_from_dict
from sft.data import (
    IGNORE_INDEX,
    SFTDataError,
    build_datasets,
    load_rows,
    tokenize_conversation,
    validate_rows,
    write_smoke_dataset,
)
from tiny import with_overrides

REPO = Path(__file__).resolve().parents[1]
EOT = "<|im_end|>"


# ----------------------------------------------------------------------------- helpers


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat(question: str, answer: str, *more: tuple[str, str], system: str | None = "Be brief.") -> dict:
    msgs = [{"role": "system", "content": system}] if system is not None else []
    for q, a in ((question, answer), *more):
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": msgs}


def trained_runs(labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of positions with a label."""
    runs, start = [], None
    for i, lab in enumerate([*labels, IGNORE_INDEX]):
        if lab != IGNORE_INDEX and start is None:
            start = i
        elif lab == IGNORE_INDEX and start is not None:
            runs.append((start, i))
            start = None
    return runs


def tokenized_rows(tok) -> list[dict]:
    """Agent-trajectory rows: prompt (0), policy tokens (1), environment tokens (0), policy (1)."""
    rows = []
    for k in range(4):
        text = tok.apply_chat_template(
            [{"role": "user", "content": f"What is {k} plus 3?"}], tokenize=False, add_generation_prompt=True
        )
        prompt = tok(text, add_special_tokens=False)["input_ids"]
        call = tok(f"<search> {k} plus 3 </search>", add_special_tokens=False)["input_ids"]
        env = tok(f"<information> {k + 3} </information>", add_special_tokens=False)["input_ids"]
        answer = tok(f"<answer> {k + 3} </answer>{EOT}", add_special_tokens=False)["input_ids"]
        ids = list(prompt) + call + env + answer
        mask = [0] * len(prompt) + [1] * len(call) + [0] * len(env) + [1] * len(answer)
        rows.append({"input_ids": ids, "completion_mask": mask})
    return rows


def make_data(tmp_path: Path, fmt: str, tok) -> Path:
    if fmt == "messages":
        rows = [
            chat(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", (f"And minus {b}?", f"It is {a}."))
            for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]
        ]
    else:
        rows = tokenized_rows(tok)
    return write_jsonl(tmp_path / f"{fmt}.jsonl", rows)


def recipe(model_dir: str, out: Path, train: Path, **overrides) -> dict:
    base = {
        "model": {"name_or_path": model_dir},
        "data": {"train": str(train), "format": "messages", "max_length": 256},
        "optim": {"lr": 1e-2},
        "training": {"per_device_batch_size": 2},
        "steps": 2,
        "logging_steps": 1,
        "seed": 0,
        "output_dir": str(out),
    }
    return with_overrides(base, **overrides)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def metrics(out: Path) -> list[dict]:
    return read_jsonl(out / "metrics.jsonl")


# ----------------------------------------------------------------------------- (a) assistant-only labels


_text = st.text(max_size=24)
_reply = st.text(min_size=1, max_size=24).filter(lambda s: s.strip() and EOT not in s)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(system=_text, user1=_text, reply1=_reply, user2=_text, reply2=_reply)
def test_labels_are_exactly_the_assistant_replies(tiny_tokenizer, system, user1, reply1, user2, reply2):
    tok = tiny_tokenizer
    msgs = [
        {"role": "system", "content": system},
        {"role": "user", "content": user1},
        {"role": "assistant", "content": reply1},
        {"role": "user", "content": user2},
        {"role": "assistant", "content": reply2},
    ]
    enc = tokenize_conversation(tok, msgs)
    ids, labels = enc["input_ids"], enc["labels"]
    assert len(ids) == len(labels)
    assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(ids, labels))
    # the sequence is the chat template's rendering of the whole conversation
    assert tok.decode(ids) == tok.apply_chat_template(msgs, tokenize=False)
    runs = trained_runs(labels)
    # the trained positions are the two replies and their end-of-turn token, nothing else
    assert [tok.decode(ids[a:b]) for a, b in runs] == [reply1 + EOT, reply2 + EOT]
    assert [ids[b - 1] for _, b in runs] == [tok.convert_tokens_to_ids(EOT)] * 2
    # ... and each reply starts right where generation starts after the prompt before it
    for (a, _), k in zip(runs, (2, 4)):
        assert tok.decode(ids[:a]) == tok.apply_chat_template(msgs[:k], tokenize=False, add_generation_prompt=True)


def test_labels_with_default_system_prompt_and_tool_turn(tiny_tokenizer):
    tok = tiny_tokenizer
    msgs = [
        {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": "<search> 2 plus 3 </search>"},
        {"role": "tool", "content": "<information> 5 </information>"},
        {"role": "assistant", "content": "<answer> 5 </answer>"},
        {"role": "user", "content": "Thanks"},  # after the last reply: no loss, left out
    ]
    enc = tokenize_conversation(tok, msgs)
    ids, labels = enc["input_ids"], enc["labels"]
    runs = trained_runs(labels)
    assert [tok.decode(ids[a:b]) for a, b in runs] == [
        "<search> 2 plus 3 </search>" + EOT,
        "<answer> 5 </answer>" + EOT,
    ]
    text = tok.decode(ids)
    assert "You are a helpful AI assistant named SmolLM" in text  # the template's default system turn
    assert "Thanks" not in text


def test_trl_cannot_patch_chatml_for_assistant_only_loss(tiny_tokenizer):
    """Why sft.data builds the labels: TRL 1.16's assistant_only_loss needs {% generation %}
    markers and cannot add them to SmolLM2's ChatML template."""
    from trl.chat_template_utils import get_training_chat_template as training_template
    from trl.chat_template_utils import has_generation_markers

    assert not has_generation_markers(tiny_tokenizer.chat_template)
    with pytest.raises(ValueError, match="patching is not supported"):
        training_template(tiny_tokenizer)


# ----------------------------------------------------------------------------- (b) tokenized format


def test_tokenized_labels_follow_completion_mask(tmp_path, tiny_tokenizer):
    rows = tokenized_rows(tiny_tokenizer)
    path = write_jsonl(tmp_path / "traj.jsonl", rows)
    train, evals = build_datasets(SFTDataConfig(train=str(path), format="tokenized"), tiny_tokenizer)
    assert evals is None and train.column_names == ["input_ids", "labels"]
    for row, built in zip(rows, train):
        assert built["input_ids"] == row["input_ids"]
        for t, m, lab in zip(row["input_ids"], row["completion_mask"], built["labels"]):
            assert lab == (t if m else IGNORE_INDEX)
        # the environment tokens inside the response are masked
        assert 0 in row["completion_mask"][row["completion_mask"].index(1) :]


def test_trl_keeps_our_labels(tmp_path, tiny_model_dir, tiny_tokenizer):
    """The trainer's prepared dataset and collated batch carry exactly sft.data's labels."""
    from sft.trainer import build_trainer

    data = make_data(tmp_path, "messages", tiny_tokenizer)
    rec = recipe_from_dict(recipe(tiny_model_dir, tmp_path / "out", data))
    trainer, tok, _ = build_trainer(rec)
    rows = load_rows(str(data)).rows
    expected = [tokenize_conversation(tok, r["messages"]) for r in rows]
    assert trainer.train_dataset["input_ids"] == [e["input_ids"] for e in expected]
    assert trainer.train_dataset["labels"] == [e["labels"] for e in expected]
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    n = len(expected[0]["labels"])
    assert batch["labels"][0, :n].tolist() == expected[0]["labels"]


# ----------------------------------------------------------------------------- rows longer than max_length


def test_long_rows_are_cut_or_dropped_and_counted(tmp_path, tiny_tokenizer, caplog):
    """A row longer than data.max_length is cut (keep-start); one with no trained token left is
    dropped; each kind is counted in one warning naming the first such row (TRL would do both
    silently)."""
    long_prompt = " ".join(["word"] * 300)
    rows = [
        chat("What is 1 plus 2?", "1 plus 2 is 3."),  # row 0: fits
        chat(long_prompt, "dropped"),  # row 1: the prompt alone fills max_length
        chat("Say many words.", long_prompt),  # row 2: the reply is cut
        chat(long_prompt, "dropped too"),  # row 3
    ]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    cfg = SFTDataConfig(train=str(path), max_length=64)
    with caplog.at_level("WARNING", logger="sft.data"):
        train, _ = build_datasets(cfg, tiny_tokenizer)
    assert len(train) == 2 and all(len(ids) <= 64 for ids in train["input_ids"])
    full = [tokenize_conversation(tiny_tokenizer, r["messages"]) for r in rows]
    assert train["input_ids"] == [full[0]["input_ids"], full[2]["input_ids"][:64]]
    assert train["labels"][1] == full[2]["labels"][:64]
    messages = [r.getMessage() for r in caplog.records]
    assert any("long.jsonl: 1 of 4 rows are longer than data.max_length=64 tokens and were cut" in m
               and "the first: row 2 (line 3)" in m for m in messages), messages
    assert any("long.jsonl: 2 of 4 rows were DROPPED: no trained token within data.max_length=64" in m
               and "the first: row 1 (line 2)" in m for m in messages), messages


def test_every_row_too_long_is_one_error(tmp_path, tiny_tokenizer):
    long_prompt = " ".join(["word"] * 300)
    path = write_jsonl(tmp_path / "long.jsonl", [chat(long_prompt, "a"), chat(long_prompt, "b")])
    with pytest.raises(SFTDataError) as err:
        build_datasets(SFTDataConfig(train=str(path), max_length=32), tiny_tokenizer)
    message = str(err.value)
    assert message.startswith(f"{path}: no row left to train on: all 2 rows have no trained token within "
                              "data.max_length=32 tokens (the first: row 0 (line 1), ")
    assert "\n" not in message


def test_tokenized_rows_are_cut_too(tmp_path, tiny_tokenizer):
    rows = tokenized_rows(tiny_tokenizer)
    path = write_jsonl(tmp_path / "tok.jsonl", rows)
    limit = min(len(r["input_ids"]) for r in rows) - 1
    train, _ = build_datasets(SFTDataConfig(train=str(path), format="tokenized", max_length=limit), tiny_tokenizer)
    assert len(train) == len(rows) and all(len(ids) == limit for ids in train["input_ids"])


# ----------------------------------------------------------------------------- (c) (d) (e) training runs


@pytest.mark.parametrize("fmt", ["messages", "tokenized"])
def test_two_step_run_writes_loadable_final(tmp_path, tiny_model_dir, tiny_tokenizer, fmt):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft.trainer import train

    out = tmp_path / "out"
    data = make_data(tmp_path, fmt, tiny_tokenizer)
    # messages: one of the 4 rows is held out and evaluated at every step
    held_out = {"data__eval_size": 1, "eval_steps": 1, "report_to": ["tensorboard"]} if fmt == "messages" else {}
    result = train(recipe_from_dict(recipe(tiny_model_dir, out, data, data__format=fmt, **held_out)))
    assert result["global_step"] == 2
    final = out / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    assert AutoTokenizer.from_pretrained(final).chat_template == tiny_tokenizer.chat_template
    before, after = weights(Path(tiny_model_dir)), weights(final)
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == before["model.layers.0.self_attn.q_proj.weight"].shape
    assert not (out / ".tmp-final").exists() and not (final / "training_args.bin").exists()
    logged = metrics(out)
    assert [m["step"] for m in logged if "loss" in m] == [1, 2]
    assert all("lr" in m for m in logged if "loss" in m)
    if fmt == "messages":
        assert [m["step"] for m in logged if "eval_loss" in m] == [1, 2]
        assert result["eval"]["eval_loss"] > 0
        # TensorBoard events where RL runs write theirs (accelerate's tracker "agentrl" under output_dir)
        assert list((out / "agentrl").glob("events.out.tfevents.*")) and not (out / "runs").exists()
    assert json.loads((out / "config.json").read_text())["data"]["format"] == fmt


def test_lora_run_merges_into_full_model(tmp_path, tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from sft.trainer import train

    out = tmp_path / "out"
    data = make_data(tmp_path, "messages", tiny_tokenizer)
    rec = recipe(tiny_model_dir, out, data, model__lora=True, model__lora_r=4, model__lora_alpha=8,
                 model__lora_target_modules=["q_proj", "v_proj"])
    train(recipe_from_dict(rec))
    final = out / "final"
    assert not (final / "adapter_config.json").exists()
    before, after = weights(Path(tiny_model_dir)), weights(final)
    assert before.keys() == after.keys()  # a plain model: no lora_A / lora_B / base_layer keys
    q = "model.layers.0.self_attn.q_proj.weight"
    k = "model.layers.0.self_attn.k_proj.weight"
    assert not torch.equal(before[q], after[q])  # the adapter is merged in
    assert torch.equal(before[k], after[k])  # untouched outside the target modules
    AutoModelForCausalLM.from_pretrained(final)
    assert not (out / ".tmp-final-adapter").exists()


def test_lora_adapter_only_final(tmp_path, tiny_model_dir, tiny_tokenizer):
    """model.save_adapter_only (the RL key): final/ holds the adapter + tokenizer, loadable on the base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft.trainer import train

    out = tmp_path / "out"
    data = make_data(tmp_path, "messages", tiny_tokenizer)
    rec = recipe(tiny_model_dir, out, data, model__lora=True, model__lora_r=4, model__save_adapter_only=True)
    train(recipe_from_dict(rec))
    final = out / "final"
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == Path(tiny_model_dir).name  # no absolute local path
    assert not (final / "model.safetensors").exists() and not (final / "training_args.bin").exists()
    AutoTokenizer.from_pretrained(final)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(final))
    with pytest.raises(ConfigError, match="model.save_adapter_only: true needs model.lora: true"):
        recipe_from_dict(recipe(tiny_model_dir, out, data, model__save_adapter_only=True))


def test_resume_continues_from_checkpoint(tmp_path, tiny_model_dir, tiny_tokenizer):
    from sft.trainer import train

    out = tmp_path / "out"
    data = make_data(tmp_path, "messages", tiny_tokenizer)
    # constant lr: a linear schedule leaves lr = 0 in the step-2 optimizer state, so step 3 would not move
    common = {"save_steps": 1, "optim__lr_scheduler": "constant"}
    first = train(recipe_from_dict(recipe(tiny_model_dir, out, data, **common)))
    assert first["global_step"] == 2
    assert (out / "latest").read_text().strip() == "checkpoint-2"
    final_before = weights(out / "final")
    resumed = train(recipe_from_dict(recipe(tiny_model_dir, out, data, steps=3, **common)), resume="latest")
    assert resumed["global_step"] == 3
    steps = [m["step"] for m in metrics(out) if "loss" in m]
    assert steps == [1, 2, 3]  # the resumed run logged step 3 only: it started at the checkpoint's step 2
    assert (out / "latest").read_text().strip() == "checkpoint-3"
    assert any(not torch.equal(final_before[k], v) for k, v in weights(out / "final").items())


def test_refuses_non_empty_output_dir(tmp_path, tiny_model_dir, tiny_tokenizer):
    from sft.trainer import train

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    data = make_data(tmp_path, "messages", tiny_tokenizer)
    with pytest.raises(FileExistsError, match="not empty"):
        train(recipe_from_dict(recipe(tiny_model_dir, out, data)))
    with pytest.raises(FileExistsError, match="does not look like a previous run"):
        train(recipe_from_dict(recipe(tiny_model_dir, out, data, overwrite_output_dir=True)))
    assert (out / "notes.txt").read_text() == "mine"
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        train(recipe_from_dict(recipe(tiny_model_dir, out, data)), resume="latest")


# ----------------------------------------------------------------------------- packing


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packing_keeps_examples_separate(tmp_path, tiny_model_dir, tiny_tokenizer, attn):
    """TRL's bfd packing -> padding-free batches (position_ids, no attention_mask); on CPU
    transformers turns the position ids into a block-diagonal mask: packed logits equal
    the logits of each example alone."""
    from sft.trainer import build_trainer

    data = make_data(tmp_path, "messages", tiny_tokenizer)
    rec = recipe(tiny_model_dir, tmp_path / "out", data, model__attn_implementation=attn,
                 training__packing=True, training__per_device_batch_size=1, data__max_length=512)
    trainer, _, _ = build_trainer(recipe_from_dict(rec))
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in batch
    ids, pos = batch["input_ids"], batch["position_ids"]
    starts = (pos[0] == 0).nonzero().flatten().tolist()
    assert len(starts) >= 2  # several examples share the row
    bounds = list(zip(starts, [*starts[1:], ids.shape[1]]))
    model = trainer.model.eval()
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos).logits[0]
        for a, b in bounds:
            alone = model(input_ids=ids[:, a:b]).logits[0]
            torch.testing.assert_close(packed[a:b], alone, atol=1e-5, rtol=1e-5)
        # control: the same row attended as one sequence does differ after the first example
        joined = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
    a, b = bounds[1]
    assert not torch.allclose(joined[a:b], packed[a:b], atol=1e-3)


# ----------------------------------------------------------------------------- (f) malformed rows


GOOD = chat("What is 1 plus 1?", "2.")

BAD_ROWS = [
    ("messages", {"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}, "messages[0]: missing 'role'"),
    ("messages", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
     "messages[1]: empty assistant content"),
    ("messages", {"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ("messages", {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
     "role 'robot' is not one of"),
    ("messages", {**GOOD, "images": ["img/missing.png"]}, "images[0]: image file not found: 'img/missing.png'"),
    ("tokenized", {"input_ids": [5, 6, 7], "completion_mask": [0, 1]},
     "completion_mask has 2 entries but input_ids has 3"),
    ("tokenized", {"input_ids": [5, 6, 7], "completion_mask": [0, 0, 0]}, "no 1"),
    ("tokenized", {"input_ids": [5, 6, 7], "completion_mask": [0, 2, 1]}, "completion_mask[1] = 2"),
]


@pytest.mark.parametrize("fmt,bad,message", BAD_ROWS, ids=[m for _, _, m in BAD_ROWS])
def test_malformed_row_error_names_file_and_row(tmp_path, tiny_tokenizer, fmt, bad, message):
    good = GOOD if fmt == "messages" else {"input_ids": [5, 6, 7], "completion_mask": [0, 1, 1]}
    path = write_jsonl(tmp_path / "data.jsonl", [good, good, bad, good])
    with pytest.raises(SFTDataError) as info:
        build_datasets(SFTDataConfig(train=str(path), format=fmt), tiny_tokenizer)
    text = str(info.value)
    assert text.startswith(f"{path}: row 2 (line 3): ")
    assert message in text


def test_all_bad_rows_in_one_error(tmp_path):
    bad = {"messages": [{"role": "user", "content": "hi"}]}
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, bad, GOOD, bad])
    with pytest.raises(SFTDataError) as info:
        validate_rows(load_rows(str(path)), "messages")
    text = str(info.value)
    assert text.startswith(f"{path}: 2 of 4 rows are invalid")
    assert "row 1 (line 2): no assistant turn" in text and "row 3 (line 4): no assistant turn" in text


def test_images_resolve_against_the_data_file(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"\x89PNG")
    path = write_jsonl(tmp_path / "data.jsonl", [{**GOOD, "images": ["img/a.png"]}])
    validate_rows(load_rows(str(path)), "messages")  # no error


def test_invalid_json_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{oops\n")
    with pytest.raises(SFTDataError, match=r"data.jsonl: row 1 \(line 2\): invalid JSON"):
        load_rows(str(path))


def test_smoke_dataset_is_valid(tmp_path):
    path = write_smoke_dataset(tmp_path / "smoke.jsonl", rows=16)
    validate_rows(load_rows(str(path)), "messages")


# ----------------------------------------------------------------------------- (g) recipes


def test_unknown_recipe_key_is_named(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("data: {train: x.jsonl}\ntraining:\n  epochs: 1\n  packin: true\n")
    with pytest.raises(ConfigError, match=r"unknown key 'training.packin' \(did you mean 'packing'\?\)"):
        load_recipe(path)
    path.write_text("data: {train: x.jsonl}\nmodel: {lora_rank: 4}\n")
    with pytest.raises(ConfigError, match=r"'model.lora_rank' \(did you mean 'lora_r'\?\)"):
        load_recipe(path)


def test_recipe_parsing_and_overrides(tmp_path):
    data = write_smoke_dataset(tmp_path / "smoke.jsonl", rows=4)
    rec = load_recipe(REPO / "recipes" / "sft_smoke.yaml", [f"data.train={data}", "optim.lr=1e-4", "model.lora=true"])
    assert rec.model.name_or_path == "smollm2-135m" and rec.data.train == str(data)
    assert rec.optim.lr == 1e-4 and isinstance(rec.optim.lr, float) and rec.model.lora
    assert (rec.steps, rec.seed, rec.optim.lr_scheduler, rec.optim.warmup_ratio) == (8, 0, "cosine", 0.1)
    path = tmp_path / "r.yaml"
    path.write_text(f"data: {{train: {data}, format: chat}}\n")
    with pytest.raises(ConfigError, match="data.format 'chat' is not one of"):
        load_recipe(path)
    path.write_text(f"data: {{train: {data}}}\noptim: {{lr_scheduler: cosin}}\n")
    with pytest.raises(ConfigError, match="optim.lr_scheduler 'cosin' .*did you mean 'cosine'"):
        load_recipe(path)
    path.write_text("data: {train: data/nope_smoke.jsonl}\n")
    with pytest.raises(ConfigError, match="data.train: dataset file not found: data/nope_smoke.jsonl .*sft.data smoke"):
        load_recipe(path)


def test_sft_warmup_and_adam_settings_reach_trl(tmp_path, tiny_model_dir):
    from sft.trainer import build_sft_config

    data = write_smoke_dataset(tmp_path / "smoke.jsonl", rows=4)
    rec = recipe_from_dict(recipe(tiny_model_dir, tmp_path / "out", data, optim__warmup_steps=3,
                                  optim__adam_betas=[0.8, 0.95], optim__adam_eps=1e-6, optim__weight_decay=0.1))
    args = build_sft_config(rec, has_eval=False)
    assert (args.warmup_steps, args.adam_beta1, args.adam_beta2, args.adam_epsilon) == (3, 0.8, 0.95, 1e-6)
    assert (args.weight_decay, args.max_steps, args.learning_rate, args.seed) == (0.1, 2, 1e-2, 0)
    rec = recipe_from_dict(recipe(tiny_model_dir, tmp_path / "out", data, optim__warmup_ratio=0.25))
    assert build_sft_config(rec, has_eval=False).warmup_steps == 0.25  # TRL: a float < 1 is a ratio
    assert rec.optim.resolved_warmup_steps(10) == 3  # RL's resolution of the same key (rounded up)


def test_cli_reports_recipe_errors(tmp_path, capsys):
    from sft.train import main

    path = tmp_path / "r.yaml"
    path.write_text("data: {train: x.jsonl}\ntrainin: {}\n")
    assert main([str(path)]) == 2
    assert "unknown key 'trainin' (did you mean 'training'?)" in capsys.readouterr().err
    path.write_text("data: {train: x.jsonl}\n")
    assert main([str(path), "training.lr=1e-4"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {path}: training.lr was renamed optim.lr"


def test_an_optim_section_keeps_the_sft_defaults(tmp_path, tiny_model_dir):
    # a recipe giving only optim.lr keeps SFT's linear schedule (not RL's constant one)
    data = write_smoke_dataset(tmp_path / "smoke.jsonl", rows=4)
    rec = recipe_from_dict(recipe(tiny_model_dir, tmp_path / "out", data))
    assert (rec.optim.lr, rec.optim.lr_scheduler) == (1e-2, "linear")
    assert recipe_from_dict({"data": {"train": str(data)}}).optim.lr == 2e-5

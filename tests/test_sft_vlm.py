"""VLM SFT (sft/ + sft/vlm.py) on a tiny random Qwen2-VL built here: processors without
torchvision, assistant-only labels, a 2-step CPU run whose final/ reloads, malformed rows;
plus the easy-vqa conversion (envs/vqa) on a small fake wheel and the evaluator."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from envs.vqa.model import build_model, build_processor, build_tokenizer
from rl.common import read_jsonl
from sft.config import ConfigError, SFTDataConfig, recipe_from_dict
from sft.data import IGNORE_INDEX, SFTDataError, build_datasets, load_rows
from sft.vlm import (
    AssistantTurnLabels,
    is_vision_language_model,
    load_processor,
    torchvision_available,
)
from test_sft import trained_runs  # the text path's helper: [start, end) runs of labelled positions
from tiny import with_overrides

EOT = "<|im_end|>"
IMAGE_SIDE = 56  # 4x4 patches of 14 px -> 2x2 merged -> 4 image tokens per image
IMAGE_TOKENS = 4
TEXTS = [
    "what color is the shape?", "what shape is this?", "is there a red circle?", "and the second image?",
    "red", "blue", "circle", "rectangle", "yes", "no", "The first is red, the second is blue.",
]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory) -> str:
    """A tiny random Qwen2-VL (2 decoder layers, hidden 32; 1 vision block, width 16) with a
    BPE tokenizer trained here and the Qwen2-VL processor/template, saved as a checkpoint."""
    out = tmp_path_factory.mktemp("tiny_qwen2_vl")
    tok = build_tokenizer(TEXTS, vocab_size=320)
    processor = build_processor(tok, image_side=IMAGE_SIDE)
    model = build_model(tok, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                        vision_depth=1, vision_dim=16, vision_heads=2, seed=0)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """img/red_circle.png, img/blue_square.png (64x64) and img/broken.png (not an image)."""
    root = tmp_path_factory.mktemp("vlm_data")
    (root / "img").mkdir()
    for name, color, shape in [("red_circle", "red", "ellipse"), ("blue_square", "blue", "rectangle")]:
        im = Image.new("RGB", (64, 64), "white")
        getattr(ImageDraw.Draw(im), shape)((12, 12, 50, 50), fill=color)
        im.save(root / "img" / f"{name}.png")
    (root / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def vqa_row(question: str, answer: str, image: str = "img/red_circle.png") -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "images": [image]}


# Row shapes the labels must handle: string content + image (placed before the question),
# parts with explicit image placeholders over two turns and two images, and no image at all.
ROWS = [
    vqa_row("what color is the shape?", "red"),
    {
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what shape is this?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "circle"}]},
            {"role": "user", "content": [{"type": "text", "text": "and the second image?"}, {"type": "image"}]},
            {"role": "assistant", "content": "rectangle"},
        ],
        "images": ["img/red_circle.png", "img/blue_square.png"],
    },
    {"messages": [{"role": "user", "content": "is there a red circle?"}, {"role": "assistant", "content": "yes"}]},
    vqa_row("what color is the shape?", "blue", "img/blue_square.png"),
]


def recipe(model_dir: str, out: Path, train: Path, **overrides) -> dict:
    base = {
        "model": {"name_or_path": model_dir},
        "data": {"train": str(train), "format": "messages", "max_length": 128},
        "training": {"per_device_batch_size": 2, "num_threads": 1},
        "optim": {"lr": 1e-2},
        "steps": 2,
        "logging_steps": 1,
        "seed": 0,
        "output_dir": str(out),
    }
    return with_overrides(base, **overrides)


# ----------------------------------------------------------------------------- processor and model


def test_processor_loads_without_torchvision_and_names_the_standard_class(vlm_dir):
    processor = load_processor(vlm_dir)
    assert type(processor).__name__ == "Qwen2VLProcessor"
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"  # PIL, not torchvision
    assert processor.tokenizer.backend == "tokenizers"  # TRL's assistant mask needs the fast tokenizer
    assert json.loads((Path(vlm_dir) / "processor_config.json").read_text())["processor_class"] == "Qwen2VLProcessor"
    assert is_vision_language_model(vlm_dir)
    if not torchvision_available():
        # why sft.vlm builds the image-only class: the stock loader wants a video processor
        from transformers import AutoProcessor

        assert not hasattr(processor, "video_processor")
        with pytest.raises((OSError, ImportError, ValueError)):
            AutoProcessor.from_pretrained(vlm_dir)


# ----------------------------------------------------------------------------- labels


def test_labels_are_exactly_the_assistant_replies(tmp_path, vlm_dir, images):
    """The collated batch trains each assistant reply + <|im_end|> and nothing else: not the
    prompt, not the image tokens, not the template's newline after <|im_end|>, not padding."""
    from sft.trainer import build_trainer

    data = write_jsonl(images / "rows.jsonl", ROWS)
    trainer, processor, _ = build_trainer(recipe_from_dict(recipe(vlm_dir, tmp_path / "out", data)))
    tok = processor.tokenizer
    assert isinstance(trainer.data_collator, AssistantTurnLabels)
    assert trainer.train_dataset.column_names == ["messages", "images"]
    examples = [trainer.train_dataset[i] for i in range(len(ROWS))]
    batch = trainer.data_collator([dict(e) for e in examples])
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert batch["pixel_values"].shape[0] == 4 * 16  # 4 images x 16 patches
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    expected_replies = [["red"], ["circle", "rectangle"], ["yes"], ["blue"]]
    expected_images = [1, 2, 0, 1]
    for r, row in enumerate(ROWS):
        row_ids, row_labels = ids[r].tolist(), labels[r].tolist()
        assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(row_ids, row_labels))
        assert all(lab == IGNORE_INDEX for lab, m in zip(row_labels, mask[r].tolist()) if m == 0)  # padding
        assert row_ids.count(image_id) == IMAGE_TOKENS * expected_images[r]
        assert all(lab != image_id for lab in row_labels)
        runs = trained_runs(row_labels)
        replies = expected_replies[r]
        assert [tok.decode(row_ids[a:b]) for a, b in runs] == [f"{x}{EOT}" for x in replies]
        # the trained ids are what the model generates: the reply tokenized alone, then <|im_end|>
        assert [row_ids[a:b] for a, b in runs] == [tok(f"{x}{EOT}", add_special_tokens=False)["input_ids"]
                                                   for x in replies]
        # ... and each reply starts right where generation starts after its prompt
        msgs = examples[r]["messages"]
        starts = [k for k, m in enumerate(msgs) if m["role"] == "assistant"]
        for (a, _), k in zip(runs, starts):
            prompt = processor.apply_chat_template(msgs[:k], add_generation_prompt=True, tokenize=False)
            prompt = prompt.replace("<|image_pad|>", "<|image_pad|>" * IMAGE_TOKENS)
            assert tok.decode(row_ids[:a]) == prompt
    # images of string-content rows sit before the question, in the first user turn
    assert examples[0]["messages"][0]["content"][0]["type"] == "image"
    # TRL's own collator (wrapped) also trains the "\n" after <|im_end|>: the reason for AssistantTurnLabels
    raw = trainer.data_collator.collator([dict(examples[0])])
    (a, b), = trained_runs(raw["labels"][0].tolist())
    assert tok.decode(raw["input_ids"][0, a:b]) == f"red{EOT}\n"


# ----------------------------------------------------------------------------- training


def test_two_step_cpu_run_writes_a_reloadable_final(tmp_path, vlm_dir, images):
    from transformers import AutoModelForImageTextToText

    from sft.trainer import train

    data = write_jsonl(images / "train.jsonl", ROWS)
    out = tmp_path / "out"
    rec = recipe(vlm_dir, out, data, data__eval_size=1, eval_steps=1)
    result = train(recipe_from_dict(rec))
    assert result["global_step"] == 2 and result["eval"]["eval_loss"] > 0
    final = out / "final"
    for name in ("model.safetensors", "config.json", "processor_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (final / name).is_file(), name
    assert not (final / "training_args.bin").exists() and not (out / ".tmp-final").exists()
    assert is_vision_language_model(str(final))
    before, after = load_file(str(Path(vlm_dir) / "model.safetensors")), load_file(str(final / "model.safetensors"))
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # saved in the Qwen2-VL checkpoint layout: visual.* (vision tower), model.* (decoder)
    assert any(k.startswith("visual.blocks.") for k in changed)  # the vision tower trains too
    assert any(k.startswith("model.layers.") for k in changed)
    logged = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in logged if "loss" in m] == [1, 2]
    assert [m["step"] for m in logged if "eval_loss" in m] == [1, 2]

    processor = load_processor(str(final))
    model = AutoModelForImageTextToText.from_pretrained(final).eval()
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    conv = [{"role": "user", "content": [{"type": "image", "image": str(images / "img" / "red_circle.png")},
                                         {"type": "text", "text": "what color is the shape?"}]}]
    inputs = processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert gen.shape[1] > inputs["input_ids"].shape[1]


def test_packing_is_refused_for_vlms(tmp_path, vlm_dir, images):
    from sft.trainer import build_trainer

    data = write_jsonl(images / "pack.jsonl", ROWS)
    rec = recipe(vlm_dir, tmp_path / "out", data, training__packing=True)
    with pytest.raises(ConfigError, match="training.packing: not supported for vision-language models"):
        build_trainer(recipe_from_dict(rec))


# ----------------------------------------------------------------------------- malformed rows


GOOD = vqa_row("what color is the shape?", "red")

BAD_ROWS = [
    ({"messages": [{"content": "what shape is this?"}, {"role": "assistant", "content": "circle"}],
      "images": ["img/red_circle.png"]}, "messages[0]: missing 'role'"),
    (vqa_row("what color is the shape?", "red", "img/missing.png"), "images[0]: image file not found: 'img/missing.png'"),
    (vqa_row("what color is the shape?", "  "), "messages[1]: empty assistant content"),
    (vqa_row("what color is the shape?", "red", "img/broken.png"), "images[0]: cannot read image 'img/broken.png'"),
    ({"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "q"}]},
                   {"role": "assistant", "content": "red"}], "images": ["img/red_circle.png"]},
     "2 image part(s) in the messages but 1 image(s) in 'images'"),
    ({"messages": [{"role": "user", "content": "q"},
                   {"role": "assistant", "content": [{"type": "image"}, {"type": "text", "text": "red"}]}],
      "images": ["img/red_circle.png"]}, "messages[1].content[0]: image part in a assistant turn"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "image": "img/red_circle.png"}]},
                   {"role": "assistant", "content": "red"}]}, "inline image 'image'"),
    (vqa_row("what color is the shape? " * 40, "red"), "exceed data.max_length=64"),
]


@pytest.mark.parametrize("bad,message", BAD_ROWS, ids=[m for _, m in BAD_ROWS])
def test_malformed_row_is_one_error_naming_file_and_row(vlm_dir, images, bad, message):
    processor = load_processor(vlm_dir)
    path = write_jsonl(images / "bad.jsonl", [GOOD, GOOD, bad, GOOD])
    with pytest.raises(SFTDataError) as info:
        build_datasets(SFTDataConfig(train=str(path), max_length=64), processor)
    text = str(info.value)
    assert text.startswith(f"{path}: row 2 (line 3): "), text
    assert message in text
    assert "\n" not in text  # one line


def test_all_bad_vlm_rows_in_one_error(vlm_dir, images):
    processor = load_processor(vlm_dir)
    broken = vqa_row("what color is the shape?", "red", "img/broken.png")
    path = write_jsonl(images / "bad2.jsonl", [GOOD, broken, GOOD, broken])
    with pytest.raises(SFTDataError) as info:
        build_datasets(SFTDataConfig(train=str(path)), processor)
    text = str(info.value)
    assert text.startswith(f"{path}: 2 of 4 rows are invalid")
    assert "row 1 (line 2): images[0]: cannot read" in text and "row 3 (line 4): images[0]: cannot read" in text


def test_text_model_refuses_image_rows(tmp_path, tiny_tokenizer, images):
    path = write_jsonl(images / "text.jsonl", [GOOD])
    with pytest.raises(SFTDataError, match="rows carry images, but the model is a text model"):
        build_datasets(SFTDataConfig(train=str(path)), tiny_tokenizer)


def test_image_paths_become_absolute(vlm_dir, images):
    processor = load_processor(vlm_dir)
    path = write_jsonl(images / "abs.jsonl", ROWS)
    train, _ = build_datasets(SFTDataConfig(train=str(path)), processor)
    assert train[1]["images"] == [str(images / "img" / "red_circle.png"), str(images / "img" / "blue_square.png")]
    assert train[2]["images"] == []
    assert len(load_rows(str(path)).rows) == len(train)  # nothing dropped


# ----------------------------------------------------------------------------- easy-vqa


def fake_easy_vqa_wheel(path: Path) -> Path:
    """A wheel laid out like easy-vqa 1.0: easy_vqa/data/{train,test}/{questions.json,images/N.png}."""
    buf = {}
    colors = {0: "red", 1: "blue", 2: "green"}
    for split, ids in (("train", [0, 1, 2]), ("test", [0, 1])):
        qs = []
        for i in ids:
            im = Image.new("RGB", (64, 64), "white")
            ImageDraw.Draw(im).ellipse((10, 10, 40, 40), fill=colors[i])
            png = path.parent / f"{split}{i}.png"
            im.save(png)
            buf[f"easy_vqa/data/{split}/images/{i}.png"] = png.read_bytes()
            qs += [["what color is the shape?", colors[i], i], ["what shape is in the image?", "circle", i],
                   ["is there a red shape?", "yes" if colors[i] == "red" else "no", i]]
        buf[f"easy_vqa/data/{split}/questions.json"] = json.dumps(qs).encode()
    buf["easy_vqa/data/answers.txt"] = b"circle\nred\nblue\ngreen\nyes\nno\n"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in buf.items():
            zf.writestr(name, data)
    return path


def test_easy_vqa_conversion_gives_valid_seeded_rows(tmp_path, monkeypatch, vlm_dir):
    from envs.vqa.data import convert, extract_wheel, vqa_cache_dir

    monkeypatch.setenv("AGENTRL_CACHE", str(tmp_path / "cache"))
    assert vqa_cache_dir() == tmp_path / "cache" / "datasets" / "easy_vqa" / "1.0"
    data_dir = extract_wheel(fake_easy_vqa_wheel(tmp_path / "easy_vqa-1.0-py3-none-any.whl"), vqa_cache_dir())
    paths = convert(data_dir, tmp_path / "out", train_size=5, test_size=0, seed=3)
    train, test = read_jsonl(paths["train"]), read_jsonl(paths["test"])
    assert len(train) == 5 and len(test) == 6  # a subset of the 9 train questions; all 6 test ones
    row = train[0]
    assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
    assert Path(row["images"][0]).is_absolute() and Path(row["images"][0]).is_file()
    assert "/test/" in test[0]["images"][0] and all("/train/" in r["images"][0] for r in train)
    assert {r["question_type"] for r in train + test} <= {"color", "shape", "yes/no"}
    again = convert(data_dir, tmp_path / "out2", train_size=5, test_size=0, seed=3)
    assert again["train"].read_text() == paths["train"].read_text()  # seeded
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["splits"]["train"] == {"rows": 5, "of": 9, "images": len({r["image_id"] for r in train}),
                                       "question_types": meta["splits"]["train"]["question_types"]}
    # the rows are valid VLM SFT data as they are
    train_ds, _ = build_datasets(SFTDataConfig(train=str(paths["train"])), load_processor(vlm_dir))
    assert len(train_ds) == 5
    with pytest.raises(ValueError, match="--train-size 10: the train split has 9 questions"):
        convert(data_dir, tmp_path / "out3", train_size=10)
    # balanced: equal question types in train (3 of each exist), test untouched
    bal = convert(data_dir, tmp_path / "bal", train_size=5, test_size=0, seed=3, balance_train=True)
    types = [r["question_type"] for r in read_jsonl(bal["train"])]
    assert sorted(types) == ["color", "color", "shape", "shape", "yes/no"]
    assert bal["test"].read_text() == paths["test"].read_text()
    from envs.vqa.data import _balanced

    qs = [{"question_type": t} for t in ["color"] * 2 + ["shape"] * 5 + ["yes/no"] * 5]
    with pytest.raises(ValueError, match=r"needs 3 questions of each type; the train split has fewer of: color \(2\)"):
        _balanced(qs, list(range(len(qs))), 9, __import__("random").Random(0))


def test_majority_baselines():
    from envs.vqa.eval import majority_baselines

    def r(q, a, t):
        return {"question": q, "answer": a, "question_type": t}

    train = [r("is there a red shape?", "no", "yes/no")] * 3 + [r("is there a circle?", "yes", "yes/no")] * 2 + \
        [r("what color?", "red", "color")] * 2 + [r("what color?", "blue", "color")]
    evals = [r("is there a red shape?", "no", "yes/no"), r("is there a circle?", "yes", "yes/no"),
             r("what color?", "blue", "color"), r("what shape?", "circle", "shape")]
    b = majority_baselines(train, evals)
    assert b["majority"] == {"answer": "no", "accuracy": 0.25}
    assert b["majority_per_type"]["answers"] == {"color": "red", "yes/no": "no"}
    assert b["majority_per_type"]["accuracy"] == 0.25  # "no", "no", "red", fallback "no"
    assert b["majority_per_question"]["accuracy"] == 0.5  # "no", "yes", "red", fallback "no"


def test_vqa_accuracy_scores_greedy_answers(tmp_path, vlm_dir, images):
    from envs.vqa.eval import vqa_accuracy

    rows = [vqa_row("what color is the shape?", "red", str(images / "img" / "red_circle.png"))] * 3
    write_jsonl(tmp_path / "train.jsonl", rows + [vqa_row("what color is the shape?", "blue")])
    test = write_jsonl(tmp_path / "test.jsonl", rows)
    result = vqa_accuracy(vlm_dir, str(test), limit=2, batch_size=2, max_new_tokens=2)
    assert result["n"] == 2 and 0.0 <= result["accuracy"] <= 1.0
    assert result["majority"] == {"answer": "red", "accuracy": 1.0}
    assert set(result["per_type"]) == {"all"}
    assert len(result["examples"]) == 2 and all(e["answer"] == "red" for e in result["examples"])


def test_lora_run_merges_into_a_full_vlm(tmp_path, vlm_dir, images):
    from sft.trainer import train

    data = write_jsonl(images / "lora.jsonl", ROWS)
    out = tmp_path / "out"
    lora = {"lora": True, "lora_r": 4, "lora_alpha": 8, "lora_target_modules": ["q_proj", "v_proj"]}
    train(recipe_from_dict(recipe(vlm_dir, out, data, **{f"model__{k}": v for k, v in lora.items()})))
    before, after = load_file(str(Path(vlm_dir) / "model.safetensors")), load_file(str(out / "final" / "model.safetensors"))
    assert before.keys() == after.keys()  # a plain Qwen2-VL checkpoint: no lora_A / lora_B keys
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"model.layers.{i}.self_attn.{m}_proj.weight" for i in (0, 1) for m in ("q", "v")}
    assert load_processor(str(out / "final")).chat_template == load_processor(vlm_dir).chat_template

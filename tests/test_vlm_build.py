"""The SmolLM2 VLM build (envs/vqa/build_vlm.py) on a tiny Llama, the caption and digit-scene writers
(envs/vqa/captions.py, envs/vqa/digits.py) on small fake sources, and a 2-step caption pre-training run
of a tiny LLaVA through sft.train (language model frozen)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from rl.common import read_jsonl

# ----------------------------------------------------------------------------- fake sources


def fake_easy_vqa(root: Path) -> Path:
    """An easy-vqa data dir: train images 0-3, test images 0-1, with questions that pin down (or not)
    each image's shape and colour through every kind of question the real set has."""
    spec = {
        "train": [
            # (colour drawn, shape drawn, questions)
            ("red", "ellipse", [("what color is the shape?", "red"), ("what shape is in the image?", "circle")]),
            # colour from a negated yes/no question ruling nothing out, shape by elimination ("no" / "not")
            ("blue", "rectangle", [("what color is the shape?", "blue"), ("is no circle present?", "yes"),
                                   ("is there not a triangle?", "yes")]),
            ("green", "polygon", [("is there a green shape?", "yes"), ("does the image contain a triangle?", "yes")]),
            # nothing about the shape; colour only
            ("teal", "rectangle", [("what color is the shape?", "teal"), ("is there a red shape?", "no")]),
        ],
        "test": [
            ("gray", "ellipse", [("what shape is it?", "circle"), ("is there a gray shape?", "yes")]),
            ("black", "rectangle", [("is there a yellow shape?", "no")]),  # neither: no caption row
        ],
    }
    for split, images in spec.items():
        (root / split / "images").mkdir(parents=True)
        questions = []
        for i, (color, shape, qs) in enumerate(images):
            im = Image.new("RGB", (64, 64), "white")
            draw = ImageDraw.Draw(im)
            if shape == "polygon":
                draw.polygon([(32, 8), (56, 56), (8, 56)], fill=color)
            else:
                getattr(draw, shape)((12, 12, 52, 52), fill=color)
            im.save(root / split / "images" / f"{i}.png")
            questions += [[q, a, i] for q, a in qs]
        (root / split / "questions.json").write_text(json.dumps(questions))
    return root


def fake_digits(path: Path, n: int = 30) -> Path:
    """A digits.csv.gz in scikit-learn's layout: 64 ink values 0-16 and a label per line; digit k has
    ink (k % 17) everywhere and label k % 10, so a scene's pixels tell which source digits it shows."""
    lines = [",".join([str(k % 17)] * 64 + [str(k % 10)]) for k in range(n)]
    with gzip.open(path, "wt") as f:
        f.write("\n".join(lines) + "\n")
    return path


def image_parts(row: dict) -> int:
    return sum(1 for m in row["messages"] if isinstance(m["content"], list)
               for p in m["content"] if p["type"] == "image")


# ----------------------------------------------------------------------------- captions


def test_image_attributes_follow_from_the_questions(tmp_path):
    from envs.vqa.captions import easy_vqa_caption, image_attributes
    from envs.vqa.data import read_questions

    data = fake_easy_vqa(tmp_path / "easy")
    attrs = image_attributes(read_questions(data, "train"))
    assert attrs == {0: {"shape": "circle", "color": "red"}, 1: {"shape": "rectangle", "color": "blue"},
                     2: {"shape": "triangle", "color": "green"}, 3: {"shape": None, "color": "teal"}}
    assert [easy_vqa_caption(a) for a in attrs.values()] == ["a red circle", "a blue rectangle", "a green triangle",
                                                             "a teal shape"]
    assert easy_vqa_caption({"shape": "circle", "color": None}) == "a circle"
    assert easy_vqa_caption({"shape": None, "color": None}) is None


@pytest.mark.parametrize("questions, message", [
    ([("what color is the shape?", "red"), ("is there not a red shape?", "yes")], "image 0: .* contradict on color"),
    ([("what shape is it?", "circle"), ("what shape is this?", "triangle")], "image 0: .* contradict on shape"),
    ([("is there a circle?", "no"), ("is there a triangle?", "no"), ("is there a rectangle?", "no")],
     "image 0: .* rule out every shape"),
])
def test_contradicting_questions_are_one_error_naming_the_image(questions, message):
    from envs.vqa.captions import image_attributes
    from envs.vqa.data import question_type

    rows = [{"question": q, "answer": a, "image_id": 0, "question_type": question_type(a)} for q, a in questions]
    with pytest.raises(ValueError, match=message):
        image_attributes(rows, "questions.json")


def test_caption_rows_have_one_image_per_placeholder_and_hold_out_test_images(tmp_path):
    from envs.vqa.captions import write_captions
    from envs.vqa.digits import make_scenes

    data = fake_easy_vqa(tmp_path / "easy")
    scenes = tmp_path / "scenes"
    make_scenes(fake_digits(tmp_path / "digits.csv.gz"), scenes, train_scenes=3, test_scenes=2, side=32)
    paths = write_captions(data, tmp_path / "captions", digit_scenes=scenes, seed=1)
    train, test = read_jsonl(paths["train"]), read_jsonl(paths["test"])
    assert len(train) == 4 + 3 and len(test) == 1 + 2  # test image 1 says nothing: no row
    for row in train + test:
        assert image_parts(row) == len(row["images"]) == 1
        assert Path(row["images"][0]).is_absolute() and Path(row["images"][0]).is_file()
        assert row["question_type"] == "caption" and row["messages"][1]["role"] == "assistant"
    easy = [r for r in train if r["source"] == "easy_vqa"]
    assert all("/train/" in r["images"][0] for r in easy)
    assert sorted(r["messages"][1]["content"] for r in easy) == ["a blue rectangle", "a green triangle",
                                                                 "a red circle", "a teal shape"]
    assert [r["messages"][1]["content"] for r in test if r["source"] == "easy_vqa"] == ["a gray circle"]
    meta = json.loads((tmp_path / "captions" / "meta.json").read_text())
    assert meta["splits"]["test"]["sources"]["easy_vqa"]["images"] == {"both": 1, "neither (no row)": 1}
    again = write_captions(data, tmp_path / "captions2", digit_scenes=scenes, seed=1)
    assert again["train"].read_text() == paths["train"].read_text()  # seeded
    with pytest.raises(FileNotFoundError, match="digit-scenes"):
        write_captions(data, tmp_path / "c3", digit_scenes=tmp_path / "nowhere")


# ----------------------------------------------------------------------------- digit scenes


def test_digit_scenes_split_by_source_digit_and_answer_from_the_pixels(tmp_path):
    from envs.vqa.digits import CELL_NAMES, make_scenes, read_digits

    images, labels = read_digits(fake_digits(tmp_path / "digits.csv.gz"))
    paths = make_scenes(tmp_path / "digits.csv.gz", tmp_path / "scenes", train_scenes=6, test_scenes=4, side=32,
                        test_fraction=0.3, seed=2)
    questions = {s: read_jsonl(paths[s]) for s in ("train", "test")}
    captions = {s: read_jsonl(paths[f"captions_{s}"]) for s in ("train", "test")}
    sources = {s: {i for r in captions[s] for i in r["source_ids"]} for s in captions}
    assert sources["train"] and sources["test"] and not sources["train"] & sources["test"]
    for split, n in (("train", 6), ("test", 4)):
        assert len(captions[split]) == n and len(questions[split]) == 4 * n
        for row in questions[split] + captions[split]:
            assert image_parts(row) == len(row["images"]) == 1
        for row in captions[split]:
            assert row["messages"][1]["content"] == "digits " + " ".join(str(labels[i]) for i in row["source_ids"])
            # the scene shows the source digits: cell k's pixels carry digit k's ink (dark on white)
            im = Image.open(row["images"][0])
            assert im.size == (32, 32) and im.mode == "RGB"
            for k, i in enumerate(row["source_ids"]):
                x, y = 16 * (k % 2) + 8, 16 * (k // 2) + 8
                assert im.getpixel((x, y))[0] == 255 - round(images[i][0] * 255 / 16)
        for row in questions[split]:
            name = row["messages"][0]["content"][1]["text"].removeprefix("what digit is ").removesuffix("?")
            assert row["messages"][1]["content"] == str(row["digits"][CELL_NAMES[2].index(name)])
    meta = json.loads((tmp_path / "scenes" / "meta.json").read_text())
    assert meta["splits"]["test"]["source_digits"] == 9 and meta["splits"]["train"]["source_digits"] == 21
    # rebuilt with other settings: the folder is replaced whole (no stale scenes from the first build)
    make_scenes(tmp_path / "digits.csv.gz", tmp_path / "scenes", train_scenes=2, test_scenes=1, side=32)
    assert len(list((tmp_path / "scenes" / "images" / "train").iterdir())) == 2


def test_bad_digits_file_is_an_error_naming_file_and_line(tmp_path):
    from envs.vqa.digits import make_scenes, read_digits

    bad = tmp_path / "digits.csv.gz"
    with gzip.open(bad, "wt") as f:
        f.write(",".join(["0"] * 65) + "\n" + ",".join(["3"] * 63 + ["17", "1"]) + "\n")
    with pytest.raises(ValueError, match=r"digits.csv.gz:2: expected 64 ink values in 0..16"):
        read_digits(bad)
    with pytest.raises(ValueError, match="--grid 4"):
        make_scenes(fake_digits(tmp_path / "ok.csv.gz"), tmp_path / "s", grid=4)


# ----------------------------------------------------------------------------- the build


TINY_VISION = {"image_side": 32, "patch_size": 16, "vision_hidden": 32, "vision_layers": 1, "vision_heads": 2}


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory) -> Path:
    """build_smollm2_vlm on a tiny Llama checkpoint (tests/tiny.py) instead of SmolLM2."""
    from envs.vqa.build_vlm import build_smollm2_vlm
    from tiny import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("vlm_build")
    llama = save_tiny_checkpoint(root / "llama", seed=0, num_attention_heads=2, num_key_value_heads=1)
    out, counts = build_smollm2_vlm(root / "vlm", text_model=llama, seed=0, **TINY_VISION)
    assert counts["total"] == counts["vision_tower"] + counts["projector"] + counts["language_model"]
    return out


def test_build_reloads_with_auto_classes_and_generates(tiny_vlm, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

    from envs.vqa.build_vlm import build_smollm2_vlm

    files = {p.name for p in tiny_vlm.iterdir()}
    assert {"model.safetensors", "config.json", "processor_config.json", "tokenizer.json"} <= files
    assert not any(f.endswith((".bin", ".pt")) for f in files)
    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm).eval()
    processor = AutoProcessor.from_pretrained(tiny_vlm)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(processor).__name__ == "LlavaProcessor"
    # the language model is the given Llama's weights, unchanged (only the vocabulary grew by <image>)
    llama = AutoModelForCausalLM.from_pretrained(tiny_vlm.parent / "llama")
    text = model.model.language_model
    assert torch.equal(text.layers[1].mlp.down_proj.weight, llama.model.layers[1].mlp.down_proj.weight)
    n = llama.model.embed_tokens.weight.shape[0]
    assert torch.equal(text.embed_tokens.weight[:n], llama.model.embed_tokens.weight)

    im = Image.new("RGB", (48, 40), "white")  # any size: resized to 32 x 32 -> 4 image tokens
    ImageDraw.Draw(im).ellipse((8, 8, 30, 30), fill="red")
    conv = [{"role": "user", "content": [{"type": "image", "image": im}, {"type": "text", "text": "what is it?"}]}]
    inputs = processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    image_id = model.config.image_token_index
    assert int((inputs["input_ids"] == image_id).sum()) == (32 // 16) ** 2
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 32, 32)
    with torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert gen.shape[1] > inputs["input_ids"].shape[1]
    with pytest.raises(FileExistsError, match="--force"):
        build_smollm2_vlm(tiny_vlm, text_model=str(tiny_vlm.parent / "llama"), **TINY_VISION)


# ----------------------------------------------------------------------------- a run through sft.train


def test_caption_pretraining_trains_the_image_path_only(tiny_vlm, tmp_path):
    """Stage 1 through `build_vlm.pretrain` (= sft.train on the recipe): 2 steps with the language model and
    the (stage-0 pre-trained) tower frozen; final/ (copied to the cache path) reloads, only the projector changed."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from envs.vqa.build_vlm import PRETRAIN_RECIPE, pretrain
    from envs.vqa.captions import write_captions

    data = write_captions(fake_easy_vqa(tmp_path / "easy"), tmp_path / "captions")
    out, result = pretrain(tiny_vlm, tmp_path / "cache" / "vlm", recipe=PRETRAIN_RECIPE, overrides=[
        f"data.train={data['train']}", f"data.eval={data['test']}", "data.eval_size=1", "steps=2",
        "training.per_device_batch_size=2", "training.num_threads=1", "training.dataloader_workers=0",
        "logging_steps=1", "data.max_length=256", f"output_dir={tmp_path / 'run'}", "optim.lr=1e-2", "optim.warmup_ratio=0",
    ])
    assert result["global_step"] == 2 and result["eval"]["eval_loss"] > 0
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    before, after = load_file(str(tiny_vlm / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # saved in LLaVA's checkpoint layout: vision_tower.*, multi_modal_projector.*, language_model.*
    assert any(k.startswith("multi_modal_projector.") for k in changed)
    assert any(k.startswith("language_model.") for k in before) and any(k.startswith("vision_tower.") for k in before)
    assert all(k.startswith("multi_modal_projector.") for k in changed)
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    AutoProcessor.from_pretrained(out)
    with pytest.raises(FileExistsError, match="--force"):
        pretrain(tiny_vlm, out, overrides=[f"data.train={data['train']}"])


def test_vqa_eval_scores_a_llava_checkpoint(tiny_vlm, tmp_path):
    """envs.vqa.eval (written for Qwen2-VL) on the LLaVA build: prompts with images batch, generate, score."""
    from envs.vqa.eval import vqa_accuracy

    data = fake_easy_vqa(tmp_path / "easy")
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
             "images": [str(data / "train" / "images" / f"{i}.png")], "question_type": t}
            for q, a, i, t in [("what color is the shape?", "red", 0, "color"), ("what shape is it?", "circle", 0, "shape"),
                               ("what color is the shape?", "blue", 1, "color")]]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    result = vqa_accuracy(str(tiny_vlm), str(tmp_path / "test.jsonl"), batch_size=2, max_new_tokens=2)
    assert result["n"] == 2 and set(result["per_type"]) == {"color", "shape"}
    assert result["majority_per_type"]["accuracy"] == 1.0  # "red" for colour, "circle" for shape
    assert len(result["examples"]) == 2 and all(isinstance(e["prediction"], str) for e in result["examples"])


def test_image_feature_stats_see_a_collapsed_projector(tiny_vlm, tmp_path):
    """The collapse check of docs/vlm.md: a projector that outputs a constant has cosine 1 between images."""
    from transformers import AutoModelForImageTextToText

    from envs.vqa.build_vlm import image_feature_stats

    data = fake_easy_vqa(tmp_path / "easy")
    images = [str(data / "train" / "images" / f"{i}.png") for i in range(4)]
    fresh = image_feature_stats(tiny_vlm, images)
    assert fresh["mean_cosine_between_images"] < 0.999 and fresh["image_feature_norm"] > 0
    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm)
    with torch.no_grad():  # the last layer ignores its input: every image maps to its (large) bias
        model.model.multi_modal_projector.linear_2.weight.zero_()
        model.model.multi_modal_projector.linear_2.bias.fill_(5.0)
    model.save_pretrained(tmp_path / "collapsed")
    from transformers import AutoProcessor

    AutoProcessor.from_pretrained(tiny_vlm).save_pretrained(tmp_path / "collapsed")
    collapsed = image_feature_stats(tmp_path / "collapsed", images)
    assert collapsed["mean_cosine_between_images"] == pytest.approx(1.0, abs=1e-5)
    assert collapsed["image_feature_norm"] == pytest.approx(5.0 * model.config.text_config.hidden_size ** 0.5, rel=1e-4)
    with pytest.raises(ValueError, match="at least 2 images"):
        image_feature_stats(tiny_vlm, images[:1])


def test_cli_writes_scenes_and_captions_from_the_cache(tmp_path, capsys):
    """`python -m envs.vqa digit-scenes` / `captions` with the sources already in the cache (no download)."""
    from envs.vqa.__main__ import main
    from envs.vqa.data import vqa_cache_dir
    from envs.vqa.digits import digits_cache_path

    cache = tmp_path / "cache"
    digits = digits_cache_path(cache)
    digits.parent.mkdir(parents=True)
    fake_digits(digits)
    fake_easy_vqa(vqa_cache_dir(cache))
    scenes = tmp_path / "scenes"
    assert main(["digit-scenes", "--out", str(scenes), "--train-scenes", "3", "--test-scenes", "2", "--side", "32",
                 "--cache-dir", str(cache)]) == 0
    assert main(["captions", "--out", str(tmp_path / "captions"), "--digit-scenes", str(scenes),
                 "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "12 questions" in out and "7 rows" in out
    assert len(read_jsonl(tmp_path / "captions" / "train.jsonl")) == 7
    assert main(["digit-scenes", "--grid", "4", "--out", str(scenes), "--cache-dir", str(cache)]) == 1
    assert "--grid 4" in capsys.readouterr().err

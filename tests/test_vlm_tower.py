"""Stage 0 of the SmolLM2 VLM (envs/vqa/tower_pretrain.py) on a tiny LLaVA built from a tiny Llama: the tower
learns from image labels alone, the projector's output is rescaled to the token embeddings' norm, nothing else
changes, and `python -m envs.vqa build-vlm` runs build -> stage 0 -> stage 1 (tower frozen)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_vlm_build import TINY_VISION, fake_digits, fake_easy_vqa


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A fake easy-vqa dir and 32-px digit scenes (2 x 2 cells of 16 px = one 16-px patch each)."""
    from envs.vqa.digits import make_scenes

    root = tmp_path_factory.mktemp("tower_sources")
    easy = fake_easy_vqa(root / "easy")
    scenes = root / "scenes"
    make_scenes(fake_digits(root / "digits.csv.gz"), scenes, train_scenes=6, test_scenes=2, side=32)
    return easy, scenes


@pytest.fixture(scope="module")
def tiny_init(tmp_path_factory) -> Path:
    from envs.vqa.build_vlm import build_smollm2_vlm
    from tiny import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("tower_init")
    llama = save_tiny_checkpoint(root / "llama", seed=0, num_attention_heads=2, num_key_value_heads=1)
    return build_smollm2_vlm(root / "vlm", text_model=llama, seed=0, **TINY_VISION)[0]


def test_cell_patches_are_the_patches_inside_each_cell():
    from envs.vqa.tower_pretrain import TowerHeads

    heads = TowerHeads(8, grid=2, patches_per_side=4)
    assert heads.cell_patches == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    assert TowerHeads(8, grid=3, patches_per_side=3).cell_patches[4] == [4]  # the middle cell
    with pytest.raises(ValueError, match="4 patches per side do not split into 3 cells"):
        TowerHeads(8, grid=3, patches_per_side=4)


def test_examples_carry_the_labels_the_data_pins_down(sources):
    from envs.vqa.data import ANSWER_TYPES
    from envs.vqa.tower_pretrain import IGNORE, load_examples
    from rl.common import read_jsonl

    easy, scenes = sources
    paths, labels, grid = load_examples(easy, scenes, "train")
    assert grid == 2 and len(paths) == 4 + 6
    shapes, colors = ANSWER_TYPES["shape"], ANSWER_TYPES["color"]
    assert labels[0] == {"shape": shapes.index("circle"), "color": colors.index("red"), "cells": [IGNORE] * 4}
    assert labels[3] == {"shape": IGNORE, "color": colors.index("teal"), "cells": [IGNORE] * 4}  # shape unknown
    scene_rows = read_jsonl(scenes / "captions_train.jsonl")
    assert [x["cells"] for x in labels[4:]] == [r["digits"] for r in scene_rows]
    assert all(x["shape"] == x["color"] == IGNORE for x in labels[4:])
    test_paths, _, _ = load_examples(easy, scenes, "test")
    assert len(test_paths) == 1 + 2 and all("/test" in p for p in test_paths)  # test image 1 has no label
    assert len(load_examples(easy, scenes, "train", limit=2)[0]) == 2 + 2


def test_bad_scene_row_is_an_error_naming_file_and_row(sources, tmp_path):
    import json
    import shutil

    from envs.vqa.tower_pretrain import load_examples

    _, scenes = sources
    bad = tmp_path / "scenes"
    shutil.copytree(scenes, bad)
    rows = (bad / "captions_train.jsonl").read_text().splitlines()
    row = json.loads(rows[1])
    row["digits"] = [1, 2]
    rows[1] = json.dumps(row)
    (bad / "captions_train.jsonl").write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=r"captions_train.jsonl: row 2: expected 4 `digits`"):
        load_examples(None, bad, "train")
    with pytest.raises(ValueError, match="no labelled images"):
        load_examples(None, None, "train")


def test_stage0_trains_the_tower_only_and_rescales_the_projector(tiny_init, sources, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from envs.vqa.tower_pretrain import pretrain_tower, tower_features
    from rl.multimodal import load_image

    easy, scenes = sources
    out, report = pretrain_tower(tiny_init, tmp_path / "tower", easy_vqa_dir=easy, digit_scenes_dir=scenes,
                                 epochs=20, batch_size=4, lr=3e-3)
    assert report["images"] == {"train": 10, "test": 3} and report["steps"] == 20 * 3
    first, last = report["train_loss_first_last"]
    assert last < first  # the heads + tower fit the labels
    assert set(report["held_out_accuracy"]) == {"shape", "color", "digit"}
    assert (out / "tower_pretrain.json").is_file()
    before, after = load_file(str(tiny_init / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys()  # the throwaway heads are not saved
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("vision_tower.encoder.") for k in changed)
    # besides the tower only linear_2 (its bias starts at zero, so scaling leaves it equal)
    assert "multi_modal_projector.linear_2.weight" in changed
    assert changed - {k for k in changed if k.startswith("vision_tower.")} <= {
        "multi_modal_projector.linear_2.weight", "multi_modal_projector.linear_2.bias"}
    # linear_2 is the same layer, scaled; its outputs' mean norm is the token embeddings'
    ratio = after["multi_modal_projector.linear_2.weight"] / before["multi_modal_projector.linear_2.weight"]
    assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio), rtol=1e-4)
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    from envs.vqa.tower_pretrain import load_examples

    paths = load_examples(easy, scenes, "train")[0]
    pixels = processor.image_processor([load_image(p) for p in paths], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        feats = model.model.multi_modal_projector(tower_features(model.model.vision_tower, pixels))
    embed_norm = model.get_input_embeddings().weight.norm(dim=-1).mean()
    assert float(feats.norm(dim=-1).mean()) == pytest.approx(float(embed_norm), rel=1e-3)
    assert report["token_embedding_norm"] == pytest.approx(float(embed_norm), rel=1e-3)
    with pytest.raises(FileExistsError, match="--force"):
        pretrain_tower(tiny_init, out, easy_vqa_dir=easy, digit_scenes_dir=scenes, epochs=1)


def test_build_vlm_command_runs_stage0_then_stage1_with_the_tower_frozen(tiny_init, sources, tmp_path, capsys):
    """`python -m envs.vqa build-vlm`: the (existing) init is reused, stage 0 writes --tower, stage 1 trains the
    projector on captions from it; the caption stage leaves the tower and the language model as stage 0 left them."""
    from envs.vqa.__main__ import main
    from envs.vqa.captions import write_captions

    easy, scenes = sources
    data = write_captions(easy, tmp_path / "captions", digit_scenes=scenes)
    tower, out = tmp_path / "tower", tmp_path / "vlm"
    rc = main(["build-vlm", "--init", str(tiny_init), "--tower", str(tower), "--out", str(out), "--tower-epochs", "2",
               "--easy-vqa-dir", str(easy), "--digit-scenes", str(scenes),
               f"data.train={data['train']}", f"data.eval={data['test']}", "data.eval_size=1", "steps=2",
               "training.per_device_batch_size=2", "training.dataloader_workers=0", "data.max_length=256",
               f"output_dir={tmp_path / 'run'}", "optim.lr=1e-2", "optim.warmup_ratio=0"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "stage 0" in printed and "held-out accuracy" in printed and "caption pre-trained" in printed
    staged, final = load_file(str(tower / "model.safetensors")), load_file(str(out / "model.safetensors"))
    changed = {k for k in staged if not torch.equal(staged[k], final[k])}
    assert changed and all(k.startswith("multi_modal_projector.") for k in changed)

"""The SFT data-scale runner (sft/scale.py) and the nested training subsets it relies on
(data.max_train_rows in sft/config.py + sft/data.py). The end-to-end test trains the tiny
random Llama at two sizes (seconds)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from rl.common import read_jsonl
from sft.config import ConfigError, SFTDataConfig, recipe_from_dict
from sft.data import SFTDataError, build_datasets, train_subset_indices, write_smoke_dataset
from sft.scale import main, parse_sizes, run_scale


def weight_norm(model_dir: str, recipe) -> dict[str, float]:
    """A user evaluator (`test_sft_scale:weight_norm`): the L2 norm of the final weights."""
    tensors = load_file(str(Path(model_dir) / "model.safetensors"))
    return {"weight_norm": math.sqrt(sum(float((t.double() ** 2).sum()) for t in tensors.values()))}


def write_recipe(tmp_path: Path, model_dir: str, data: Path, **data_keys) -> Path:
    recipe = {
        "model": {"name_or_path": model_dir},
        "data": {"train": str(data), "eval_size": 2, "max_length": 128, **data_keys},
        # epochs, not steps: the number of steps then grows with the training-set size
        "training": {"epochs": 1, "per_device_batch_size": 2},
        "optim": {"lr": 1e-2},
        "logging_steps": 1,
        "seed": 0,
        "output_dir": str(tmp_path / "unused"),
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


# ----------------------------------------------------------------------------- nested subsets


def test_subset_indices_are_seeded_nested_and_sorted():
    small, large = train_subset_indices(100, 32, seed=0), train_subset_indices(100, 64, seed=0)
    assert len(small) == 32 and len(set(large)) == 64 and small == sorted(small)
    assert set(small) <= set(large)
    assert small == train_subset_indices(100, 32, seed=0)
    assert small != train_subset_indices(100, 32, seed=1)
    assert train_subset_indices(10, 10, seed=5) == list(range(10))


def test_max_train_rows_subsets_are_nested_with_the_same_eval_rows(tmp_path, tiny_tokenizer):
    data = write_smoke_dataset(tmp_path / "d.jsonl", rows=20)
    built = {
        n: build_datasets(SFTDataConfig(train=str(data), eval_size=4, max_train_rows=n), tiny_tokenizer, seed=0)
        for n in (0, 4, 8)
    }
    rows = {n: [tuple(r) for r in train["input_ids"]] for n, (train, _) in built.items()}
    assert len(rows[0]) == 16 and len(rows[4]) == 4 and len(rows[8]) == 8
    assert set(rows[4]) <= set(rows[8]) <= set(rows[0])
    evals = {n: [tuple(r) for r in ev["input_ids"]] for n, (_, ev) in built.items()}
    assert evals[0] == evals[4] == evals[8]  # held out before the subset is drawn
    assert not set(evals[0]) & set(rows[0])


def test_max_train_rows_larger_than_the_data_is_an_error(tmp_path, tiny_tokenizer):
    data = write_smoke_dataset(tmp_path / "d.jsonl", rows=10)
    with pytest.raises(SFTDataError, match=r"d.jsonl: data.max_train_rows=9 but only 8 training rows are "
                                           r"available \(after holding out data.eval_size=2\)"):
        build_datasets(SFTDataConfig(train=str(data), eval_size=2, max_train_rows=9), tiny_tokenizer)


def test_max_train_rows_is_a_strict_recipe_key():
    base = {"data": {"train": "x.jsonl"}}
    assert recipe_from_dict(base, check_files=False).data.max_train_rows == 0  # default: all rows
    with pytest.raises(ConfigError, match="data.max_train_rows must be >= 0"):
        recipe_from_dict({"data": {"train": "x.jsonl", "max_train_rows": -1}})
    with pytest.raises(ConfigError, match="max_train_rows"):  # the misspelling names the key
        recipe_from_dict({"data": {"train": "x.jsonl", "max_train_row": 8}})


def test_parse_sizes():
    assert parse_sizes("64, 32,128") == [32, 64, 128]
    for bad in ("32,0", "32,x", "", "32,32"):
        with pytest.raises(ConfigError, match="--sizes"):
            parse_sizes(bad)


# ----------------------------------------------------------------------------- the runner


def test_scale_run_two_sizes_writes_one_table(tmp_path, tiny_model_dir, capsys):
    data = write_smoke_dataset(tmp_path / "d.jsonl", rows=10)
    recipe = write_recipe(tmp_path, tiny_model_dir, data)
    out = tmp_path / "scale"
    argv = [str(recipe), "--sizes", "4,2", "--out", str(out), "--evaluator", "heldout_loss",
            "--evaluator", "test_sft_scale:weight_norm", "optim.lr=5e-3"]
    assert main(argv) == 0

    results = json.loads((out / "results.json").read_text())
    assert results["sizes"] == [2, 4] and results["evaluators"] == ["heldout_loss", "test_sft_scale:weight_norm"]
    assert results["overrides"] == ["optim.lr=5e-3"]
    points = results["results"]
    assert [p["size"] for p in points] == [2, 4] and [p["rows"] for p in points] == [2, 4]
    assert [p["steps"] for p in points] == [1, 2]  # 1 epoch at batch 2
    for p in points:
        assert set(p["metrics"]) == {"eval_loss", "weight_norm"}
        assert math.isfinite(p["metrics"]["eval_loss"]) and math.isfinite(p["train_loss"]) and p["minutes"] > 0
        run = Path(p["run_dir"])
        assert (run / "final" / "model.safetensors").is_file()
        config = json.loads((run / "config.json").read_text())
        assert config["data"]["max_train_rows"] == p["size"] and config["optim"]["lr"] == 5e-3
        # the table's eval_loss is the one the trainer logged at its last step
        logged = read_jsonl(run / "metrics.jsonl")
        last_eval = [r for r in logged if "eval_loss" in r][-1]
        assert last_eval["step"] == p["steps"] and last_eval["eval_loss"] == p["metrics"]["eval_loss"]
        assert p["metrics"]["weight_norm"] == weight_norm(str(run / "final"), None)["weight_norm"]
    assert points[0]["metrics"]["weight_norm"] != points[1]["metrics"]["weight_norm"]

    table = (out / "results.md").read_text().splitlines()
    header = "| size | rows | steps | final train loss | eval_loss | weight_norm | minutes |"
    assert header in table
    body = table[table.index(header) + 2:][:2]
    assert [line.split("|")[1:4] for line in body] == [[" 2 ", " 2 ", " 1 "], [" 4 ", " 4 ", " 2 "]]
    assert f"{points[1]['metrics']['eval_loss']:.4f}" in body[1]
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(out.glob(".*tmp"))  # atomic writes leave no temp files

    # a second run reuses both finished sizes: nothing is retrained, the table is the same
    final = Path(points[0]["run_dir"]) / "final" / "model.safetensors"
    mtime = final.stat().st_mtime_ns
    capsys.readouterr()
    assert main(argv) == 0
    assert capsys.readouterr().err.count("reusing the finished run") == 2
    assert final.stat().st_mtime_ns == mtime
    again = json.loads((out / "results.json").read_text())["results"]
    assert [p["metrics"] for p in again] == [p["metrics"] for p in points]

    # the same directory with a different recipe is refused rather than silently mixed
    assert main([*argv[:-1], "optim.lr=1e-3"]) == 1
    assert "holds a finished run of a different recipe" in capsys.readouterr().err


def test_scale_errors_before_training(tmp_path, tiny_model_dir, capsys):
    data = write_smoke_dataset(tmp_path / "d.jsonl", rows=10)
    recipe = write_recipe(tmp_path, tiny_model_dir, data)
    out = tmp_path / "scale"

    assert main([str(recipe), "--sizes", "2", "--out", str(out), "output_dir=elsewhere"]) == 2
    assert "the runner sets output_dir for each size" in capsys.readouterr().err
    assert main([str(recipe), "--sizes", "2", "--out", str(out), "data.eval_size=0"]) == 2
    assert "heldout_loss needs a held-out set" in capsys.readouterr().err
    assert main([str(recipe), "--sizes", "2", "--out", str(out), "--evaluator", "nope"]) == 1
    assert "unknown evaluator 'nope'" in capsys.readouterr().err
    assert main([str(recipe), "--sizes", "2", "--out", str(out), "data.max_train_row=3"]) == 2
    assert "max_train_rows" in capsys.readouterr().err
    assert not out.exists()  # nothing trained, nothing written

    with pytest.raises(SFTDataError, match="data.max_train_rows=9 but only 8 training rows"):
        run_scale(str(recipe), [9], out)

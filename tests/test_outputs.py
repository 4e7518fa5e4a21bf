"""What a run leaves behind: `<output_dir>/final/` is a plain Hugging Face model (LoRA merged, or the
adapter on request) with no absolute path of the training machine inside; a run dir is a model name
(`rl.models.resolve_model`); nothing is deleted silently; the CLIs print known errors as one line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from rl.config import ConfigError, config_from_dict
from rl.models import ModelPathError, resolve_model
from rl.trainer import train
from tiny import arithmetic_recipe

REPO = Path(__file__).resolve().parents[1]


def _train(model_dir, out: Path, **overrides) -> Path:
    # no held-out eval: these tests are about the files, not the learning
    train(config_from_dict(arithmetic_recipe(model_dir, out, data__eval="", **overrides)))
    return out / "final"


def _no_local_paths(final: Path, *local: Path) -> None:
    """No text file of `final` names a local path (tmp dirs of this test, "/tmp", the model cache)."""
    for f in final.iterdir():
        if f.suffix in (".json", ".md", ".jinja", ".txt"):
            text = f.read_text(encoding="utf-8")
            for path in [*map(str, local), "/tmp", str(Path.home())]:
                assert path not in text, f"{f.name} names {path}"


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A finished full-fine-tune run (2 GRPO steps on the tiny model)."""
    out = tmp_path_factory.mktemp("full") / "run"
    _train(tiny_model_dir, out)
    return out


def test_final_is_a_plain_model(finished_run, tiny_model_dir):
    final = finished_run / "final"
    assert (final / "model.safetensors").is_file() and not list(final.glob("*.bin"))
    assert not (finished_run / ".tmp-final").exists()
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    assert tok.chat_template and tok("1 2")["input_ids"]
    # the trained weights, not the base model's: equal to the last checkpoint's policy
    latest = AutoModelForCausalLM.from_pretrained(finished_run / "checkpoint-2" / "policy")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trained, saved, before = model.state_dict(), latest.state_dict(), base.state_dict()
    assert all(torch.equal(trained[k], saved[k]) for k in saved)
    assert any(not torch.equal(trained[k], before[k]) for k in before)
    _no_local_paths(final, finished_run, Path(tiny_model_dir))


def test_continue_from_a_finished_run(finished_run, tmp_path):
    """`model.name_or_path: <output dir of a finished run>` starts from its final/ model."""
    assert resolve_model(str(finished_run)) == str(finished_run / "final")
    final = _train(str(finished_run), tmp_path / "next", steps=1)
    assert AutoModelForCausalLM.from_pretrained(final).config.model_type == "llama"
    _no_local_paths(final, tmp_path, finished_run)


def test_eval_loads_a_run_dir(finished_run):
    """eval.run --model <run dir> keeps working: it loads the run's final/ model."""
    from eval.run import resolve_policy_path

    assert Path(resolve_policy_path(str(finished_run))) == finished_run / "final"


def test_lora_final_is_merged(tiny_model_dir, tmp_path):
    out = tmp_path / "lora"
    final = _train(tiny_model_dir, out, model__lora=True, model__lora_r=4, model__lora_alpha=8)
    assert not (final / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(final).eval()
    assert not any("lora" in k for k in merged.state_dict())
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft = PeftModel.from_pretrained(base, str(out / "checkpoint-2" / "policy")).eval()
    ids = torch.tensor([[5, 17, 33, 2, 40, 41, 7]])
    with torch.no_grad():
        want, got = peft(ids).logits, merged(ids).logits
        with peft.disable_adapter():
            untrained = peft(ids).logits
    assert not torch.allclose(want, untrained)  # the adapter changed the model: the check below means something
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    _no_local_paths(final, tmp_path, Path(tiny_model_dir))


def test_adapter_only_final(tiny_model_dir, tmp_path, monkeypatch):
    lora = dict(model__lora=True, model__lora_r=4, model__save_adapter_only=True)
    out = tmp_path / "adapter"
    final = _train(tiny_model_dir, out, **lora)
    assert (final / "adapter_model.safetensors").is_file() and not (final / "model.safetensors").exists()
    config = json.loads((final / "adapter_config.json").read_text())
    # the base as the recipe named it; an absolute path of this machine becomes its last component
    assert config["base_model_name_or_path"] == Path(tiny_model_dir).name
    _no_local_paths(final, tmp_path, Path(tiny_model_dir))
    assert resolve_model(str(out)) == str(final)  # an adapter dir is a model for the resolver (eval merges it)

    # a base named relative to the working directory stays as written, and a run that starts from
    # the adapter-only run gets base + adapter merged
    from peft import PeftModel

    from rl.setup import load_policy

    monkeypatch.chdir(Path(tiny_model_dir).parent)
    rel = os.path.join(".", Path(tiny_model_dir).name)
    out = tmp_path / "adapter_rel"
    final = _train(rel, out, **lora)
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == rel
    policy = load_policy(config_from_dict(arithmetic_recipe(str(out), tmp_path / "next")), resolve_model(str(out)))
    assert not any("lora" in k for k in policy.state_dict())
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(final)).eval()
    ids = torch.tensor([[5, 17, 33, 2, 40]])
    with torch.no_grad():
        torch.testing.assert_close(policy.eval()(ids).logits, peft(ids).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="save_adapter_only: true needs model.lora: true"):
        config_from_dict(arithmetic_recipe(tiny_model_dir, tmp_path / "x", model__save_adapter_only=True))


def test_a_directory_that_is_not_a_model(tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("x")
    (notes / "config.json").write_text("{}")  # a run's recipe, say: not a model config
    with pytest.raises(ModelPathError) as exc:
        resolve_model(str(notes))
    msg = str(exc.value)
    assert "\n" not in msg and str(notes) in msg and "is not a model" in msg and "todo.txt" in msg
    run = tmp_path / "stopped"
    (run / "checkpoint-3" / "policy").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    with pytest.raises(ModelPathError, match=r"did not finish \(checkpoint-3, no final/\).*--resume latest"):
        resolve_model(str(run))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelPathError, match="it is empty"):
        resolve_model(str(tmp_path / "empty"))


# ----------------------------------------------------------------------------- the CLI


def _recipe_file(tmp_path: Path, model_dir: str, out: Path, **overrides) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(arithmetic_recipe(model_dir, out, data__eval="", **overrides)))
    return path


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_cli_refuses_an_existing_output_dir(tiny_model_dir, tmp_path, capsys):
    from rl.train import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert main([str(_recipe_file(tmp_path, tiny_model_dir, out))]) == 2
    line = _one_error_line(capsys)
    assert str(out) in line and "--resume latest" in line and "overwrite_output_dir=true" in line
    assert "choose another output_dir" in line
    assert (out / "mine.txt").read_text() == "keep"


def test_cli_resume_without_checkpoint(tiny_model_dir, tmp_path, capsys):
    from rl.train import main

    out = tmp_path / "out"
    assert main([str(_recipe_file(tmp_path, tiny_model_dir, out)), "--resume", "latest"]) == 2
    assert "--resume latest: no complete checkpoint-*" in _one_error_line(capsys)


def test_cli_missing_recipe(tmp_path, capsys):
    from rl.train import main

    assert main([str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in _one_error_line(capsys)


def test_cli_model_path_not_a_model(tmp_path, capsys):
    from rl.train import main

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "data.csv").write_text("a,b\n")
    assert main([str(_recipe_file(tmp_path, str(junk), tmp_path / "out"))]) == 2
    line = _one_error_line(capsys)
    assert str(junk) in line and "is not a model" in line and "data.csv" in line


def test_cli_keeps_tracebacks_of_bugs(tiny_model_dir, tmp_path, monkeypatch):
    """Only the known errors become one line: anything else is a bug and propagates."""
    import rl.trainer
    from rl.train import main

    def broken(cfg, resume=None):
        raise KeyError("a bug")

    monkeypatch.setattr(rl.trainer, "train", broken)
    with pytest.raises(KeyError, match="a bug"):
        main([str(_recipe_file(tmp_path, tiny_model_dir, tmp_path / "out"))])

    def missing_file(cfg, resume=None):
        open(tmp_path / "no-such-file")  # an OS error (errno set): not one of our guards

    monkeypatch.setattr(rl.trainer, "train", missing_file)
    with pytest.raises(FileNotFoundError):
        main([str(_recipe_file(tmp_path, tiny_model_dir, tmp_path / "out"))])


def test_sft_cli_one_line_for_an_existing_output_dir(tmp_path, capsys):
    from sft.train import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "yo"}]}) + "\n")
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(yaml.safe_dump({"data": {"train": str(data)}, "output_dir": str(out)}))
    assert main([str(recipe)]) == 2
    assert str(out) in _one_error_line(capsys)
    assert (out / "mine.txt").read_text() == "keep"


# ----------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "recipes").glob("*.yaml")))
def test_shipped_recipes_never_delete_an_output_dir(recipe):
    data = yaml.safe_load((REPO / "recipes" / recipe).read_text())
    assert data.get("overwrite_output_dir") is not True, f"recipes/{recipe} sets overwrite_output_dir: true"


# ----------------------------------------------------------------------------- log output


def test_progress_is_plain_lines_off_a_terminal():
    import io

    from rl.common import progress

    log = io.StringIO()  # not a TTY, like a log file
    with progress(total=3, desc="steps", file=log) as bar:
        for i in range(3):
            bar.update(1)
            bar.set_postfix(reward=i)  # refreshes at once: one line per step
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text and text.isascii()
    lines = text.splitlines()
    assert any("3/3" in line and "reward=2" in line for line in lines) and len(lines) >= 3
    log = io.StringIO()  # a bar that a terminal would erase (leave=False) keeps its final state in a log
    with progress(total=4, desc="eval", leave=False, file=log) as bar:
        bar.update(4)
    assert "eval" in log.getvalue().splitlines()[-1] and "4/4" in log.getvalue().splitlines()[-1]


def test_library_progress_bars_off_a_terminal():
    import io

    import datasets
    import transformers

    from rl.common import plain_library_progress

    try:
        plain_library_progress(io.StringIO())
        assert not transformers.utils.logging.is_progress_bar_enabled()
        assert not datasets.utils.logging.is_progress_bar_enabled()
    finally:
        transformers.utils.logging.enable_progress_bar()
        datasets.utils.logging.enable_progress_bar()


@pytest.mark.slow
def test_no_deepspeed_accelerator_warning_without_gpu():
    """accelerate imports deepspeed on the first unwrap_model; without CUDA, DeepSpeed's auto-detection
    warned on every run (the fix: `quiet_deepspeed`, called by rl.setup before the Accelerator)."""
    import subprocess
    import sys

    pytest.importorskip("deepspeed")
    if torch.cuda.is_available():
        pytest.skip("the warning is about machines without CUDA")
    code = "from rl.common import quiet_deepspeed; quiet_deepspeed(); import deepspeed"
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Setting accelerator to CPU" not in proc.stdout + proc.stderr
    # without it the warning is there (so the check above means something)
    proc = subprocess.run([sys.executable, "-c", "import deepspeed"], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=300)
    assert "Setting accelerator to CPU" in proc.stdout + proc.stderr

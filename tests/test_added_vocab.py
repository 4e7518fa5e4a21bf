"""Added vocabulary (rl/vocab.py, `model.added_tokens`): tokenizer, resize, row initialisation, training
under full fine-tuning and LoRA (PEFT trainable tokens), checkpoints, SFT, the vLLM engine.

On the tiny Llama (tied embeddings) and an untied variant (`tie_word_embeddings=False`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from rl.config import ConfigError, ModelConfig, config_from_dict
from rl.vocab import MARKER, add_to_tokenizer, prepare_model, trainable_token_indices
from tiny import arithmetic_recipe, make_tiny_tokenizer, save_tiny_checkpoint

TOKENS = ["<a_1>", "<a_2>", "<b_1>"]
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def model_dir(request, tmp_path_factory) -> str:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=0, tie_word_embeddings=request.param)


def prepared(model_dir: str, init: str = "mean", tokens=TOKENS):
    tok = make_tiny_tokenizer()
    cfg = ModelConfig(name_or_path=model_dir, added_tokens=tokens, added_tokens_init=init)
    vocab = add_to_tokenizer(tok, cfg)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return tok, vocab, model, cfg


def matrices(model) -> list[torch.Tensor]:
    """The input embedding, and the output head when it is a separate matrix."""
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return [emb] if head is emb else [emb, head]


def test_tokens_are_single_added_tokens_that_round_trip():
    tok = make_tiny_tokenizer()
    n = len(tok)
    vocab = add_to_tokenizer(tok, ModelConfig(added_tokens=TOKENS))
    assert vocab.token_ids == [n, n + 1, n + 2] and len(tok) == n + 3
    text = "item<a_1><b_1> then <a_2>!"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert [i for i in ids if i >= n] == [n, n + 2, n + 1]
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == text  # added, not special
    # idempotent: a tokenizer that has them (a checkpoint's) keeps the ids and adds nothing
    again = add_to_tokenizer(tok, ModelConfig(added_tokens=TOKENS))
    assert again.ids == vocab.ids and len(tok) == n + 3 and again.preexisting == set(TOKENS)


def test_mean_init_is_the_mean_of_the_old_rows(model_dir):
    tok, vocab, model, cfg = prepared(model_dir)
    old = [w.detach().clone() for w in matrices(model)]
    n = old[0].shape[0]
    assert prepare_model(model, vocab, cfg) == vocab.token_ids
    assert model.config.vocab_size == len(tok) == n + 3
    for before, after in zip(old, matrices(model)):
        assert after.shape == (n + 3, before.shape[1])
        assert torch.equal(after[:n], before)  # existing rows untouched
        for i in vocab.token_ids:
            torch.testing.assert_close(after[i], before.mean(0))
    assert getattr(model.config, MARKER) == vocab.ids
    if len(old) == 1:  # tied: the head is the embedding
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_description_init_is_the_mean_of_the_description_rows(model_dir, tmp_path):
    rows = [{"token": "<a_1>", "description": "the capital of France"},
            {"token": "<a_2>", "description": "plus"}]
    path = tmp_path / "tokens.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok, vocab, model, cfg = prepared(model_dir, init="description", tokens=str(path))
    old = [w.detach().clone() for w in matrices(model)]
    prepare_model(model, vocab, cfg)
    for before, after in zip(old, matrices(model)):
        for row in rows:
            desc = tok(row["description"], add_special_tokens=False)["input_ids"]
            assert len(desc) >= 1
            torch.testing.assert_close(after[vocab.ids[row["token"]]], before[desc].mean(0))


def test_a_model_that_has_the_rows_is_not_reinitialised(model_dir, tmp_path):
    tok, vocab, model, cfg = prepared(model_dir)
    prepare_model(model, vocab, cfg)
    with torch.no_grad():  # "trained" rows
        model.get_input_embeddings().weight[vocab.token_ids] += 1.0
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    tok2 = AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    vocab2 = add_to_tokenizer(tok2, cfg)
    assert vocab2.ids == vocab.ids and len(tok2) == len(tok)
    assert prepare_model(reloaded, vocab2, cfg) == []
    assert torch.equal(reloaded.get_input_embeddings().weight, model.get_input_embeddings().weight)
    # the base tokenizer (a resumed full fine-tuning run loads the tokenizer of the recipe's model and the
    # weights of the checkpoint): the tokens get the same ids and the checkpoint's rows are kept
    vocab3 = add_to_tokenizer(make_tiny_tokenizer(), cfg)
    assert prepare_model(reloaded, vocab3, cfg) == []


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_lora_trains_only_the_added_rows(tied, tmp_path):
    from peft import LoraConfig, get_peft_model

    from rl.weights import export_weights

    d = save_tiny_checkpoint(tmp_path / "m", tie_word_embeddings=tied)
    tok, vocab, model, cfg = prepared(d)
    prepare_model(model, vocab, cfg)
    indices = trainable_token_indices(model, vocab)
    assert indices == ({"model.embed_tokens": vocab.token_ids} if tied else
                       {"model.embed_tokens": vocab.token_ids, "lm_head": vocab.token_ids})
    policy = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=indices))
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert all("lora_" in n or "trainable_tokens_delta" in n for n in trainable)
    ids = torch.tensor([[5, 6, *vocab.token_ids, 7]])
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-1)
    policy(ids, labels=ids).loss.backward()
    opt.step()
    exported = dict(export_weights(policy))
    assert EMBED in exported and HEAD in exported and not any("token_adapter" in k for k in exported)
    base = AutoModelForCausalLM.from_pretrained(d)
    n = base.get_input_embeddings().weight.shape[0]
    for key in (EMBED, HEAD):
        old = base.get_input_embeddings().weight if key == EMBED else base.get_output_embeddings().weight
        assert torch.equal(exported[key][:n], old)  # the old rows of embed (and head) do not train
        assert not torch.allclose(exported[key][n:], old.mean(0).expand(3, -1))  # the new rows did
    with torch.no_grad():  # the exported weights are the trained policy
        plain = AutoModelForCausalLM.from_pretrained(d)
        plain.resize_token_embeddings(len(tok))
        plain.load_state_dict(exported)
        torch.testing.assert_close(plain(ids).logits, policy(ids).logits, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("tokens, message", [
    ("missing.txt", "model.added_tokens: file not found: missing.txt"),
    (["<a_1>", "<a_2>", "<a_1>"], "model.added_tokens[2]: duplicate token '<a_1>' (also at model.added_tokens[0])"),
    (["<a_1>", ""], "model.added_tokens[1]: a token must be a non-empty string"),
    ("tokens.csv", "model.added_tokens: 'tokens.csv' is neither a list nor a .txt / .jsonl file"),
])
def test_bad_token_lists_are_one_clear_error(tiny_model_dir, tmp_path, tokens, message):
    cfg = arithmetic_recipe(tiny_model_dir, tmp_path / "out", model__added_tokens=tokens)
    with pytest.raises(ConfigError) as e:
        config_from_dict(cfg)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_description_init_needs_every_description(tiny_model_dir, tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"token": "<a_1>", "description": "one"}\n{"token": "<a_2>"}\n')
    cfg = arithmetic_recipe(tiny_model_dir, tmp_path / "out", model__added_tokens=str(path),
                            model__added_tokens_init="description")
    with pytest.raises(ConfigError, match=r"model.added_tokens \(.*t.jsonl line 2\): token '<a_2>' has no description"):
        config_from_dict(cfg)


def test_a_token_of_the_base_vocabulary_is_an_error():
    with pytest.raises(ValueError, match="model.added_tokens: 'the' is already a token of the base vocabulary"):
        add_to_tokenizer(make_tiny_tokenizer(), ModelConfig(added_tokens=["<a_1>", "the"]))


def test_txt_file_and_override_syntax(tiny_model_dir, tmp_path):
    from rl.config import read_recipe_mapping

    (tmp_path / "tokens.txt").write_text("<a_1>\n\n<a_2>\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(arithmetic_recipe(tiny_model_dir, tmp_path / "out")))
    data = read_recipe_mapping(recipe, ["model.added_tokens=[<a_1>,<a_2>]"])
    assert config_from_dict(data).model.added_tokens == ["<a_1>", "<a_2>"]
    from rl.vocab import read_added_tokens

    specs = read_added_tokens(ModelConfig(added_tokens=str(tmp_path / "tokens.txt")))
    assert [s.token for s in specs] == ["<a_1>", "<a_2>"]


# ----------------------------------------------------------------------------- RL runs


def with_tokens(messages: list[dict]) -> list[dict]:
    """Prompts that contain added tokens, so their input-embedding rows get gradients too."""
    return [*messages[:-1], {**messages[-1], "content": messages[-1]["content"] + " <a_1><b_1><a_2>"}]


def token_prompts(row: dict) -> list[dict]:  # a prompt builder ("module:function")
    return with_tokens(list(row["messages"]))


def rl_run(model_dir: str, out: Path, **overrides) -> dict:
    from rl.trainer import train

    cfg = arithmetic_recipe(model_dir, out, model__added_tokens=TOKENS,
                            data__prompt_builder="test_added_vocab:token_prompts", **overrides)
    return train(config_from_dict(cfg))


def new_token_logits(model, tok) -> torch.Tensor:
    ids = tok("<a_1><b_1> 3 <a_2><a_1>", add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert (ids >= 512).sum() == 4
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_rl_run_trains_the_added_rows_and_final_reloads(model_dir, tmp_path, lora):
    from peft import PeftModel

    out = tmp_path / "run"
    extra = {"model__lora": True, "model__lora_r": 4} if lora else {}
    result = rl_run(model_dir, out, **extra)
    assert [h["step"] for h in result["history"] if "reward/mean" in h] == [1, 2]
    base = load_file(str(Path(model_dir) / "model.safetensors"))
    final = load_file(str(out / "final" / "model.safetensors"))
    n = base[EMBED].shape[0]
    assert final[EMBED].shape[0] == n + 3
    init = base[EMBED].mean(0).expand(3, -1)
    assert not torch.allclose(final[EMBED][n:], init)  # the new rows trained
    if lora:
        assert torch.equal(final[EMBED][:n], base[EMBED])  # the old rows of embed did not
    else:
        assert not torch.equal(final[EMBED][:n], base[EMBED])
    if HEAD in base:  # untied: the head got (and trained) new rows too
        assert final[HEAD].shape[0] == n + 3
        assert not torch.allclose(final[HEAD][n:], base[HEAD].mean(0).expand(3, -1))
        if lora:
            assert torch.equal(final[HEAD][:n], base[HEAD])
    # final/ reloads with the tokens, and equals the trainer's policy (the last checkpoint)
    tok = AutoTokenizer.from_pretrained(out / "final")
    assert all(len(tok(t, add_special_tokens=False)["input_ids"]) == 1 for t in TOKENS)
    assert json.loads((out / "final" / "config.json").read_text())[MARKER] == {
        t: tok.convert_tokens_to_ids(t) for t in TOKENS}
    reloaded = AutoModelForCausalLM.from_pretrained(out / "final")
    ckpt = out / "checkpoint-2" / "policy"
    if lora:  # the checkpoint holds the trained rows, not the whole resized embedding (rl.vocab.adapter_save_kwargs)
        adapter = load_file(str(ckpt / "adapter_model.safetensors"))
        assert any("trainable_tokens_delta" in k for k in adapter)
        assert not any("embed_tokens.token_adapter.base_layer" in k or "lm_head.token_adapter.base_layer" in k
                       for k in adapter)
        trained = AutoModelForCausalLM.from_pretrained(model_dir)
        prepare_model(trained, add_to_tokenizer(make_tiny_tokenizer(), ModelConfig(added_tokens=TOKENS)),
                      ModelConfig(added_tokens=TOKENS))
        trained = PeftModel.from_pretrained(trained, str(ckpt))
    else:
        trained = AutoModelForCausalLM.from_pretrained(ckpt)
    torch.testing.assert_close(new_token_logits(reloaded, tok), new_token_logits(trained, tok), rtol=0, atol=1e-5)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_resume_and_a_trained_start_add_nothing(tiny_model_dir, tmp_path, lora):
    """Resuming a run, or starting a new one from its final/, keeps the trained rows and the ids."""
    from rl.setup import setup_run

    out = tmp_path / "run"
    extra = {"model__lora": True, "model__lora_r": 4} if lora else {}
    rl_run(tiny_model_dir, out, **extra)
    final = load_file(str(out / "final" / "model.safetensors"))
    cfg = config_from_dict(arithmetic_recipe(tiny_model_dir, out, model__added_tokens=TOKENS, **extra))
    run = setup_run(cfg, resume="latest")
    exported = dict(__import__("rl.weights", fromlist=["export_weights"]).export_weights(run.unwrapped))
    torch.testing.assert_close(exported[EMBED], final[EMBED], rtol=0, atol=1e-6)
    assert len(run.tokenizer) == final[EMBED].shape[0]
    start = config_from_dict(arithmetic_recipe(str(out / "final"), tmp_path / "next", model__added_tokens=TOKENS,
                                               algorithm__kl_coef=0.1))
    run2 = setup_run(start, resume=None)
    assert len(run2.tokenizer) == final[EMBED].shape[0]  # nothing added twice
    assert torch.equal(run2.unwrapped.get_input_embeddings().weight.detach(), final[EMBED])
    assert torch.equal(run2.ref_model.get_input_embeddings().weight, final[EMBED])


def test_an_adapter_only_final_loads_with_its_added_rows(tiny_model_dir, tmp_path):
    """`model.save_adapter_only`: final/ is the adapter (+ tokenizer); loading it as a start (rl.setup) or
    for eval (eval.run) resizes the base for the adapter's trainable-token rows."""
    from eval.run import load_policy_for_eval
    from rl.setup import load_policy

    out = tmp_path / "run"
    rl_run(tiny_model_dir, out, model__lora=True, model__lora_r=4, model__save_adapter_only=True)
    final = out / "final"
    config = json.loads((final / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = tiny_model_dir  # the portable name is the tmp dir's last component
    (final / "adapter_config.json").write_text(json.dumps(config))
    cfg = config_from_dict(arithmetic_recipe(tiny_model_dir, tmp_path / "next"))
    merged = load_policy(cfg, str(final))
    evaluated, tok = load_policy_for_eval(str(final), device="cpu")
    assert merged.get_input_embeddings().weight.shape[0] == len(tok) == 512 + 3
    assert getattr(merged.config, MARKER) == {t: tok.convert_tokens_to_ids(t) for t in TOKENS}
    torch.testing.assert_close(new_token_logits(merged, tok), new_token_logits(evaluated, tok), rtol=0, atol=1e-6)
    # and they are the trained rows, not the initial ones
    init = AutoModelForCausalLM.from_pretrained(tiny_model_dir).get_input_embeddings().weight.mean(0)
    assert not torch.allclose(merged.get_input_embeddings().weight[512:], init.expand(3, -1))


# ----------------------------------------------------------------------------- SFT


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_sft_run_trains_the_added_rows(model_dir, tmp_path, lora):
    from sft.config import recipe_from_dict
    from sft.trainer import train
    from tiny import with_overrides

    rows = [{"messages": [{"role": "user", "content": f"Recommend item {k}."},
                          {"role": "assistant", "content": f"<a_{k % 2 + 1}><b_1>"}]} for k in range(4)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "sft"
    recipe = with_overrides(
        {"model": {"name_or_path": model_dir, "added_tokens": TOKENS},
         "data": {"train": str(data), "max_length": 128}, "optim": {"lr": 1e-2},
         "training": {"per_device_batch_size": 2}, "steps": 2, "logging_steps": 1, "output_dir": str(out)},
        **({"model__lora": True, "model__lora_r": 4, "model__lora_target_modules": ["q_proj"]} if lora else {}))
    result = train(recipe_from_dict(recipe))
    assert result["global_step"] == 2
    final = out / "final"
    tok = AutoTokenizer.from_pretrained(final)
    assert [len(tok(t, add_special_tokens=False)["input_ids"]) for t in TOKENS] == [1, 1, 1]
    base, after = load_file(str(Path(model_dir) / "model.safetensors")), load_file(str(final / "model.safetensors"))
    n = base[EMBED].shape[0]
    assert after[EMBED].shape[0] == n + 3
    a1, b1 = tok.convert_tokens_to_ids("<a_1>"), tok.convert_tokens_to_ids("<b_1>")
    assert not torch.allclose(after[EMBED][[a1, b1]], base[EMBED].mean(0).expand(2, -1))
    if lora:
        assert torch.equal(after[EMBED][:n], base[EMBED])
    model = AutoModelForCausalLM.from_pretrained(final)  # loads, with the added rows recorded
    assert getattr(model.config, MARKER) == {t: tok.convert_tokens_to_ids(t) for t in TOKENS}


# ----------------------------------------------------------------------------- vLLM


def _vllm_error() -> str | None:
    try:
        import vllm  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"{type(e).__name__}: {e}"
    return None


needs_vllm = pytest.mark.skipif(_vllm_error() is not None, reason=f"vLLM is not importable ({_vllm_error()})")


@pytest.fixture(scope="module")
def resized(vdir):
    """(model, tokenizer, vocab) of `vdir` (head_dim 32, tied) with the added tokens."""
    tok, vocab, model, cfg = prepared(vdir)
    prepare_model(model, vocab, cfg)
    return model.eval(), tok, vocab


@pytest.fixture(scope="module")
def vllm_engine(resized):
    from rl.engines import build_engine

    model, tok, _ = resized
    eng = build_engine("vllm", model, tok, 16, kv_cache_gb=0.05, max_model_len=256)
    yield eng
    eng.close()


@pytest.mark.slow
@needs_vllm
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_vllm_serves_the_resized_model_and_syncs_the_new_rows(resized, vllm_engine, lora):
    """The colocate engine runs the resized vocabulary; after a training step on new-token sequences and
    `update_weights`, its log-probs of the (new-token) samples equal the trainer's teacher-forced ones."""
    import copy

    from rl.engines import SamplingParams
    from test_vllm_engines import flat_logprobs, teacher_forced

    model, tok, vocab = resized
    new = vocab.token_ids
    prompts = [[5, 6, new[0], new[2]], [new[1], 7, new[0]]]
    params = SamplingParams(max_new_tokens=8, temperature=1.0)
    gens = vllm_engine.generate(prompts, params)  # new tokens in the prompts: the engine's embedding has the rows
    torch.testing.assert_close(flat_logprobs(gens), teacher_forced(model, prompts, gens, 1.0), rtol=1e-4, atol=2e-4)
    policy = copy.deepcopy(model).train()
    if lora:
        from peft import LoraConfig, get_peft_model

        policy = get_peft_model(policy, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                   trainable_token_indices=trainable_token_indices(policy, vocab)))
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(3):  # make the new tokens likely: the samples are then new-token sequences
        ids = torch.tensor([prompts[0] + new * 3])
        policy(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    policy.eval()
    try:
        vllm_engine.update_weights(policy)
        gens = vllm_engine.generate(prompts, params)
        sampled = [t for g in gens for t in g.token_ids]
        assert sum(t in new for t in sampled) >= len(sampled) // 2, sampled
        torch.testing.assert_close(flat_logprobs(gens), teacher_forced(policy, prompts, gens, 1.0),
                                   rtol=1e-4, atol=2e-4)
    finally:
        vllm_engine.update_weights(model)  # the module's engine goes back to the shared weights


@pytest.mark.slow
@needs_vllm
def test_rl_run_with_the_vllm_engine_and_added_tokens(vdir, tmp_path):
    """`rollout.engine: vllm` with added tokens under LoRA: the engine starts on the resized model, is synced
    after each step (trainable-token rows included), and its log-probs match the trainer's recomputed ones."""
    result = rl_run(vdir, tmp_path / "run", model__lora=True, model__lora_r=4, rollout__engine="vllm",
                    rollout__engine_kwargs={"kv_cache_gb": 0.05, "max_model_len": 256},
                    algorithm__rollout_correction="token")
    steps = [h for h in result["history"] if "reward/mean" in h]
    assert [h["step"] for h in steps] == [1, 2]
    for h in steps:  # the rollout after the first step's sync came from the updated weights
        assert 0 <= h["rollout/logp_abs_diff"] < 1e-3 and h["rollout/token_ratio_max"] < 1.01


def test_ppo_critic_gets_the_rows_and_resumes_without_reinit(tiny_model_dir, tmp_path):
    from rl.setup import setup_run

    out = tmp_path / "run"
    ppo = {"algorithm__name": "ppo", "algorithm__kl_coef": 0.05, "algorithm__critic_layers": 1,
           "algorithm__critic_lr": 1e-2}
    result = rl_run(tiny_model_dir, out, **ppo)
    assert all(math.isfinite(h["grad_norm"]) for h in result["history"] if "grad_norm" in h)
    critic_dir = out / "checkpoint-2" / "critic"
    saved = load_file(str(critic_dir / "model.safetensors"))
    assert saved["embed_tokens.weight"].shape[0] == 512 + 3
    base = load_file(str(Path(tiny_model_dir) / "model.safetensors"))[EMBED]
    assert not torch.allclose(saved["embed_tokens.weight"][512:], base.mean(0).expand(3, -1))  # trained
    assert json.loads((critic_dir / "config.json").read_text())[MARKER] == json.loads(
        (out / "final" / "config.json").read_text())[MARKER]
    cfg = config_from_dict(arithmetic_recipe(tiny_model_dir, out, model__added_tokens=TOKENS, **ppo))
    run = setup_run(cfg, resume="latest")
    critic = run.accelerator.unwrap_model(run.critic)
    assert torch.equal(critic.backbone.get_input_embeddings().weight.detach(), saved["embed_tokens.weight"])
    assert run.ref_model.get_input_embeddings().weight.shape[0] == 512 + 3


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_vision_language_models_get_the_rows_too(family, tmp_path):
    """The processor's tokenizer gets the tokens; the language model's embedding (and head) the rows; only
    those rows train under LoRA, and the export names them as the checkpoint does."""
    from peft import LoraConfig, get_peft_model

    from rl.multimodal import load_pretrained_model, load_tokenizer_and_processor
    from rl.weights import export_weights
    from tiny_vlm import save_tiny_llava, save_tiny_qwen2_vl

    d = (save_tiny_llava if family == "llava" else save_tiny_qwen2_vl)(tmp_path / "vlm")
    tok, processor = load_tokenizer_and_processor(d)
    cfg = ModelConfig(added_tokens=TOKENS)
    vocab = add_to_tokenizer(tok, cfg)
    assert len(processor.tokenizer) == len(tok)  # one tokenizer object: the processor renders the new ids
    assert processor.tokenizer.convert_tokens_to_ids("<b_1>") == vocab.ids["<b_1>"]
    model = load_pretrained_model(d, torch.float32, "sdpa")
    n = model.get_input_embeddings().weight.shape[0]
    old = model.get_input_embeddings().weight.detach().clone()
    assert prepare_model(model, vocab, cfg) == vocab.token_ids
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == len(tok) and torch.equal(emb[:n], old)
    torch.testing.assert_close(emb[vocab.token_ids[0]], old[:n].mean(0))
    indices = trainable_token_indices(model, vocab)
    policy = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=indices))
    assert any("trainable_tokens_delta" in k for k, p in policy.named_parameters() if p.requires_grad)
    exported = dict(export_weights(policy))
    embed_key = next(k for k in exported if k.endswith("embed_tokens.weight"))
    assert exported[embed_key].shape[0] == len(tok) and not any("token_adapter" in k for k in exported)

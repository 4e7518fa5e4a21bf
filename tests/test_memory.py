"""The memory-saving paths compute the same numbers as the plain ones: log-probs and entropies with
the output head applied in checkpointed chunks (rl.forward) equal the full-vocabulary computation,
values and gradients, for several chunk sizes, a LoRA-wrapped model and the no-grad batch pass;
models whose logits are not the head's output fall back to the full path."""

from __future__ import annotations

import pytest
import torch

import rl.forward as F
from rl.forward import batch_forward, chunked_logprobs, forward_logprobs
from rl.packing import build_micro_batches, make_micro_batch, scatter_rows
from rl.trajectory import Trajectory
from tiny import make_tiny_llama

CHUNKS = [1, 3, 7, 64, 10_000]  # 1 token, sizes that leave a remainder, more than all the targets


def _trajs(vocab: int, seed: int = 0) -> list[Trajectory]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for gid, (p, lengths) in enumerate([(6, [3, 5, 1, 4]), (4, [2, 7]), (9, [6])]):
        prompt = torch.randint(3, vocab, (p,), generator=g).tolist()
        for n in lengths:
            resp = torch.randint(3, vocab, (n,), generator=g).tolist()
            out.append(Trajectory(prompt, resp, [1] * n, [0.0] * n, gid, {}))
    return out


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return make_tiny_llama(tiny_tokenizer, seed=1)


def _grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def _close_grad(got, ref, name):
    """Equal up to float32 summation order: a weight's gradient sums over tokens, in chunks here and in
    one matmul (over every kept column, unused ones included) there, so it differs in its last bits
    (measured: 4e-6 on entries of magnitude 8)."""
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6 * max(1.0, ref.abs().max().item()), msg=name)


def _loss(logp, ent):
    # weights differ per token so a permuted or misplaced chunk would show
    w = torch.linspace(0.5, 1.5, logp.numel())
    return (w * logp).sum() + (w.flip(0) * ent).sum() * 0.3


@pytest.mark.parametrize("packed", [True, False])
def test_chunked_logprobs_entropies_and_gradients_equal_the_full_vocab_path(model, packed):
    trajs = _trajs(model.config.vocab_size)
    mb = make_micro_batch(trajs, list(range(len(trajs))), packed, 0)
    model.zero_grad(set_to_none=True)
    ref_logp, ref_ent = forward_logprobs(model, mb, 0.7, True, chunk_tokens=0)
    _loss(ref_logp, ref_ent).backward()
    ref_grads = _grads(model)
    assert ref_logp.numel() == sum(len(t.response_ids) for t in trajs) and len(ref_grads) > 0
    for chunk in CHUNKS:
        logp, ent = forward_logprobs(model, mb, 0.7, True, chunk_tokens=chunk)
        torch.testing.assert_close(logp, ref_logp, rtol=0, atol=1e-6)
        torch.testing.assert_close(ent, ref_ent, rtol=0, atol=1e-6)
        _loss(logp, ent).backward()
        grads = _grads(model)
        assert grads.keys() == ref_grads.keys()
        for name, g in grads.items():
            _close_grad(g, ref_grads[name], f"chunk {chunk}: {name}")


def test_chunked_logprobs_function_matches_log_softmax_and_recomputes_in_backward():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(11, 16, requires_grad=True)
    targets = torch.randint(0, 50, (11,))
    logits = head(hidden).float() / 0.5
    ref = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    from rl.algorithms import entropy_from_logits

    ref_ent = entropy_from_logits(logits)
    (ref.sum() + ref_ent.sum()).backward()
    ref_gh, ref_gw = hidden.grad.clone(), head.weight.grad.clone()
    for chunk in CHUNKS:
        hidden.grad, head.weight.grad = None, None
        logp, ent = chunked_logprobs(head, hidden, targets, 0.5, True, chunk)
        torch.testing.assert_close(logp, ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(ent, ref_ent, rtol=0, atol=1e-6)
        # the chunks are checkpointed: the graph keeps no [chunk, vocab] tensor (the backward recomputes it)
        (logp.sum() + ent.sum()).backward()
        _close_grad(hidden.grad, ref_gh, "hidden")
        _close_grad(head.weight.grad, ref_gw, "head")
    empty, none = chunked_logprobs(head, hidden[:0], targets[:0], 1.0, False, 4)
    assert empty.shape == (0,) and none is None


def test_chunks_keep_no_vocab_sized_tensor_for_the_backward():
    """What the autograd graph saves: with chunking, nothing of the vocabulary's size."""
    torch.manual_seed(0)
    V, N = 997, 64
    head = torch.nn.Linear(8, V, bias=False)
    hidden = torch.randn(N, 8, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # not checkpointed: logits kept
        logp, ent = F._chunk_stats(head, hidden, targets, 1.0, True)
    assert max(saved) >= N * V
    (logp.sum() + ent.sum()).backward()
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logp, ent = chunked_logprobs(head, hidden, targets, 1.0, True, 16)
    assert 0 < max(saved) < 16 * V  # the chunks' inputs and the head's weight only
    (logp.sum() + ent.sum()).backward()


def test_lora_wrapped_model_chunked_equals_full(model):
    peft = pytest.importorskip("peft")
    import copy

    lora = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                      init_lora_weights=False))
    trajs = _trajs(model.config.vocab_size, seed=3)
    mb = make_micro_batch(trajs, list(range(len(trajs))), True, 0)
    ref_logp, ref_ent = forward_logprobs(lora, mb, 1.0, True, chunk_tokens=0)
    _loss(ref_logp, ref_ent).backward()
    ref_grads = _grads(lora)
    assert ref_grads and all("lora_" in n for n in ref_grads)
    for chunk in (1, 5, 10_000):
        logp, ent = forward_logprobs(lora, mb, 1.0, True, chunk_tokens=chunk)
        torch.testing.assert_close(logp, ref_logp, rtol=0, atol=1e-6)
        torch.testing.assert_close(ent, ref_ent, rtol=0, atol=1e-6)
        _loss(logp, ent).backward()
        for name, g in _grads(lora).items():
            _close_grad(g, ref_grads[name], name)
    with lora.disable_adapter():  # the reference policy under LoRA goes through the same head
        base = forward_logprobs(lora, mb, 1.0, False, chunk_tokens=4)[0]
    torch.testing.assert_close(base, forward_logprobs(model, mb, 1.0, False, chunk_tokens=0)[0], rtol=0, atol=1e-6)


def test_no_grad_batch_forward_equals_the_full_vocab_path(model, monkeypatch):
    trajs = _trajs(model.config.vocab_size, seed=5)
    B, T = len(trajs), max(len(t.response_ids) for t in trajs)
    micro = build_micro_batches(trajs, list(range(B)), 12, True, 0, 16)
    assert len(micro) > 1
    expect = torch.zeros(B, T)
    for mb in micro:
        expect += scatter_rows(forward_logprobs(model, mb, 0.8, False, chunk_tokens=0)[0].detach(), mb, B, T)
    for chunk in (1, 4, 10_000):
        monkeypatch.setattr(F, "LOGPROB_CHUNK_TOKENS", chunk)
        got = batch_forward(model, micro, B, T, 0.8)
        torch.testing.assert_close(got, expect, rtol=0, atol=1e-6)


def test_models_whose_logits_are_not_the_heads_output_take_the_full_path(tiny_tokenizer):
    """A model that post-processes its logits (here: soft-capping, as Gemma 2 does) is detected and
    computed unchunked, so the result stays that of the model's own logits."""

    class Capped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def get_output_embeddings(self):
            return self.inner.get_output_embeddings()

        def forward(self, **kwargs):
            out = self.inner(**kwargs)
            out.logits = torch.tanh(out.logits / 3.0) * 3.0
            return out

    capped = Capped(make_tiny_llama(tiny_tokenizer, seed=2))
    trajs = _trajs(capped.inner.config.vocab_size, seed=7)
    mb = make_micro_batch(trajs, list(range(len(trajs))), True, 0)
    full = forward_logprobs(capped, mb, 1.0, True, chunk_tokens=0)
    chunked = forward_logprobs(capped, mb, 1.0, True, chunk_tokens=4)
    assert F._HEAD_IS_LOGITS[capped.get_output_embeddings()] is False
    torch.testing.assert_close(chunked[0], full[0], rtol=0, atol=0)
    torch.testing.assert_close(chunked[1], full[1], rtol=0, atol=0)


@pytest.mark.parametrize("params", [dict(temperature=0.8, top_p=0.9, top_k=20), dict(temperature=0.0)])
def test_hf_engine_logprobs_per_step_are_those_of_the_stacked_scores(model, tiny_tokenizer, params):
    """The engine takes log-probs one generation step at a time instead of from one stacked
    [B, steps, V] copy of the scores: the same numbers, bit for bit."""
    from rl.engines import HFEngine, SamplingParams

    engine = HFEngine(model, tiny_tokenizer)
    prompts = [[5, 9, 11], [7], [3, 4, 5, 6, 7, 8]]
    sp = SamplingParams(max_new_tokens=6, **params)
    torch.manual_seed(11)
    gens = engine.generate(prompts, sp)
    # the old computation, on a generate call with the same inputs and seed
    ids = torch.full((3, 6), engine.pad_id)
    mask = torch.zeros((3, 6), dtype=torch.long)
    for j, p in enumerate(prompts):
        ids[j, 6 - len(p):], mask[j, 6 - len(p):] = torch.tensor(p), 1
    torch.manual_seed(11)
    model.eval()
    res = model.generate(input_ids=ids, attention_mask=mask, **engine._generate_kwargs(sp))
    model.train()
    new = res.sequences[:, 6:]
    old = torch.log_softmax(torch.stack(res.scores, 1).float(), -1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
    for j, g in enumerate(gens):
        assert g.token_ids == new[j, : len(g.token_ids)].tolist()
        assert g.logprobs == old[j, : len(g.token_ids)].tolist()


def test_host_memory_helpers_are_safe_to_call_repeatedly():
    # glibc here (Linux CI): the mmap threshold is set; elsewhere they are no-ops
    assert F.limit_heap_fragmentation() == F.limit_heap_fragmentation()
    F.release_memory()
    F.release_memory()


def test_update_runs_the_policy_in_training_mode_so_gradient_checkpointing_applies(tiny_model_dir, tmp_path,
                                                                                     monkeypatch):
    """from_pretrained returns eval mode, in which transformers skips layer checkpointing: the update
    must switch the policy to training mode, or model.gradient_checkpointing does nothing."""
    import rl.update as U
    from rl.config import config_from_dict
    from rl.trainer import train
    from tiny import arithmetic_recipe

    seen = []
    step = U._policy_micro_step

    def spy(run, mb, *args, **kwargs):
        seen.append((run.policy.training, run.unwrapped.is_gradient_checkpointing))
        return step(run, mb, *args, **kwargs)

    monkeypatch.setattr(U, "_policy_micro_step", spy)
    train(config_from_dict(arithmetic_recipe(tiny_model_dir, tmp_path, steps=1, eval_before_training=False,
                                             model__gradient_checkpointing=True)))
    assert seen and all(training and checkpointing for training, checkpointing in seen)

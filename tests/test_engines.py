"""The HF rollout engine: ids, finish reasons, stop strings, and log-probs that agree
with a teacher-forced forward pass of the trainer on the same tokens."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer

from agents.single_turn import render_prompt, single_turn
from rl.engines import HFEngine, SamplingParams
from rl.engines.hf import _first_stop
from rl.forward import forward_logprobs
from rl.packing import make_micro_batch, scatter_rows


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return model, tok


def teacher_forced(model, trajs, temperature):
    """Trainer log-probs of every response token, in trajectory order."""
    mb = make_micro_batch(trajs, list(range(len(trajs))), True, 0)
    logp, _ = forward_logprobs(model, mb, temperature, False)
    T = max(len(t.response_ids) for t in trajs)
    full = scatter_rows(logp, mb, len(trajs), T)
    return torch.cat([full[i, : len(t.response_ids)] for i, t in enumerate(trajs)])


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lengths=st.lists(st.integers(1, 12), min_size=1, max_size=5),
    temperature=st.sampled_from([0.6, 1.0, 1.7]),
    seed=st.integers(0, 1000),
)
def test_logprobs_match_teacher_forcing_under_left_padding(tiny, lengths, temperature, seed):
    model, tok = tiny
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, len(tok), (n,), generator=g).tolist() for n in lengths]
    torch.manual_seed(seed)
    gens = HFEngine(model, tok).generate(prompts, SamplingParams(max_new_tokens=7, temperature=temperature))
    from rl.trajectory import Trajectory

    trajs = [Trajectory(p, x.token_ids, [1] * len(x.token_ids), x.logprobs, i, {}) for i, (p, x) in enumerate(zip(prompts, gens))]
    engine_logp = torch.tensor([lp for x in gens for lp in x.logprobs])
    torch.testing.assert_close(engine_logp, teacher_forced(model, trajs, temperature), rtol=1e-4, atol=2e-4)
    for x in gens:
        assert 1 <= len(x.token_ids) <= 7
        assert x.finish_reason in ("eos", "length")
        assert (x.finish_reason == "eos") == (x.token_ids[-1] == tok.eos_token_id)
        assert tok.eos_token_id not in x.token_ids[:-1]  # nothing after the first eos survives


def test_greedy_is_deterministic_and_matches_argmax(tiny):
    model, tok = tiny
    prompt = tok("What is 2 plus 3", add_special_tokens=False)["input_ids"]
    a = HFEngine(model, tok).generate([prompt, prompt[:3]], SamplingParams(max_new_tokens=5, temperature=0))
    b = HFEngine(model, tok).generate([prompt], SamplingParams(max_new_tokens=5, temperature=0))
    assert a[0].token_ids == b[0].token_ids  # batch composition (padding) does not change greedy output
    ids = list(prompt)
    with torch.no_grad():
        for tok_id in a[0].token_ids:
            assert model(torch.tensor([ids])).logits[0, -1].argmax().item() == tok_id
            ids.append(tok_id)


def test_stop_strings_cut_at_the_first_occurrence(tiny):
    model, tok = tiny
    prompt = tok("search the answer", add_special_tokens=False)["input_ids"]
    torch.manual_seed(0)
    free = HFEngine(model, tok).generate([prompt] * 4, SamplingParams(max_new_tokens=20, temperature=1.0))
    # use a piece of text the model actually produced as the stop string
    text = tok.decode(free[0].token_ids)
    stop = text[3:5] if len(text) >= 5 else text
    torch.manual_seed(0)
    gens = HFEngine(model, tok).generate([prompt] * 4, SamplingParams(max_new_tokens=20, temperature=1.0, stop=[stop]))
    assert gens[0].finish_reason == "stop" and gens[0].stop_string == stop
    decoded = tok.decode(gens[0].token_ids)
    assert stop in decoded and stop not in tok.decode(gens[0].token_ids[:-1])


def test_first_stop_bisection():
    text = "abc</search>def</answer>"
    assert _first_stop(lambda k: text[:k], len(text), ["</answer>", "</search>"]) == (12, "</search>")
    assert _first_stop(lambda k: text[:k], len(text), ["nope"]) is None


def test_empty_prompt_is_a_clear_error(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="empty prompt"):
        HFEngine(model, tok).generate([[]], SamplingParams())


@pytest.mark.slow
def test_smollm2_rollout_ids_masks_logprobs_agree_with_teacher_forcing(smollm2_dir):
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    rows = [
        {"messages": [{"role": "user", "content": "What is 12 + 7?"}]},
        {"messages": [{"role": "user", "content": "Name a primary colour."}]},
    ]
    torch.manual_seed(0)
    trajs = single_turn(
        HFEngine(model, tok), tok, rows, prompt_builder=lambda r: r["messages"],
        params=SamplingParams(max_new_tokens=12, temperature=0.8), group_size=2,
    )
    assert [t.group_id for t in trajs] == [0, 0, 1, 1]
    for t, row in zip(trajs, [rows[0], rows[0], rows[1], rows[1]]):
        # the prompt ids are exactly the chat template's rendering
        assert t.prompt_ids == render_prompt(tok, row["messages"])
        assert tok.decode(t.prompt_ids).endswith("<|im_start|>assistant\n")
        assert t.loss_mask == [1] * len(t.response_ids)
        assert t.response_text == tok.decode(t.response_ids, skip_special_tokens=True)
    engine_logp = torch.tensor([lp for t in trajs for lp in t.rollout_logprobs])
    torch.testing.assert_close(engine_logp, teacher_forced(model, trajs, 0.8), rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------- the package: registry, base class


def test_a_users_module_class_engine_runs_from_a_recipe(tiny_model_dir, tmp_path):
    import helpers_engines
    from test_trainer import recipe

    from rl.config import config_from_dict
    from rl.trainer import train

    helpers_engines.CALLS.clear()
    helpers_engines.BUILT.clear()
    cfg = recipe(tiny_model_dir, tmp_path, steps=1, eval_before_training=False, data__eval="",
                 rollout__engine="helpers_engines:CountingEngine", rollout__engine_kwargs={"tag": "mine"})
    result = train(config_from_dict(cfg))
    assert [h["step"] for h in result["history"] if "reward/mean" in h] == [1]
    calls = helpers_engines.CALLS
    assert helpers_engines.BUILT == [{"tag": "mine"}]  # engine_kwargs reach the user's constructor
    assert calls["generate"] >= 1 and calls["prompts"] == 2 * 4  # prompts_per_step x group_size
    assert calls["update_weights"] == 1 and calls["close"] == 1
    assert calls["wake"] >= 1 and calls["sleep"] >= 1


def test_unknown_engine_lists_the_registered_ones(tiny):
    from rl.engines import ENGINES, build_engine

    model, tok = tiny
    with pytest.raises(ValueError, match=r"unknown rollout engine 'hff'; registered: \[") as e:
        build_engine("hff", model, tok, 4)
    # other tests may have registered engines of their own: the built-in ones are listed
    assert all(f"'{name}'" in str(e.value) for name in ("hf", "vllm", "vllm_server"))
    with pytest.raises(ValueError, match="cannot import module 'no_such_module'"):
        build_engine("no_such_module:Engine", model, tok, 4)
    with pytest.raises(TypeError, match=r"lacks \['close', 'session', 'sleep', 'update_weights', 'wake'\].*BaseEngine"):
        build_engine("helpers_engines:NotAnEngine", model, tok, 4)
    assert isinstance(build_engine("hf", model, tok, 4), HFEngine)
    assert {"hf", "vllm", "vllm_server"} <= set(ENGINES.names())


def test_base_engine_defaults_do_nothing_and_the_rest_must_be_implemented():
    from rl.engines import BaseEngine, RolloutEngine

    class Minimal(BaseEngine):
        pass

    engine = Minimal()
    assert isinstance(engine, RolloutEngine)
    before = dict(vars(engine))
    assert engine.sleep() is None and engine.wake() is None and engine.close() is None
    with engine.session() as inside:
        assert inside is engine
    assert vars(engine) == before  # nothing was set, allocated or released
    with pytest.raises(NotImplementedError, match="Minimal must implement generate"):
        engine.generate([[1]], SamplingParams())
    with pytest.raises(NotImplementedError, match="Minimal must implement update_weights"):
        engine.update_weights(torch.nn.Linear(1, 1))


def test_engines_import_without_vllm_and_without_a_circle():
    import subprocess
    import sys
    from pathlib import Path

    code = """
import sys
import rl.weights
assert not any(m == "rl.engines" or m.startswith("rl.engines.") for m in sys.modules), "rl.weights imports engines"
import rl.engines
assert not {"rl.engines.vllm_colocate", "rl.engines.vllm_server"} & set(sys.modules), "vLLM engines imported eagerly"
import rl.engines.vllm_colocate, rl.engines.vllm_server
assert not any(m == "vllm" or m.startswith("vllm.") for m in sys.modules), "vllm imported"
"""
    res = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]

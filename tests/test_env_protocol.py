"""The environment protocol (agents/environment.py) and the generic `multi_turn` agent, proved with a toy
paper (tests/toy_env.py) that only uses the protocol and registers itself: scripted episodes, the loss-mask
contract on the tiny model, 2 trainer steps with `plugins: [toy_env]`, and `python -m eval.run` on it
(and on the single-turn arithmetic recipe, with the `rewards` metric set)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_multi_turn import R, ScriptedEngine, chat

import toy_env
from agents.environment import Environment, Prompt, StepResult
from agents.multi_turn import LOOP_DEFAULTS, loop_options, multi_turn, tokenize_env_text
from eval import run as eval_run
from rl.engines import BaseEngine, SamplingParams
from rl.registry import AGENTS, ENVIRONMENTS, METRICS

REPO = Path(__file__).resolve().parents[1]
PARAMS = SamplingParams(max_new_tokens=16)
ROWS = [{"secret": 5, "low": 1, "high": 8}, {"secret": 3, "low": 1, "high": 8}]


def runs(ids, mask):
    """(mask value, ids) runs of a response, in order."""
    out = []
    for t, m in zip(ids, mask):
        if out and out[-1][0] == m:
            out[-1][1].append(t)
        else:
            out.append((m, [t]))
    return out


def toy_prompt(tok, row):
    return chat(tok, toy_env.question(row["low"], row["high"]))


# ----------------------------------------------------------------------------- scripted episodes


@pytest.mark.parametrize("structured", [False, True])
def test_toy_episodes_masks_groups_and_info(tiny_tokenizer, structured):
    tok = tiny_tokenizer
    g = lambda n: R(f"<guess> {n} </guess>")  # noqa: E731
    scripts = [
        [g(3), g(5)],  # row 0 (secret 5): higher, solved
        [R("hmm", finish="length"), g(7), g(6), g(5)],  # invalid, lower, lower, (final turn) solved
        [g(3)],  # row 1 (secret 3): solved at once
        [R("no idea", finish="eos")],  # eos without an action: ends the episode, nothing appended
    ]
    prompts = [toy_prompt(tok, r) for r in ROWS for _ in range(2)]
    eng = ScriptedEngine(tok, prompts, scripts)
    trajs = multi_turn(eng, tok, ROWS, params=PARAMS, group_size=2, first_group_id=7, env="toy_guess",
                       env_kwargs={"structured": structured}, final_answer_turn=True)  # fmt: skip
    assert [t.group_id for t in trajs] == [7, 7, 8, 8] and [t.row for t in trajs] == [ROWS[0]] * 2 + [ROWS[1]] * 2
    assert all(t.prompt_ids == p for t, p in zip(trajs, prompts))
    assert all(set(c[1].stop) >= {"</guess>"} for c in eng.calls)  # the environment's stop strings
    env_text = {
        0: ["\nhigher\n"],
        1: [toy_env.INVALID, "\nlower\n", ["\nlower\n", toy_env.LAST_CHANCE]],
        2: [],
        3: [],
    }
    for k, t in enumerate(trajs):
        pieces = runs(t.response_ids, t.loss_mask)
        model = [ids for m, ids in pieces if m == 1]
        env = [ids for m, ids in pieces if m == 0]
        # policy tokens: exactly the engine's ids (mask 1, their log-probs); env tokens: mask 0, log-prob 0
        assert model == [gen.token_ids for gen in eng.generations[k]]
        assert [lp for lp, m in zip(t.rollout_logprobs, t.loss_mask) if m] == [
            x for gen in eng.generations[k] for x in gen.logprobs
        ]
        assert all(lp == 0.0 for lp, m in zip(t.rollout_logprobs, t.loss_mask) if not m)
        want = [sum((tokenize_env_text(tok, x) for x in (e if isinstance(e, list) else [e])), []) for e in env_text[k]]
        assert env == want
        assert t.info["model_tokens"] == sum(t.loss_mask) and t.info["env_tokens"] == len(t.loss_mask) - sum(t.loss_mask)
    a, b, c, d = (t.info for t in trajs)
    assert a["solved"] and a["guesses"] == 2 and a["termination"] == "solved" and a["turns"] == 2
    assert b["solved"] and b["turns"] == 4 and b["invalid_actions"] == 1 and b["valid_actions"] == 3
    assert b["actions"] == {"invalid": 1, "guess": 3} and b["last_guess"] == 5
    assert c["solved"] and c["turns"] == 1
    assert not d["solved"] and d["termination"] == "eos" and d["invalid_actions"] == 1
    assert trajs[0].response_text.endswith("<guess> 5 </guess>")


def test_structured_observation_ids_are_appended_as_is_and_truncated(tiny_tokenizer):
    tok = tiny_tokenizer

    class Ids(Environment):
        def step(self, turns):
            return [StepResult(observation_ids=[7, 8, 9], observation_suffix="!") for _ in turns]

    eng = ScriptedEngine(tok, [chat(tok, "q")], [[R("a"), R("b")]])
    (t,) = multi_turn(eng, tok, [{"messages": [{"role": "user", "content": "q"}]}], prompt_builder=lambda r: r["messages"],
                      params=PARAMS, env=Ids, max_turns=2, max_obs_tokens=2)  # fmt: skip
    env = [ids for m, ids in runs(t.response_ids, t.loss_mask) if m == 0]
    assert env == [[7, 8] + tokenize_env_text(tok, "!")] and t.info["obs_truncated"] == 1
    assert t.info["termination"] == "max_turns"


def test_prompts_from_the_builder_or_as_ids(tiny_tokenizer):
    tok = tiny_tokenizer
    rows = [{**r, "messages": [{"role": "user", "content": f"custom {r['secret']}"}]} for r in ROWS]
    eng = ScriptedEngine(tok, [chat(tok, "custom 5"), chat(tok, "custom 3")],
                         [[R("<guess> 5 </guess>")], [R("<guess> 4 </guess>"), R("<guess> 3 </guess>")]])
    trajs = AGENTS.get("multi_turn")(eng, tok, rows, prompt_builder=lambda r: r["messages"], params=PARAMS,
                                     group_size=1, env="toy_env:GuessEnv", env_kwargs={"use_prompt_builder": True})
    assert [t.prompt_ids for t in trajs] == [chat(tok, "custom 5"), chat(tok, "custom 3")]
    assert [t.info["solved"] for t in trajs] == [True, True] and [t.info["guesses"] for t in trajs] == [1, 2]

    class AsIds(toy_env.GuessEnv):
        def reset(self, rows):
            super().reset(rows)
            return [Prompt(prompt_ids=[1, 2, 3]) for _ in rows]

    eng = ScriptedEngine(tok, [[1, 2, 3]], [[R("<guess> 5 </guess>")]])
    (t,) = multi_turn(eng, tok, ROWS[:1], params=PARAMS, env=AsIds)
    assert t.prompt_ids == [1, 2, 3] and t.info["solved"]
    with pytest.raises(ValueError, match="no prompt_builder"):
        multi_turn(eng, tok, rows, params=PARAMS, env="toy_guess", env_kwargs={"use_prompt_builder": True})


def test_protocol_errors_are_clear(tiny_tokenizer):
    tok = tiny_tokenizer

    from PIL import Image

    from rl.multimodal import ImageError

    class ImagePrompt(Environment):  # images for a text policy (the tiny tokenizer has no processor)
        def reset(self, rows):
            return [Prompt(messages=[{"role": "user", "content": "q"}], images=[Image.new("RGB", (8, 8))])
                    for _ in rows]

    class ImageObs(Environment):
        def reset(self, rows):
            return [[{"role": "user", "content": "q"}] for _ in rows]

        def step(self, turns):
            return [StepResult(images=["screen"]) for _ in turns]

    eng = ScriptedEngine(tok, [chat(tok, "q")], [[R("a"), R("b")]])
    with pytest.raises(ImageError, match="text model"):
        multi_turn(eng, tok, [{}], params=PARAMS, env=ImagePrompt)
    with pytest.raises(ValueError, match="come as a chat turn"):  # image observations need a message
        multi_turn(eng, tok, [{}], params=PARAMS, env=ImageObs, max_turns=2)
    with pytest.raises(ValueError, match=r"unknown environment 'nope'.*toy_guess"):
        multi_turn(eng, tok, [{}], params=PARAMS, env="nope")
    with pytest.raises(ValueError, match="rollout.agent_kwargs.env"):
        multi_turn(eng, tok, [{}], params=PARAMS)
    with pytest.raises(TypeError, match="unexpected keyword"):
        multi_turn(eng, tok, [{}], params=PARAMS, env="toy_guess", max_turn=2)


def test_loop_option_defaults():
    assert loop_options(Environment, {}) == LOOP_DEFAULTS
    opts = loop_options(toy_env.GuessEnv, {"max_turns": 5})
    assert opts["max_turns"] == 5 and opts["max_obs_tokens"] == 64 and opts["final_answer_turn"] is False
    resolved = multi_turn.resolved_kwargs({"env": "toy_guess", "max_response_tokens": 64})
    assert resolved["max_turns"] == 3 and resolved["max_response_tokens"] == 64 and resolved["env"] == "toy_guess"

    class Bad(Environment):
        loop_defaults = {"max_turn": 2}

    with pytest.raises(ValueError, match="max_turn"):
        loop_options(Bad, {})


# ----------------------------------------------------------------------------- the tiny model


class RecordingEngine(BaseEngine):
    """Forwards to an engine and records every (sequence, generation) pair."""

    def __init__(self, engine):
        self.engine, self.seen = engine, []

    def generate(self, prompts, params):
        gens = self.engine.generate(prompts, params)
        self.seen += [(list(p), g) for p, g in zip(prompts, gens)]
        return gens

    def update_weights(self, model):
        self.engine.update_weights(model)

    def session(self):
        return self.engine.session()


def test_loss_mask_contract_on_the_tiny_model(tiny_model_dir):
    """Every policy token is an engine token at the position the engine produced it (mask 1); every other
    response token was inserted by the environment (mask 0)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rl.engines import HFEngine

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    eng = RecordingEngine(HFEngine(model, tok, batch_size=4))
    rows = [{"secret": s, "low": 1, "high": h} for s, h in ((2, 3), (5, 9), (7, 7), (1, 12))]  # distinct prompts
    params = SamplingParams(max_new_tokens=6, temperature=1.0)
    for structured in (False, True):
        trajs = multi_turn(eng, tok, rows, params=params, env="toy_guess", env_kwargs={"structured": structured},
                           max_turns=3, final_answer_turn=True)  # fmt: skip
        for t in trajs:
            full, p = t.prompt_ids + t.response_ids, len(t.prompt_ids)
            mine = [(s, g) for s, g in eng.seen if s[:p] == t.prompt_ids and full[: len(s)] == s]
            assert len(mine) == t.info["turns"] >= 1
            policy = set()
            for s, g in mine:
                assert full[len(s) : len(s) + len(g.token_ids)] == list(g.token_ids)
                assert t.rollout_logprobs[len(s) - p : len(s) - p + len(g.token_ids)] == list(g.logprobs)
                policy |= set(range(len(s) - p, len(s) - p + len(g.token_ids)))
            assert t.loss_mask == [int(j in policy) for j in range(len(t.response_ids))]
        eng.seen.clear()
    assert any(0 in t.loss_mask for t in trajs)  # the random model's replies got corrective messages


def toy_recipe(model_dir: str, out: Path, **extra) -> dict:
    return {
        "plugins": ["toy_env"],
        "model": {"name_or_path": model_dir},
        "data": {"train": "toy_numbers", "train_kwargs": {"n_train": 8, "n_test": 4},
                 "eval": "toy_numbers", "eval_kwargs": {"n_train": 8, "n_test": 4},
                 "prompt_builder": "messages", "required_columns": ["secret", "low", "high"]},
        "rollout": {"agent": "multi_turn", "agent_kwargs": {"env": "toy_guess", "max_turns": 2, "final_answer_turn": True},
                    "group_size": 2, "max_new_tokens": 6},
        "rewards": [{"name": "toy_solved"}],
        "algorithm": {"name": "grpo"},
        "optim": {"lr": 1e-2},
        "steps": 2,
        "prompts_per_step": 2,
        "micro_batch_tokens": 512,
        "output_dir": str(out),
        "seed": 3,
        **extra,
    }  # fmt: skip


def test_two_trainer_steps_with_the_toy_plugin(tiny_model_dir, tmp_path, recorded_trajectories):
    from rl.config import config_from_dict
    from rl.trainer import train

    seen = recorded_trajectories
    result = train(config_from_dict(toy_recipe(tiny_model_dir, tmp_path / "run", eval_before_training=False), "toy"))
    steps = [h for h in result["history"] if "reward/mean" in h]
    assert [h["step"] for h in steps] == [1, 2]
    assert all(h["nan_skipped_steps"] == 0 and "reward/toy_solved" in h for h in steps)
    assert "eval/toy_solved" in result["eval_after"]
    train_trajs = seen[:8]  # 2 steps x 2 prompts x G=2, then the 4 eval prompts
    for k in range(0, 8, 2):  # the G copies of a prompt: one group id, one prompt, one row
        a, b = train_trajs[k : k + 2]
        assert a.group_id == b.group_id and a.prompt_ids == b.prompt_ids and a.row is b.row
    assert len({t.group_id for t in train_trajs}) == 4 and len(seen) == 12
    assert all("solved" in t.info and t.info["termination"] in ("solved", "eos", "max_turns") for t in seen)


# ----------------------------------------------------------------------------- eval.run on any recipe


def test_eval_run_on_the_toy_recipe(tiny_model_dir, tmp_path, capsys):
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(yaml.safe_dump(toy_recipe(tiny_model_dir, tmp_path / "run")))
    out = tmp_path / "lb"
    argv = ["--recipe", str(recipe), "--model", f"tiny={tiny_model_dir}", "--model", tiny_model_dir,
            "--limit", "3", "--out", str(out), "--agent-kwarg", "max_turns=1"]  # fmt: skip
    assert eval_run.main(argv) == 0
    md = (out / "leaderboard.md").read_text()
    assert md.startswith("# Guess-the-number leaderboard\n") and "| model | dataset | n | solved | guesses | invalid |" in md
    summary = json.loads((out / "leaderboard.json").read_text())
    assert summary["metrics"] == ["n", "solved", "avg_guesses", "avg_invalid"]
    assert summary["settings"]["env"] == "toy_guess" and summary["settings"]["max_turns"] == 1
    assert summary["settings"]["max_obs_tokens"] == 64  # the environment's loop default, resolved
    assert summary["settings"]["metrics"] == "toy_guess" and summary["data"] == {"eval": "toy_numbers"}
    for label, res in summary["results"].items():
        preds = [json.loads(x) for x in (out / res["datasets"]["eval"]["predictions"]).read_text().splitlines()]
        assert len(preds) == 3 and all(p["turns"] == 2 for p in preds)  # max_turns 1 + the final answer-only turn
        assert res["datasets"]["eval"]["solved"] == pytest.approx(sum(p["solved"] for p in preds) / 3)
    assert len(summary["results"]) == 2
    capsys.readouterr()
    # the metric set can be chosen: reward means of the recipe's rewards
    assert eval_run.main([*argv[:-2], "--metrics", "rewards", "--overwrite"]) == 0
    md = (out / "leaderboard.md").read_text()
    assert "| model | dataset | n | reward | toy_solved | avg_response_tokens | avg_model_tokens |" in md


def test_eval_run_on_the_arithmetic_recipe(tiny_model_dir, tmp_path):
    out = tmp_path / "lb"
    argv = ["--recipe", str(REPO / "recipes" / "arithmetic_grpo.yaml"), "--model", f"tiny={tiny_model_dir}",
            "--limit", "4", "--max-new-tokens", "4", "--batch-size", "3", "--out", str(out)]  # fmt: skip
    assert eval_run.main(argv) == 0
    summary = json.loads((out / "leaderboard.json").read_text())
    assert summary["settings"]["agent"] == "single_turn" and summary["settings"]["metrics"] == "rewards"
    m = summary["results"]["tiny"]["datasets"]["eval"]
    preds = [json.loads(x) for x in (out / m["predictions"]).read_text().splitlines()]
    assert m["n"] == 4 and len(preds) == 4
    assert m["final_number"] == pytest.approx(sum(p["rewards"]["final_number"] for p in preds) / 4)
    assert all(p["row"]["question"].startswith("What is") and p["model_tokens"] <= 4 for p in preds)
    assert "| tiny | eval | 4 |" in (out / "leaderboard.md").read_text()
    assert METRICS.get("rewards").title in (out / "leaderboard.md").read_text()
    assert ENVIRONMENTS.get("toy_guess") is toy_env.GuessEnv

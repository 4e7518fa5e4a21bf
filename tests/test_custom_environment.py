"""docs/custom_environment.md is a test: the files its code blocks show are the real files, the environment,
reward and dataset behave as the page says (hand-made cases, scripted episodes checked token by token
against the chat template), and the page's command trains its recipe (2 steps on the tiny model)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

from test_multi_turn import R, ScriptedEngine

from agents.multi_turn import multi_turn
from agents.single_turn import render_prompt
from envs.reverse_word import ASK, ReverseWord, feedback, in_place, reverse_word_reward, reverse_words
from rl.engines import SamplingParams
from rl.registry import ENVIRONMENTS

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "custom_environment.md"
# a file on the page: the line "File `path`:", a blank line, then a fenced block holding the whole file
_FILE_BLOCK = re.compile(r"^File `([^`]+)`:\n\n```[a-z]*\n(.*?)^```$", re.M | re.S)


def page_files() -> dict[str, str]:
    return {path: text for path, text in _FILE_BLOCK.findall(PAGE.read_text())}


def test_the_page_shows_the_real_files():
    files = page_files()
    assert sorted(files) == ["envs/reverse_word.py", "recipes/reverse_word.yaml"]
    for path, text in files.items():
        assert text == (REPO / path).read_text(), f"docs/custom_environment.md: the block of {path} is not the file"
    page = PAGE.read_text()
    assert "python -m rl.train recipes/reverse_word.yaml" in page
    assert "output_dir: outputs/reverse_word" in files["recipes/reverse_word.yaml"]


def test_feedback_and_reward_on_hand_made_cases():
    assert feedback("elppa", "apple") is None
    assert feedback("elpa", "apple") == "Not quite: the reversed word has 5 letters. Try again."
    assert feedback("elxpa", "apple") == "Not quite: letter 3 is wrong. Try again."
    assert feedback("apple", "apple") == "Not quite: letter 1 is wrong. Try again."
    assert in_place("elppa", "apple") == 1.0 and in_place("elxpa", "apple") == 0.8 and in_place("", "apple") == 0.0
    assert in_place("el", "apple") == 0.4  # letters in place, whatever the length
    row = {"word": "apple"}
    reward = lambda **info: reverse_word_reward(row, SimpleNamespace(info=info))  # noqa: E731
    assert reward(solved=True, in_place=1.0) == 1.0
    assert reward(solved=False, in_place=0.8) == 0.4  # half credit for the letters in place
    assert reward(solved=False, in_place=0.0) == 0.0


def test_dataset_splits_are_disjoint_and_seeded():
    ds = reverse_words(n_train=40, n_test=10)
    assert ds["train"].column_names == ["word", "messages"] and len(ds["train"]) == 40 and len(ds["test"]) == 10
    assert not set(ds["train"]["word"]) & set(ds["test"]["word"])
    assert ds["test"][0]["messages"] == [{"role": "user", "content": ASK.format(ds["test"][0]["word"])}]
    assert reverse_words(n_train=40, n_test=10)["train"]["word"] == ds["train"]["word"]


def test_scripted_episodes_token_by_token(tiny_tokenizer):
    """A wrong attempt gets the feedback as a user turn; the ids are the template's rendering of the
    conversation, tokenised in one go; the policy's tokens alone have mask 1."""
    tok = tiny_tokenizer
    rows = [{"word": w, "messages": [{"role": "user", "content": ASK.format(w)}]} for w in ("apple", "tiger")]
    prompts = [render_prompt(tok, r["messages"]) for r in rows]
    scripts = [
        [R("It is elxpa", finish="eos"), R("elppa", finish="eos")],  # letter 3 wrong, then solved
        [R("no idea", finish="eos"), R("regi", finish="length"), R("tigre", finish="eos")],  # never solved
    ]
    eng = ScriptedEngine(tok, prompts, scripts)
    trajs = multi_turn(eng, tok, rows, prompt_builder=lambda r: r["messages"], params=SamplingParams(max_new_tokens=16),
                       env="reverse_word")  # fmt: skip
    a, b = trajs
    assert a.info["solved"] and a.info["attempts"] == 2 and a.info["termination"] == "solved"
    assert not b.info["solved"] and b.info["attempts"] == 3 and b.info["termination"] == "max_turns"
    assert b.info["in_place"] == in_place("tigre", "tiger") and b.info["valid_actions"] == 3
    assert [reverse_word_reward(t.row, t) for t in trajs] == [1.0, 0.5 * in_place("tigre", "tiger")]
    convos = [
        rows[0]["messages"] + [{"role": "assistant", "content": "It is elxpa"},
                               {"role": "user", "content": "Not quite: letter 3 is wrong. Try again."},
                               {"role": "assistant", "content": "elppa"}],
        rows[1]["messages"] + [{"role": "assistant", "content": "no idea"},
                               {"role": "user", "content": "Not quite: the reversed word has 5 letters. Try again."},
                               {"role": "assistant", "content": "regi"},
                               {"role": "user", "content": "Not quite: the reversed word has 5 letters. Try again."},
                               {"role": "assistant", "content": "tigre"}],
    ]  # fmt: skip
    for k, (t, convo) in enumerate(zip(trajs, convos)):
        one_go = tok.apply_chat_template(convo, tokenize=True, return_dict=False)
        assert t.prompt_ids + t.response_ids + tok("\n", add_special_tokens=False)["input_ids"] == one_go
        policy = [x for g in eng.generations[k] for x in g.token_ids]
        assert [x for x, m in zip(t.response_ids, t.loss_mask) if m] == policy
        assert sum(t.loss_mask) == len(policy) == t.info["model_tokens"]


def test_the_page_command_trains_the_recipe_on_the_tiny_model(tiny_model_dir, tmp_path, recorded_trajectories,
                                                                capsys):
    from transformers import AutoTokenizer

    from rl.train import main

    out = tmp_path / "run"
    argv = [str(REPO / "recipes" / "reverse_word.yaml"), f"model.name_or_path={tiny_model_dir}", f"output_dir={out}",
            "steps=2", "data.eval_size=2"]  # fmt: skip
    assert main(argv) == 0
    assert "done: " in capsys.readouterr().out
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [h for h in history if "reward/mean" in h]
    assert [h["step"] for h in steps] == [1, 2] and all("reward/reverse_word" in h for h in steps)
    assert any("eval/reverse_word" in h for h in history)
    assert ENVIRONMENTS.get("reverse_word") is ReverseWord
    seen = recorded_trajectories
    assert len(seen) == 2 + 2 * 2 * 4 + 2  # eval before, 2 steps x 2 prompts x G=4, eval after
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    for t in seen:
        assert 1 <= t.info["attempts"] == t.info["turns"] <= 3 and t.info["termination"] in ("solved", "max_turns")
        assert t.reward == reverse_word_reward(t.row, t)
        env = [x for x, m in zip(t.response_ids, t.loss_mask) if not m]
        # the feedback came as user turns, with the template's real special tokens (2 per turn: close + open)
        assert env.count(im_start) == 2 * (t.info["turns"] - 1) and ("Not quite" in tok.decode(env)) == bool(env)
    assert any(t.info["turns"] > 1 for t in seen)  # the random tiny model got feedback

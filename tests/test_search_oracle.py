"""envs/search/oracle.py: oracle warm-start episodes are RL-loop renderings with exact loss masks."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from envs.search.env import FINAL_TURN_TEXT
from envs.search.oracle import generate_oracle_trajectories, main, oracle_queries
from rl.common import read_jsonl
from test_search_agent import DOCS, search_kwargs, write_corpus

ROWS = [
    {"id": "a", "question": "What is the capital of France?", "golden_answers": ["Paris"]},
    {
        "id": "b",
        "question": 'Who is described as "largest city of Germany"?',
        "golden_answers": ["Berlin"],
        "metadata": {"qtype": "desc2title", "titles": ["Berlin"]},
    },
    {
        "id": "c",
        "question": 'In the Wikipedia article "Jupiter", which name fills the blank: "Jupiter is the largest ____."?',
        "golden_answers": ["planet"],
        "metadata": {"qtype": "cloze", "titles": ["Jupiter"]},
    },
    {  # the answer is nowhere in the corpus: an ungrounded two-hop episode
        "id": "d",
        "question": 'The Wikipedia article on Mona Lisa mentions something described as "Italian painter". What is it?',
        "golden_answers": ["Leonardo da Vinci"],
        "metadata": {"qtype": "bridge", "titles": ["Mona Lisa", "Leonardo da Vinci"]},
    },
]
KW = {"template": "fast", "topk": 1, "max_turns": 2, "max_obs_tokens": 64}  # flat: see search_kwargs


def runs(ids, mask, value):
    out, cur = [], []
    for t, m in zip(ids, mask):
        if m == value:
            cur.append(t)
        elif cur:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


def test_oracle_queries():
    assert oracle_queries(ROWS[0]) == [ROWS[0]["question"]]  # no metadata: the question itself
    assert oracle_queries(ROWS[1]) == ["largest city of Germany"]
    assert oracle_queries(ROWS[2]) == ["Jupiter"]
    bridge = {"question": 'The Wikipedia article on X mentions something described as "Y z". What is it?',
              "metadata": {"qtype": "bridge", "titles": ["X", "W"]}}  # fmt: skip
    assert oracle_queries(bridge) == ["X", "Y z"]


def test_oracle_episodes_masks_and_grounding(tiny_tokenizer, tmp_path):
    corpus = str(write_corpus(tmp_path / "c.jsonl"))
    rows, counts = generate_oracle_trajectories(
        tiny_tokenizer, ROWS, search_kwargs(**KW, retriever=corpus), keep_ungrounded=True, progress=False
    )
    assert counts == {"episodes": 4, "grounded": 3, "answered": 4, "kept": 4}
    by_id = {r["id"]: r for r in rows}
    assert [by_id[k]["grounded"] for k in "abcd"] == [True, True, True, False]
    for r in rows:
        ids, mask = r["input_ids"], r["completion_mask"]
        assert len(ids) == len(mask) and mask[0] == 0
        model = [tiny_tokenizer.decode(p) for p in runs(ids, mask, 1)]
        # trained tokens are exactly the oracle's actions: one search, then the gold answer
        assert model[-1] == f"<answer> {r['golden_answers'][0]} </answer>"
        assert all(m.startswith("<search> ") and m.endswith(" </search>") for m in model[:-1])
        env = [tiny_tokenizer.decode(p) for p in runs(ids, mask, 0)[1:]]  # after the prompt
        assert all("<information>" in e and "</information>" in e for e in env[: r["searches"]])
    # the ungrounded episode ran both hops, ran out of turns, and answered in the final turn
    d = by_id["d"]
    assert d["searches"] == 2 and FINAL_TURN_TEXT.strip() in d["text"]
    # grounded-only by default
    kept, counts = generate_oracle_trajectories(tiny_tokenizer, ROWS, search_kwargs(**KW, retriever=corpus), progress=False)
    assert [r["id"] for r in kept] == ["a", "b", "c"] and counts["kept"] == 3


def test_slow_template_oracle_thinks_before_every_action(tiny_tokenizer, tmp_path):
    from envs.search.rewards import search_format
    from rl.trajectory import Trajectory

    corpus = str(write_corpus(tmp_path / "c.jsonl"))
    rows, counts = generate_oracle_trajectories(
        tiny_tokenizer, ROWS[:3], search_kwargs(**{**KW, "template": "slow"}, retriever=corpus), progress=False
    )
    assert counts["kept"] == 3
    for r in rows:
        ids, mask = r["input_ids"], r["completion_mask"]
        actions = [tiny_tokenizer.decode(p) for p in runs(ids, mask, 1)]
        assert all(a.startswith("<think> ") and "</think>" in a for a in actions)
        assert actions[-1].endswith(f"<answer> {r['golden_answers'][0]} </answer>")
        # the Search-R1 format-aware reward (think required under the Slow template) gives full marks
        start = mask.index(1)
        traj = Trajectory(ids[:start], ids[start:], mask[start:], [0.0] * (len(ids) - start), 0, r,
                          response_text=tiny_tokenizer.decode(ids[start:]), info={"template": "slow"})
        assert search_format(r, traj) == 1.0


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, len(DOCS) - 1), st.sampled_from([8, 16, 64]))
def test_oracle_answers_from_the_evidence_it_saw(tiny_tokenizer, tmp_path_factory, doc, max_obs):
    """`grounded` holds exactly when the gold appears in the (truncated) observation the policy read."""
    corpus = str(write_corpus(tmp_path_factory.mktemp("c") / "c.jsonl"))
    title, text = DOCS[doc]
    gold = text.rstrip(".").split()[-1]  # the last word of the passage: cut off by short observations
    row = {"id": "x", "question": f"{title}?", "golden_answers": [gold]}
    (r,), _ = generate_oracle_trajectories(
        tiny_tokenizer, [row], search_kwargs(**{**KW, "max_obs_tokens": max_obs, "max_turns": 1}, retriever=corpus),
        keep_ungrounded=True, progress=False,
    )  # fmt: skip
    seen = " ".join(tiny_tokenizer.decode(p) for p in runs(r["input_ids"], r["completion_mask"], 0)[1:2])
    assert r["grounded"] == (gold.lower() in seen.lower().replace("</information>", ""))


def test_cli_keeps_metadata_and_refuses_overwrite(tiny_model_dir, tmp_path, capsys):
    corpus = write_corpus(tmp_path / "c.jsonl")
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {{name_or_path: {tmp_path / 'sft_output_not_trained_yet'}}}\n"
        f"data: {{train: {data}}}\n"
        "plugins: [envs.search]\n"
        "rollout:\n  agent: multi_turn\n  max_new_tokens: 32\n"
        f"  agent_kwargs: {{env: search, env_kwargs: {{retriever: {corpus}, topk: 1, template: fast}}, max_turns: 2, "
        "max_obs_tokens: 64}\n"
        "rewards: [{name: search_em}]\n"
    )
    out = tmp_path / "o.jsonl"
    # the recipe's model (an SFT output) does not exist yet: the tokenizer comes from --tokenizer
    args = ["--recipe", str(recipe), "--data", str(data), "--out", str(out), "--tokenizer", tiny_model_dir]
    assert main(args) == 0
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    # row b used its metadata: the query was the quoted description, not the question
    assert "<search> largest city of Germany </search>" in rows[1]["text"]
    assert main(args) == 2
    assert "exists" in capsys.readouterr().err

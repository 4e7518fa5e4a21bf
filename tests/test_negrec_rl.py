"""CoNRec RL side (envs/negrec/tasks.py, envs/negrec/rl.py, recipes/negrec_*.yaml): the stage prompt
builders (context windows and caps, SIDs only, never a future item), the future-negative reward against
hand-computed numbers, the Stage-1 SFT rows, the recipes' validation, and a 3-stage Progressive GRPO run
on the tiny model with SID tokens added and generation constrained to valid SIDs."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from envs.negrec import rl as negrec_rl
from envs.negrec.tasks import context_items, sft_rows
from rl.data import DataError

REPO = Path(__file__).resolve().parents[1]
TOKENS = ["<a_0>", "<a_1>", "<b_0>", "<b_1>", "<c_0>", "<c_1>"]
SID = re.compile(r"^(<a_\d+><b_\d+><c_\d+>)$")


def sid(k: int) -> str:
    """Item k's SID: 8 items over 2 x 2 x 2 codes."""
    return f"<a_{k >> 2}><b_{(k >> 1) & 1}><c_{k & 1}>"


ITEMS = [{"item": f"i{k}", "title": f"Movie {k}", "year": "1995" if k % 2 else "", "genres": ["Drama"],
          "text": f"Movie {k}", "sid": sid(k)} for k in range(8)]
# code embeddings with known cosines: cos(i0, i1) = 0.6, cos(i0, i4) = 1/sqrt(2) (i4 not unit length:
# the reward normalises), i2 and i3 orthogonal to i0
EMB = np.array([[1, 0, 0], [0.6, 0.8, 0], [0, 1, 0], [0, 0, 1], [2, 2, 0], [0, 0.6, 0.8], [1, 0, 1], [0, 1, 1]],
               dtype=np.float32)


@pytest.fixture
def table(tmp_path) -> dict:
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps(r) + "\n" for r in ITEMS))
    emb = tmp_path / "sid_embeddings.npy"
    np.save(emb, EMB)
    return {"items": str(items), "embeddings": str(emb)}


def entry(k: int, day: int) -> dict:
    return {"item": f"i{k}", "sid": sid(k), "day": day}


def example(**over) -> dict:
    """A train example: anchor i0 on day 10; negatives on days 1, 2, 8, 9 (i4..i7), positives i1, i2, i3 + more."""
    row = {
        "user": "u1", "split": "train", "anchor_pos": 9, "anchor_day": 10,
        "negatives": [entry(4, 1), entry(5, 2), entry(6, 8), entry(7, 9)],
        "positives": [entry(1, 3), entry(2, 4), entry(3, 5), entry(5, 6), entry(6, 7)],
        "next_negative": "i0", "future_negatives": ["i0"], "future_positives": ["i4"], "gts": ["i1", "i3"],
        "candidates": [f"i{k}" for k in range(8)], "long_tail_user": False,
    }
    row.update(over)
    return row


def reward(table, text: str, row: dict | None = None, **kwargs) -> dict:
    return negrec_rl.negrec_future_negative(row or example(), SimpleNamespace(response_text=text), **table, **kwargs)


# ----------------------------------------------------------------------------- prompt builders


def shown_sids(messages: list[dict]) -> dict[str, list[str]]:
    """The SIDs on each context line of a prompt; asserts every word there is one SID."""
    (msg,) = messages
    assert msg["role"] == "user" and msg["content"].endswith("\nNext disliked item:")
    lines = {}
    for line in msg["content"].splitlines()[:-1]:
        key, _, rest = line.partition(": ")
        words = rest.split()
        assert all(SID.match(w) for w in words), line  # items are SIDs only: no ids, no titles
        lines[key] = words
    return lines


def test_stage_builders_show_their_context_and_nothing_of_the_future():
    row = example()
    recent = shown_sids(negrec_rl.recent_negatives(row))
    assert recent == {"Disliked": [sid(6), sid(7)]}  # days 8 and 9 are within 3 days of day 10; 1 and 2 are not
    full = shown_sids(negrec_rl.negatives(row))
    assert full == {"Disliked": [sid(k) for k in (4, 5, 6, 7)]}  # oldest first
    both = shown_sids(negrec_rl.negatives_positives(row))
    assert both == {"Disliked": [sid(k) for k in (4, 5, 6, 7)], "Liked": [sid(k) for k in (1, 2, 3, 5, 6)]}
    for prompt in (recent, full, both):  # the anchor (i0) and every later item never appear
        assert sid(0) not in sum(prompt.values(), [])
    # the registered names are these functions
    from rl.data import PROMPT_BUILDERS

    assert PROMPT_BUILDERS.get("negrec_recent_negatives")(row) == negrec_rl.recent_negatives(row)
    assert PROMPT_BUILDERS.get("negrec_negatives_positives")(row) == negrec_rl.negatives_positives(row)


def test_builder_caps_and_the_empty_recent_window():
    import functools

    row = example()
    assert context_items(row, "recent", recent_max_items=1) == ([sid(7)], [])
    assert context_items(row, "negatives", max_items=2) == ([sid(6), sid(7)], [])
    assert context_items(row, "negatives_positives", max_items=1, max_positives=2) == ([sid(7)], [sid(5), sid(6)])
    wider = functools.partial(negrec_rl.recent_negatives, recent_days=9)  # partial-able: "module:attr" in a recipe
    assert shown_sids(wider(row)) == {"Disliked": [sid(k) for k in (4, 5, 6, 7)]}
    old = example(anchor_day=30)  # nothing in the last 3 days: the most recent negative is kept
    assert context_items(old, "recent") == ([sid(7)], [])
    assert context_items(old, "recent", recent_min_items=0) == ([], [])
    assert negrec_rl.recent_negatives(old, recent_min_items=0)[0]["content"] == "Disliked: (none)\nNext disliked item:"
    no_sid = example(negatives=[{"item": "i4", "sid": "", "day": 1}])
    with pytest.raises(DataError, match=r"user 'u1', anchor_pos 9\): negative item 'i4' has no 'sid'"):
        negrec_rl.negatives(no_sid)


# ----------------------------------------------------------------------------- the reward


def test_similarity_reward_hand_computed(table):
    # gen i0: cos to gts {i1: 0.6, i3: 0} -> 0.6; to fps {i4} -> 1/sqrt(2)
    out = reward(table, sid(0))
    assert out["valid"] == 1.0 and out["hit"] == 0.0 and out["hit_next"] == 1.0
    assert out["sim_gts"] == pytest.approx(0.6, abs=1e-6)
    assert out["sim_fps"] == pytest.approx(math.sqrt(0.5), abs=1e-6)
    assert out["score"] == pytest.approx(0.6 - 0.5 * math.sqrt(0.5), abs=1e-6)
    assert reward(table, sid(0), gamma=0.0)["score"] == pytest.approx(0.6, abs=1e-6)
    # gen i1 is in gts: cos 1, exact hit
    hit = reward(table, f"  {sid(1)}\n")  # whitespace around the SID is stripped
    assert hit["hit"] == 1.0 and hit["hit_next"] == 0.0
    assert hit["score"] == pytest.approx(1.0 - 0.5 * (0.6 + 0.8) / math.sqrt(2), abs=1e-6)


def test_empty_sets_invalid_sids_and_threshold(table):
    # empty GTS: no positive term; empty FPS: no penalty
    assert reward(table, sid(0), example(gts=[]))["score"] == pytest.approx(-0.5 * math.sqrt(0.5), abs=1e-6)
    assert reward(table, sid(0), example(future_positives=[]))["score"] == pytest.approx(0.6, abs=1e-6)
    assert reward(table, sid(0), example(gts=[], future_positives=[]))["score"] == 0.0
    for text in ("", "garbage", sid(0)[:-5], sid(0) + sid(1), "<a_0><b_0><c_9>"):
        out = reward(table, text, invalid=-2.0)
        assert out == {"score": -2.0, "valid": 0.0, "hit": 0.0, "hit_next": 0.0, "sim_gts": 0.0, "sim_fps": 0.0}
    # threshold: a similarity below it counts 0 (0.6 < 0.65), one at or above it counts
    assert reward(table, sid(0), variant="threshold", threshold=0.65)["score"] == pytest.approx(
        -0.5 * math.sqrt(0.5), abs=1e-6)
    assert reward(table, sid(0), variant="threshold", threshold=0.6)["score"] == pytest.approx(
        0.6 - 0.5 * math.sqrt(0.5), abs=1e-6)
    assert reward(table, sid(0), variant="threshold", threshold=0.8)["score"] == 0.0
    with pytest.raises(KeyError, match="item 'nope' of the example is not in the item table"):
        reward(table, sid(0), example(gts=["nope"]))
    with pytest.raises(ValueError, match="variant 'cosine' is not one of"):
        reward(table, sid(0), variant="cosine")


def test_hit_reward_levels(table):
    def hit(gts, fps=(), gamma=0.0):
        return reward(table, sid(0), example(gts=list(gts), future_positives=list(fps)), variant="hit", gamma=gamma)["score"]

    assert hit(["i0"]) == 1.0  # the full SID
    assert hit(["i1"]) == pytest.approx(0.1)  # <a_0><b_0> shared
    assert hit(["i2", "i3"]) == pytest.approx(0.01)  # <a_0> only
    assert hit(["i4", "i7"]) == 0.0  # another first level
    assert hit(["i4", "i2", "i1"]) == pytest.approx(0.1)  # the best over gts
    assert hit([]) == 0.0
    assert hit(["i0"], ["i1"], gamma=0.5) == pytest.approx(1.0 - 0.05)
    assert hit(["i0"], ["i1"], gamma=0.0) == 1.0


def test_centred_similarity(table):
    # the mean of the raw code embeddings is subtracted before the cosine
    centred = EMB - EMB.mean(0)
    unit = centred / np.linalg.norm(centred, axis=1, keepdims=True)
    expect = max(unit[0] @ unit[1], unit[0] @ unit[3]) - 0.5 * (unit[0] @ unit[4])
    assert reward(table, sid(0), center=True)["score"] == pytest.approx(float(expect), abs=1e-6)
    assert reward(table, sid(0), center=False)["score"] == pytest.approx(0.6 - 0.5 * math.sqrt(0.5), abs=1e-6)


def test_item_table_is_loaded_once_and_checks_its_files(table, tmp_path):
    assert negrec_rl.item_table(table["items"], table["embeddings"]) is negrec_rl.item_table(
        table["items"], table["embeddings"])
    short = tmp_path / "short.npy"
    np.save(short, EMB[:5])
    with pytest.raises(DataError, match=r"short.npy: expected \[8, d\] rows"):
        negrec_rl.ItemTable(table["items"], short)
    dup = tmp_path / "dup.jsonl"
    dup.write_text("".join(json.dumps({**r, "sid": sid(0)}) + "\n" for r in ITEMS))
    with pytest.raises(DataError, match="items and SIDs must be unique"):
        negrec_rl.ItemTable(dup, table["embeddings"])


def test_examples_dataset_subsamples_and_filters(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(example(user=f"u{k % 3}", anchor_pos=k)) + "\n" for k in range(9)))
    assert len(negrec_rl.negrec_examples(str(path))) == 9
    sub = negrec_rl.negrec_examples(str(path), max_rows=4, seed=1)
    assert len(sub) == 4 and sub["anchor_pos"] == sorted(sub["anchor_pos"])
    assert sub["anchor_pos"] == negrec_rl.negrec_examples(str(path), max_rows=4, seed=1)["anchor_pos"]
    assert set(negrec_rl.negrec_examples(str(path), users=["u1"])["user"]) == {"u1"}
    with pytest.raises(DataError, match="no rows of the 1 users given"):
        negrec_rl.negrec_examples(str(path), users=["nobody"])


# ----------------------------------------------------------------------------- Stage-1 SFT rows


def test_sft_rows_translation_and_alignment():
    examples = [example(), example(anchor_pos=10, positives=[entry(1, 3)])]  # the second: too few positives
    rows = sft_rows(ITEMS, examples, tasks=("sid2title", "title2sid", "alignment", "next_negative"), seed=3)
    by_task: dict[str, list[dict]] = {}
    for r in rows:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        by_task.setdefault(r["task"], []).append(r)
    assert len(by_task["sid2title"]) == len(by_task["title2sid"]) == 8
    assert by_task["sid2title"][1]["messages"][0]["content"] == f"Title of {sid(1)}?"
    assert by_task["sid2title"][1]["messages"][1]["content"] == "Movie 1 (1995)"
    assert by_task["sid2title"][2]["messages"][1]["content"] == "Movie 2"  # no year known
    assert by_task["title2sid"][1]["messages"] == [{"role": "user", "content": 'Item ID of "Movie 1 (1995)"?'},
                                                   {"role": "assistant", "content": sid(1)}]
    (align,) = by_task["alignment"]  # the example with one earlier positive is skipped
    prompt, answer = align["messages"][0]["content"], align["messages"][1]["content"]
    assert answer == sid(0)  # the held-out negative: the anchor, which the context does not show
    lines = prompt.splitlines()
    disliked, liked = lines[0].removeprefix("Disliked: ").split(), lines[1].removeprefix("Liked: ").split()
    options = [line.split(". ", 1)[1] for line in lines if re.match(r"^[A-D]\. ", line)]
    assert [line[0] for line in lines if re.match(r"^[A-D]\. ", line)] == ["A", "B", "C", "D"]
    assert len(disliked) == 1 and disliked[0] in {sid(k) for k in (4, 5, 6, 7)}
    positives = {sid(k) for k in (1, 2, 3, 5, 6)}
    assert answer in options and set(options) - {answer} <= positives and len(set(options)) == 4
    assert set(liked) == positives - set(options)  # liked items shown are positives that are not candidates
    assert answer not in disliked + liked
    nxt = by_task["next_negative"][0]  # the stage-(ii) prompt, the anchor's SID
    assert nxt["messages"] == [negrec_rl.negatives(example())[0], {"role": "assistant", "content": sid(0)}]
    assert sft_rows(ITEMS, examples, seed=3) == sft_rows(ITEMS, examples, seed=3)  # seeded
    assert len([r for r in sft_rows(ITEMS, [example()] * 5, tasks=("alignment",), max_alignment_rows=2)]) == 2
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['seqrec'\]"):
        sft_rows(ITEMS, examples, tasks=("seqrec",))


def test_sft_rows_are_valid_sft_input(tmp_path):
    from sft.data import validate_rows
    from sft.rows import RawRows

    rows = sft_rows(ITEMS, [example()], tasks=("sid2title", "title2sid", "alignment", "next_negative"))
    validate_rows(RawRows(rows, "rows"), "messages")


# ----------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("name", ["negrec_progressive_grpo", "negrec_single_stage_grpo"])
def test_grpo_recipes_load(name, tmp_path):
    from rl.config import config_from_dict, read_recipe_mapping

    tokens = tmp_path / "sid_tokens.jsonl"
    tokens.write_text("".join(json.dumps({"token": t, "description": "a film group"}) + "\n" for t in TOKENS))
    data = read_recipe_mapping(REPO / "recipes" / f"{name}.yaml", [f"model.added_tokens={tokens}"])
    cfg = config_from_dict(data, name, check_files=False)
    assert cfg.rollout.constraint and cfg.rollout.max_new_tokens == 4 and cfg.rollout.group_size == 8
    assert [r.name for r in cfg.rewards] == ["negrec_future_negative"]
    if name == "negrec_progressive_grpo":
        assert [s.prompt_builder or cfg.data.prompt_builder for s in cfg.stages] == [
            "negrec_recent_negatives", "negrec_negatives", "negrec_negatives_positives"]
        assert all(s.kl_coef is not None for s in cfg.stages)
    else:
        assert not cfg.stages and cfg.data.prompt_builder == "negrec_negatives_positives"
    progressive = config_from_dict(read_recipe_mapping(REPO / "recipes" / "negrec_progressive_grpo.yaml",
                                                       [f"model.added_tokens={tokens}"]), "p", check_files=False)
    assert cfg.total_steps == progressive.total_steps  # single-stage: the same total steps


def test_sft_recipe_loads(tmp_path):
    from rl.config import read_recipe_mapping
    from sft.config import recipe_from_dict

    tokens = tmp_path / "sid_tokens.jsonl"
    tokens.write_text("".join(json.dumps({"token": t, "description": "a film group"}) + "\n" for t in TOKENS))
    data = read_recipe_mapping(REPO / "recipes" / "negrec_sft.yaml", [f"model.added_tokens={tokens}"])
    recipe = recipe_from_dict(data, "negrec_sft", check_files=False)
    assert recipe.model.lora and recipe.data.format == "messages" and recipe.steps > 0


# ----------------------------------------------------------------------------- Progressive GRPO, tiny


def test_progressive_grpo_three_stages_on_the_tiny_model(tiny_model_dir, table, tmp_path, single_turn_calls):
    """3 stages x 1 step (recent negatives -> negatives -> negatives + positives): the run finishes, each
    stage logs its step with its own prompt builder, and every sampled response is a valid SID."""
    from rl.config import config_from_dict
    from rl.trainer import train

    seen = single_turn_calls
    sids = tmp_path / "sids.txt"
    sids.write_text("".join(sid(k) + "\n" for k in range(8)))
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(json.dumps(example(user=f"u{k}", next_negative=f"i{k}", gts=[f"i{k}", "i3"]))
                                  + "\n" for k in range(4)))
    recipe = {
        "plugins": ["envs.negrec.rl"],
        "model": {"name_or_path": tiny_model_dir, "added_tokens": TOKENS, "lora": True, "lora_r": 4},
        "data": {"train": str(train_file), "prompt_builder": "negrec_negatives_positives",
                 "required_columns": ["negatives", "positives", "gts", "future_positives", "next_negative"]},
        "rollout": {"group_size": 4, "max_new_tokens": 4, "temperature": 1.0, "constraint": str(sids)},
        "rewards": [{"name": "negrec_future_negative", "kwargs": {**table, "gamma": 0.5}}],
        "algorithm": {"name": "grpo"},
        "stages": [{"name": "recent", "steps": 1, "prompt_builder": "negrec_recent_negatives", "kl_coef": 0.0},
                   {"name": "negatives", "steps": 1, "prompt_builder": "negrec_negatives", "kl_coef": 0.01},
                   {"name": "negatives+positives", "steps": 1, "kl_coef": 0.02}],
        "optim": {"lr": 1e-2},
        "prompts_per_step": 2, "micro_batch_tokens": 512, "eval_before_training": False,
        "output_dir": str(tmp_path / "out"), "seed": 0,
    }
    result = train(config_from_dict(recipe))
    steps = [h for h in result["history"] if "reward/mean" in h]
    assert [(h["step"], h["stage"]) for h in steps] == [(1, 0), (2, 1), (3, 2)]
    assert len(seen) == 3 and all(len(trajs) == 8 for trajs in seen)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "out" / "final")
    valid = {sid(k) for k in range(8)}
    for stage, trajs in enumerate(seen):
        for t in trajs:
            assert t.response_text.strip() in valid and t.info["finish_reason"] == "eos"  # the SID, then the end
            assert t.reward_parts["negrec_future_negative/valid"] == 1.0
            prompt = tok.decode(t.prompt_ids)
            assert ("Liked:" in prompt) == (stage == 2)
            n_disliked = prompt.split("Disliked: ")[1].split("\n")[0].count("<a_")
            assert n_disliked == (2 if stage == 0 else 4)

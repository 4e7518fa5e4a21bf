"""envs/negrec C part: Swing co-negative similarity, baselines, metrics (MetricSet `negrec`) and the
`negrec_topk` constrained beam-search agent (on the tiny model with added SID tokens)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny import make_tiny_tokenizer
from transformers import AutoModelForCausalLM

from envs.negrec.agent import NegrecAgentError, load_catalog, negrec_topk
from envs.negrec.baselines import (
    CoNegativeKNN,
    NegativePopularity,
    RandomBaseline,
    fit_baselines,
    train_negatives,
)
from envs.negrec.metrics import (
    aggregate,
    cand_acc,
    fhr_at_k,
    hr_at_k,
    leaderboard_markdown,
    leaderboard_rows,
    lif_hit,
    record,
    records_for_baseline,
)
from envs.negrec.swing import expand_gts, swing_similarity
from rl.config import ModelConfig
from rl.vocab import add_to_tokenizer, prepare_model


def row(user="u1", nxt="a", future=("a",), negatives=(), candidates=("a", "b", "c"), tail_user=False,
        tail_items=None, anchor_pos=5):
    r = {"user": user, "split": "test", "anchor_pos": anchor_pos, "anchor_day": 10,
         "negatives": [{"item": i, "sid": "", "day": 1} for i in negatives], "positives": [],
         "next_negative": nxt, "future_negatives": list(future), "future_positives": [], "gts": list(future),
         "candidates": list(candidates), "long_tail_user": tail_user}
    if tail_items is not None:
        r["long_tail_items"] = list(tail_items)
    return r


# ----------------------------------------------------------------------------- metrics


def test_per_row_metrics_by_hand():
    r = row(nxt="a", future=("a", "b"), tail_items=["b"])
    assert hr_at_k(["x", "a", "y"], r, k=2) == 1.0
    assert hr_at_k(["x", "y", "a"], r, k=2) == 0.0  # a is the 3rd: outside the top 2
    assert fhr_at_k(["b", None], r, k=2) == 1.0  # a later future negative counts
    assert fhr_at_k(["x", "y", "b"], r, k=2) == 0.0
    assert lif_hit(["b"], r, k=1) == 1.0 and lif_hit(["a"], r, k=1) == 0.0
    assert lif_hit(["b"], row(tail_items=[]), k=1) is None and lif_hit(["b"], row(), k=1) is None
    assert cand_acc("a", r) == 1.0 and cand_acc("b", r) == 0.0 and cand_acc(None, r) == 0.0


def test_aggregate_by_hand_with_invalid_slots_and_long_tail():
    recs = [
        record(["a", None, "z"], row(nxt="a", future=("a",), tail_user=True, tail_items=[]), "a", k=3),
        record(["x", "b", None], row(nxt="a", future=("a", "b"), tail_user=True, tail_items=["b"]), "c", k=3),
        record(["x", "y"], row(nxt="q", future=("q",), tail_items=["q"]), "q", k=3),  # 2 items for 3 slots
        record(["x", "y", "z"], row(nxt="q", future=("q",), negatives=("y", "z", "w")), "b", k=3),
    ]
    m = aggregate(recs)
    assert list(m) == ["n", "hr@3", "fhr@3", "luf@3", "lif@3", "cand_acc", "invalid_rate", "history_rate",
                       "n_long_tail_users", "n_long_tail_items"]
    assert m["n"] == 4
    assert m["hr@3"] == pytest.approx(1 / 4)
    assert m["fhr@3"] == pytest.approx(2 / 4)
    assert m["luf@3"] == pytest.approx(2 / 2)  # both long-tail users hit a future negative
    assert m["lif@3"] == pytest.approx(1 / 2)  # rows 2 (b: hit) and 3 (q: miss)
    assert m["cand_acc"] == pytest.approx(2 / 4)
    assert m["invalid_rate"] == pytest.approx(3 / 12)  # two None slots and one missing
    assert m["history_rate"] == pytest.approx(2 / 12)  # y, z of the last row were disliked before
    assert (m["n_long_tail_users"], m["n_long_tail_items"]) == (2, 2)


def test_empty_long_tail_sets_are_nan_not_zero():
    m = aggregate([record(["a"], row(), "a", k=1)])
    assert math.isnan(m["luf@1"]) and math.isnan(m["lif@1"])
    assert m["hr@1"] == 1.0 and m["n_long_tail_users"] == 0
    with pytest.raises(ValueError, match="mix K"):
        aggregate([record(["a"], row(), "a", k=1), record(["a"], row(), "a", k=2)])


# ----------------------------------------------------------------------------- swing


def test_swing_against_a_hand_computed_three_user_example():
    users = {"u1": {"a", "b", "c"}, "u2": {"a", "b"}, "u3": {"a", "c", "d"}}
    # pairs: {u1,u2} share {a,b}: 1/(1+2); {u1,u3} share {a,c}: 1/(1+2); {u2,u3} share {a}: no other item
    sim = swing_similarity(users, alpha=1.0)
    assert set(sim) == {"a", "b", "c", "d"}
    assert sim["a"] == [("b", pytest.approx(1 / 3)), ("c", pytest.approx(1 / 3))]  # tie: by item id
    assert sim["b"] == [("a", pytest.approx(1 / 3))] and sim["c"] == [("a", pytest.approx(1 / 3))]
    assert sim["d"] == []  # only u3 disliked d: no pair
    # user weights 1/sqrt(|I_u|): {u1,u2} -> 1/(sqrt(3) sqrt(2) 3), {u1,u3} -> 1/(3 * 3)
    w = swing_similarity(users, alpha=1.0, user_weight=True)
    assert dict(w["a"]) == pytest.approx({"b": 1 / (math.sqrt(6) * 3), "c": 1 / 9})
    assert [j for j, _ in w["a"]] == ["b", "c"]
    # a fourth user sharing a,b,c adds 1/(1+3) from each of {u1,u4}, and 1/(1+2) from {u2,u4} to a-b
    more = swing_similarity({**users, "u4": {"a", "b", "c"}}, alpha=1.0, top_n=1)
    assert more["a"] == [("b", pytest.approx(1 / 3 + 1 / 4 + 1 / 3))]  # top_n=1 keeps the best


def test_expand_gts_future_first_then_neighbours_deduplicated():
    swing = {"a": [("b", 0.9), ("c", 0.5), ("d", 0.1)], "b": [("a", 0.9), ("e", 0.7)]}
    assert expand_gts(["a", "b", "a"], swing, top_n=2) == ["a", "b", "c", "e"]
    assert expand_gts(["a"], swing, top_n=5, min_sim=0.4) == ["a", "b", "c"]
    assert expand_gts(["zz"], swing) == ["zz"]


# ----------------------------------------------------------------------------- baselines


TRAIN_PAIRS = [("u1", "a"), ("u1", "b"), ("u1", "c"), ("u2", "a"), ("u2", "b"), ("u3", "a"), ("u3", "c"), ("u3", "d")]


def test_baselines_exclude_history_and_pick_candidates():
    bl = fit_baselines(TRAIN_PAIRS, items=["a", "b", "c", "d", "e", "f"])
    r = row(negatives=("a", "c"), candidates=("e", "b", "d"), nxt="b", future=("b",))
    for name, b in bl.items():
        top = b.recommend(r, 4)
        assert len(top) == len(set(top)) == 4, name
        assert not {"a", "c"} & set(top), name
        assert b.pick(r) in r["candidates"], name
    pop = bl["neg_popularity"]
    assert pop.recommend(r, 4) == ["b", "d", "e", "f"]  # b: 2 users, d: 1, then the rest by id
    assert pop.pick(r) == "b"
    knn = bl["co_negative_knn"]
    # swing from a: b and c (1/3 each); from c: a. b is the only unseen item reached; then popularity
    assert knn.recommend(r, 3) == ["b", "d", "e"]
    assert knn.pick(row(negatives=("c",), candidates=("d", "a"))) == "a"
    assert knn.recommend(row(negatives=()), 2) == pop.recommend(row(negatives=()), 2)  # no history: popularity
    rnd = RandomBaseline(["a", "b", "c", "d", "e", "f"], seed=3)
    assert rnd.recommend(r, 4) == rnd.recommend(dict(r), 4)  # seeded per row
    assert sorted(rnd.recommend(r, 10)) == ["b", "d", "e", "f"]


def test_train_negatives_from_rows_pairs_and_frames():
    rows = [dict(row(user="u1", nxt="b", negatives=("a",)), split="train"),
            dict(row(user="u1", nxt="c", negatives=("a", "b")), split="train")]
    assert train_negatives(rows) == [("u1", "a"), ("u1", "b"), ("u1", "c")]
    import pandas as pd

    df = pd.DataFrame({"user": ["u1", "u1", "u2"], "item": ["a", "b", "a"], "label": ["neg", "pos", "neg"],
                       "split": ["train", "train", "test"]})
    assert train_negatives(df) == [("u1", "a")]
    with pytest.raises(ValueError, match="row 1 is a 'test' example"):
        train_negatives([row()])
    assert isinstance(fit_baselines(TRAIN_PAIRS)["co_negative_knn"], CoNegativeKNN)
    assert isinstance(fit_baselines(TRAIN_PAIRS)["neg_popularity"], NegativePopularity)


def test_baseline_records_share_the_model_table():
    bl = fit_baselines(TRAIN_PAIRS, items=["a", "b", "c", "d", "e"])
    rows = [row(negatives=("a",), nxt="b", future=("b",), candidates=("b", "e")),
            row(user="u2", negatives=("b",), nxt="c", future=("c", "d"), candidates=("c", "d"), tail_user=True)]
    table = leaderboard_rows({name: {"test": records_for_baseline(rows, b, k=2)} for name, b in bl.items()})
    assert [t["model"] for t in table] == ["random", "neg_popularity", "co_negative_knn"]
    assert all(t["invalid_rate"] == 0.0 and t["history_rate"] == 0.0 and t["n"] == 2 for t in table)
    md = leaderboard_markdown(table)
    assert "| model | dataset | n | hr@2 | fhr@2 | luf@2 | lif@2 |" in md and "| - |" in md  # no long-tail items: -


# ----------------------------------------------------------------------------- agent


SIDS = [f"<a_{a}><b_{b}>" for a in range(3) for b in range(3)]  # 9 items, 2 levels
ITEMS = [f"m{i}" for i in range(len(SIDS))]


@pytest.fixture(scope="module")
def sid_model(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("negrec")
    tokens = sorted({t for s in SIDS for t in ("<" + p for p in s.split("<")[1:])})
    tok = make_tiny_tokenizer()
    cfg = ModelConfig(name_or_path=tiny_model_dir, added_tokens=tokens, added_tokens_init="mean")
    vocab = add_to_tokenizer(tok, cfg)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prepare_model(model, vocab, cfg)
    # "mean" gives every SID token the same row, so every item would tie: distinct rows (the head is tied)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[vocab.token_ids] += torch.randn(len(vocab.token_ids), emb.shape[1], generator=torch.Generator().manual_seed(0))
    items = d / "items.jsonl"
    items.write_text("".join(json.dumps({"item": i, "title": i, "sid": s}) + "\n" for i, s in zip(ITEMS, SIDS)))
    return model.eval(), tok, str(items)


def builder(r):
    return [{"role": "user", "content": f"user {r['user']} disliked " + " ".join(n["item"] for n in r["negatives"])}]


def agent_rows():
    return [row(user="u1", nxt="m4", future=("m4", "m7"), negatives=("m0",), candidates=("m2", "m4", "zz", "m8"),
                tail_user=True, tail_items=["m7"]),
            row(user="u2", nxt="m1", future=("m1",), negatives=("m3", "m5"), candidates=("m1", "m6"))]


def test_agent_returns_valid_distinct_sids_and_a_candidate_pick(sid_model):
    from rl.engines import HFEngine

    model, tok, items = sid_model
    engine = HFEngine(model, tok)
    rows = agent_rows()
    trajs = negrec_topk(engine, tok, rows, prompt_builder=builder, params=None, group_size=1, first_group_id=7,
                        items=items, k=5)
    assert [t.group_id for t in trajs] == [7, 8]
    for t, r in zip(trajs, rows):
        topk = t.info["topk"]
        assert len(topk) == 5 == len(set(topk)) and set(topk) <= set(ITEMS) and t.info["invalid"] == 0
        assert t.info["scores"] == sorted(t.info["scores"], reverse=True)
        assert t.info["pick"] in r["candidates"]
        # the response is the best beam: its SID then eos, rendered as the single-turn agent renders prompts
        assert t.response_text == SIDS[ITEMS.index(topk[0])]
        assert t.response_ids[-1] == tok.eos_token_id
        assert t.prompt_ids == list(tok.apply_chat_template(builder(r), add_generation_prompt=True, tokenize=True,
                                                            return_dict=False))
    assert trajs[0].info["candidates_unknown"] == 1  # "zz" has no SID
    # the pick is the candidate with the highest log-prob under the candidate-constrained distribution,
    # recomputed here by brute force: one forward per step, log_softmax over the ids the trie allows
    cat = load_catalog(items, tok, sorted(engine.eos_ids))
    assert load_catalog(items, tok, sorted(engine.eos_ids)) is cat  # built once per file and tokenizer
    cands = [c for c in rows[0]["candidates"] if c in ITEMS]
    trie, _ = cat.candidate_trie(cands, "cands")
    best, best_lp = None, -math.inf
    for c in cands:
        seq, lp = cat.ids_of_item[c] + [tok.eos_token_id], 0.0
        for j in range(len(seq)):
            with torch.no_grad():
                logits = model(torch.tensor([trajs[0].prompt_ids + seq[:j]])).logits[0, -1]
            allowed = trie.allowed(seq[:j])
            lp += torch.log_softmax(logits[allowed], -1)[allowed.index(seq[j])].item()
        if lp > best_lp:
            best, best_lp = c, lp
    assert trajs[0].info["pick"] == best and trajs[0].info["pick_score"] == pytest.approx(best_lp, abs=1e-4)
    # the top-K's first beam is the best item of the full trie: its score is the top of a top-9 list
    full = negrec_topk(engine, tok, rows[:1], prompt_builder=builder, items=items, k=9, pick=False)[0]
    assert full.info["topk"][:5] == trajs[0].info["topk"] and sorted(full.info["topk"]) == ITEMS
    assert full.info["pick"] is None


def test_agent_errors_name_the_setting_and_line(sid_model, tmp_path):
    from rl.engines import HFEngine

    model, tok, items = sid_model
    engine = HFEngine(model, tok)
    with pytest.raises(NegrecAgentError, match="agent_kwargs.items is required"):
        negrec_topk(engine, tok, agent_rows(), prompt_builder=builder)
    with pytest.raises(NegrecAgentError, match=r"k=10 must be in \[1, 9\]"):
        negrec_topk(engine, tok, agent_rows(), prompt_builder=builder, items=items, k=10)
    dup = tmp_path / "dup.jsonl"
    dup.write_text(json.dumps({"item": "x", "sid": SIDS[0]}) + "\n" + json.dumps({"item": "y", "sid": SIDS[0]}) + "\n")
    with pytest.raises(NegrecAgentError, match=r"dup.jsonl: line 2: SID <a_0><b_0> of item 'y'"):
        load_catalog(dup, tok, [tok.eos_token_id])
    raw = tmp_path / "raw.jsonl"
    raw.write_text(json.dumps({"item": "x", "sid": "<q_1><q_2>"}) + "\n")
    with pytest.raises(NegrecAgentError, match="line 1: SID <q_1><q_2> tokenizes to .* add the SID tokens"):
        load_catalog(raw, tok, [tok.eos_token_id])


def test_eval_run_with_the_agent_gives_the_negrec_table(sid_model):
    from eval.run import default_metrics, evaluate
    from rl.registry import AGENTS

    assert default_metrics({}, AGENTS.get("negrec_topk")) == "negrec"
    model, tok, items = sid_model
    res = evaluate((model, tok), {"test": agent_rows()}, agent="negrec_topk", agent_kwargs={"items": items, "k": 5},
                   prompt_builder=builder, progress=False)
    m = res["datasets"]["test"]["metrics"]
    assert set(m) == {"n", "hr@5", "fhr@5", "luf@5", "lif@5", "cand_acc", "invalid_rate", "history_rate",
                      "n_long_tail_users", "n_long_tail_items"}
    assert m["n"] == 2 and m["invalid_rate"] == 0.0 and (m["n_long_tail_users"], m["n_long_tail_items"]) == (1, 1)
    preds = res["datasets"]["test"]["predictions"]
    assert [p["user"] for p in preds] == ["u1", "u2"] and all(len(p["topk"]) == 5 for p in preds)
    assert res["settings"]["k"] == 5 and res["settings"]["pick"] is True

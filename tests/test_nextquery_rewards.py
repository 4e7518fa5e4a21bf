"""envs.nextquery.quality (query extraction, EM / F1 / embedding similarity) and envs.nextquery.rewards."""

import json

import pytest

from envs.nextquery.quality import (EmbeddingSimilarity, default_similarity, exact_match, extract_query,
                                    normalize_query, token_f1)


@pytest.mark.parametrize("completion, query", [
    ("waterproof trail shoes", "waterproof trail shoes"),
    ("Query: \"Waterproof trail shoes\".", "Waterproof trail shoes"),
    ("next search query - tent 2 person\nbecause they bought poles", "tent 2 person"),
    ("<think>they bought a tent, so pegs</think>\n<query> tent pegs </query>", "tent pegs"),
    ("<think>a</think> b <think>c</think>answer: `camping stove`<|im_end|>", "camping stove"),
    ("<query>sleeping bag", "sleeping bag"),                      # unclosed query tag: the rest
    ("<query>x</query> then <query>head torch</query>", "head torch"),  # the last one
    ("\n\n  hiking   socks  \nmore", "hiking socks"),
    ("<think>still thinking about it", ""),                        # reasoning never ended
    ("", ""),
    (None, ""),
    ("<|im_end|>", ""),
])
def test_extract_query(completion, query):
    assert extract_query(completion) == query


def test_normalize_em_f1():
    assert normalize_query("  The Running-Shoes, WATERPROOF! ") == "runningshoes waterproof"
    assert exact_match("waterproof running shoes", "Waterproof running shoes.") == 1.0
    assert exact_match("running shoes", "waterproof running shoes") == 0.0
    assert exact_match("", "tent") == 0.0 and exact_match(None, "tent") == 0.0
    assert token_f1("running shoes", "waterproof running shoes") == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))
    assert token_f1("", "tent") == 0.0 and token_f1("tent", "tent") == 1.0


@pytest.mark.slow
def test_embedding_similarity():
    sim = EmbeddingSimilarity()
    s = sim(["waterproof trail running shoes", "waterproof trail running shoes", "chocolate cake recipe", "", "x"],
            ["trail running shoes waterproof", "waterproof trail running shoes", "trail running shoes", "tent", ""])
    assert s[1] == pytest.approx(1.0, abs=1e-5)
    assert s[0] > 0.9 and s[2] < 0.5 and s[0] > s[2]
    assert s[3] == 0.0 and s[4] == 0.0  # empty prediction / reference: 0, not the empty string's cosine
    assert all(-1.0 <= v <= 1.0 for v in s)
    assert default_similarity() is default_similarity()
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        sim(["a", "b"], ["a"])


# ---- rewards ----

from envs.nextquery import rewards as nr  # noqa: E402
from rl.rewards import REWARDS  # noqa: E402
from rl.trajectory import Trajectory  # noqa: E402


def traj(text, n_tokens, row=None):
    return Trajectory(prompt_ids=[1], response_ids=list(range(n_tokens)), loss_mask=[1] * n_tokens,
                      rollout_logprobs=[0.0] * n_tokens, group_id=0, row=row or {}, response_text=text)


ROW = {"query": "waterproof trail running shoes"}


def test_quality_reward_metrics():
    assert REWARDS.get("nextquery_quality") is nr.nextquery_quality
    out = nr.nextquery_quality(ROW, traj("Query: trail running shoes", 5), metric="f1")
    assert out["score"] == pytest.approx(2 * 1 * 0.75 / 1.75) and out["em"] == 0.0 and out["parsed"] == 1.0
    assert nr.nextquery_quality(ROW, traj("<think>x</think><query>waterproof trail running shoes</query>", 9),
                                metric="em")["score"] == 1.0
    with pytest.raises(ValueError, match="metric 'bleu'"):
        nr.nextquery_quality(ROW, traj("x", 1), metric="bleu")


def test_gated_edge_cases():
    exact = "waterproof trail running shoes"
    g = nr.nextquery_gated
    # within / at the budget: no penalty
    assert g(ROW, traj(exact, 6), metric="f1", bar=0.7, budget_tokens=8)["score"] == 1.0
    assert g(ROW, traj(exact, 8), metric="f1", bar=0.7, budget_tokens=8)["score"] == 1.0
    # over the budget and above the bar: (B/n)^alpha
    out = g(ROW, traj(exact, 16), metric="f1", bar=0.7, budget_tokens=8)
    assert out["score"] == pytest.approx(0.5) and out["gated"] == 1.0 and out["penalty"] == pytest.approx(0.5)
    assert g(ROW, traj(exact, 16), metric="f1", bar=0.7, budget_tokens=8, alpha=2)["score"] == pytest.approx(0.25)
    # exactly at the bar: gated (>=); f1("trail running shoes", ref) = 6/7
    at_bar = 6 / 7
    out = g(ROW, traj("trail running shoes", 16), metric="f1", bar=at_bar, budget_tokens=8)
    assert out["gated"] == 1.0 and out["score"] == pytest.approx(at_bar * 0.5)
    # just below the bar: no penalty however long, and no bonus for brevity
    long_below = g(ROW, traj("trail running shoes", 100), metric="f1", bar=at_bar + 1e-9, budget_tokens=8)
    short_below = g(ROW, traj("trail running shoes", 2), metric="f1", bar=at_bar + 1e-9, budget_tokens=8)
    assert long_below["score"] == short_below["score"] == pytest.approx(at_bar) and long_below["gated"] == 0.0
    # empty and unparseable answers: 0
    assert g(ROW, traj("", 1), metric="f1")["score"] == 0.0
    out = g(ROW, traj("<think>never finished", 16), metric="f1")
    assert out["score"] == 0.0 and out["parsed"] == 0.0
    # a per-input budget in the row wins over the kwarg
    row = {**ROW, "token_budget": 16}
    assert g(row, traj(exact, 16), metric="f1", budget_tokens=8)["score"] == 1.0
    with pytest.raises(ValueError, match="budget must be > 0"):
        g(ROW, traj(exact, 16), metric="f1", budget_tokens=0)


@pytest.mark.slow
def test_gated_with_embedding_similarity():
    out = nr.nextquery_gated(ROW, traj("waterproof trail running shoes", 32), bar=0.7, budget_tokens=16)
    assert out["quality"] == pytest.approx(1.0, abs=1e-5) and out["score"] == pytest.approx(0.5, abs=1e-5)
    low = nr.nextquery_gated(ROW, traj("chocolate cake", 32), bar=0.7, budget_tokens=16)
    assert low["gated"] == 0.0 and low["score"] == pytest.approx(low["quality"]) and low["quality"] < 0.7


# ---- on-device benchmark: quantised models load and answer ----

def test_int8_and_bf16_tiny_models_answer(tiny_model_dir):
    import sys
    from pathlib import Path

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import nextquery_ondevice as bench

    from envs.nextquery.replay import ModelPredictor

    rows = bench.sample_rows()[:3]
    pred = ModelPredictor(tiny_model_dir, template="compact", max_new_tokens=6, batch_size=2)
    fp32 = pred.generate(rows)
    pred.model = bench.convert(pred.model, "int8")
    linears = [m for m in pred.model.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    assert linears and not any(type(m) is torch.nn.Linear for m in pred.model.modules())
    int8 = pred.generate(rows)
    assert len(int8) == 3 and all(isinstance(a, str) for a in int8) and len(fp32) == 3
    assert len(pred(rows)) == 3  # extracted queries
    pred.model = bench.convert(ModelPredictor(tiny_model_dir).model, "bf16")
    assert next(pred.model.parameters()).dtype == torch.bfloat16 and len(pred.generate(rows[:1])) == 1
    # int8-mixed: the MLP down projections stay fp32, every other Linear is quantised
    mixed = bench.convert(ModelPredictor(tiny_model_dir).model, "int8-mixed")
    kinds = {n: type(m) for n, m in mixed.named_modules() if n.endswith(("down_proj", "up_proj", "lm_head"))}
    assert kinds and all((k is torch.nn.Linear) == n.endswith("down_proj") for n, k in kinds.items())


@pytest.mark.slow
def test_ondevice_benchmark_end_to_end(tiny_model_dir, tmp_path, capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import nextquery_ondevice as bench

    out = tmp_path / "bench.json"
    assert bench.main(["--model", tiny_model_dir, "--threads", "1", "--precisions", "int8", "int8-mixed",
                       "--n-latency", "2", "--n-quality", "3", "--n-logits", "2", "--max-new-tokens", "4",
                       "--answer-tokens", "4", "--data", "", "--no-emb-sim", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    by = {o["precision"]: o for o in res["summary"]}
    assert set(by) == {"fp32", "int8", "int8-mixed"} and by["fp32"]["speedup_vs_fp32"] == 1.0  # fp32 always added
    assert by["fp32"]["agreement_with_fp32"] == 1.0 and by["fp32"]["top1_agreement"] == 1.0
    assert by["fp32"]["kl_from_fp32"] == pytest.approx(0.0, abs=1e-6) and by["int8"]["kl_from_fp32"] >= 0.0
    assert all(len(v) == 2 for v in res["latencies_s"].values()) and len(res["latencies_s"]) == 3
    assert all(r["peak_mb"] > 0 for r in res["runs"].values())
    assert by["int8"]["weights_mb"] < by["fp32"]["weights_mb"] and by["fp32"]["weights_ratio_vs_fp32"] == 1.0
    assert "int8" in capsys.readouterr().out

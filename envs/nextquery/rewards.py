"""Rewards of the next-query agent (registered in `rl.rewards.REWARDS`); the real next query is
row["query"], the prediction is `quality.extract_query(traj.response_text)` (answer-only or the
<think>/<query> format).

  nextquery_quality   answer quality: `metric` = "emb_sim" (cosine of all-MiniLM-L6-v2 embeddings, in
                      [-1, 1], in practice [0, 1] for queries), "f1" (token F1) or "em".
  nextquery_gated     RecGPT-Mobile V2's quality-gated reward:
                          q                       if q <  bar   (no length penalty, and no bonus for brevity)
                          q * lp(n, B)            if q >= bar
                      lp(n, B) = 1 for n <= B, (B / n) ** alpha for n > B: one-sided (an answer within the
                      budget is never penalised, nor paid for being shorter), smooth, never negative; with
                      alpha = 1 twice the budget halves the reward.
                      n = the completion's policy tokens (sum of the loss mask, the end-of-turn token
                      included); B = the row's `budget_column` value when the row has one (a per-input
                      budget written by the data step), else `budget_tokens`.
                      The gate makes the reward discontinuous at the bar on purpose (the paper's design):
                      length pressure only acts on answers that are already good, so the policy is not
                      pushed to trade quality for brevity below it.
Both return a dict: "score" plus the logged parts (quality, em, f1, tokens, penalty, gated, parsed).
An empty or unparseable answer (no query after extraction) scores 0 quality, below any positive bar.
"""

from __future__ import annotations

from envs.nextquery.quality import default_similarity, exact_match, extract_query, token_f1
from rl.rewards import register_reward

__all__ = ["METRICS", "quality_of", "length_factor", "nextquery_quality", "nextquery_gated"]

METRICS = ("emb_sim", "f1", "em")


def quality_of(pred: str, ref: str, metric: str = "emb_sim") -> float:
    if metric not in METRICS:
        raise ValueError(f"nextquery reward: metric {metric!r} is not one of {list(METRICS)}")
    if metric == "em":
        return exact_match(pred, ref)
    if metric == "f1":
        return token_f1(pred, ref)
    return default_similarity()([pred], [ref])[0]


def length_factor(n_tokens: int, budget: float, alpha: float = 1.0) -> float:
    """The one-sided length penalty lp(n, B) (module docstring)."""
    if budget <= 0:
        raise ValueError(f"nextquery_gated: the token budget must be > 0, got {budget}")
    return 1.0 if n_tokens <= budget else (budget / n_tokens) ** alpha


def _parts(row: dict, traj, metric: str) -> dict:
    pred = extract_query(traj.response_text)
    ref = str(row["query"])
    q = quality_of(pred, ref, metric)
    return {"quality": q, "em": exact_match(pred, ref), "f1": token_f1(pred, ref), "parsed": float(bool(pred)),
            "tokens": float(sum(traj.loss_mask))}


@register_reward("nextquery_quality")
def nextquery_quality(row: dict, traj, metric: str = "emb_sim") -> dict:
    parts = _parts(row, traj, metric)
    return {"score": parts["quality"], **parts}


@register_reward("nextquery_gated")
def nextquery_gated(row: dict, traj, metric: str = "emb_sim", bar: float = 0.7, budget_tokens: float = 16,
                    budget_column: str = "token_budget", alpha: float = 1.0) -> dict:
    parts = _parts(row, traj, metric)
    budget = row.get(budget_column)
    budget = float(budget if budget is not None else budget_tokens)
    gated = parts["quality"] >= bar
    penalty = length_factor(int(parts["tokens"]), budget, alpha) if gated else 1.0
    return {"score": parts["quality"] * penalty, **parts, "penalty": penalty, "gated": float(gated), "budget": budget}

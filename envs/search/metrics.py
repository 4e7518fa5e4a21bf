"""The search leaderboard: the search environment's metric set (`rl.registry.METRICS["search"]`).

`python -m eval.run --recipe recipes/search_r1pp_cpu.yaml --model ... --data NAME=PATH` computes it
for every model x dataset (the search environment names it in `SearchEnvironment.metrics`):
  EM and F1 (the `search_em` / `search_f1` rewards, so the leaderboard's numbers are the training
  rewards'), answer rate (an answer action was taken), average searches, average response length in
  tokens (whole response incl. observations) and in model-generated tokens, invalid-action rate
  (invalid actions / all actions), number of questions, retrieval errors (searches answered with
  "retrieval unavailable": a retrieval server down, an in-process retriever raising). A model on 2+
  datasets gets an `avg` row = the mean of the per-dataset metrics (each dataset counts once, whatever
  its size); its `n` and retrieval errors are totals.
Retrieval errors are warned about (count, of how many, the retriever); when every retrieval of a
model x dataset failed, `python -m eval.run` exits 1 after writing the results (`check`): near-zero
scores from a dead server are not a result.
Datasets load with `envs.search.qa_data.load_qa` (FlashRAG jsonl or Search-R1 parquet; errors name
file and row). Each prediction line: id, question, golds, queries (the searches issued, in order),
prediction (the final answer), em, f1, answered, searches, retrieval_unavailable, turns, valid/invalid
actions, response and model tokens, termination; `eval.run` adds the response's `segments`
(policy / environment texts).

From Python:

    from envs.search.metrics import evaluate_search
    res = evaluate_search("outputs/search_r1pp_cpu", {"dev": "data/wiki10k_qa/dev.jsonl"}, limit=100)
    res["datasets"]["dev"]["metrics"]["em"], res["avg"]["f1"]
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from envs.search.rewards import search_em, search_f1
from eval.metrics import MetricSet, mean
from rl.registry import METRICS

__all__ = ["COLUMNS", "SEARCH_METRICS", "question_record", "aggregate", "check_retrievals", "check_rows",
           "evaluate_search"]

# metric key -> column title in leaderboard.md (order = column order)
COLUMNS = {
    "n": "n",
    "em": "EM",
    "f1": "F1",
    "answer_rate": "answer rate",
    "avg_searches": "searches",
    "avg_response_tokens": "response tokens",
    "avg_model_tokens": "model tokens",
    "invalid_action_rate": "invalid rate",
    "retrieval_errors": "retrieval errors",
}


def question_record(traj) -> dict:
    """One prediction line: the row, the answer, its scores (the training rewards) and the episode stats."""
    info, row = traj.info, traj.row
    return {
        "id": row.get("id"),
        "question": row["question"],
        "golds": list(row["golden_answers"]) if not isinstance(row["golden_answers"], str) else [row["golden_answers"]],
        "queries": [str(q) for q in info.get("queries") or []],  # the search actions, in order
        "prediction": info.get("answer"),
        "em": search_em(row, traj),
        "f1": search_f1(row, traj),
        "answered": bool(info.get("answered", False)),
        "searches": int(info.get("searches", 0)),
        # None when the agent's info does not count them (the column then shows "-")
        "retrieval_unavailable": info.get("retrieval_unavailable"),
        "turns": int(info.get("turns", 0)),
        "valid_actions": int(info.get("valid_actions", 0)),
        "invalid_actions": int(info.get("invalid_actions", 0)),
        "response_tokens": len(traj.response_ids),
        "model_tokens": info.get("model_tokens"),
        "termination": info.get("termination"),
    }


def aggregate(records: Sequence[dict]) -> dict:
    """Metrics of one model x dataset from its question records."""
    actions = sum(r["valid_actions"] + r["invalid_actions"] for r in records)
    model_tokens = [r["model_tokens"] for r in records if r.get("model_tokens") is not None]
    unavailable = [r["retrieval_unavailable"] for r in records if r.get("retrieval_unavailable") is not None]
    return {
        "n": len(records),
        "em": mean([r["em"] for r in records]),
        "f1": mean([r["f1"] for r in records]),
        "answer_rate": mean([float(r["answered"]) for r in records]),
        "avg_searches": mean([r["searches"] for r in records]),
        "avg_response_tokens": mean([r["response_tokens"] for r in records]),
        # only when every episode reports it (other agents' info may not)
        "avg_model_tokens": mean(model_tokens) if len(model_tokens) == len(records) else None,
        "invalid_action_rate": sum(r["invalid_actions"] for r in records) / actions if actions else 0.0,
        "retrieval_errors": sum(unavailable) if len(unavailable) == len(records) else None,
        "retrievals": sum(r["searches"] for r in records),  # not a column: what check_retrievals compares to
    }


def check_retrievals(metrics: Mapping, settings: Mapping) -> tuple[str, bool] | None:
    """A warning when retrievals were unavailable; fatal when all of them were (nothing was retrieved)."""
    errors, total = metrics.get("retrieval_errors"), metrics.get("retrievals") or 0
    if not errors:
        return None
    where = settings.get("retriever")
    msg = (f"{errors} of {total} retrievals were unavailable (retriever: {where}); those searches showed "
           "'retrieval unavailable' to the model")  # fmt: skip
    if errors >= total:
        hint = "; is the retrieval server running?" if str(where).startswith(("http://", "https://")) else ""
        msg = f"every retrieval failed: {msg}{hint}"
    return msg, errors >= total


def check_rows(rows: Sequence[Mapping], name: str) -> list[dict]:
    """In-memory rows need what the environment and the rewards read; say which row lacks it."""
    from envs.search.qa_data import QADataError

    out = []
    for i, r in enumerate(rows):
        if not isinstance(r, Mapping):
            raise QADataError(f"dataset {name!r}: row {i} is a {type(r).__name__}, expected a dict")
        q = r.get("question")
        if not isinstance(q, str) or not q.strip():
            raise QADataError(f"dataset {name!r}: row {i}: missing field 'question'")
        if not r.get("golden_answers"):
            raise QADataError(f"dataset {name!r}: row {i}: missing field 'golden_answers'")
        out.append(dict(r))
    return out


def _load_qa(path: str) -> list[dict]:
    from envs.search.qa_data import load_qa  # imported here: `python -m envs.search.qa_data` must not run twice

    return list(load_qa(path))


SEARCH_METRICS = METRICS.register(
    "search",
    MetricSet(record=question_record, aggregate=aggregate, columns=COLUMNS, title="Search agent leaderboard",
              load=_load_qa, check_rows=check_rows, progress="em", totals=("n", "retrieval_errors"),
              check=check_retrievals),
)


def evaluate_search(
    model_path_or_name: str | os.PathLike | tuple,
    datasets: Mapping[str, str | os.PathLike | Sequence[Mapping]],
    *,
    retriever: Any = None,
    retriever_kind: str = "bm25",
    topk: int = 3,
    template: str = "fast",
    max_turns: int = 4,
    max_new_tokens: int = 128,
    max_obs_tokens: int | None = 500,
    max_response_tokens: int | None = None,
    **kwargs: Any,
) -> dict:
    """`eval.run.evaluate` of the search environment's agent with these settings (None retriever: wiki10k).

    Other keyword arguments (temperature, limit, batch_size, seed, dtype, label, engine, tokenizer,
    progress) are `eval.run.evaluate`'s.
    """
    from envs.search.env import default_retriever
    from eval.run import evaluate

    agent_kwargs = {
        "env": "search",
        "env_kwargs": {"retriever": default_retriever() if retriever is None else retriever,
                       "retriever_kind": retriever_kind, "topk": topk, "template": template},
        "max_turns": max_turns, "max_obs_tokens": max_obs_tokens, "max_response_tokens": max_response_tokens,
    }  # fmt: skip
    return evaluate(model_path_or_name, datasets, agent="multi_turn", agent_kwargs=agent_kwargs, metrics="search",
                    max_new_tokens=max_new_tokens, **kwargs)

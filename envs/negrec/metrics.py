"""Metrics of the negative-feedback recommender (CoNRec) and the `negrec` leaderboard metric set.

Per example row (see `envs/negrec/data.py`) and a model's / baseline's output — `topk`, a list of
item ids best first where None marks a generated slot that decoded to no item, and `pick`, one
candidate — the definitions used here:

  HR@K       1 if `row["next_negative"]` is among the first K items, else 0
  FHR@K      1 if ANY of `row["future_negatives"]` (the anchor and the user's later negatives within
             the window, same split) is among the first K items, else 0 — a hit rate over the future
             window, as the paper's "FHR@20 against 7-day future negatives"
  LUF@K      the mean FHR@K over rows whose user is long-tail (`row["long_tail_user"]`)
  LIF@K      over rows with a non-empty `row["long_tail_items"]` (future negatives that are
             long-tail items; added by the build), the mean of: 1 if any of them is in the top K
  Cand.Acc   1 if the pick is the next negative (the candidates always include it)
  invalid    the fraction of the K slots that were None (an invalid generation; 0 for baselines and,
             by construction, for constrained beam search — counting it is the check)
  history    the fraction of the K slots holding an item of the prompt's history negatives
             (`row["negatives"]`): on MovieLens a user rates an item once, so such a slot can never
             hit; baselines exclude them (0), a model that copies its prompt shows it here

A subset with no rows (no long-tail user / item) gives NaN, never 0 (the table shows `-`).

`record(topk, row, pick, k)` makes one JSON-safe line; `aggregate(records)` the leaderboard numbers:
`{n, hr@K, fhr@K, luf@K, lif@K, cand_acc, invalid_rate, history_rate, n_long_tail_users,
n_long_tail_items}` with K
from the records (all records of one table must share it). The metric set "negrec" (`--metrics
negrec`, the `negrec_topk` agent's default) records a trajectory from its `info` (`topk`, `pick`,
`invalid`) and `row`; `records_for_baseline` gives the same records for a baseline, so models and
baselines share one table (`leaderboard_rows`, `leaderboard_markdown`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from eval.metrics import MetricSet, mean
from rl.registry import METRICS

__all__ = [
    "DEFAULT_K",
    "NEGREC_METRICS",
    "aggregate",
    "cand_acc",
    "fhr_at_k",
    "history_slots",
    "hr_at_k",
    "invalid_slots",
    "leaderboard_markdown",
    "leaderboard_rows",
    "lif_hit",
    "record",
    "records_for_baseline",
    "trajectory_record",
]

DEFAULT_K = 20


def _top(topk: Sequence[str | None], k: int) -> set[str]:
    return {str(i) for i in list(topk)[:k] if i is not None}


def hr_at_k(topk: Sequence[str | None], row: Mapping, k: int = DEFAULT_K) -> float:
    """1.0 if the row's next negative is in the first k items."""
    return float(str(row["next_negative"]) in _top(topk, k))


def fhr_at_k(topk: Sequence[str | None], row: Mapping, k: int = DEFAULT_K) -> float:
    """1.0 if any of the row's future negatives (window, same split) is in the first k items."""
    return float(bool(_top(topk, k) & {str(i) for i in row["future_negatives"]}))


def lif_hit(topk: Sequence[str | None], row: Mapping, k: int = DEFAULT_K) -> float | None:
    """1.0 / 0.0: a long-tail future negative is in the first k items; None when the row has none
    (`long_tail_items` empty or absent), so it does not count towards LIF."""
    tail = {str(i) for i in row.get("long_tail_items") or ()}
    if not tail:
        return None
    return float(bool(_top(topk, k) & tail))


def cand_acc(pick: str | None, row: Mapping) -> float:
    """1.0 if the picked candidate is the next negative (None, no pick: 0)."""
    return float(pick is not None and str(pick) == str(row["next_negative"]))


def invalid_slots(topk: Sequence[str | None], k: int = DEFAULT_K) -> int:
    """How many of the k slots hold no item (None, or missing: a shorter list than k)."""
    top = list(topk)[:k]
    return sum(i is None for i in top) + max(0, k - len(top))


def history_slots(topk: Sequence[str | None], row: Mapping, k: int = DEFAULT_K) -> int:
    """How many of the first k items are among the row's history negatives."""
    hist = {str(n["item"]) for n in row.get("negatives") or ()}
    return sum(i is not None and str(i) in hist for i in list(topk)[:k])


def record(topk: Sequence[str | None], row: Mapping, pick: str | None = None, k: int = DEFAULT_K,
           **extra: Any) -> dict:
    """One prediction line: the row's identity, the output, and its per-row metrics (`extra` is kept)."""
    return {
        "user": row.get("user"), "split": row.get("split"), "anchor_pos": row.get("anchor_pos"),
        "next_negative": row["next_negative"], "k": k,
        "topk": [None if i is None else str(i) for i in topk], "pick": pick,
        "hr": hr_at_k(topk, row, k), "fhr": fhr_at_k(topk, row, k),
        "long_tail_user": bool(row.get("long_tail_user", False)), "lif": lif_hit(topk, row, k),
        "cand_acc": cand_acc(pick, row), "invalid": invalid_slots(topk, k), "history": history_slots(topk, row, k),
        **extra,
    }  # fmt: skip


def aggregate(records: Sequence[Mapping]) -> dict:
    """The leaderboard numbers of one model x dataset (keys in table order; see the module docstring)."""
    ks = sorted({int(r["k"]) for r in records})
    if len(ks) > 1:
        raise ValueError(f"negrec aggregate: the records mix K values {ks}: score one K per table")
    k = ks[0] if ks else DEFAULT_K
    tail_users = [r for r in records if r["long_tail_user"]]
    tail_items = [r for r in records if r["lif"] is not None]
    slots = k * len(records)
    return {
        "n": len(records),
        f"hr@{k}": mean([r["hr"] for r in records]),
        f"fhr@{k}": mean([r["fhr"] for r in records]),
        f"luf@{k}": mean([r["fhr"] for r in tail_users]),
        f"lif@{k}": mean([r["lif"] for r in tail_items]),
        "cand_acc": mean([r["cand_acc"] for r in records]),
        "invalid_rate": sum(r["invalid"] for r in records) / slots if slots else float("nan"),
        "history_rate": sum(r["history"] for r in records) / slots if slots else float("nan"),
        "n_long_tail_users": len(tail_users),
        "n_long_tail_items": len(tail_items),
    }


def trajectory_record(traj) -> dict:
    """A `negrec_topk` trajectory's record: its info's top-K and pick against its row."""
    info = traj.info
    missing = [key for key in ("topk", "pick") if key not in info]
    if missing:
        raise ValueError(f"metric set 'negrec': the trajectory's info lacks {missing} (evaluate with the "
                         f"negrec_topk agent, which writes them); info keys: {sorted(info)}")
    k = int(info.get("k", len(info["topk"])))
    extra = {"scores": info.get("scores"), "response": traj.response_text}
    if traj.reward_parts:  # the recipe's rewards of the best beam, when eval.run scored them
        extra["rewards"] = {name: float(v) for name, v in traj.reward_parts.items()}
    return record(info["topk"], traj.row, info["pick"], k, **extra)


def records_for_baseline(rows: Iterable[Mapping], baseline, k: int = DEFAULT_K) -> list[dict]:
    """The records of a baseline (`.recommend(row, k)`, `.pick(row)`), as the metric set makes for a model."""
    return [record(baseline.recommend(row, k), row, baseline.pick(row), k) for row in rows]


def leaderboard_rows(results: Mapping[str, Mapping[str, Sequence[Mapping]]]) -> list[dict]:
    """`{model or baseline label: {dataset: records}}` -> one dict per label x dataset:
    `{"model", "dataset", **aggregate(records)}`, in the given order."""
    return [{"model": label, "dataset": name, **aggregate(recs)}
            for label, per in results.items() for name, recs in per.items()]


def leaderboard_markdown(rows: Sequence[Mapping]) -> str:
    """A markdown table of `leaderboard_rows`' output (floats with 4 decimals; NaN as `-`)."""
    from rl.report import markdown_table

    keys = list(dict.fromkeys(key for r in rows for key in r if key not in ("model", "dataset")))

    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    return markdown_table(["model", "dataset", *keys], [[r["model"], r["dataset"], *[cell(r.get(key)) for key in keys]]
                                                        for r in rows])


# columns None: the table shows aggregate()'s keys in their order, whatever K the run used
NEGREC_METRICS = METRICS.register("negrec", MetricSet(
    record=trajectory_record, aggregate=aggregate, columns=None,
    title="Negative-feedback recommendation (CoNRec): HR/FHR/LUF/LIF@K, Cand.Acc",
    progress="hr", totals=("n", "n_long_tail_users", "n_long_tail_items"),
))

"""Metric sets: what `python -m eval.run` computes for an environment's agent.

A metric set turns each evaluated trajectory into one JSON-safe record (a line of
`predictions/<model>__<dataset>.jsonl`) and the records of one model x dataset into the numbers of
one leaderboard row. An environment registers its metric set in `rl.registry.METRICS` and names it
in its class attribute `metrics` (`agents/environment.py`); `eval.run` picks, in order: its
`--metrics NAME` flag, the environment's `metrics`, else `rewards` (defined here: the means of the
recipe's reward functions, for single-turn recipes such as arithmetic and any environment without
its own set).

    from eval.metrics import MetricSet
    from rl.registry import METRICS

    METRICS.register("toy", MetricSet(
        record=lambda traj: {"solved": float(traj.info["solved"]), "turns": traj.info["turns"]},
        aggregate=lambda recs: {"n": len(recs), "solved": mean([r["solved"] for r in recs])},
        columns={"n": "n", "solved": "solved"},
        title="Toy leaderboard",
    ))

The trajectories a metric set sees are already scored by the recipe's reward functions
(`traj.reward`, `traj.reward_parts`), so a record may use them or compute its own numbers from
`traj.row` / `traj.info` (the search set calls its rewards, so the leaderboard's EM is the training
reward's EM by construction). `eval.run` adds `segments` to every record: the whole response as
`[{"role": "policy"|"env", "text": ...}]`, decoded from the trajectory's ids split where its
loss_mask changes (`rl.samples.segments`, as in the trainer's samples files), so a record shows
what the model wrote and what the environment inserted. A model evaluated on 2+ datasets gets an `avg` row: the mean of each
per-dataset metric (datasets weigh equally), the sum for the set's `totals` (`n`, counts).

`check(metrics, settings)` (optional) looks at one model x dataset's metrics and the run's settings
and returns `(message, fatal)` or None: `eval.run` logs the message as a warning, stores it in
leaderboard.json, and after writing the results exits 1 when it is fatal (the search set: every
retrieval was unavailable, e.g. a retrieval server that is not running).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from rl.registry import METRICS

__all__ = ["MetricSet", "mean", "average_metrics", "REWARD_METRICS", "reward_record", "reward_aggregate"]


def mean(xs: Sequence[float]) -> float:
    """The mean, NaN for no values (the table shows `-`)."""
    return sum(xs) / len(xs) if xs else float("nan")


@dataclass
class MetricSet:
    """An environment's leaderboard metrics; calling it on a trajectory gives that example's record."""

    record: Callable[[Any], dict]  # Trajectory -> one JSON-safe prediction line
    aggregate: Callable[[list[dict]], dict]  # the records of one model x dataset -> {metric: number}; has "n"
    columns: Mapping[str, str] | None = None  # metric key -> column title, in table order; None: every key
    title: str = "Leaderboard"  # heading of leaderboard.md
    # dataset loader for `--data PATH` (errors naming file and row); None: rl.data.load_source (jsonl,
    # parquet, csv, save_to_disk dirs). Registered datasets and "module:function" always use load_source.
    load: Callable[[str], Sequence[Mapping]] | None = None
    check_rows: Callable[[Sequence[Mapping], str], list[dict]] | None = None  # validates in-memory rows (name)
    progress: str | None = None  # a record key whose running mean the progress bar shows
    totals: Sequence[str] = ("n",)  # counts: the `avg` row has their sum, not their mean
    # (metrics of one model x dataset, the run's settings) -> (warning message, fatal) or None
    check: Callable[[Mapping, Mapping], tuple[str, bool] | None] | None = None

    def __call__(self, traj) -> dict:
        return self.record(traj)


def average_metrics(
    per_dataset: Sequence[Mapping], keys: Sequence[str] | None = None, totals: Sequence[str] = ("n",)
) -> dict:
    """The `avg` row: mean of each per-dataset metric (datasets weigh equally); `totals` (`n`) are summed."""
    if keys is None:
        keys = list(dict.fromkeys(k for m in per_dataset for k in m))
    out: dict[str, Any] = {"n": sum(m.get("n", 0) for m in per_dataset)}
    for key in keys:
        if key == "n":
            continue
        vals = [m[key] for m in per_dataset if isinstance(m.get(key), (int, float)) and not isinstance(m[key], bool)]
        vals = [v for v in vals if v is not None]
        out[key] = (sum(vals) if key in totals else mean(vals)) if vals else None
    return out


# ----------------------------------------------------------------------------- rewards (the default set)


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def reward_record(traj) -> dict:
    """The example's scalar row fields, the response, the recipe's rewards and the episode's size."""
    info = traj.info
    return {
        "row": {k: v for k, v in traj.row.items() if _scalar(v)},
        "response": traj.response_text,
        "reward": float(traj.reward),
        "rewards": {k: float(v) for k, v in traj.reward_parts.items()},
        "response_tokens": len(traj.response_ids),
        "model_tokens": int(sum(traj.loss_mask)),
        "turns": info.get("turns"),
        "termination": info.get("termination", info.get("finish_reason")),
    }


def reward_aggregate(records: Sequence[dict]) -> dict:
    names = list(dict.fromkeys(k for r in records for k in r["rewards"]))
    out: dict[str, Any] = {"n": len(records), "reward": mean([r["reward"] for r in records])}
    for name in names:
        out[name] = mean([r["rewards"][name] for r in records if name in r["rewards"]])
    out["avg_response_tokens"] = mean([r["response_tokens"] for r in records])
    out["avg_model_tokens"] = mean([r["model_tokens"] for r in records])
    return out


# columns: n, reward, one per reward function (named as in the recipe), then the sizes
REWARD_METRICS = METRICS.register(
    "rewards",
    MetricSet(record=reward_record, aggregate=reward_aggregate, title="Leaderboard (reward means)",
              progress="reward"),
)

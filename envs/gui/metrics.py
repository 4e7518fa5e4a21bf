"""GUI agent leaderboards (`rl.registry.METRICS`): "gui_static" (step-level, AndroidLens / SecAgent static
evaluation) and "gui_live" (episodes in the live MiniWoB++ browser).

gui_static: one static step per prompt (rows of `static_{train,test}.jsonl`: the step prompt, its
`valid_actions`, `elements`, `episode_id`, `step`). Each output is scored by `envs.gui.rewards.step_outcome`
(the `secagent` reward's scoring: one implementation for the reward and the leaderboard).
  SA        step accuracy: the fraction of steps whose action matches one of the step's valid actions
            (kind and arguments; clicks inside an enlarged valid box, `envs.gui.matching`).
  TA        task accuracy: the fraction of episodes with EVERY step correct (records grouped by
            `episode_id`). An episode with fewer evaluated steps than its `n_steps` column (a
            `--limit` cut it) is left out of TA and counted in `partial_episodes`; without the column,
            the evaluated steps are the episode.
  AMS       action matching score, as we define it (AndroidLens reports it per step but publishes no
            formula): per episode, the fraction of its evaluated steps whose action matches a valid
            action; AMS = the mean over episodes (an episode weighs once however long it is, unlike SA,
            where every step weighs once).
  type acc  the predicted action's kind equals the reference action's kind.
  acc <kind>  SA among the steps whose reference action is of that kind (click, type, key, scroll,
            wait, terminate); "-" when the data has none.
  well-formed  the fraction of outputs with context, thought and action in the SecAgent format.
  input tokens  mean prompt tokens per step (image tokens included for VLM policies).

gui_live: one MiniWoB episode per prompt (`envs.gui.env.MiniWobEnv`; rows `{"task", "seed"}`), from the
episode facts the environment puts in `traj.info`.
  success   the fraction of episodes MiniWoB scored positive.
  ATP       Average Task Progress: the mean over episodes of milestones reached / milestones of the task
            (`envs.gui.milestones.task_progress`; 1 for a solved episode).
  steps     mean policy steps per episode; invalid rate: invalid outputs / steps.
  input tokens/step, step latency (s)  over all steps of all episodes (a step weighs once).
  `success/<task>` per task type is in leaderboard.json (not a table column).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Mapping, Sequence

from envs.gui.milestones import task_progress
from envs.gui.rewards import step_outcome
from eval.metrics import MetricSet, mean
from rl.registry import METRICS

__all__ = ["STATIC_COLUMNS", "LIVE_COLUMNS", "KINDS", "static_record", "static_aggregate", "check_static_rows",
           "live_record", "live_aggregate", "static_metric_set", "GUI_STATIC", "GUI_LIVE"]

# the action kinds of envs.gui.actions.ACTION_KINDS (tests check they agree): one accuracy column each
KINDS = ("click", "type", "key", "scroll", "wait", "terminate")

STATIC_COLUMNS = {
    "n": "steps",
    "episodes": "episodes",
    "sa": "SA",
    "ta": "TA",
    "ams": "AMS",
    "type_acc": "type acc",
    **{f"acc_{k}": f"acc {k}" for k in KINDS},
    "well_formed": "well-formed",
    "input_tokens": "input tokens/step",
}

LIVE_COLUMNS = {
    "n": "episodes",
    "success": "success",
    "atp": "ATP",
    "avg_steps": "steps",
    "invalid_rate": "invalid rate",
    "input_tokens_per_step": "input tokens/step",
    "step_latency": "step latency (s)",
}


def _step_index(row: Mapping) -> Any:
    return row.get("step", row.get("step_index"))


# ----------------------------------------------------------------------------- static


def static_record(traj, *, margin: float = 0.2, text_match: str = "equal") -> dict:
    """One prediction line of a static step."""
    row = traj.row
    out = step_outcome(row, traj.response_text, margin=margin, text_match=text_match)
    return {
        "episode_id": row.get("episode_id"),
        "step": _step_index(row),
        "task": row.get("task"),
        "n_steps": row.get("n_steps", row.get("num_steps")),
        "gold": row.get("action"),
        "valid_actions": list(row["valid_actions"]),
        "prediction": out["action"],
        "gold_kind": out["gold_kind"],
        "pred_kind": out["pred_kind"],
        "correct": bool(out["correct"]),
        "well_formed": bool(out["well_formed"]),
        "error": out["error"],
        "input_tokens": len(traj.prompt_ids),
    }


def static_aggregate(records: Sequence[dict]) -> dict:
    """SA, TA, AMS, per-kind accuracy, ... of one model x dataset (definitions in the module docstring)."""
    episodes: dict[Any, list[dict]] = defaultdict(list)
    for i, r in enumerate(records):
        # a record without an episode id is an episode of its own (TA = SA for such data)
        episodes[r.get("episode_id") if r.get("episode_id") is not None else ("#", i)].append(r)
    complete, partial = [], 0
    for recs in episodes.values():
        expected = recs[0].get("n_steps")
        if expected is not None and len({r.get("step") for r in recs}) < int(expected):
            partial += 1
        else:
            complete.append(recs)
    out: dict[str, Any] = {
        "n": len(records),
        "episodes": len(episodes),
        "sa": mean([float(r["correct"]) for r in records]),
        "ta": mean([float(all(r["correct"] for r in recs)) for recs in complete]),
        "ams": mean([mean([float(r["correct"]) for r in recs]) for recs in episodes.values()]),
        "type_acc": mean([float(r["pred_kind"] is not None and r["pred_kind"] == r["gold_kind"]) for r in records]),
    }
    for kind in KINDS:
        of_kind = [float(r["correct"]) for r in records if r["gold_kind"] == kind]
        out[f"acc_{kind}"] = mean(of_kind) if of_kind else None
    out["well_formed"] = mean([float(r["well_formed"]) for r in records])
    out["input_tokens"] = mean([r["input_tokens"] for r in records])
    out["partial_episodes"] = partial
    return out


def check_static_rows(rows: Sequence[Mapping], name: str) -> list[dict]:
    """Static rows need valid actions, elements and an episode id; the error names the dataset and row."""
    from rl.data import DataError

    out = []
    for i, r in enumerate(rows):
        if not isinstance(r, Mapping):
            raise DataError(f"dataset {name!r}: row {i} is a {type(r).__name__}, expected a dict")
        valid = r.get("valid_actions")
        if not isinstance(valid, (list, tuple)) or not valid or not all(isinstance(v, str) for v in valid):
            raise DataError(f"dataset {name!r}: row {i}: 'valid_actions' must be a non-empty list of action texts")
        if not isinstance(r.get("elements"), (list, tuple)):
            raise DataError(f"dataset {name!r}: row {i}: missing field 'elements' (the screen's elements with boxes)")
        if r.get("episode_id") is None:
            raise DataError(f"dataset {name!r}: row {i}: missing field 'episode_id' (TA groups steps by it)")
        out.append(dict(r))
    return out


def static_metric_set(margin: float = 0.2, text_match: str = "equal") -> MetricSet:
    """The gui_static metric set with other matching options (register it under a name of your own)."""
    return MetricSet(record=lambda traj: static_record(traj, margin=margin, text_match=text_match),
                     aggregate=static_aggregate, columns=STATIC_COLUMNS, title="GUI agent: static step evaluation",
                     check_rows=check_static_rows, progress="correct", totals=("n", "episodes", "partial_episodes"))


# ----------------------------------------------------------------------------- live


def live_record(traj) -> dict:
    """One prediction line of a live episode (facts from the miniwob environment's info)."""
    info, row = traj.info, traj.row
    if "success" not in info:
        raise KeyError(f"gui_live: the trajectory's info has no 'success': it needs episodes of the 'miniwob' "
                       f"environment (info keys: {sorted(info)})")
    success = bool(info["success"])
    milestones = [bool(m) for m in info.get("milestones") or ()]
    return {
        "task": row.get("task"),
        "seed": row.get("seed"),
        "success": success,
        "raw_reward": float(info.get("raw_reward", 0.0)),
        # the environment's counts; the loop's own (turns, invalid_actions) for an env that gives none
        "steps": int(info.get("steps", info.get("turns", 0))),
        "invalid": int(info.get("invalid", info.get("invalid_actions", 0))),
        "milestones": milestones,
        "progress": task_progress(milestones, success=success),
        "input_tokens": [int(t) for t in info.get("input_tokens") or ()],
        "step_seconds": [float(s) for s in info.get("step_seconds") or ()],
        "termination": info.get("termination"),
    }


def live_aggregate(records: Sequence[dict]) -> dict:
    steps = sum(r["steps"] for r in records)
    tokens = [t for r in records for t in r["input_tokens"]]
    seconds = [s for r in records for s in r["step_seconds"]]
    progress = [r["progress"] for r in records if r["progress"] == r["progress"]]  # NaN: no milestones
    out: dict[str, Any] = {
        "n": len(records),
        "success": mean([float(r["success"]) for r in records]),
        "atp": mean(progress),
        "avg_steps": mean([r["steps"] for r in records]),
        "invalid_rate": sum(r["invalid"] for r in records) / steps if steps else 0.0,
        "input_tokens_per_step": mean(tokens) if tokens else None,
        "step_latency": mean(seconds) if seconds else None,
    }
    by_task: dict[str, list[float]] = defaultdict(list)
    for r in records:
        by_task[str(r["task"])].append(float(r["success"]))
    out.update({f"success/{t}": mean(v) for t, v in sorted(by_task.items())})
    return out


GUI_STATIC = METRICS.register("gui_static", static_metric_set())
GUI_LIVE = METRICS.register(
    "gui_live",
    MetricSet(record=live_record, aggregate=live_aggregate, columns=LIVE_COLUMNS,
              title="GUI agent: live MiniWoB++ episodes", progress="success"),
)

"""GUI agent rewards (`rl.rewards.REWARDS`): SecAgent's step reward and MiniWoB's episode reward.

secagent      static step rows (one SecAgent step per prompt; `valid_actions` + `elements` columns):
              `format_weight` (0.5) x [the output is well formed: context, thought, action] +
              `action_weight` (1.0) x [its action matches one of the row's valid actions]
              (SecAgent's GRPO reward). The action counts even when the format is not right (the two
              terms add up as in the paper; a correct action in a bad format gets 1.0, not 1.5).
              Matching is `envs.gui.matching.match_action` (`margin`, `text_match` are its options).
              Extras logged: well_formed, correct, type_match (predicted kind = gold kind) and, for the
              row's gold kind K, `K_steps` = 1 and `K_correct`: the batch means' ratio is K's accuracy.
miniwob_task  live episodes of the `miniwob` environment: 1.0 when MiniWoB's raw reward is positive
              (`info["success"]`), else 0.0; `raw: true` gives MiniWoB's raw reward in [-1, 1] instead
              (partial credit on some tasks; -1 for a wrong submit). Time penalties are never used: the
              wall time of a CPU rollout says nothing about the policy. Extras: success, raw_reward, steps.

`step_outcome` is the one scoring of a static step, shared with the leaderboard (`envs.gui.metrics`), so
the reported SA is the training reward's correctness by construction.
"""

from __future__ import annotations

from typing import Any, Mapping

from envs.gui.matching import action_kind, match_action
from envs.gui.secagent import parse_step
from rl.rewards import register_reward

__all__ = ["step_outcome", "gold_kind", "secagent_reward", "miniwob_task"]


def _where(row: Mapping) -> str:
    return f"row {row.get('episode_id', '?')} step {row.get('step', row.get('step_index', '?'))}"


def gold_kind(row: Mapping) -> str | None:
    """The kind of the step's reference action (`action` column), else of its first valid action."""
    if row.get("action"):
        kind = action_kind(row["action"])
        if kind is not None:
            return kind
    valid = row.get("valid_actions") or ()
    return action_kind(valid[0]) if valid else None


def step_outcome(row: Mapping, response_text: str, *, margin: float = 0.2, text_match: str = "equal") -> dict:
    """{well_formed, correct, pred_kind, gold_kind, action, error} of one policy output on a static step."""
    from envs.gui.actions import parse_action

    valid = row.get("valid_actions")
    if not isinstance(valid, (list, tuple)) or not valid or not all(isinstance(v, str) for v in valid):
        raise ValueError(f"{_where(row)}: 'valid_actions' must be a non-empty list of action texts, got {valid!r:.80}")
    elements = row.get("elements")
    if not isinstance(elements, (list, tuple)):
        raise ValueError(f"{_where(row)}: 'elements' must be a list of elements with 'ref' and 'box'")
    step = parse_step(response_text)
    pred = parse_action(step.action_text) if step.action_text else None
    action = pred.action if pred is not None else None
    error = step.error or (pred.error if pred is not None and pred.action is None else None)
    return {
        "well_formed": step.well_formed,
        "correct": match_action(action, list(valid), elements, margin=margin, text_match=text_match),
        "pred_kind": action.kind if action is not None else None,
        "gold_kind": gold_kind(row),
        "action": step.action_text,
        "error": error,
    }


@register_reward("secagent")
def secagent_reward(row: dict, traj, format_weight: float = 0.5, action_weight: float = 1.0, margin: float = 0.2,
                    text_match: str = "equal") -> dict:
    out = step_outcome(row, traj.response_text, margin=margin, text_match=text_match)
    gk = out["gold_kind"]
    extras: dict[str, Any] = {
        "well_formed": float(out["well_formed"]),
        "correct": float(out["correct"]),
        "type_match": float(gk is not None and out["pred_kind"] == gk),
    }
    if gk is not None:
        extras[f"{gk}_steps"] = 1.0
        extras[f"{gk}_correct"] = float(out["correct"])
    score = format_weight * out["well_formed"] + action_weight * out["correct"]
    return {"score": float(score), **extras}


@register_reward("miniwob_task")
def miniwob_task(row: dict, traj, raw: bool = False) -> dict:
    info = traj.info
    missing = [k for k in ("success", "raw_reward") if k not in info]
    if missing:
        raise KeyError(f"miniwob_task: the trajectory's info has no {missing[0]!r}: it needs episodes of the "
                       f"'miniwob' environment (info keys: {sorted(info)})")
    success = bool(info["success"])
    raw_reward = float(info["raw_reward"])
    return {"score": raw_reward if raw else float(success), "success": float(success), "raw_reward": raw_reward,
            "steps": float(info.get("steps", 0))}

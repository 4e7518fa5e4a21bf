"""Reward functions: a registry of `f(row, trajectory, **kwargs) -> float | dict`.

A function returns a float, or a dict with a "score" key plus extra numbers that are
logged. Recipes combine several with weights. An exception inside a reward never
stops training: the sample gets `reward_fallback`, and the failure is counted in the
step metrics (`reward_errors/<name>`) and logged once per function with its message.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from rl.registry import Registry

if TYPE_CHECKING:  # annotations only: importing the rewards (and the papers registering theirs) needs no torch
    from rl.trajectory import Trajectory

logger = logging.getLogger(__name__)

REWARDS: Registry[Callable[..., Any]] = Registry("reward function")
register_reward = REWARDS.register

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@register_reward("numeric_exact")
def numeric_exact(row: dict, traj: Trajectory, answer_column: str = "answer") -> float:
    """1 if the whole response (stripped) is exactly the gold number, else 0.

    Strict on purpose: the answer must be the number alone, which a model learns to
    give; a number buried in prose scores 0.
    """
    text = traj.response_text.strip()
    return 1.0 if text == str(row[answer_column]).strip() else 0.0


@register_reward("final_number")
def final_number(row: dict, traj: Trajectory, answer_column: str = "answer") -> float:
    """1 if the response ended by itself (not cut at the token budget) and its last
    number equals the gold number: the final answer of a worked reply like
    "9 + 3 = 12" counts; rambling that never finishes does not."""
    if traj.info.get("finish_reason") == "length":
        return 0.0
    numbers = _NUMBER.findall(traj.response_text.replace(",", ""))
    return 1.0 if numbers and math.isclose(float(numbers[-1]), float(row[answer_column])) else 0.0


@register_reward("length_penalty")
def length_penalty(row: dict, traj: Trajectory, max_tokens: int = 32) -> float:
    """-(fraction of the token budget used); a gentle push towards short answers."""
    return -min(1.0, sum(traj.loss_mask) / max(1, max_tokens))


@dataclass
class RewardFn:
    name: str
    fn: Callable[..., Any]
    weight: float
    kwargs: dict


def build_rewards(specs) -> list[RewardFn]:
    return [RewardFn(s.name, REWARDS.get(s.name), s.weight, dict(s.kwargs)) for s in specs]


def score_trajectories(trajs: list[Trajectory], reward_fns: list[RewardFn], fallback: float) -> Counter:
    """Sets `traj.reward` (weighted sum) and `traj.reward_parts`; returns error counts per function."""
    errors: Counter = Counter()
    for traj in trajs:
        total, parts = 0.0, {}
        for rf in reward_fns:
            try:
                out = rf.fn(traj.row, traj, **rf.kwargs)
                if isinstance(out, dict):
                    parts.update({f"{rf.name}/{k}": float(v) for k, v in out.items() if k != "score"})
                    out = out["score"]
                value = float(out)
                if not math.isfinite(value):
                    raise ValueError(f"non-finite reward {value}")
            except Exception as e:  # a reward bug must not kill a long run; it is counted and reported
                if not errors[rf.name]:
                    logger.warning("reward function '%s' raised %s: %s (scored %s)", rf.name, type(e).__name__, e, fallback)
                errors[rf.name] += 1
                value = fallback
            parts[rf.name] = value
            total += rf.weight * value
        traj.reward = total
        traj.reward_parts = parts
    return errors

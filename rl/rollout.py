"""The rollout step: sample this process's prompts, run the agent through the engine, score the
trajectories, and (dynamic sampling) keep the groups to train on."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from rl import algorithms
from rl.rewards import score_trajectories
from rl.trajectory import Trajectory

__all__ = ["RolloutBatch", "rollout_step"]


@dataclass
class RolloutBatch:
    all_trajs: list[Trajectory]  # everything rolled out on this process (metrics)
    trajs: list[Trajectory]  # the groups trained on (all of them unless rollout.oversample > 1)
    rewards: torch.Tensor  # [len(all_trajs)] float64
    informative: dict[int, bool]  # group id -> its rewards differ
    kept_groups: set[int]
    reward_errors: dict[str, int]  # reward function name -> samples whose reward raised
    seconds: float


def rollout_step(run, step: int, stage_idx: int) -> RolloutBatch:
    """Every process draws the same global batch of prompts and rolls out its slice."""
    cfg, world, rank = run.cfg, run.world, run.rank
    data = run.stage_data[stage_idx]
    n_rollout = cfg.prompts_per_step * cfg.rollout.oversample
    rows = [data.dataset[i] for i in data.sampler.next(n_rollout)[rank::world]]
    t0 = time.perf_counter()
    run.engine.wake()
    all_trajs = run.agent(
        run.engine, run.tokenizer, rows, prompt_builder=data.builder, params=run.sampling,
        group_size=cfg.rollout.group_size, first_group_id=step * n_rollout + rank * len(rows),
        **cfg.rollout.agent_kwargs,
    )
    run.engine.sleep()
    seconds = time.perf_counter() - t0
    errors = score_trajectories(all_trajs, run.reward_fns, cfg.reward_fallback)
    # dynamic sampling: each process trains on its share of groups, those whose rewards differ first
    rewards = torch.tensor([t.reward for t in all_trajs], dtype=torch.float64)
    groups = torch.tensor([t.group_id for t in all_trajs], dtype=torch.long)
    informative = algorithms.informative_groups(rewards, groups)
    trajs = all_trajs
    if cfg.rollout.oversample > 1:
        keep = algorithms.select_groups(rewards, groups, cfg.prompts_per_step // world, informative=informative)
        trajs = [all_trajs[i] for i in keep.tolist()]
    return RolloutBatch(all_trajs, trajs, rewards, informative, {t.group_id for t in trajs},
                        {rf.name: errors[rf.name] for rf in run.reward_fns}, seconds)

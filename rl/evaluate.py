"""Held-out evaluation during training: rollouts of the eval rows (greedy by default) through the
run's agent and engine; the means of every reward, the response length and the episode info."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from rl.engines import SamplingParams
from rl.metrics import info_means, reduce_sums
from rl.rewards import score_trajectories

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(run) -> dict:
    cfg, acc = run.cfg, run.accelerator
    params = SamplingParams(max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.eval_temperature,
                            stop=list(cfg.rollout.stop))
    mine = run.eval_rows[acc.process_index :: acc.num_processes]
    size = max(1, cfg.rollout.generation_batch_size)
    trajs = []
    # chunks of one generation batch each, so a long eval shows its progress
    for start in tqdm(range(0, len(mine), size), desc=f"eval ({len(run.eval_rows)} prompts)", leave=False,
                      disable=not acc.is_main_process, dynamic_ncols=True):
        trajs += run.agent(run.engine, run.tokenizer, mine[start : start + size], prompt_builder=run.eval_builder,
                           params=params, group_size=1, **cfg.rollout.agent_kwargs)
    score_trajectories(trajs, run.reward_fns, cfg.reward_fallback)
    names = ["reward"] + [rf.name for rf in run.reward_fns]
    local = {"reward": sum(t.reward for t in trajs), "tokens": float(sum(len(t.response_ids) for t in trajs)),
             "samples": float(len(trajs))}
    local.update({f"reward/{n}": sum(t.reward_parts[n] for t in trajs) for n in names[1:]})
    tot = reduce_sums(acc, local)
    n = max(tot["samples"], 1.0)
    out = {"eval/reward": tot["reward"] / n}
    out.update({f"eval/{name}": tot[f"reward/{name}"] / n for name in names[1:]})
    out["eval/response_length"] = tot["tokens"] / n
    out["eval/samples"] = int(tot["samples"])
    out.update(info_means(acc, trajs, "eval/info"))
    return out

"""Held-out evaluation during training: rollouts of the eval rows (greedy by default) through the
run's agent and engine; the means of every reward (and a dict reward's extra numbers), the response
length and the episode info. With `samples_file`, every eval sample is written there (rl.samples)."""

from __future__ import annotations

from pathlib import Path

import torch

from rl.common import progress
from rl.engines import SamplingParams
from rl.metrics import info_means, reduce_sums, reward_extra_means
from rl.rewards import score_trajectories
from rl.samples import gather_records, sample_record, write_samples

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(run, samples_file: Path | None = None, step: int = 0) -> dict:
    cfg, acc = run.cfg, run.accelerator
    params = SamplingParams(max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.eval_temperature,
                            stop=list(cfg.rollout.stop), constraint=run.sampling.constraint)
    world = acc.num_processes
    slices = [run.eval_rows[r::world] for r in range(world)]
    mine = slices[acc.process_index]
    size = max(1, cfg.rollout.generation_batch_size)
    trajs = []
    # chunks of one generation batch each, so a long eval shows its progress; the bar counts prompts over
    # all processes (`eval 32/64`), which step through their slices together
    bar = progress(total=len(run.eval_rows), desc="eval", unit="prompt", leave=False, disable=not acc.is_main_process)
    for start in range(0, len(mine), size):
        trajs += run.agent(run.engine, run.tokenizer, mine[start : start + size], prompt_builder=run.eval_builder,
                           params=params, group_size=1, **cfg.rollout.agent_kwargs)
        bar.update(sum(len(s[start : start + size]) for s in slices))
    bar.close()
    score_trajectories(trajs, run.reward_fns, cfg.reward_fallback)
    names = ["reward"] + [rf.name for rf in run.reward_fns]
    local = {"reward": sum(t.reward for t in trajs), "tokens": float(sum(len(t.response_ids) for t in trajs)),
             "samples": float(len(trajs))}
    local.update({f"reward/{n}": sum(t.reward_parts[n] for t in trajs) for n in names[1:]})
    tot = reduce_sums(acc, local)
    n = max(tot["samples"], 1.0)
    out = {"eval/reward": tot["reward"] / n}
    out.update({f"eval/{name}": tot[f"reward/{name}"] / n for name in names[1:]})
    out.update(reward_extra_means(acc, trajs, names[1:], "eval"))
    out["eval/response_length"] = tot["tokens"] / n
    out["eval/samples"] = int(tot["samples"])
    out.update(info_means(acc, trajs, "eval/info"))
    if samples_file is not None:
        records = gather_records(acc, [sample_record(run.tokenizer, t, step=step, stage="eval") for t in trajs])
        if acc.is_main_process:
            write_samples(samples_file, records)
    return out

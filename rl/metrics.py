"""Step metrics, reduced across processes by name.

Every process computes named local sums (or maxima); `reduce_sums` / `reduce_max` combine them
over all processes, key by key, so a metric is never found by its position in a tensor. The
metrics a step logs are assembled in `step_metrics`; `MetricsLog` writes them (metrics.jsonl,
trackers, the in-memory history the report plots).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from rl import algorithms
from rl.trajectory import Trajectory

__all__ = [
    "MAX_INFO_CATEGORIES",
    "reduce_sums",
    "reduce_max",
    "info_means",
    "rollout_mismatch_metrics",
    "is_weight_metrics",
    "step_metrics",
    "MetricsLog",
]

MAX_INFO_CATEGORIES = 8


def _same_names(accelerator: Accelerator, names: list[str]) -> None:
    """Every process reduces the same names (a mismatch would add different metrics together)."""
    if accelerator.num_processes > 1:
        seen = {tuple(n) for n in gather_object([names])}
        if len(seen) > 1:
            raise RuntimeError(f"processes reduce different metrics: {sorted(seen)}")


def reduce_sums(accelerator: Accelerator, local: Mapping[str, float]) -> dict[str, float]:
    """`{name: sum over processes}` (float64)."""
    names = sorted(local)
    _same_names(accelerator, names)
    values = torch.tensor([float(local[k]) for k in names], dtype=torch.float64)
    if accelerator.num_processes > 1:
        values = accelerator.reduce(values.to(accelerator.device), reduction="sum").cpu()
    return dict(zip(names, values.tolist()))


def reduce_max(accelerator: Accelerator, local: Mapping[str, float]) -> dict[str, float]:
    """`{name: max over processes}` (float64)."""
    names = sorted(local)
    _same_names(accelerator, names)
    values = torch.tensor([float(local[k]) for k in names], dtype=torch.float64)
    if accelerator.num_processes > 1:
        values = accelerator.gather(values.to(accelerator.device)[None]).cpu().amax(0)
    return dict(zip(names, values.tolist()))


def info_means(accelerator: Accelerator, trajs: list[Trajectory], prefix: str) -> dict[str, float]:
    """Means over all processes of the agents' per-sample `info`: numbers and booleans as
    `<prefix>/<key>`, short strings with at most `MAX_INFO_CATEGORIES` values (finish reasons, terminations) as fractions
    `<prefix>/<key>/<value>`. Agents add fields; the trainer needs no change."""
    # free text (e.g. a search agent's answers) would explode into one metric per distinct value
    distinct: dict[str, set] = {}
    for t in trajs:
        for key, value in t.info.items():
            if isinstance(value, str):
                distinct.setdefault(key, set()).add(value)
    categorical = {k for k, v in distinct.items() if len(v) <= MAX_INFO_CATEGORIES and max(map(len, v)) <= 32}
    sums: dict[str, float] = {}
    for t in trajs:
        for key, value in t.info.items():
            if isinstance(value, (bool, int, float)):
                sums[key] = sums.get(key, 0.0) + float(value)
            elif key in categorical:
                sums[f"{key}/{value}"] = sums.get(f"{key}/{value}", 0.0) + 1.0
    # processes may see different keys (a category only one of them met): union, by name
    parts = gather_object([(sums, len(trajs))]) if accelerator.num_processes > 1 else [(sums, len(trajs))]
    n = max(sum(c for _, c in parts), 1)
    keys = sorted({k for d, _ in parts for k in d})
    return {f"{prefix}/{k}": sum(d.get(k, 0.0) for d, _ in parts) / n for k in keys}


def rollout_mismatch_metrics(accelerator: Accelerator, old_logprobs, rollout_logprobs, mask) -> dict[str, float]:
    """Engine vs trainer log-probs over every process's policy tokens (`rollout/*` metrics)."""
    parts = {k: v.double().item() for k, v in algorithms.rollout_mismatch(old_logprobs, rollout_logprobs, mask).items()}
    sums = reduce_sums(accelerator, {k: parts[k] for k in ("abs_diff_sum", "k3_sum", "tokens")})
    maxes = reduce_max(accelerator, {k: parts[k] for k in ("abs_diff_max", "log_ratio_max", "seq_log_ratio_max")})
    n = max(sums["tokens"], 1.0)
    return {
        "rollout/logp_abs_diff": sums["abs_diff_sum"] / n,
        "rollout/logp_abs_diff_max": maxes["abs_diff_max"],
        "rollout/kl_k3": sums["k3_sum"] / n,
        # largest pi_old / mu of a token and of a whole sequence (exp of a log, so it may be inf)
        "rollout/token_ratio_max": math.exp(min(maxes["log_ratio_max"], 700.0)),
        "rollout/seq_ratio_max": math.exp(min(maxes["seq_log_ratio_max"], 700.0)),
    }


def is_weight_metrics(accelerator: Accelerator, weights, mask, cap: float) -> dict[str, float]:
    """Mean truncated IS weight and the fraction of policy tokens whose weight hit the cap."""
    m = mask > 0  # exp(log(cap)) may round just below cap, hence the tolerance
    tot = reduce_sums(accelerator, {
        "weight": weights[m].sum().item(), "truncated": (weights[m] >= cap * (1 - 1e-6)).sum().item(),
        "tokens": m.sum().item(),
    })
    n = max(tot["tokens"], 1.0)
    return {"rollout/is_weight_mean": tot["weight"] / n, "rollout/is_truncated_frac": tot["truncated"] / n}


def step_metrics(accelerator: Accelerator, *, rollout, update, passes, group_size: int) -> dict[str, float]:
    """One step's metrics: rewards and episode info over everything rolled out (the policy's
    performance, not the groups dynamic sampling kept for training), losses over the trained tokens,
    advantage statistics over this process's policy tokens."""
    trajs, rewards = rollout.all_trajs, rollout.rewards.tolist()
    local = {
        "reward": sum(rewards), "reward_sq": sum(r * r for r in rewards), "samples": len(rewards),
        "generated_tokens": sum(sum(t.loss_mask) for t in trajs),
        "informative_groups": sum(rollout.informative.values()), "groups": len(rollout.informative),
        "kept_informative_groups": sum(rollout.informative[g] for g in rollout.kept_groups),
        "kept_groups": len(rollout.kept_groups),
        "policy_tokens": update.policy_tokens, "trained_tokens": update.trained_tokens,
        **{f"loss/{k}": v for k, v in update.loss_sums.items()},
    }
    for name, errors in rollout.reward_errors.items():
        local[f"reward/{name}"] = sum(t.reward_parts.get(name, 0.0) for t in trajs)
        local[f"reward_errors/{name}"] = float(errors)
    tot = reduce_sums(accelerator, local)
    n, seen = max(tot["samples"], 1), max(tot["policy_tokens"], 1)
    mean_r = tot["reward"] / n
    metrics = {
        "reward/mean": mean_r,
        "reward/std": math.sqrt(max(tot["reward_sq"] / n - mean_r**2, 0.0)),
        "response_length/mean": tot["generated_tokens"] / n,
    }
    metrics.update(info_means(accelerator, trajs, "info"))
    metrics.update(passes.mismatch)
    metrics.update({k: v / seen for k, v in tot.items() if k.startswith("loss/")})
    for name in rollout.reward_errors:
        metrics[f"reward/{name}"] = tot[f"reward/{name}"] / n
        metrics[f"reward_errors/{name}"] = tot[f"reward_errors/{name}"]
    if group_size > 1:  # one sample per prompt (PPO) has no groups to compare
        metrics["rollout/informative_groups"] = tot["informative_groups"] / max(tot["groups"], 1)  # rewards differ
        metrics["rollout/trained_informative_groups"] = tot["kept_informative_groups"] / max(tot["kept_groups"], 1)
    valid = passes.advantages[passes.mask > 0]
    metrics.update({
        "advantage/mean": valid.mean().item() if valid.numel() else 0.0,
        "advantage/std": valid.std().item() if valid.numel() > 1 else 0.0,
        "advantage/abs_max": valid.abs().max().item() if valid.numel() else 0.0,
        "grad_norm": sum(update.grad_norms) / len(update.grad_norms) if update.grad_norms else float("nan"),
        "tokens/generated": tot["generated_tokens"],
        "tokens/trained": tot["trained_tokens"],  # forward/backward tokens (with padding when packing is off)
        "time/rollout": rollout.seconds,
        "time/train": update.seconds,
        "throughput/generated_tokens_per_s": tot["generated_tokens"] / max(rollout.seconds, 1e-9),
        "throughput/trained_tokens_per_s": tot["trained_tokens"] / max(update.seconds, 1e-9),
    })
    return metrics


class MetricsLog:
    """The run's metrics: the in-memory history, `metrics.jsonl` (main process) and the trackers."""

    def __init__(self, accelerator: Accelerator, output_dir: Path, history: list[dict], report_to: list[str]):
        self.accelerator, self.history, self.report_to = accelerator, history, report_to
        self.file = open(output_dir / "metrics.jsonl", "a") if accelerator.is_main_process else None

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        self.history.append({"step": step, **metrics})
        if self.file:
            self.file.write(json.dumps({"step": step, **metrics}) + "\n")
            self.file.flush()
        if self.report_to:
            self.accelerator.log(dict(metrics), step=step)

    def close(self) -> None:
        if self.file:
            self.file.close()

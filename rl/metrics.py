"""Step metrics, reduced across processes by name.

Every process computes named local sums (or maxima); `reduce_sums` / `reduce_max` combine them
over all processes, key by key, so a metric is never found by its position in a tensor. The
metrics a step logs are assembled in `step_metrics`; `MetricsLog` writes them (metrics.jsonl,
trackers, the in-memory history the report plots).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from rl import algorithms
from rl.common import atomic_write_lines
from rl.trajectory import Trajectory

logger = logging.getLogger("rl.metrics")

__all__ = [
    "reduce_sums",
    "reduce_max",
    "info_means",
    "reward_extra_means",
    "flatten_config",
    "rollout_mismatch_metrics",
    "is_weight_metrics",
    "step_metrics",
    "MetricsLog",
]

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


def _union_means(accelerator: Accelerator, sums: Mapping[str, float], count: int) -> dict[str, float]:
    """`{name: sum over processes / samples over processes}` for names that only some processes may
    have met (a sample's info key, a dict reward's extra): gathered as a union, by name."""
    parts = gather_object([(dict(sums), count)]) if accelerator.num_processes > 1 else [(dict(sums), count)]
    n = max(sum(c for _, c in parts), 1)
    keys = sorted({k for d, _ in parts for k in d})
    return {k: sum(d.get(k, 0.0) for d, _ in parts) / n for k in keys}


def info_means(accelerator: Accelerator, trajs: list[Trajectory], prefix: str) -> dict[str, float]:
    """Means over all processes' samples of the agents' per-sample `info` numbers and booleans, as
    `<prefix>/<key>`; a sample without the key counts 0 (an event that did not happen). Strings (answers,
    termination reasons) never become metric names, which must be few and fixed: they are in the samples
    files (`rl.samples`). Agents add fields; the trainer needs no change."""
    sums: dict[str, float] = {}
    for t in trajs:
        for key, value in t.info.items():
            if isinstance(value, (bool, int, float)):
                sums[f"{prefix}/{key}"] = sums.get(f"{prefix}/{key}", 0.0) + float(value)
    return _union_means(accelerator, sums, len(trajs))


def reward_extra_means(accelerator: Accelerator, trajs: list[Trajectory], reward_names: list[str],
                       prefix: str) -> dict[str, float]:
    """Means of the extra numbers dict-valued rewards return (`reward_parts["<name>/<key>"]`, see
    rl/rewards.py) as `<prefix>/<name>/<key>`; a sample whose reward raised has none and counts 0."""
    sums: dict[str, float] = {}
    for t in trajs:
        for key, value in t.reward_parts.items():
            if any(key.startswith(f"{name}/") for name in reward_names):
                sums[f"{prefix}/{key}"] = sums.get(f"{prefix}/{key}", 0.0) + float(value)
    return _union_means(accelerator, sums, len(trajs))


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
        # the engines' finish reason "length": cut at the token budget (TRL's completions/clipped_ratio)
        "clipped": sum(t.info.get("finish_reason") == "length" for t in trajs),
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
        "response_length/clipped_frac": tot["clipped"] / n,
    }
    metrics.update(reward_extra_means(accelerator, trajs, list(rollout.reward_errors), "reward"))
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


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as `{"model.lr": 1e-6, ...}` with scalar values only: numbers, booleans and strings
    as they are, None as "None", lists (and empty dicts) as their JSON text. What trackers take as
    filterable hyper-parameters (TensorBoard's hparams accept no lists or None)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        elif value is None:
            flat[name] = "None"
        else:
            flat[name] = json.dumps(value, default=str)
    return flat


class MetricsLog:
    """The run's metrics: the in-memory history, `metrics.jsonl` (main process) and the trackers.

    `metrics.jsonl` is the history: on resume it is rewritten (atomically) from the history the checkpoint
    holds, so a step logged after that checkpoint, or twice (a crash while its checkpoint was written),
    appears once, as in an uninterrupted run.

    The metric names are fixed per kind of record (a training step; an evaluation: all names "eval/...")
    by its first record, so every line of a kind has the same keys: a name missing from a later record is
    logged as 0.0 (info keys and reward extras average to 0 over samples without them), a name first seen
    later is not logged and is warned about once (its values are in the samples files)."""

    def __init__(self, accelerator: Accelerator, output_dir: Path, history: list[dict], report_to: list[str]):
        self.accelerator, self.history, self.report_to = accelerator, history, report_to
        self.names: dict[str, list[str]] = {}
        for record in history:
            self.names.setdefault(self.kind(record), [k for k in record if k != "step"])
        self._warned: set[str] = set()
        self.file = None
        if accelerator.is_main_process:
            path = Path(output_dir) / "metrics.jsonl"
            atomic_write_lines(path, (json.dumps(h) for h in history))
            self.file = open(path, "a")

    @staticmethod
    def kind(metrics: Mapping[str, Any]) -> str:
        return "eval" if all(k.startswith("eval/") for k in metrics if k != "step") else "train"

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        kind = self.kind(metrics)
        names = self.names.setdefault(kind, list(metrics))
        new = [k for k in metrics if k not in names and k not in self._warned]
        if new and self.accelerator.is_main_process:
            logger.warning("metric(s) %s first appeared at step %d: not logged (the names of %s records are fixed "
                           "by the first one; the samples files hold the values)", new, step, kind)
        self._warned.update(new)
        record = {"step": step, **{k: metrics.get(k, 0.0) for k in names}}
        self.history.append(record)
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.report_to:
            self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def close(self) -> None:
        if self.file:
            self.file.close()

"""The batch's per-token quantities before the update: pi_old (engine log-probs, or recomputed with
rollout correction weights), reference log-probs for the KL, critic values, token rewards and the
advantages over the global batch (batch baselines and whitening see every process's samples)."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator

from rl import algorithms
from rl.forward import batch_forward, release_memory
from rl.metrics import is_weight_metrics, rollout_mismatch_metrics
from rl.packing import build_micro_batches
from rl.trajectory import Trajectory, outcome_token_rewards, to_response_tensors

__all__ = ["BatchPasses", "prepare_batch", "gather_for_advantages"]


@dataclass
class BatchPasses:
    """`[B, T]` tensors over this process's trained samples (0 at environment tokens and padding)."""

    mask: torch.Tensor  # loss mask: 1 at policy tokens
    old_logprobs: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    ref_logprobs: torch.Tensor | None = None  # when kl_coef > 0
    old_values: torch.Tensor | None = None  # when the estimator needs values
    is_weights: torch.Tensor | None = None  # truncated importance weights (rollout correction)
    mismatch: dict[str, float] = field(default_factory=dict)  # rollout/* metrics


def gather_for_advantages(accelerator: Accelerator, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """All-gather [B, T] tensors across processes (padded to a common T), so batch-level
    statistics (batch baselines, whitening) are those of the global batch."""
    if accelerator.num_processes == 1:
        return tensors
    return [accelerator.gather(accelerator.pad_across_processes(t.to(accelerator.device), dim=1)).cpu() for t in tensors]


def prepare_batch(run, trajs: list[Trajectory], kl_coef: float) -> BatchPasses:
    cfg, algo, accelerator = run.cfg, run.cfg.algorithm, run.accelerator
    resp = to_response_tensors(trajs)
    B, T = resp.response_ids.shape
    mask = resp.response_mask
    recompute = cfg.old_logprobs == "recompute" or algo.rollout_correction != "none"
    # laid out once (packing builds a W x W mask per row) and reused by every no-grad pass
    whole_batch = build_micro_batches(
        trajs, list(range(B)), cfg.micro_batch_tokens, cfg.packing, run.tokenizer.pad_token_id, cfg.pack_row_tokens,
        run.vision,
    ) if (recompute or kl_coef > 0 or run.critic is not None) else []
    out = BatchPasses(mask=mask, old_logprobs=resp.rollout_logprobs * mask, advantages=None, returns=None)
    if recompute:
        out.old_logprobs = batch_forward(run.unwrapped, whole_batch, B, T, run.temperature) * mask
        out.mismatch = rollout_mismatch_metrics(accelerator, out.old_logprobs, resp.rollout_logprobs, mask)
        if algo.rollout_correction != "none":
            out.is_weights = algorithms.get_rollout_correction(algo.rollout_correction)(
                out.old_logprobs, resp.rollout_logprobs, mask, cap=algo.rollout_correction_cap
            )
            out.mismatch.update(is_weight_metrics(accelerator, out.is_weights, mask, algo.rollout_correction_cap))
    if kl_coef > 0:  # under LoRA the adapter-disabled policy is the reference
        with run.unwrapped.disable_adapter() if cfg.model.lora else nullcontext():
            ref = run.unwrapped if cfg.model.lora else run.ref_model
            out.ref_logprobs = batch_forward(ref, whole_batch, B, T, run.temperature) * mask
    if run.critic is not None:
        out.old_values = batch_forward(accelerator.unwrap_model(run.critic), whole_batch, B, T, values=True) * mask
    if whole_batch:
        del whole_batch  # its W x W packing masks
        release_memory()

    token_rewards = outcome_token_rewards(trajs, T)
    if kl_coef > 0 and algo.kl_in_reward:
        token_rewards = token_rewards - kl_coef * run.kl_fn(out.old_logprobs, out.ref_logprobs) * mask
    # advantages over the global batch (group ids are globally unique), then this process's slice
    g_rewards, g_mask, g_values = gather_for_advantages(
        accelerator, [token_rewards, mask, out.old_values if out.old_values is not None else torch.zeros_like(mask)]
    )
    g_groups = accelerator.gather(resp.group_ids.to(accelerator.device)).cpu() if run.world > 1 else resp.group_ids
    g_adv, g_ret = algorithms.call_with_options(
        run.estimator, run.algo_options, token_rewards=g_rewards, response_mask=g_mask, group_ids=g_groups,
        values=g_values if run.critic is not None else None,
    )
    rows = slice(run.rank * B, (run.rank + 1) * B)
    out.advantages, out.returns = g_adv[rows, :T], g_ret[rows, :T]
    return out

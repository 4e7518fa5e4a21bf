"""The update step: epochs x mini-batches x packed micro-batches of policy (and critic) losses,
gradient accumulation with global normalisation, clipping, and the optimizer steps.

Every loss is aggregated with the denominators of the whole mini-batch over all processes
(`num_tokens`, `num_seqs`), so the sum of the micro-batch losses is the mini-batch loss: the
update does not depend on how the batch is cut into micro-batches or processes.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from rl import algorithms
from rl.batch import BatchPasses
from rl.forward import forward_logprobs, forward_values, release_memory
from rl.packing import MicroBatch, build_micro_batches, gather_rows
from rl.trajectory import Trajectory

__all__ = ["UpdateStats", "update_step", "aggregate_micro"]

logger = logging.getLogger("rl.update")

LOSS_SUMS = ("approx_kl", "clipfrac", "entropy", "kl", "pg_loss", "vf_loss")  # logged as loss/<name>


@dataclass
class UpdateStats:
    loss_sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(LOSS_SUMS, 0.0))  # over policy tokens
    grad_norms: list[float] = field(default_factory=list)  # one per optimizer step taken
    policy_tokens: float = 0.0
    trained_tokens: int = 0  # forward/backward tokens, padding included
    skipped: int = 0  # optimizer steps skipped for a non-finite loss or gradient
    seconds: float = 0.0


def aggregate_micro(x, m, mb: MicroBatch, mode, num_tokens, num_seqs, norm_len) -> torch.Tensor:
    """Aggregate a flat per-token quantity of a micro-batch with global denominators.
    The micro-batch is viewed as [n_seqs, longest] so per-sequence modes see sequences."""
    n = len(mb.lengths)
    width = max(mb.lengths) if mb.lengths else 1
    mat = x.new_zeros(n, width)
    msk = m.new_zeros(n, width)
    start = 0
    for i, length in enumerate(mb.lengths):
        mat[i, :length] = x[start : start + length]
        msk[i, :length] = m[start : start + length]
        start += length
    return algorithms.aggregate_loss(mat, msk, mode, num_tokens=num_tokens, num_seqs=num_seqs, norm_len=norm_len)


def _zero_loss(module) -> torch.Tensor:
    """A zero that still reaches every trainable parameter, so DDP's gradient hooks all fire."""
    return sum(p.sum() for p in module.parameters() if p.requires_grad) * 0.0


def _policy_micro_step(run, mb: MicroBatch, passes: BatchPasses, kl_coef: float, counts, stats: UpdateStats):
    """Forward, loss and backward of one micro-batch; returns 1 if the loss was not finite (skipped)."""
    algo = run.cfg.algorithm
    logp, entropy = forward_logprobs(run.policy, mb, run.temperature, with_entropy=True)
    m = gather_rows(passes.mask, mb).to(logp.device)
    adv = gather_rows(passes.advantages, mb).to(logp.device)
    old = gather_rows(passes.old_logprobs, mb).to(logp.device)
    # losses take [B, T]; a micro-batch is one flat row each
    pg_mat, info = algorithms.call_with_options(
        run.policy_loss_fn, run.algo_options, logprobs=logp[None], old_logprobs=old[None],
        advantages=adv[None], response_mask=m[None],
    )
    algorithms.check_policy_loss_info(algo.policy_loss, pg_mat, info)

    def agg(x):
        return aggregate_micro(x, m, mb, algo.loss_agg_mode, *counts, run.cfg.rollout.max_new_tokens)

    if passes.is_weights is not None:  # truncated importance sampling, engine -> trainer
        pg_mat = pg_mat * gather_rows(passes.is_weights, mb).to(pg_mat.device)[None]
    loss = agg(pg_mat[0])
    if algo.entropy_coef:
        loss = loss - algo.entropy_coef * agg(entropy)
    if kl_coef > 0 and not algo.kl_in_reward:
        loss = loss + kl_coef * agg(run.kl_fn(logp, gather_rows(passes.ref_logprobs, mb).to(logp.device)))
    # DDP averages gradients over processes; the global normalisation already divides by the
    # global counts, so undo the average
    loss = loss * run.world
    bad = 0
    if not torch.isfinite(loss):
        bad, loss = 1, _zero_loss(run.policy)
    run.accelerator.backward(loss)
    with torch.no_grad():
        sums = stats.loss_sums
        stats.policy_tokens += m.sum().item()
        stats.trained_tokens += int(mb.input_ids.numel())
        sums["pg_loss"] += (pg_mat[0] * m).sum().item()
        sums["entropy"] += (entropy * m).sum().item()
        sums["clipfrac"] += (info["clipped"][0] * m).sum().item()
        sums["approx_kl"] += (info["approx_kl"][0] * m).sum().item()
        if passes.ref_logprobs is not None:
            sums["kl"] += (run.kl_fn(logp, gather_rows(passes.ref_logprobs, mb).to(logp.device)) * m).sum().item()
    return bad


def _critic_micro_step(run, mb: MicroBatch, passes: BatchPasses, counts, stats: UpdateStats):
    algo = run.cfg.algorithm
    v = forward_values(run.critic, mb)
    m = gather_rows(passes.mask, mb).to(v.device)
    vf_mat, _ = algorithms.call_with_options(
        run.value_loss_fn, run.algo_options, v[None], gather_rows(passes.old_values, mb).to(v.device)[None],
        gather_rows(passes.returns, mb).to(v.device)[None], m[None],
    )
    vf = aggregate_micro(vf_mat[0], m, mb, algo.loss_agg_mode, *counts, run.cfg.rollout.max_new_tokens)
    vf = algo.value_loss_coef * vf * run.world
    bad = 0
    if not torch.isfinite(vf):
        bad, vf = 1, _zero_loss(run.critic)
    run.accelerator.backward(vf)
    stats.loss_sums["vf_loss"] += (vf_mat[0] * m).sum().item()
    return bad


def _accumulate(run, module, micro: list[MicroBatch], step_fn) -> int:
    """`step_fn(mb)` over the micro-batches, syncing gradients across processes on the last one only."""
    bad = 0
    for k, mb in enumerate(micro):
        with nullcontext() if k == len(micro) - 1 else run.accelerator.no_sync(module):
            bad += step_fn(mb)
    return bad


def _optimizer_step(run, bad: int, stats: UpdateStats, step: int) -> None:
    acc, cfg = run.accelerator, run.cfg
    grad_norm = acc.clip_grad_norm_(run.policy.parameters(), cfg.optim.max_grad_norm)
    if run.critic is not None:
        acc.clip_grad_norm_(run.critic.parameters(), cfg.optim.max_grad_norm)
    bad = torch.tensor([float(bad)], device=acc.device)
    bad = acc.reduce(bad + (0 if torch.isfinite(grad_norm) else 1), reduction="sum")
    if bad.item() > 0:  # every process skips together, so replicas stay identical
        stats.skipped += 1
        logger.warning("step %d: non-finite loss or gradient, optimizer step skipped", step + 1)
    else:
        run.optimizer.step()
        run.scheduler.step()
        if run.critic_optimizer is not None:
            run.critic_optimizer.step()
        stats.grad_norms.append(grad_norm.item())
    run.optimizer.zero_grad(set_to_none=True)
    if run.critic_optimizer is not None:
        run.critic_optimizer.zero_grad(set_to_none=True)


def update_step(run, trajs: list[Trajectory], passes: BatchPasses, kl_coef: float, step: int) -> UpdateStats:
    """`ppo_epochs` passes over the batch, each in `mini_batches_per_step` optimizer steps."""
    cfg, acc = run.cfg, run.accelerator
    t0 = time.perf_counter()
    stats = UpdateStats()
    B = len(trajs)
    # from_pretrained returns a model in eval mode, and transformers checkpoints its layers only in
    # training mode: without this, model.gradient_checkpointing was silently off (measured: the same
    # 8.6 GB peak with and without it on recipes/search_r1pp_cpu.yaml)
    run.policy.train()
    for epoch in range(cfg.ppo_epochs):
        # a fixed order per step keeps runs reproducible; mini-batches interleave groups
        perm = torch.randperm(B, generator=torch.Generator().manual_seed(cfg.seed * 100003 + step * 101 + epoch))
        for k in range(cfg.mini_batches_per_step):
            mini = perm[k :: cfg.mini_batches_per_step].tolist()
            counts = torch.tensor([passes.mask[mini].sum().item(), float(len(mini))], device=acc.device)
            counts = acc.reduce(counts, reduction="sum").tolist()  # global (num_tokens, num_seqs)
            # laid out once, used by the policy pass and the critic pass
            micro = build_micro_batches(trajs, mini, cfg.micro_batch_tokens, cfg.packing,
                                        run.tokenizer.pad_token_id, cfg.pack_row_tokens, run.vision)
            bad = _accumulate(run, run.policy, micro,
                              lambda mb: _policy_micro_step(run, mb, passes, kl_coef, counts, stats))
            if run.critic is not None:
                bad += _accumulate(run, run.critic, micro,
                                   lambda mb: _critic_micro_step(run, mb, passes, counts, stats))
            _optimizer_step(run, bad, stats, step)
    release_memory()  # the step's activations are freed: hand their pages back before the next rollout
    stats.seconds = time.perf_counter() - t0
    return stats

"""The shared RL trainer: one loop for REINFORCE, RLOO, GRPO, PPO and curriculum stages.

`train(cfg)` reads top to bottom:

  setup -> eval before -> for each step:
      pick the stage -> rollout G samples per prompt (agent + engine) and rewards
      -> pi_old / reference / values and advantages over the global batch
      -> update (epochs x mini-batches x packed micro-batches) -> sync weights to the engine
      -> metrics -> eval -> checkpoint
  -> eval after -> report (before/after table, reward curve)

Each step is a function in its own module: `rl.setup` (accelerator, models, optimizers, engine,
data), `rl.rollout`, `rl.batch`, `rl.update`, `rl.metrics`, `rl.evaluate`, `rl.checkpoint`,
`rl.report`. Algorithms differ only through the `rl.algorithms` registries the recipe names;
papers differ only through the agent, environment, prompt builders, datasets and rewards that
their plugins register. Nothing here knows a paper or an algorithm by name.
"""

from __future__ import annotations

import logging
import time

from rl.batch import prepare_batch
from rl.checkpoint import restore_run, save_final, save_run, stage_at
from rl.common import progress as progress_bar
from rl.config import TrainConfig
from rl.evaluate import evaluate
from rl.metrics import MetricsLog, step_metrics
from rl.report import write_training_report
from rl.rollout import rollout_step
from rl.samples import gather_records, log_samples, sample_record, samples_path, write_samples
from rl.setup import setup_run
from rl.update import update_step

__all__ = ["train"]

logger = logging.getLogger("rl.trainer")


def train(cfg: TrainConfig, resume: str | None = None) -> dict:
    run = setup_run(cfg, resume)
    start_step, history = restore_run(run)
    metrics_log = MetricsLog(run.accelerator, run.output_dir, history, cfg.report_to)

    def run_eval(step: int) -> dict:
        if not run.eval_rows:
            return {}
        metrics = evaluate(run, samples_path(run.output_dir, step, eval_=True) if cfg.log_samples > 0 else None, step)
        metrics_log.log(metrics, step)
        return metrics

    eval_before = run_eval(0) if (cfg.eval_before_training and start_step == 0) else {}
    if eval_before and run.is_main:
        logger.info("eval before training: %s", _fmt(eval_before))
    last_eval = eval_before

    progress = progress_bar(total=cfg.total_steps, initial=start_step, desc="rl.train", disable=not run.is_main)
    skipped = 0
    for step in range(start_step, cfg.total_steps):
        t_step = time.perf_counter()
        stage_idx = stage_at(run.stages, step)
        stage = run.stages[stage_idx]
        kl_coef = run.kl_coef(stage)

        # rollout -> rewards -> (dynamic sampling) -> per-token quantities -> update -> weight sync
        rollout = rollout_step(run, step, stage_idx)
        passes = prepare_batch(run, rollout.trajs, kl_coef)
        update = update_step(run, rollout.trajs, passes, kl_coef, step)
        skipped += update.skipped
        t_sync = time.perf_counter()
        run.engine.update_weights(run.unwrapped)
        sync_seconds = time.perf_counter() - t_sync

        metrics = {"stage": stage_idx}
        metrics.update(step_metrics(run.accelerator, rollout=rollout, update=update, passes=passes,
                                    group_size=cfg.rollout.group_size))
        metrics.update({
            "kl_coef": kl_coef,
            "lr": run.scheduler.get_last_lr()[0],
            "nan_skipped_steps": skipped,
            "time/weight_sync": sync_seconds,
            "time/step": time.perf_counter() - t_step,
            # samples rolled out so far: the plots' second x axis (episodes = step x prompts x oversample x G)
            "episodes": (step + 1) * cfg.prompts_per_step * cfg.rollout.oversample * cfg.rollout.group_size,
        })
        log_step = (step + 1) % cfg.logging_steps == 0 or step + 1 == cfg.total_steps
        if log_step:
            metrics_log.log(metrics, step + 1)
        if cfg.log_samples > 0:  # every step (the first log_samples of every process's, gathered in order)
            records = gather_records(run.accelerator, [sample_record(run.tokenizer, t, step=step + 1, stage=stage_idx)
                                                       for t in rollout.all_trajs[: cfg.log_samples]])
            if run.is_main:
                write_samples(samples_path(run.output_dir, step + 1), records[: cfg.log_samples])
                if log_step:
                    log_samples(records)
        progress.update(1)
        progress.set_postfix(stage=stage.name or stage_idx, reward=f"{metrics['reward/mean']:.3f}",
                             s_per_step=f"{metrics['time/step']:.1f}")

        done = step + 1 == cfg.total_steps
        if cfg.eval_steps and (step + 1) % cfg.eval_steps == 0 and not done:
            last_eval = run_eval(step + 1)
        if (cfg.save_steps and (step + 1) % cfg.save_steps == 0) or done:
            save_run(run, step + 1, history)
    progress.close()
    save_final(run)  # <output_dir>/final/: the trained policy as a plain Hugging Face model

    eval_after = run_eval(cfg.total_steps) if run.eval_rows else {}
    if run.is_main:
        write_training_report(run.output_dir, history, eval_before, eval_after)
        if eval_after:
            logger.info("eval after training: %s", _fmt(eval_after))
    metrics_log.close()
    run.engine.close()  # a vLLM engine holds its own memory and workers
    # Every rank waits for the main one's report, then the process group is torn down: a rank that exits
    # while gloo's threads still run aborts with "terminate called without an active exception" (seen in CI).
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()  # finishes trackers; destroys the process group only when one exists
    return {"eval_before": eval_before, "eval_after": eval_after or last_eval, "history": history}


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())

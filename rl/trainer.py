"""The shared RL trainer: one loop for REINFORCE, RLOO, GRPO, PPO and curriculum stages.

`train(cfg)` reads top to bottom:

  setup -> eval before -> for each step:
      pick the stage -> sample prompts -> rollout G samples per prompt (agent + engine)
      -> rewards -> (KL reference, PPO values) -> advantages
      -> for each epoch and mini-batch: packed micro-batches, log-probs, losses, backward
      -> optimizer step -> sync weights to the engine -> metrics -> checkpoint -> eval
  -> eval after -> report (before/after table, reward curve)

Algorithms differ only through `rl.algorithms` registries selected by the recipe;
papers differ only through the agent, prompt builder, dataset and reward functions.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

from rl import algorithms, checkpoint
from rl.config import TrainConfig, config_to_dict
from rl.critic import ValueModel
from rl.data import PROMPT_BUILDERS, PromptSampler, check_columns, load_source
from rl.engines import SamplingParams, build_engine
from rl.models import resolve_model
from rl.plugins import load_plugins
from rl.registry import AGENTS
from rl.rewards import build_rewards, score_trajectories
from rl.trajectory import Trajectory, outcome_token_rewards, to_response_tensors

logger = logging.getLogger("rl.trainer")


# ----------------------------------------------------------------------------- packing


@dataclass
class MicroBatch:
    """Sequences laid out for one forward pass, as `[rows, width]` tensors.

    Packed (the default): samples are bin-packed into rows of at most `row_tokens`
    tokens, and samples of the same prompt share one copy of it: a row holds
    `prompt, response_1, ..., response_G, next prompt, ...`, each response with position
    ids continuing from its prompt and a 4D mask letting it see its prompt and its own
    earlier tokens only. That is exact (the loss is a sum over responses, so gradients
    through a shared prompt just accumulate) and removes (G-1)/G of the prompt compute.
    Rows stay short because without a varlen attention kernel (CPU, sdpa) attention
    over one long packed row costs O(length^2): measured 2x slower than padding at
    3.4k tokens. Padded: one sample per row, right-padded, with a 2D attention mask.

    Logits are computed only for the columns in `cols` (those that predict a response
    token in some row); `keep` indexes the flattened `[rows, len(cols)]` logits in
    target order; `rows`/`lengths` map targets back to `[B, T]` response tensors.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor  # [R, 1, W, W] additive float (packed) or [R, W] (padded)
    cols: torch.Tensor
    keep: torch.Tensor
    targets: torch.Tensor
    rows: list[int]  # indices into the batch
    lengths: list[int]  # response lengths, in order
    packed: bool = True


def _prompt_groups(trajs: list[Trajectory], rows: list[int]) -> list[list[int]]:
    """Rows grouped by identical prompt ids, in first-seen order."""
    groups: dict[tuple, list[int]] = {}
    for r in rows:
        groups.setdefault(tuple(trajs[r].prompt_ids), []).append(r)
    return list(groups.values())


def _first_fit(units: list[tuple[int, list[int]]], capacity: int) -> list[list[int]]:
    """First-fit-decreasing bin packing of (cost, items) units; an oversize unit gets a bin alone."""
    bins: list[list[int]] = []
    loads: list[int] = []
    for cost, items in sorted(units, key=lambda u: -u[0]):
        for b, load in enumerate(loads):
            if load + cost <= capacity:
                bins[b].extend(items)
                loads[b] += cost
                break
        else:
            bins.append(list(items))
            loads.append(cost)
    return bins


def _group_units(trajs: list[Trajectory], rows: list[int], capacity: int, share: bool) -> list[tuple[int, list[int]]]:
    """Samples of one prompt as units costing prompt + responses (split when over capacity)."""
    units = []
    for group in _prompt_groups(trajs, rows) if share else [[r] for r in rows]:
        p = len(trajs[group[0]].prompt_ids)
        unit, cost = [], p
        for r in group:
            n = len(trajs[r].response_ids)
            if unit and cost + n > capacity:
                units.append((cost, unit))
                unit, cost = [], p
            unit.append(r)
            cost += n
        units.append((cost, unit))
    return units


def _finish(ids_rows, pos_rows, keep_rc, targets, order, lengths, pad_id, mask_rows, packed: bool) -> MicroBatch:
    R, W = len(ids_rows), max(len(x) for x in ids_rows)
    ids = torch.full((R, W), pad_id, dtype=torch.long)
    pos = torch.zeros((R, W), dtype=torch.long)
    for i, (a, b) in enumerate(zip(ids_rows, pos_rows)):
        ids[i, : len(a)] = torch.tensor(a)
        pos[i, : len(b)] = torch.tensor(b)
    cols = torch.tensor(sorted({c for _, c in keep_rc}), dtype=torch.long)
    col_index = {c: j for j, c in enumerate(cols.tolist())}
    keep = torch.tensor([r * len(cols) + col_index[c] for r, c in keep_rc], dtype=torch.long)
    return MicroBatch(ids, pos, mask_rows(W), cols, keep, torch.tensor(targets, dtype=torch.long), order, lengths, packed)


def make_micro_batch(
    trajs: list[Trajectory], rows: list[int], packed: bool, pad_id: int, row_tokens: int = 256
) -> MicroBatch:
    keep_rc, targets, lengths, order = [], [], [], []
    ids_rows, pos_rows = [], []
    if packed:
        owners, segments = [], []
        for row_items in _first_fit(_group_units(trajs, rows, row_tokens, True), row_tokens):
            ids, pos, owner, segment = [], [], [], []
            for g, group in enumerate(_prompt_groups(trajs, row_items)):
                prompt = trajs[group[0]].prompt_ids
                p, start = len(prompt), len(ids)
                ids.extend(prompt)
                pos.extend(range(p))
                owner.extend([g] * p)
                segment.extend([-1] * p)  # -1 = prompt: visible to every response of its group
                for r in group:
                    resp = trajs[r].response_ids
                    n, at = len(resp), len(ids)
                    # token 0 is predicted at the prompt's last position, token j at response position j-1
                    cols = ([start + p - 1] + list(range(at, at + n - 1))) if n else []
                    keep_rc.extend((len(ids_rows), c) for c in cols)
                    ids.extend(resp)
                    pos.extend(range(p, p + n))
                    owner.extend([g] * n)
                    segment.extend([r] * n)
                    targets.extend(resp)
                    lengths.append(n)
                    order.append(r)
            ids_rows.append(ids)
            pos_rows.append(pos)
            owners.append(owner)
            segments.append(segment)

        def mask_rows(W: int) -> torch.Tensor:
            # additive float mask: understood by both the sdpa and the eager attention paths
            mask = torch.full((len(ids_rows), 1, W, W), torch.finfo(torch.float32).min)
            causal = torch.ones(W, W, dtype=torch.bool).tril()
            for i, (owner, segment) in enumerate(zip(owners, segments)):
                o = torch.full((W,), -1)
                o[: len(owner)] = torch.tensor(owner)
                sg = torch.full((W,), -2)
                sg[: len(segment)] = torch.tensor(segment)
                allowed = causal & (o[None, :] == o[:, None]) & ((sg[None, :] == -1) | (sg[None, :] == sg[:, None]))
                allowed |= torch.eye(W, dtype=torch.bool)  # padding attends to itself: no empty softmax rows
                mask[i, 0].masked_fill_(allowed, 0.0)
            return mask

        return _finish(ids_rows, pos_rows, keep_rc, targets, order, lengths, pad_id, mask_rows, True)
    for i, r in enumerate(rows):
        p, n = len(trajs[r].prompt_ids), len(trajs[r].response_ids)
        ids_rows.append(trajs[r].prompt_ids + trajs[r].response_ids)
        pos_rows.append(list(range(p + n)))
        keep_rc.extend((i, c) for c in range(p - 1, p - 1 + n))
        targets.extend(trajs[r].response_ids)
        lengths.append(n)
        order.append(r)

    def pad_mask(W: int) -> torch.Tensor:
        mask = torch.zeros((len(ids_rows), W), dtype=torch.long)
        for i, x in enumerate(ids_rows):
            mask[i, : len(x)] = 1
        return mask

    return _finish(ids_rows, pos_rows, keep_rc, targets, order, lengths, pad_id, pad_mask, False)


def plan_micro_batches(trajs: list[Trajectory], rows: list[int], max_tokens: int, packed: bool = True) -> list[list[int]]:
    """Samples into micro-batches of at most `max_tokens` tokens (first-fit decreasing).

    When packed, samples of one prompt travel together (their prompt is counted once);
    a group too big for one micro-batch is split, each part carrying the prompt again.
    A single sample longer than `max_tokens` gets a micro-batch of its own."""
    return [sorted(b) for b in _first_fit(_group_units(trajs, rows, max_tokens, packed), max_tokens)]


def forward_logprobs(model, mb: MicroBatch, temperature: float, with_entropy: bool):
    """Per-token log-probs (and entropies) of the targets, flat over the micro-batch."""
    device = next(model.parameters()).device
    out = model(
        input_ids=mb.input_ids.to(device),
        position_ids=mb.position_ids.to(device),
        attention_mask=mb.attention_mask.to(device),
        use_cache=False,
        logits_to_keep=mb.cols.to(device),  # logits only where a response token is predicted
    )
    logits = out.logits.flatten(0, 1)[mb.keep.to(device)]
    logits = logits.float() / (temperature if temperature > 0 else 1.0)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, mb.targets.to(device).unsqueeze(-1)).squeeze(-1)
    entropy = algorithms.entropy_from_logits(logits) if with_entropy else None
    return logp, entropy


def forward_values(critic, mb: MicroBatch) -> torch.Tensor:
    device = next(critic.parameters()).device
    values = critic(
        mb.input_ids.to(device), mb.position_ids.to(device), attention_mask=mb.attention_mask.to(device),
        keep=mb.cols.to(device),
    )
    return values.flatten()[mb.keep.to(device)]


def scatter_rows(flat: torch.Tensor, mb: MicroBatch, B: int, T: int) -> torch.Tensor:
    """Flat per-token values of a micro-batch -> a [B, T] tensor (zeros elsewhere)."""
    out = torch.zeros(B, T, dtype=flat.dtype, device=flat.device)
    start = 0
    for r, n in zip(mb.rows, mb.lengths):
        out[r, :n] = flat[start : start + n]
        start += n
    return out


def gather_rows(full: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
    """Inverse of scatter_rows: [B, T] -> flat values in micro-batch order."""
    return torch.cat([full[r, :n] for r, n in zip(mb.rows, mb.lengths)])


@torch.no_grad()
def batch_forward(model, micro_batches: list[MicroBatch], B: int, T: int, temperature=1.0, values=False) -> torch.Tensor:
    """[B, T] log-probs (or critic values) for a whole rollout batch, no gradients."""
    out = torch.zeros(B, T)
    for mb in micro_batches:
        flat = forward_values(model, mb) if values else forward_logprobs(model, mb, temperature, False)[0]
        out += scatter_rows(flat.float().cpu(), mb, B, T)
    return out


# ----------------------------------------------------------------------------- helpers


def gather_for_advantages(accelerator: Accelerator, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """All-gather [B, T] tensors across processes (padded to a common T), so batch-level
    statistics (batch baselines, whitening) are those of the global batch."""
    if accelerator.num_processes == 1:
        return tensors
    return [accelerator.gather(accelerator.pad_across_processes(t.to(accelerator.device), dim=1)).cpu() for t in tensors]


MAX_INFO_CATEGORIES = 8


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
    parts = gather_object([(sums, len(trajs))]) if accelerator.num_processes > 1 else [(sums, len(trajs))]
    n = max(sum(c for _, c in parts), 1)
    keys = sorted({k for d, _ in parts for k in d})
    return {f"{prefix}/{k}": sum(d.get(k, 0.0) for d, _ in parts) / n for k in keys}


def rollout_mismatch_metrics(accelerator: Accelerator, old_logprobs, rollout_logprobs, mask) -> dict[str, float]:
    """Engine vs trainer log-probs over every process's policy tokens (`rollout/*` metrics)."""
    parts = algorithms.rollout_mismatch(old_logprobs, rollout_logprobs, mask)
    sums = accelerator.reduce(torch.stack([parts["abs_diff_sum"], parts["k3_sum"], parts["tokens"]])
                              .double().to(accelerator.device), reduction="sum").cpu()
    maxes = torch.stack([parts["abs_diff_max"], parts["log_ratio_max"], parts["seq_log_ratio_max"]]).double()
    maxes = accelerator.gather(maxes.to(accelerator.device)[None]).cpu().amax(0)
    n = max(sums[2].item(), 1.0)
    return {
        "rollout/logp_abs_diff": sums[0].item() / n,
        "rollout/logp_abs_diff_max": maxes[0].item(),
        "rollout/kl_k3": sums[1].item() / n,
        # largest pi_old / mu of a token and of a whole sequence (exp of a log, so it may be inf)
        "rollout/token_ratio_max": math.exp(min(maxes[1].item(), 700.0)),
        "rollout/seq_ratio_max": math.exp(min(maxes[2].item(), 700.0)),
    }


def is_weight_metrics(accelerator: Accelerator, weights, mask, cap: float) -> dict[str, float]:
    """Mean truncated IS weight and the fraction of policy tokens whose weight hit the cap."""
    m = mask > 0  # exp(log(cap)) may round just below cap, hence the tolerance
    local = torch.tensor([weights[m].sum().item(), (weights[m] >= cap * (1 - 1e-6)).sum().item(), m.sum().item()],
                         dtype=torch.float64)
    tot = accelerator.reduce(local.to(accelerator.device), reduction="sum").cpu()
    n = max(tot[2].item(), 1.0)
    return {"rollout/is_weight_mean": tot[0].item() / n, "rollout/is_truncated_frac": tot[1].item() / n}


def stage_at(stages, step: int) -> int:
    """Index of the stage that global step `step` (0-based) belongs to."""
    end = 0
    for i, s in enumerate(stages):
        end += s.steps
        if step < end:
            return i
    return len(stages) - 1


def load_policy(cfg: TrainConfig, path: str):
    dtype = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if cfg.model.dtype not in dtype:
        raise ValueError(f"model.dtype '{cfg.model.dtype}' is not one of {sorted(dtype)}")
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype[cfg.model.dtype], attn_implementation=cfg.model.attn_implementation
    )
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(accelerator, engine, tokenizer, agent, agent_kwargs, rows, prompt_builder, reward_fns, cfg) -> dict:
    """Greedy (by default) rollouts on the held-out rows; means of every reward."""
    params = SamplingParams(
        max_new_tokens=cfg.rollout.max_new_tokens,
        temperature=cfg.rollout.eval_temperature,
        stop=list(cfg.rollout.stop),
    )
    mine = rows[accelerator.process_index :: accelerator.num_processes]
    size = max(1, cfg.rollout.generation_batch_size)
    trajs = []
    # chunks of one generation batch each, so a long eval shows its progress
    for start in tqdm(range(0, len(mine), size), desc=f"eval ({len(rows)} prompts)", leave=False,
                      disable=not accelerator.is_main_process, dynamic_ncols=True):
        chunk = mine[start : start + size]
        trajs += agent(engine, tokenizer, chunk, prompt_builder=prompt_builder, params=params, group_size=1,
                       **agent_kwargs)
    score_trajectories(trajs, reward_fns, cfg.reward_fallback)
    names = ["reward"] + [rf.name for rf in reward_fns]
    sums = torch.tensor(
        [[t.reward for t in trajs]] + [[t.reward_parts[n] for t in trajs] for n in names[1:]], dtype=torch.float64
    ).sum(-1) if trajs else torch.zeros(len(names), dtype=torch.float64)
    lengths = torch.tensor([float(sum(len(t.response_ids) for t in trajs)), float(len(trajs))], dtype=torch.float64)
    totals = accelerator.reduce(torch.cat([sums, lengths]).to(accelerator.device), reduction="sum").cpu()
    n = max(totals[-1].item(), 1.0)
    out = {f"eval/{name}": totals[i].item() / n for i, name in enumerate(names)}
    out["eval/response_length"] = totals[-2].item() / n
    out["eval/samples"] = int(totals[-1].item())
    out.update(info_means(accelerator, trajs, "eval/info"))
    return out


# ----------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig, resume: str | None = None) -> dict:
    output_dir = Path(cfg.output_dir)
    # cpu=True without a GPU: accelerate only forms a gloo (MULTI_CPU) group under
    # `accelerate launch` when told it is on CPU; otherwise each process runs alone
    accelerator = Accelerator(
        log_with=cfg.report_to or None, project_dir=str(output_dir), cpu=not torch.cuda.is_available()
    )
    is_main = accelerator.is_main_process
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    for launcher_env, wanted in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED")):
        # measured for FSDP with accelerate 1.15: on a CPU machine the config silently becomes
        # plain DDP over gloo (every rank holds the whole model); say so instead of letting it pass
        asked = os.environ.get(launcher_env, "").lower() == "true"
        if is_main and asked and accelerator.distributed_type.name != wanted:
            logger.warning("the accelerate config asks for %s, but accelerate runs %s here (no GPU: %s needs one); "
                           "every process holds the whole model", wanted, accelerator.distributed_type.name, wanted)
    fsdp_plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if accelerator.distributed_type.name == "FSDP" and getattr(fsdp_plugin, "fsdp_version", 1) != 2:
        # FSDP1's root parameters are flat shards outside a forward: generation and the weight
        # export to a rollout engine would read shards (see tests/test_weight_export_fsdp1.py)
        raise ValueError("FSDP1 (accelerate fsdp_version: 1) is not supported: use fsdp_version: 2 "
                         "(recipes/accelerate/fsdp2.yaml)")
    if resume is None and is_main and output_dir.exists() and any(output_dir.iterdir()):
        if not cfg.overwrite_output_dir:
            raise FileExistsError(
                f"output_dir {output_dir} is not empty: pass --resume latest to continue it, "
                "or overwrite_output_dir=true to start over"
            )
        # starting over means starting clean (old metrics must not mix with the new run's), but
        # only a directory that holds a previous run is ever deleted
        if not ((output_dir / "config.json").is_file() and (output_dir / "metrics.jsonl").is_file()):
            raise FileExistsError(
                f"overwrite_output_dir: {output_dir} does not look like a previous run (no config.json and "
                "metrics.jsonl); refusing to delete it, choose another output_dir"
            )
        shutil.rmtree(output_dir)
    accelerator.wait_for_everyone()
    set_seed(cfg.seed)
    load_plugins(cfg.plugins)
    algo = cfg.algorithm
    estimator = algorithms.get_advantage_estimator(algorithms.estimator_for(algo.name))
    policy_loss_fn = algorithms.get_policy_loss(algo.policy_loss)
    kl_fn = algorithms.get_kl_estimator(algo.kl_estimator)
    value_loss_fn = algorithms.get_value_loss(algo.value_loss)
    algo_options = algo.function_options()
    stages = cfg.resolved_stages()
    use_kl = any((s.kl_coef if s.kl_coef is not None else algo.kl_coef) > 0 for s in stages)
    use_critic = algorithms.needs_values(algorithms.estimator_for(algo.name))

    # --- models ---------------------------------------------------------------------------
    # on resume the policy (or its adapter) and the critic come from the checkpoint via
    # from_pretrained, which handles sharded weights and tied embeddings
    ckpt = checkpoint.find_checkpoint(resume, output_dir) if resume is not None else None
    model_path = resolve_model(cfg.model.name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    policy = load_policy(cfg, str(ckpt / "policy") if ckpt and not cfg.model.lora else model_path)
    ref_model = None
    if cfg.model.lora:
        from peft import LoraConfig, PeftModel, get_peft_model

        if ckpt:
            policy = PeftModel.from_pretrained(policy, str(ckpt / "policy"), is_trainable=True)
        else:
            policy = get_peft_model(
                policy,
                LoraConfig(
                    r=cfg.model.lora_r,
                    lora_alpha=cfg.model.lora_alpha,
                    lora_dropout=cfg.model.lora_dropout,
                    target_modules=list(cfg.model.lora_target_modules),
                    task_type="CAUSAL_LM",
                ),
            )
    elif use_kl:  # under LoRA the adapter-disabled base is the reference: no second copy
        ref_model = load_policy(cfg, model_path).to(accelerator.device).eval().requires_grad_(False)
    critic = None
    if use_critic:
        critic = (  # a checkpointed critic is already truncated: its config says how deep it is
            ValueModel.from_pretrained(str(ckpt / "critic"), dtype=torch.float32)
            if ckpt
            else ValueModel.from_pretrained(model_path, num_layers=algo.critic_layers, dtype=torch.float32)
        )

    optimizer = torch.optim.AdamW(
        [p for p in policy.parameters() if p.requires_grad],
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.adam_betas),
        eps=cfg.optim.adam_eps,
        weight_decay=cfg.optim.weight_decay,
    )
    optimizer_steps = cfg.total_steps * cfg.ppo_epochs * cfg.mini_batches_per_step
    scheduler = get_scheduler(cfg.optim.lr_scheduler, optimizer, cfg.optim.warmup_steps, optimizer_steps)
    policy, optimizer, scheduler = accelerator.prepare(policy, optimizer, scheduler)
    critic_optimizer = None
    if critic is not None:
        critic_optimizer = torch.optim.AdamW(critic.parameters(), lr=algo.critic_lr, betas=tuple(cfg.optim.adam_betas))
        critic, critic_optimizer = accelerator.prepare(critic, critic_optimizer)
    unwrapped = accelerator.unwrap_model(policy)
    engine = build_engine(cfg.rollout.engine, unwrapped, tokenizer, cfg.rollout.generation_batch_size,
                          **cfg.rollout.engine_kwargs)

    # --- data, rewards, agent ---------------------------------------------------------------
    agent = AGENTS.get(cfg.rollout.agent)
    reward_fns = build_rewards(cfg.rewards)
    stage_data = []
    for i, stage in enumerate(stages):
        source = stage.train or cfg.data.train
        ds = load_source(source, stage.train_kwargs if stage.train_kwargs is not None else cfg.data.train_kwargs)
        check_columns(ds, cfg.data.required_columns, source)
        builder = PROMPT_BUILDERS.get(stage.prompt_builder or cfg.data.prompt_builder)
        builder(ds[0])  # fail now, naming the builder, rather than mid-run
        stage_data.append((ds, builder, PromptSampler(len(ds), cfg.seed + i, cfg.data.shuffle)))
    eval_rows = []
    if cfg.data.eval:
        eval_ds = load_source(cfg.data.eval, cfg.data.eval_kwargs, split="test")
        check_columns(eval_ds, cfg.data.required_columns, cfg.data.eval)
        if cfg.data.eval_size:
            eval_ds = eval_ds.select(range(min(cfg.data.eval_size, len(eval_ds))))
        eval_rows = list(eval_ds)
    eval_builder = PROMPT_BUILDERS.get(cfg.data.prompt_builder)

    world, rank = accelerator.num_processes, accelerator.process_index
    if cfg.prompts_per_step % world:
        raise ValueError(f"prompts_per_step={cfg.prompts_per_step} must be divisible by the {world} processes")
    local_samples = cfg.prompts_per_step // world * cfg.rollout.group_size
    if local_samples < cfg.mini_batches_per_step:
        raise ValueError(f"{local_samples} samples per process cannot fill {cfg.mini_batches_per_step} mini-batches")
    sampling = SamplingParams(
        max_new_tokens=cfg.rollout.max_new_tokens,
        temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p,
        top_k=cfg.rollout.top_k,
        stop=list(cfg.rollout.stop),
    )
    temperature = cfg.rollout.temperature if cfg.rollout.temperature > 0 else 1.0
    norm_len = cfg.rollout.max_new_tokens

    # --- resume -----------------------------------------------------------------------------
    start_step = 0
    history: list[dict] = []
    if ckpt is not None:
        state = checkpoint.load_training_state(
            ckpt, rank, optimizer=optimizer, scheduler=scheduler, critic_optimizer=critic_optimizer,
            samplers=[sampler for _, _, sampler in stage_data],
        )
        start_step = state["step"]
        history = state.get("history", [])
        logger.info("resumed from %s at step %d", ckpt, start_step)
    else:
        set_seed(cfg.seed + rank)  # different samples on each process, reproducibly

    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
    if cfg.report_to:
        accelerator.init_trackers("agentrl", config={k: str(v) for k, v in config_to_dict(cfg).items()})
    metrics_file = open(output_dir / "metrics.jsonl", "a") if is_main else None

    def log(metrics: dict, step: int):
        history.append({"step": step, **metrics})
        if metrics_file:
            metrics_file.write(json.dumps({"step": step, **metrics}) + "\n")
            metrics_file.flush()
        if cfg.report_to:
            accelerator.log(metrics, step=step)

    def run_eval(step: int) -> dict:
        if not eval_rows:
            return {}
        m = evaluate(
            accelerator, engine, tokenizer, agent, cfg.rollout.agent_kwargs, eval_rows, eval_builder, reward_fns, cfg
        )
        log(m, step)
        return m

    def save(step: int):
        tmp = checkpoint.temp_dir(output_dir, step)
        if is_main:
            state = {
                "step": step,
                "stage": stage_at(stages, max(step - 1, 0)),
                "samplers": [s.state_dict() for _, _, s in stage_data],
                "history": history,
            }
            checkpoint.save_training_state(
                tmp, state, policy=unwrapped, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler,
                critic=accelerator.unwrap_model(critic) if critic is not None else None,
                critic_optimizer=critic_optimizer,
            )
        accelerator.wait_for_everyone()
        checkpoint.save_rng(tmp, rank)  # every process: sampling RNG differs per rank
        accelerator.wait_for_everyone()
        if is_main:
            checkpoint.finalize(output_dir, step, cfg.save_total_limit)
        accelerator.wait_for_everyone()

    eval_before = run_eval(0) if (cfg.eval_before_training and start_step == 0) else {}
    if eval_before and is_main:
        logger.info("eval before training: %s", _fmt(eval_before))

    progress = tqdm(total=cfg.total_steps, initial=start_step, desc="rl.train", disable=not is_main, dynamic_ncols=True)
    nan_skips = 0
    last_eval = eval_before
    for step in range(start_step, cfg.total_steps):
        t_step = time.perf_counter()
        stage_idx = stage_at(stages, step)
        stage = stages[stage_idx]
        kl_coef = stage.kl_coef if stage.kl_coef is not None else algo.kl_coef
        ds, builder, sampler = stage_data[stage_idx]

        # --- rollout: every process draws the same global batch and keeps its slice -------
        n_rollout = cfg.prompts_per_step * cfg.rollout.oversample
        indices = sampler.next(n_rollout)[rank::world]
        rows = [ds[i] for i in indices]
        t0 = time.perf_counter()
        engine.wake()
        rollout_trajs = agent(
            engine,
            tokenizer,
            rows,
            prompt_builder=builder,
            params=sampling,
            group_size=cfg.rollout.group_size,
            first_group_id=step * n_rollout + rank * len(rows),
            **cfg.rollout.agent_kwargs,
        )
        engine.sleep()
        rollout_time = time.perf_counter() - t0
        reward_errors = score_trajectories(rollout_trajs, reward_fns, cfg.reward_fallback)
        # dynamic sampling: each process trains on its share of groups, those whose rewards differ first
        rollout_rewards = torch.tensor([t.reward for t in rollout_trajs], dtype=torch.float64)
        rollout_groups = torch.tensor([t.group_id for t in rollout_trajs], dtype=torch.long)
        rolled_informative = algorithms.informative_groups(rollout_rewards, rollout_groups)
        trajs = rollout_trajs
        if cfg.rollout.oversample > 1:
            keep = algorithms.select_groups(rollout_rewards, rollout_groups, cfg.prompts_per_step // world,
                                            informative=rolled_informative)
            trajs = [rollout_trajs[i] for i in keep.tolist()]
        kept_groups = {t.group_id for t in trajs}

        # --- per-token quantities for the whole batch --------------------------------------
        resp = to_response_tensors(trajs)
        B, T = resp.response_ids.shape
        mask = resp.response_mask
        pad_id = tokenizer.pad_token_id
        # laid out once (packing builds a W x W mask per row) and reused by every no-grad pass
        recompute = cfg.old_logprobs == "recompute" or algo.rollout_correction != "none"
        needs_passes = recompute or kl_coef > 0 or critic is not None
        whole_batch = [
            make_micro_batch(trajs, rows_k, cfg.packing, pad_id, cfg.pack_row_tokens)
            for rows_k in plan_micro_batches(trajs, list(range(B)), cfg.micro_batch_tokens, cfg.packing)
        ] if needs_passes else []
        is_weights, mismatch = None, {}
        if recompute:
            old_logprobs = batch_forward(unwrapped, whole_batch, B, T, temperature) * mask
            mismatch = rollout_mismatch_metrics(accelerator, old_logprobs, resp.rollout_logprobs, mask)
            if algo.rollout_correction != "none":
                is_weights = algorithms.get_rollout_correction(algo.rollout_correction)(
                    old_logprobs, resp.rollout_logprobs, mask, cap=algo.rollout_correction_cap
                )
                mismatch.update(is_weight_metrics(accelerator, is_weights, mask, algo.rollout_correction_cap))
        else:
            old_logprobs = resp.rollout_logprobs * mask
        ref_logprobs = None
        if kl_coef > 0:
            with unwrapped.disable_adapter() if cfg.model.lora else nullcontext():
                ref = unwrapped if cfg.model.lora else ref_model
                ref_logprobs = batch_forward(ref, whole_batch, B, T, temperature) * mask
        old_values = None
        if critic is not None:
            old_values = batch_forward(accelerator.unwrap_model(critic), whole_batch, B, T, values=True) * mask

        token_rewards = outcome_token_rewards(trajs, T)
        if kl_coef > 0 and algo.kl_in_reward:
            token_rewards = token_rewards - kl_coef * kl_fn(old_logprobs, ref_logprobs) * mask
        # advantages over the global batch (group ids are globally unique), then our slice
        g_rewards, g_mask, g_values = gather_for_advantages(
            accelerator, [token_rewards, mask, old_values if old_values is not None else torch.zeros_like(mask)]
        )
        g_groups = accelerator.gather(resp.group_ids.to(accelerator.device)).cpu() if world > 1 else resp.group_ids
        g_adv, g_ret = algorithms.call_with_options(
            estimator,
            algo_options,
            token_rewards=g_rewards,
            response_mask=g_mask,
            group_ids=g_groups,
            values=g_values if critic is not None else None,
        )
        advantages, returns = g_adv[rank * B : (rank + 1) * B, :T], g_ret[rank * B : (rank + 1) * B, :T]

        # --- optimisation: epochs x mini-batches x micro-batches ---------------------------
        t0 = time.perf_counter()
        sums = {"pg_loss": 0.0, "kl": 0.0, "entropy": 0.0, "clipfrac": 0.0, "approx_kl": 0.0, "vf_loss": 0.0}
        grad_norms, tokens_seen, trained_tokens = [], 0.0, 0
        for epoch in range(cfg.ppo_epochs):
            # a fixed order per step keeps runs reproducible; mini-batches interleave groups
            perm = torch.randperm(B, generator=torch.Generator().manual_seed(cfg.seed * 100003 + step * 101 + epoch))
            minis = [perm[k :: cfg.mini_batches_per_step].tolist() for k in range(cfg.mini_batches_per_step)]
            for mini in minis:
                counts = torch.tensor([mask[mini].sum().item(), float(len(mini))], device=accelerator.device)
                num_tokens, num_seqs = accelerator.reduce(counts, reduction="sum").tolist()
                micro = [  # built once, used by the policy pass and the critic pass
                    make_micro_batch(trajs, rows_k, cfg.packing, pad_id, cfg.pack_row_tokens)
                    for rows_k in plan_micro_batches(trajs, mini, cfg.micro_batch_tokens, cfg.packing)
                ]
                bad = torch.zeros(1, device=accelerator.device)
                for k, mb in enumerate(micro):
                    last = k == len(micro) - 1
                    sync = nullcontext() if last else accelerator.no_sync(policy)
                    with sync:
                        logp, entropy = forward_logprobs(policy, mb, temperature, with_entropy=True)
                        m = gather_rows(mask, mb).to(logp.device)
                        adv = gather_rows(advantages, mb).to(logp.device)
                        old = gather_rows(old_logprobs, mb).to(logp.device)
                        # aggregation functions take [B, T]; a micro-batch is one flat row each
                        pg_mat, info = algorithms.call_with_options(
                            policy_loss_fn, algo_options, logprobs=logp[None], old_logprobs=old[None],
                            advantages=adv[None], response_mask=m[None],
                        )
                        algorithms.check_policy_loss_info(algo.policy_loss, pg_mat, info)
                        agg = lambda x: _aggregate(x, m, mb, algo.loss_agg_mode, num_tokens, num_seqs, norm_len)  # noqa: E731
                        if is_weights is not None:  # truncated importance sampling, engine -> trainer
                            pg_mat = pg_mat * gather_rows(is_weights, mb).to(pg_mat.device)[None]
                        loss = agg(pg_mat[0])
                        if algo.entropy_coef:
                            loss = loss - algo.entropy_coef * agg(entropy)
                        if kl_coef > 0 and not algo.kl_in_reward:
                            ref = gather_rows(ref_logprobs, mb).to(logp.device)
                            loss = loss + kl_coef * agg(kl_fn(logp, ref))
                        # DDP averages gradients over processes; the global normalisation
                        # already divides by the global counts, so undo the average
                        loss = loss * world
                        if not torch.isfinite(loss):
                            bad += 1
                            loss = sum(p.sum() for p in policy.parameters() if p.requires_grad) * 0.0
                        accelerator.backward(loss)
                    with torch.no_grad():
                        n_tok = m.sum().item()
                        tokens_seen += n_tok
                        trained_tokens += int(mb.input_ids.numel())
                        sums["pg_loss"] += (pg_mat[0] * m).sum().item()
                        sums["entropy"] += (entropy * m).sum().item()
                        sums["clipfrac"] += (info["clipped"][0] * m).sum().item()
                        sums["approx_kl"] += (info["approx_kl"][0] * m).sum().item()
                        if ref_logprobs is not None:
                            sums["kl"] += (kl_fn(logp, gather_rows(ref_logprobs, mb).to(logp.device)) * m).sum().item()
                if critic is not None:
                    for k, mb in enumerate(micro):
                        with nullcontext() if k == len(micro) - 1 else accelerator.no_sync(critic):
                            v = forward_values(critic, mb)
                            m = gather_rows(mask, mb).to(v.device)
                            vf_mat, _ = algorithms.call_with_options(
                                value_loss_fn, algo_options, v[None], gather_rows(old_values, mb).to(v.device)[None],
                                gather_rows(returns, mb).to(v.device)[None], m[None],
                            )
                            vf = _aggregate(vf_mat[0], m, mb, algo.loss_agg_mode, num_tokens, num_seqs, norm_len)
                            vf = algo.value_loss_coef * vf * world
                            if not torch.isfinite(vf):
                                bad += 1
                                vf = sum(p.sum() for p in critic.parameters()) * 0.0
                            accelerator.backward(vf)
                        sums["vf_loss"] += (vf_mat[0] * m).sum().item()
                grad_norm = accelerator.clip_grad_norm_(policy.parameters(), cfg.optim.max_grad_norm)
                if critic is not None:
                    accelerator.clip_grad_norm_(critic.parameters(), cfg.optim.max_grad_norm)
                bad = accelerator.reduce(bad + (0 if torch.isfinite(grad_norm) else 1), reduction="sum")
                if bad.item() > 0:  # every process skips together, so replicas stay identical
                    nan_skips += 1
                    logger.warning("step %d: non-finite loss or gradient, optimizer step skipped", step + 1)
                else:
                    optimizer.step()
                    scheduler.step()
                    if critic_optimizer is not None:
                        critic_optimizer.step()
                    grad_norms.append(grad_norm.item())
                optimizer.zero_grad(set_to_none=True)
                if critic_optimizer is not None:
                    critic_optimizer.zero_grad(set_to_none=True)
        engine.update_weights(unwrapped)
        train_time = time.perf_counter() - t0

        # --- metrics -----------------------------------------------------------------------
        # rewards and episode info over everything rolled out: the policy's performance, not
        # the (biased) groups dynamic sampling kept for training
        rewards = rollout_rewards.tolist()
        gen_tokens = int(sum(sum(t.loss_mask) for t in rollout_trajs))
        local = torch.tensor(
            [sum(rewards), sum(r * r for r in rewards), len(rewards), gen_tokens, tokens_seen, trained_tokens]
            + [sums[k] for k in sorted(sums)]
            + [sum(t.reward_parts.get(rf.name, 0.0) for t in rollout_trajs) for rf in reward_fns]
            + [float(reward_errors[rf.name]) for rf in reward_fns]
            + [sum(rolled_informative.values()), len(rolled_informative),
               sum(rolled_informative[g] for g in kept_groups), len(kept_groups)],
            dtype=torch.float64,
        )
        tot = accelerator.reduce(local.to(accelerator.device), reduction="sum").cpu().tolist()
        n, seen = max(tot[2], 1), max(tot[4], 1)
        mean_r = tot[0] / n
        step_time = time.perf_counter() - t_step
        metrics = {
            "stage": stage_idx,
            "reward/mean": mean_r,
            "reward/std": math.sqrt(max(tot[1] / n - mean_r**2, 0.0)),
            "response_length/mean": tot[3] / n,
        }
        metrics.update(info_means(accelerator, rollout_trajs, "info"))
        metrics.update(mismatch)
        metrics.update({f"loss/{k}": tot[6 + i] / seen for i, k in enumerate(sorted(sums))})
        base = 6 + len(sums)
        for i, rf in enumerate(reward_fns):
            metrics[f"reward/{rf.name}"] = tot[base + i] / n
            metrics[f"reward_errors/{rf.name}"] = tot[base + len(reward_fns) + i]
        informative, groups, kept_informative, kept = tot[base + 2 * len(reward_fns) :]
        if cfg.rollout.group_size > 1:  # one sample per prompt (PPO) has no groups to compare
            metrics["rollout/informative_groups"] = informative / max(groups, 1)  # rewards differ within the group
            metrics["rollout/trained_informative_groups"] = kept_informative / max(kept, 1)
        valid = advantages[mask > 0]
        metrics.update(
            {
                "advantage/mean": valid.mean().item() if valid.numel() else 0.0,
                "advantage/std": valid.std().item() if valid.numel() > 1 else 0.0,
                "advantage/abs_max": valid.abs().max().item() if valid.numel() else 0.0,
                "kl_coef": kl_coef,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else float("nan"),
                "nan_skipped_steps": nan_skips,
                "time/step": step_time,
                "time/rollout": rollout_time,
                "time/train": train_time,
                "tokens/generated": tot[3],
                "tokens/trained": tot[5],  # forward/backward tokens (with padding when packing is off)
                "throughput/generated_tokens_per_s": tot[3] / max(rollout_time, 1e-9),
                "throughput/trained_tokens_per_s": tot[5] / max(train_time, 1e-9),
            }
        )
        if (step + 1) % cfg.logging_steps == 0 or step + 1 == cfg.total_steps:
            log(metrics, step + 1)
        progress.update(1)
        progress.set_postfix(stage=stage.name or stage_idx, reward=f"{mean_r:.3f}", s_per_step=f"{step_time:.1f}")

        done = step + 1 == cfg.total_steps
        if cfg.eval_steps and (step + 1) % cfg.eval_steps == 0 and not done:
            last_eval = run_eval(step + 1)
        if (cfg.save_steps and (step + 1) % cfg.save_steps == 0) or done:
            save(step + 1)
    progress.close()

    eval_after = run_eval(cfg.total_steps) if eval_rows else {}
    if is_main:
        from eval.report import write_training_report

        write_training_report(output_dir, history, eval_before, eval_after)
        if eval_after:
            logger.info("eval after training: %s", _fmt(eval_after))
    if metrics_file:
        metrics_file.close()
    if hasattr(engine, "close"):  # a vLLM engine holds its own memory and workers
        engine.close()
    # Every rank waits for the main one's report, then the process group is torn down: a rank that exits
    # while gloo's threads still run aborts with "terminate called without an active exception" (seen in CI).
    accelerator.wait_for_everyone()
    accelerator.end_training()  # finishes trackers; destroys the process group only when one exists
    return {"eval_before": eval_before, "eval_after": eval_after or last_eval, "history": history}


def _aggregate(x, m, mb, mode, num_tokens, num_seqs, norm_len) -> torch.Tensor:
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
    return algorithms.aggregate_loss(
        mat, msk, mode, num_tokens=num_tokens, num_seqs=num_seqs, norm_len=norm_len
    )


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())

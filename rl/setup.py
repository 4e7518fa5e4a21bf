"""Setting up a run: the accelerator, models (policy, LoRA, reference, critic), optimizers,
rollout engine, agent, rewards and data, in the order that keeps fixed-seed runs reproducible
(LoRA and critic-head initialisation draw from the seeded RNG)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import get_scheduler

from rl import algorithms, checkpoint
from rl.common import prepare_output_dir, quiet_deepspeed, resolve_dtype
from rl.config import TrainConfig, config_to_dict
from rl.critic import ValueModel
from rl.data import PROMPT_BUILDERS, DataError, PromptSampler, check_columns, load_source
from rl.constraints import load_constraint
from rl.engines import BaseEngine, SamplingParams, build_engine
from rl.engines.base import eos_ids
from rl.models import ModelPathError, resolve_model
from rl.multimodal import (
    VisionInputs,
    apply_freezing,
    load_pretrained_model,
    load_tokenizer_and_processor,
    lora_exclude_modules,
)
from rl.plugins import load_plugins
from rl.registry import AGENTS
from rl.rewards import RewardFn, build_rewards
from rl.vocab import add_to_tokenizer, fit_base_to_adapter, prepare_model, trainable_token_indices

__all__ = ["StageData", "Run", "setup_run", "load_policy"]

logger = logging.getLogger("rl.setup")


@dataclass
class StageData:
    dataset: datasets.Dataset
    builder: Callable[[dict], list[dict]]  # row -> chat messages
    sampler: PromptSampler


@dataclass
class Run:
    """Everything a training run holds; built once by `setup_run`."""

    cfg: TrainConfig
    accelerator: Accelerator
    output_dir: Path
    tokenizer: Any
    policy: torch.nn.Module  # prepared (DDP/FSDP/DeepSpeed wrapped)
    unwrapped: torch.nn.Module
    ref_model: torch.nn.Module | None  # None under LoRA (the adapter-disabled policy) or without KL
    critic: torch.nn.Module | None  # when the advantage estimator needs values
    optimizer: Any
    scheduler: Any
    critic_optimizer: Any
    engine: BaseEngine
    agent: Callable[..., list]
    reward_fns: list[RewardFn]
    stages: list
    stage_data: list[StageData]
    eval_rows: list[dict]
    eval_builder: Callable[[dict], list[dict]]
    sampling: SamplingParams
    temperature: float  # the rollout temperature the trainer's log-probs are taken at
    estimator: Callable
    policy_loss_fn: Callable
    kl_fn: Callable
    value_loss_fn: Callable
    algo_options: dict[str, Any]
    checkpoint: Path | None  # the checkpoint resumed from
    vision: VisionInputs | None = None  # vision-language policies: pixel inputs for the training passes

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def kl_coef(self, stage) -> float:
        return stage.kl_coef if stage.kl_coef is not None else self.cfg.algorithm.kl_coef


def load_policy(cfg: TrainConfig, path: str, vocab=None):
    """The policy (or reference) model: a causal LM or a vision-language model (`rl.multimodal`'s loader,
    the one SFT uses), with `model.freeze_vision_tower` / `model.freeze_language_model` applied."""
    kwargs = dict(dtype=resolve_dtype(cfg.model.dtype), attn_implementation=cfg.model.attn_implementation)
    if (Path(path) / "adapter_config.json").is_file():
        model = _merged_adapter(path, kwargs)
    else:
        model = load_pretrained_model(path, **kwargs)
    # model.added_tokens (rl/vocab.py): rows for the run's added tokens, initialised unless the model has them
    # (before freezing: a resize replaces the embedding modules)
    prepare_model(model, vocab, cfg.model, source=path)
    apply_freezing(model, cfg.model.freeze_vision_tower, cfg.model.freeze_language_model)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def _merged_adapter(path: str, kwargs: dict):
    """A LoRA adapter dir (e.g. the `final/` of a run with `model.save_adapter_only`) as plain weights:
    its base model, named as the adapter names it and found through `resolve_model` (registry names
    included, which transformers' own adapter loading would take for hub ids), with the adapter merged."""
    from peft import PeftConfig, PeftModel

    base = PeftConfig.from_pretrained(path).base_model_name_or_path
    try:
        base_model = load_pretrained_model(resolve_model(base), **kwargs)
    except OSError as e:
        raise ModelPathError(f"model path {path!r} is a LoRA adapter whose base model {base!r} "
                             f"(adapter_config.json base_model_name_or_path) cannot be loaded here: "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    fit_base_to_adapter(base_model, path)  # an adapter trained with added tokens (rl/vocab.py)
    return PeftModel.from_pretrained(base_model, path).merge_and_unload()


def _accelerator(cfg: TrainConfig, output_dir: Path) -> Accelerator:
    quiet_deepspeed()  # before accelerate first imports deepspeed (in unwrap_model)
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
            logging.getLogger("rl.trainer").warning(
                "the accelerate config asks for %s, but accelerate runs %s here (no GPU: %s needs one); "
                "every process holds the whole model", wanted, accelerator.distributed_type.name, wanted)
    fsdp_plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if accelerator.distributed_type.name == "FSDP" and getattr(fsdp_plugin, "fsdp_version", 1) != 2:
        # FSDP1's root parameters are flat shards outside a forward: generation and the weight
        # export to a rollout engine would read shards (see tests/test_weight_export_fsdp1.py)
        raise ValueError("FSDP1 (accelerate fsdp_version: 1) is not supported: use fsdp_version: 2 "
                         "(recipes/accelerate/fsdp2.yaml)")
    return accelerator


def _models(cfg: TrainConfig, ckpt: Path | None, model_path: str, use_kl: bool, use_critic: bool, device,
            vocab=None):
    """(policy, reference, critic); on resume the policy (or its adapter) and the critic come from the
    checkpoint via from_pretrained, which handles sharded weights and tied embeddings."""
    policy = load_policy(cfg, str(ckpt / "policy") if ckpt and not cfg.model.lora else model_path, vocab)
    ref_model = None
    if cfg.model.lora:
        from peft import LoraConfig, PeftModel, get_peft_model

        if ckpt:
            policy = PeftModel.from_pretrained(policy, str(ckpt / "policy"), is_trainable=True)
        else:
            policy = get_peft_model(policy, LoraConfig(
                r=cfg.model.lora_r, lora_alpha=cfg.model.lora_alpha, lora_dropout=cfg.model.lora_dropout,
                target_modules=list(cfg.model.lora_target_modules), task_type="CAUSAL_LM",
                exclude_modules=lora_exclude_modules(cfg.model),
                trainable_token_indices=trainable_token_indices(policy, vocab),  # only the added rows train
            ))
    elif use_kl:  # under LoRA the adapter-disabled base is the reference: no second copy
        ref_model = load_policy(cfg, model_path, vocab).to(device).eval().requires_grad_(False)
    critic = None
    if use_critic:  # a checkpointed critic is already truncated: its config says how deep it is
        critic = (ValueModel.from_pretrained(str(ckpt / "critic"), dtype=torch.float32) if ckpt else
                  ValueModel.from_pretrained(model_path, num_layers=cfg.algorithm.critic_layers, dtype=torch.float32))
        prepare_model(critic.backbone, vocab, cfg.model, source="the critic")
    return policy, ref_model, critic


def _stage_data(cfg: TrainConfig, stages) -> list[StageData]:
    out = []
    for i, stage in enumerate(stages):
        source = stage.train or cfg.data.train
        ds = load_source(source, stage.train_kwargs if stage.train_kwargs is not None else cfg.data.train_kwargs)
        check_columns(ds, cfg.data.required_columns, source)
        builder = PROMPT_BUILDERS.get(stage.prompt_builder or cfg.data.prompt_builder)
        try:  # fail now, naming the builder and the row, rather than mid-run
            builder(ds[0])
        except (KeyError, ValueError, TypeError, IndexError) as e:
            raise DataError(f"{source} row 0: prompt builder '{stage.prompt_builder or cfg.data.prompt_builder}' "
                            f"cannot build a prompt from it: {type(e).__name__}: {e} (columns: {ds.column_names})") from None
        out.append(StageData(ds, builder, PromptSampler(len(ds), cfg.seed + i, cfg.data.shuffle)))
    return out


def _eval_rows(cfg: TrainConfig) -> list[dict]:
    if not cfg.data.eval:
        return []
    eval_ds = load_source(cfg.data.eval, cfg.data.eval_kwargs, split="test")
    check_columns(eval_ds, cfg.data.required_columns, cfg.data.eval)
    if cfg.data.eval_size:
        eval_ds = eval_ds.select(range(min(cfg.data.eval_size, len(eval_ds))))
    return list(eval_ds)


def setup_run(cfg: TrainConfig, resume: str | None) -> Run:
    from rl.forward import limit_heap_fragmentation

    limit_heap_fragmentation()  # before the models load: freed activations leave RSS (rl/forward.py)
    output_dir = Path(cfg.output_dir)
    accelerator = _accelerator(cfg, output_dir)
    if accelerator.is_main_process:
        prepare_output_dir(output_dir, overwrite=cfg.overwrite_output_dir, resume=resume is not None, what="output_dir",
                           marker_files=("config.json", "metrics.jsonl"))
    accelerator.wait_for_everyone()
    set_seed(cfg.seed)
    load_plugins(cfg.plugins)
    algo = cfg.algorithm
    estimator_name = algorithms.estimator_for(algo.name)
    stages = cfg.resolved_stages()
    use_kl = any((s.kl_coef if s.kl_coef is not None else algo.kl_coef) > 0 for s in stages)

    ckpt = checkpoint.find_checkpoint(resume, output_dir) if resume is not None else None
    model_path = resolve_model(cfg.model.name_or_path)
    tokenizer, processor = load_tokenizer_and_processor(model_path)
    vocab = add_to_tokenizer(tokenizer, cfg.model)  # model.added_tokens (rl/vocab.py); None without
    policy, ref_model, critic = _models(cfg, ckpt, model_path, use_kl, algorithms.needs_values(estimator_name),
                                        accelerator.device, vocab)
    optimizer = torch.optim.AdamW(
        [p for p in policy.parameters() if p.requires_grad], lr=cfg.optim.lr, betas=tuple(cfg.optim.adam_betas),
        eps=cfg.optim.adam_eps, weight_decay=cfg.optim.weight_decay,
    )
    optimizer_steps = cfg.total_steps * cfg.ppo_epochs * cfg.mini_batches_per_step
    scheduler = get_scheduler(cfg.optim.lr_scheduler, optimizer, cfg.optim.resolved_warmup_steps(optimizer_steps),
                              optimizer_steps)
    policy, optimizer, scheduler = accelerator.prepare(policy, optimizer, scheduler)
    critic_optimizer = None
    if critic is not None:
        critic_optimizer = torch.optim.AdamW(critic.parameters(), lr=algo.critic_lr, betas=tuple(cfg.optim.adam_betas))
        critic, critic_optimizer = accelerator.prepare(critic, critic_optimizer)
    unwrapped = accelerator.unwrap_model(policy)
    engine = build_engine(cfg.rollout.engine, unwrapped, tokenizer, cfg.rollout.generation_batch_size,
                          **cfg.rollout.engine_kwargs)

    world = accelerator.num_processes
    if cfg.prompts_per_step % world:
        raise ValueError(f"prompts_per_step={cfg.prompts_per_step} must be divisible by the {world} processes")
    local_samples = cfg.prompts_per_step // world * cfg.rollout.group_size
    if local_samples < cfg.mini_batches_per_step:
        raise ValueError(f"{local_samples} samples per process cannot fill {cfg.mini_batches_per_step} mini-batches")
    r = cfg.rollout
    run = Run(
        cfg=cfg, accelerator=accelerator, output_dir=output_dir, tokenizer=tokenizer, policy=policy,
        unwrapped=unwrapped, ref_model=ref_model, critic=critic, optimizer=optimizer, scheduler=scheduler,
        critic_optimizer=critic_optimizer, engine=engine, agent=AGENTS.get(r.agent),
        reward_fns=build_rewards(cfg.rewards), stages=stages, stage_data=_stage_data(cfg, stages),
        eval_rows=_eval_rows(cfg), eval_builder=PROMPT_BUILDERS.get(cfg.data.prompt_builder),
        sampling=SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                                top_k=r.top_k, stop=list(r.stop),
                                # after the added tokens: item codes may be made of them
                                constraint=load_constraint(r.constraint, tokenizer, eos_ids(unwrapped, tokenizer))),
        temperature=r.temperature if r.temperature > 0 else 1.0,
        estimator=algorithms.get_advantage_estimator(estimator_name),
        policy_loss_fn=algorithms.get_policy_loss(algo.policy_loss), kl_fn=algorithms.get_kl_estimator(algo.kl_estimator),
        value_loss_fn=algorithms.get_value_loss(algo.value_loss), algo_options=algo.function_options(), checkpoint=ckpt,
        vision=VisionInputs(processor, unwrapped) if processor is not None else None,
    )
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
    if cfg.report_to:
        from rl.metrics import flatten_config  # dotted scalar keys: TensorBoard's filterable hparams

        accelerator.init_trackers("agentrl", config=flatten_config(config_to_dict(cfg)))
    return run

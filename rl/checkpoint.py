"""Atomic, resumable checkpoints in safetensors.

Layout of `checkpoint-<step>/`:
  policy/                 save_pretrained (safetensors; a PEFT adapter under LoRA) + tokenizer
  critic/                 PPO only
  optimizer.safetensors   tensors of the optimizer state (+ optimizer.json for the rest)
  critic_optimizer.*      PPO only
  scheduler.json
  rng_state_<rank>.safetensors / .json   torch, numpy and python RNG of each process
  trainer_state.json      step, stage, prompt-sampler positions, config
The directory is written as `.tmp-checkpoint-<step>` and renamed when complete, so
a crash never leaves a half-written checkpoint that `--resume` would pick up.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

# one checkpoint discovery for RL, SFT and eval runs: rl.common (re-exported here)
from rl.common import CHECKPOINT_PREFIX as PREFIX
from rl.common import find_checkpoint, latest_checkpoint, list_checkpoints  # noqa: F401


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, rest = {}, {"param_groups": state["param_groups"], "state": {}}
    for idx, per_param in state["state"].items():
        rest["state"][str(idx)] = {}
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                rest["state"][str(idx)][key] = value
    return tensors, rest


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict = {int(i): dict(v) for i, v in rest["state"].items()}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def save_optimizer(optimizer: torch.optim.Optimizer, directory: Path, name: str) -> None:
    tensors, rest = _flatten_optimizer(optimizer.state_dict())
    save_file(tensors, str(directory / f"{name}.safetensors"))
    (directory / f"{name}.json").write_text(json.dumps(rest))


def load_optimizer(optimizer: torch.optim.Optimizer, directory: Path, name: str) -> None:
    tensors = load_file(str(directory / f"{name}.safetensors"))
    rest = json.loads((directory / f"{name}.json").read_text())
    # JSON has no tuples: give hyper-parameters like `betas` back their original type
    for saved, live in zip(rest["param_groups"], optimizer.param_groups):
        for key, value in saved.items():
            if isinstance(live.get(key), tuple) and isinstance(value, list):
                saved[key] = tuple(value)
    optimizer.load_state_dict(_unflatten_optimizer(tensors, rest))


def save_rng(directory: Path, rank: int) -> None:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(directory / f"rng_state_{rank}.safetensors"))
    np_state = np.random.get_state()
    py_state = random.getstate()
    (directory / f"rng_state_{rank}.json").write_text(
        json.dumps(
            {
                "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
                "python": [py_state[0], list(py_state[1]), py_state[2]],
            }
        )
    )


def load_rng(directory: Path, rank: int) -> None:
    tensors = load_file(str(directory / f"rng_state_{rank}.safetensors"))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    states = json.loads((directory / f"rng_state_{rank}.json").read_text())
    n = states["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    p = states["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def _inner(optimizer):
    """accelerate wraps optimizers; the state lives in the wrapped one."""
    return getattr(optimizer, "optimizer", optimizer)


def save_training_state(directory: Path, state: dict, *, policy, tokenizer, optimizer, scheduler,
                        critic=None, critic_optimizer=None) -> None:
    """Everything but the RNG (which each process saves itself) into a fresh `directory`."""
    if directory.exists():  # a leftover from a crash mid-save: never merge into it
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    policy.save_pretrained(str(directory / "policy"), safe_serialization=True)
    tokenizer.save_pretrained(str(directory / "policy"))
    save_optimizer(_inner(optimizer), directory, "optimizer")
    (directory / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
    if critic is not None:
        critic.save_pretrained(str(directory / "critic"))
        save_optimizer(_inner(critic_optimizer), directory, "critic_optimizer")
    (directory / "trainer_state.json").write_text(json.dumps(state))


def load_training_state(directory: Path, rank: int, *, optimizer, scheduler, critic_optimizer=None,
                        samplers=()) -> dict:
    """Optimizer, scheduler, sampler positions and this process's RNG; returns trainer_state.
    (Model weights are loaded with from_pretrained before the optimizer is built.)"""
    state = json.loads((directory / "trainer_state.json").read_text())
    load_optimizer(_inner(optimizer), directory, "optimizer")
    scheduler.load_state_dict(json.loads((directory / "scheduler.json").read_text()))
    if critic_optimizer is not None:
        load_optimizer(_inner(critic_optimizer), directory, "critic_optimizer")
    if len(samplers) != len(state["samplers"]):
        raise ValueError(f"{directory}: the checkpoint has {len(state['samplers'])} stages, the recipe {len(samplers)}")
    for sampler, saved in zip(samplers, state["samplers"]):
        sampler.load_state_dict(saved)
    load_rng(directory, rank)
    return state


def temp_dir(output_dir: Path, step: int) -> Path:
    return output_dir / f".tmp-{PREFIX}{step}"


def finalize(output_dir: Path, step: int, keep: int) -> Path:
    """Rename the finished temp dir into place and prune old checkpoints (main process only)."""
    final = output_dir / f"{PREFIX}{step}"
    if final.exists():  # re-saving the same step (e.g. the last one): swap, never merge
        shutil.rmtree(final)
    temp_dir(output_dir, step).rename(final)
    (output_dir / "latest").write_text(final.name + "\n")
    if keep > 0:
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def stage_at(stages, step: int) -> int:
    """Index of the stage that global step `step` (0-based) belongs to."""
    end = 0
    for i, s in enumerate(stages):
        end += s.steps
        if step < end:
            return i
    return len(stages) - 1


def save_run(run, step: int, history: list[dict]) -> None:
    """An atomic checkpoint of a training run (`rl.setup.Run`) after `step` steps: written to a temp
    dir by every process (each its own RNG), then renamed into place by the main one."""
    tmp = temp_dir(run.output_dir, step)
    if run.is_main:
        state = {
            "step": step,
            "stage": stage_at(run.stages, max(step - 1, 0)),
            "samplers": [d.sampler.state_dict() for d in run.stage_data],
            "history": history,
        }
        save_training_state(
            tmp, state, policy=run.unwrapped, tokenizer=run.tokenizer, optimizer=run.optimizer,
            scheduler=run.scheduler, critic=run.accelerator.unwrap_model(run.critic) if run.critic is not None else None,
            critic_optimizer=run.critic_optimizer,
        )
    run.accelerator.wait_for_everyone()
    save_rng(tmp, run.rank)  # every process: sampling RNG differs per rank
    run.accelerator.wait_for_everyone()
    if run.is_main:
        finalize(run.output_dir, step, run.cfg.save_total_limit)
    run.accelerator.wait_for_everyone()


def restore_run(run) -> tuple[int, list[dict]]:
    """(start step, metrics history) of a run: from its checkpoint when resuming (optimizer, scheduler,
    samplers, this process's RNG), else (0, []) with each process's sampling RNG seeded apart."""
    if run.checkpoint is None:
        from accelerate.utils import set_seed

        set_seed(run.cfg.seed + run.rank)  # different samples on each process, reproducibly
        return 0, []
    state = load_training_state(
        run.checkpoint, run.rank, optimizer=run.optimizer, scheduler=run.scheduler,
        critic_optimizer=run.critic_optimizer, samplers=[d.sampler for d in run.stage_data],
    )
    logging.getLogger("rl.trainer").info("resumed from %s at step %d", run.checkpoint, state["step"])
    return state["step"], state.get("history", [])

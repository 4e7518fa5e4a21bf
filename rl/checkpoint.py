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
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PREFIX = "checkpoint-"


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


def list_checkpoints(output_dir: Path) -> list[Path]:
    found = [p for p in Path(output_dir).glob(f"{PREFIX}*") if p.is_dir() and p.name[len(PREFIX) :].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def find_checkpoint(spec: str, output_dir: Path) -> Path:
    """`spec` is a checkpoint dir, or "latest" for the newest one in output_dir."""
    if spec == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"--resume latest: no {PREFIX}* directory in {output_dir}")
        return found[-1]
    path = Path(spec)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"--resume {spec}: not a checkpoint (no trainer_state.json)")
    return path

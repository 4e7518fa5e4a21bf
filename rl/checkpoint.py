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

After the last step `save_final` writes `final/`: the trained policy as a plain Hugging Face
model + tokenizer (safetensors, LoRA merged unless `model.save_adapter_only`), written as
`.tmp-final/` and renamed, with no absolute path of the training machine inside: it is
what `AutoModelForCausalLM.from_pretrained`, `eval.run --model` and the next recipe's
`model.name_or_path` (the run's output dir, resolved by `rl.models.resolve_model`) load.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

# one checkpoint discovery for RL, SFT and eval runs: rl.common (re-exported here)
from rl.common import CHECKPOINT_PREFIX as PREFIX
from rl.common import find_checkpoint, latest_checkpoint, list_checkpoints  # noqa: F401
from rl.multimodal import processor_of
from rl.vocab import adapter_save_kwargs


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
    # adapter_save_kwargs: a LoRA policy with added tokens saves its trained rows, not the whole embedding
    policy.save_pretrained(str(directory / "policy"), safe_serialization=True, **adapter_save_kwargs(policy))
    (processor_of(tokenizer) or tokenizer).save_pretrained(str(directory / "policy"))  # a VLM's processor
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


# ----------------------------------------------------------------------------- final model

FINAL = "final"


def portable_model_name(name_or_path: str) -> str:
    """How a published model names the model it came from: as the recipe wrote it (a registry
    name, a hub id, a relative or ``~`` path), or, for an absolute path of this machine, just
    its last component (the path means nothing elsewhere and says where the run was made)."""
    return Path(name_or_path).name if os.path.isabs(name_or_path) else name_or_path


def _replace_paths(value, paths: list[tuple[str, str]]):
    if isinstance(value, dict):
        return {k: _replace_paths(v, paths) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_paths(v, paths) for v in value]
    if isinstance(value, str):
        for local, portable in paths:
            if value == local or value.startswith(local + os.sep):
                return portable + value[len(local):]
    return value


def make_portable(directory: Path, paths: dict[str, str]) -> None:
    """Replace absolute local paths (keys of `paths`, with their real paths) by portable names
    (values) in the JSON and markdown files of a model directory about to be published:
    config.json `_name_or_path`, tokenizer_config `name_or_path`, adapter_config
    `base_model_name_or_path`, PEFT's README model card."""
    pairs = {}
    for local, portable in paths.items():
        for form in {os.path.abspath(local), os.path.realpath(local)}:
            pairs[form.rstrip(os.sep) or os.sep] = portable
    ordered = sorted(pairs.items(), key=lambda kv: -len(kv[0]))  # the longest (most specific) path first
    for f in sorted(directory.iterdir()):
        if f.suffix == ".json":
            data = json.loads(f.read_text(encoding="utf-8"))
            fixed = _replace_paths(data, ordered)
            if fixed != data:
                f.write_text(json.dumps(fixed, indent=2, sort_keys=False) + "\n", encoding="utf-8")
        elif f.suffix == ".md":
            text = f.read_text(encoding="utf-8")
            for local, portable in ordered:
                text = text.replace(local, portable)
            f.write_text(text, encoding="utf-8")


def publish_dir(tmp: Path, dest: Path) -> Path:
    """Rename the finished `tmp` directory onto `dest`; an existing `dest` is swapped out first and
    deleted only once the new one is in place (a crash leaves `.old-<name>` beside it, never a
    half-written `dest`)."""
    if dest.exists():
        old = dest.parent / f".old-{dest.name}"
        shutil.rmtree(old, ignore_errors=True)
        dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old)
    else:
        tmp.rename(dest)
    return dest


def save_final(run) -> Path:
    """Write `<output_dir>/final/`: the policy as a plain Hugging Face model + tokenizer.

    Every process must call it: the policy's weights come from `rl.weights.export_weights`,
    whose gathers of FSDP2 / ZeRO-3 shards are collectives (and which merges LoRA on the fly,
    so the training model is never mutated); the main process keeps them and saves the base
    architecture with that state dict (safetensors) into `.tmp-final/`, then renames it. With
    `model.lora` and `model.save_adapter_only` the PEFT adapter is saved instead. Local
    absolute paths are replaced by portable names (`make_portable`)."""
    from rl.weights import export_weights

    cfg, out = run.cfg, Path(run.output_dir)
    final, tmp = out / FINAL, out / f".tmp-{FINAL}"
    model = run.unwrapped
    adapter_only = bool(cfg.model.lora and cfg.model.save_adapter_only)
    if run.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover from a crash mid-save: never merge into it
    if adapter_only:
        if run.is_main:
            model.save_pretrained(str(tmp), safe_serialization=True, **adapter_save_kwargs(model))
    else:
        state: dict[str, torch.Tensor] = {}
        for name, tensor in export_weights(model):  # every rank iterates: gathers are collective
            if run.is_main:
                state[name] = tensor.detach().to("cpu")
        if run.is_main:
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            base.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
            del state
    if run.is_main:
        (processor_of(run.tokenizer) or run.tokenizer).save_pretrained(str(tmp))  # a VLM's whole processor
        source = portable_model_name(cfg.model.name_or_path)
        if adapter_only:  # the base the adapter applies to, as the recipe named it
            config_file = tmp / "adapter_config.json"
            adapter_config = json.loads(config_file.read_text(encoding="utf-8"))
            adapter_config["base_model_name_or_path"] = source
            config_file.write_text(json.dumps(adapter_config, indent=2) + "\n", encoding="utf-8")
        local = {str(out): out.resolve().name}
        base_dir = getattr(model.get_base_model() if hasattr(model, "get_base_model") else model, "name_or_path", "")
        if base_dir:  # where from_pretrained loaded the policy (the resolved recipe model)
            local[base_dir] = source
        make_portable(tmp, local)
        publish_dir(tmp, final)
        logging.getLogger("rl.trainer").info("final model: %s", final)
    run.accelerator.wait_for_everyone()
    return final

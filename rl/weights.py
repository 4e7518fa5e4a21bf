"""The policy's weights for a rollout engine: `export_weights` (no vLLM, no engine imports).

`export_weights(model)` yields (Hugging Face checkpoint name, full tensor) for every weight
of the policy as the trainer holds it: plain or DDP-wrapped, sharded by FSDP2 (gathered),
partitioned by DeepSpeed ZeRO-3 (gathered), or a PEFT LoRA model (merged on the fly). The
vLLM engines load it in place (`rl.engines.vllm_colocate`) or push it to a server
(`rl.engines.vllm_server`: a safetensors file, or vLLM's NCCL / CUDA IPC transfer); anything
else that needs the policy as a checkpoint-format stream can use it too. Optional packages
(peft, deepspeed, torch.distributed.tensor) are imported only when the policy uses them.

`checkpoint_dir(model)`: the policy's local checkpoint directory, when it has one.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch

__all__ = ["checkpoint_dir", "export_weights"]


def export_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's weights as (Hugging Face checkpoint name, tensor), without copies.

    A PEFT LoRA model is exported merged (W + scale * B @ A through each LoRA layer's
    `get_delta_weight`), computed on the fly so the training model is never mutated
    (merge/unmerge in place would drift the base weights by float rounding each step);
    `modules_to_save` copies replace their originals, and PEFT trainable tokens (added vocabulary,
    rl/vocab.py) write their trained rows into the embedding / head weight. Tied weights appear under both
    names, as in `state_dict()`: vLLM 0.32's in-place reload needs `lm_head.weight` too
    (without it the tied lm_head keeps the old weights).

    Sharded policies (FSDP2 / `fully_shard`, accelerate's `fsdp_version: 2`): parameters
    are `DTensor` shards, and each is yielded as its full tensor (`full_tensor()`, an
    all-gather; a new tensor on the parameter's device). With LoRA, the base weight and
    the delta (computed on the shards, itself a DTensor) are both gathered, then added.
    DeepSpeed ZeRO-3 (parameters with a `ds_id`; their `.data` is an empty placeholder
    between steps): each state-dict entry's parameter (with LoRA, the whole LoRA layer's)
    is gathered with `deepspeed.zero.GatheredParameters(modifier_rank=None)` and yielded
    as a copy made while gathered. deepspeed is imported only then.
    The gathers are collectives: under multi-process training EVERY rank must
    iterate this generator to the end, in the same order, even ranks that discard the
    tensors, or the ranks deadlock. Unsharded tensors (single process, DDP, ZeRO-1/2) are
    yielded as before, without copies. FSDP1 (`FullyShardedDataParallel`) is refused with an
    error: exported as it is, its root's parameters come out as local 1-D shards and LoRA
    deltas are dropped, silently (measured on 2 gloo ranks).
    """
    if any(getattr(p, "_fsdp_flattened", False) for p in model.parameters()):  # set by FSDP1 only
        raise NotImplementedError(
            "export_weights: the policy is sharded by FSDP1 (FullyShardedDataParallel, accelerate's "
            "fsdp_version: 1), which this project does not gather; use FSDP2 (fsdp_version: 2, "
            "recipes/accelerate/fsdp2.yaml)"
        )
    try:  # the type of FSDP2 (`fully_shard`) parameters; absent from torch builds without distributed support
        from torch.distributed.tensor import DTensor
    except ImportError:  # isinstance(x, ()) is always False
        DTensor = ()

    def _full(tensor: torch.Tensor) -> torch.Tensor:  # a shard -> the full tensor (all-gather); others as they are
        return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    lora_layers: dict[str, Any] = {}
    token_layers: dict[str, Any] = {}  # PEFT trainable tokens (added vocabulary under LoRA, rl/vocab.py)
    try:
        from peft.tuners.lora import LoraLayer
        from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

        lora_layers = {n: m for n, m in base.named_modules() if isinstance(m, LoraLayer)}
        token_layers = {n: m for n, m in base.named_modules() if isinstance(m, TrainableTokensLayer)}
    except ImportError:  # peft is a core dependency, but stay usable without it
        pass
    param_of = dict(base.named_parameters(remove_duplicate=False))  # state-dict name -> Parameter (tied: one)
    # DeepSpeed ZeRO-3 partitioned parameters by state-dict name (tied ones under each name); {} otherwise
    zero3 = {n: p for n, p in param_of.items() if hasattr(p, "ds_id")}
    # a merged LoRA weight by its base Parameter: a name tied to it (lm_head.weight when the tied
    # embeddings carry LoRA) gets the merged weight too, as merge_and_unload gives it
    merged_of: dict[int, torch.Tensor] = {}
    if zero3:
        import deepspeed  # optional: only a ZeRO-3 policy gets here, and it was built with deepspeed

    def _gathered(params: list[torch.nn.Parameter]) -> contextlib.AbstractContextManager:
        if not params:
            return contextlib.nullcontext()
        # all ranks gather the same parameters in the same order; None: nobody modifies them
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    with torch.no_grad():
        for name, tensor in base.state_dict().items():
            if ".lora_" in name or ".original_module." in name:
                continue
            owner = param_of.get(name)  # the Parameter behind this entry (tied names share one)
            if owner is not None and id(owner) in merged_of:
                yield name.replace(".token_adapter.base_layer.", "."), merged_of[id(owner)]
                continue
            param = zero3.get(name)  # under ZeRO-3 `tensor` is an empty placeholder: read the gathered param
            gather = [param] if param is not None else []
            merge = tokens = None
            if ".token_adapter." in name:  # a TrainableTokensWrapper: its trained rows replace the base rows
                if ".token_adapter.base_layer." not in name:
                    continue  # the trained rows themselves (trainable_tokens_delta), merged into the weight below
                mod_name, _, pname = name.partition(".token_adapter.base_layer.")
                layer = token_layers.get(f"{mod_name}.token_adapter")
                if layer is not None and pname == "weight" and not layer.merged and not layer.disable_adapters:
                    tokens = layer
                    if zero3:
                        gather += [p for p in layer.trainable_tokens_delta.parameters() if hasattr(p, "ds_id")]
                name = f"{mod_name}.{pname}"
            if ".modules_to_save." in name:
                head, _, rest = name.partition(".modules_to_save.")
                name = head + "." + rest.split(".", 1)[1]
            if ".base_layer." in name:
                mod_name, _, pname = name.partition(".base_layer.")
                layer = lora_layers.get(mod_name)
                if layer is not None and pname == "weight" and not layer.merged and not layer.disable_adapters:
                    merge = layer
                    if zero3:  # get_delta_weight reads lora_A / lora_B: gather the layer's parameters too
                        gather += [p for p in layer.parameters() if hasattr(p, "ds_id")]
                name = f"{mod_name}.{pname}"
            with _gathered(gather):
                if param is not None:  # a copy: DeepSpeed may re-partition into the gathered storage's memory
                    tensor = param.detach().clone()
                if merge is not None:
                    for adapter in merge.active_adapters:
                        # lora_A: Linear / Conv layers; lora_embedding_A: Embedding layers
                        if adapter in getattr(merge, "lora_A", {}) or adapter in getattr(merge, "lora_embedding_A", {}):
                            # under FSDP2 both are DTensors: gather each, then add full tensors
                            tensor = _full(tensor) + _full(merge.get_delta_weight(adapter)).to(tensor.dtype)
                if tokens is not None:  # as PEFT's merge: the trained rows overwrite the base rows
                    for adapter in tokens.active_adapters:
                        if adapter in tokens.trainable_tokens_delta:
                            index = torch.tensor(tokens.token_indices[adapter], device=tensor.device)
                            delta = _full(tokens.trainable_tokens_delta[adapter]).to(tensor.dtype)
                            tensor = _full(tensor).index_copy(0, index, delta)
                    merge = merge or tokens  # for merged_of below: a tied head gets the same rows
                tensor = _full(tensor).detach()
                if merge is not None and owner is not None:
                    merged_of[id(owner)] = tensor
                yield name, tensor


def checkpoint_dir(model: torch.nn.Module) -> str | None:
    """The local directory the policy was loaded from (it has a config.json), or None; None too when
    its config's vocabulary size is not the policy's (resized for added tokens, rl/vocab.py: an engine
    started from that directory would build the old embedding shapes)."""
    import json

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    path = getattr(base, "name_or_path", None) or getattr(getattr(base, "config", None), "_name_or_path", None)
    if path and (Path(path) / "config.json").is_file():
        on_disk = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
        on_disk = on_disk.get("text_config", on_disk) if "vocab_size" not in on_disk else on_disk
        config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
        if "vocab_size" in on_disk and on_disk["vocab_size"] != getattr(config, "vocab_size", on_disk["vocab_size"]):
            return None
        return str(path)
    return None

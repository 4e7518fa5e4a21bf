"""FSDP1 (`FullyShardedDataParallel`, accelerate's `fsdp_version: 1`) is refused, not exported wrong.

Measured on 2 gloo ranks (the tiny Llama, decoder layers auto-wrapped, FULL_SHARD): exported
as it was, the module the trainer hands over (`accelerator.unwrap_model(policy)`, without the
root wrapper) gave the root's parameters as local 1-D shards (`embed_tokens` (16416,) on
rank 0 instead of (512, 64)), and a LoRA model lost every delta, silently. The project
gathers FSDP2 only; `export_weights` must raise a clear error under FSDP1 instead, for the
root and the inner module, with `use_orig_params` True and False, and with LoRA. Two CPU
processes over gloo, launched by `run_ranks` of tests/test_weight_export_sharded.py.
"""

from __future__ import annotations

import functools

import pytest
import torch

from test_weight_export_sharded import _load, _lora_model, run_ranks


@pytest.mark.slow
def test_export_weights_refuses_fsdp1(tiny_model_dir, tmp_path):
    logs = run_ranks(tmp_path, "test_weight_export_fsdp1:worker_fsdp1", tiny_model_dir)
    assert all(t.count("FSDP1 REFUSED") == 3 for t in logs)


# ----------------------------------------------------------------------------- workers


def _wrap_fsdp1(model: torch.nn.Module, use_orig_params: bool):
    """FSDP1 as accelerate's `fsdp_version: 1` applies it (transformer-layer auto-wrap, FULL_SHARD)."""
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={LlamaDecoderLayer})
    return FullyShardedDataParallel(model, auto_wrap_policy=policy, sharding_strategy=ShardingStrategy.FULL_SHARD,
                                    use_orig_params=use_orig_params, device_id=torch.device("cpu"))


def _assert_sharded(root: torch.nn.Module, full: torch.nn.Module) -> None:
    local = sum(p.numel() for p in root.parameters())
    total = sum(p.numel() for p in full.parameters())
    assert local < 0.75 * total, f"FSDP1 did not shard the model ({local} of {total} elements on this rank)"


def worker_fsdp1(model_dir: str) -> None:
    from rl.weights import export_weights

    for name, make, orig in (("plain", _load, True), ("flat", _load, False), ("lora", _lora_model, True)):
        full = make(model_dir)
        root = _wrap_fsdp1(make(model_dir), use_orig_params=orig)
        _assert_sharded(root, full)
        for model in (root, root.module):  # the root wrapper, and what accelerator.unwrap_model returns
            with pytest.raises(NotImplementedError, match="FSDP1.*fsdp_version: 2"):
                list(export_weights(model))
        list(export_weights(full))  # the unsharded model still exports
        print("FSDP1 REFUSED", name, flush=True)


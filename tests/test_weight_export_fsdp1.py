"""Weight export under FSDP1 (`FullyShardedDataParallel`, accelerate's `fsdp_version: 1`).

Two CPU processes over gloo, started like `torchrun` would, by running this file as a
script through `run_ranks` of tests/test_weight_export_sharded.py (its FSDP2 twin). The
model is wrapped as accelerate wraps it: an auto-wrap policy on the decoder layers, the
root wrapper around the rest (embeddings, final norm, tied lm_head), FULL_SHARD. Every
rank's parameters are then local 1-D shards (or one flat parameter per unit), and
`export_weights` must still yield, on every rank, exactly the unsharded model's
`state_dict()` (names, order, shapes, values; tied `lm_head.weight` included), both for the
module the trainer hands it (`accelerator.unwrap_model(policy)`, i.e. without the root
wrapper) and for the root wrapper itself, before and after an optimizer step:

* plain model with `use_orig_params` True, False, and True with activation-checkpoint
  wrappers on the layers (accelerate's `fsdp_activation_checkpointing`);
* PEFT LoRA model (`use_orig_params=True`, which FSDP1 needs for frozen + trainable
  parameters in one unit), exported merged.

After the step the export is compared exactly with FSDP's own full state dict (an
independent gather) and with the same step taken by an unsharded copy of the model.
"""

from __future__ import annotations

import copy
import functools
import sys
from pathlib import Path

HERE = Path(__file__).resolve()
for _p in (str(HERE.parents[1]), str(HERE.parent)):  # `import rl`, `import tiny`, the FSDP2 tests' helpers
    if _p not in sys.path:
        sys.path.insert(0, _p)

import pytest  # noqa: E402
import torch  # noqa: E402

import test_weight_export_sharded as sharded  # noqa: E402
from test_weight_export_sharded import _assert_exports, _load  # noqa: E402

BATCH = torch.arange(3, 3 + 2 * 12).view(2, 12)  # the same batch on every rank and in the unsharded reference


def run_ranks(monkeypatch, tmp_path: Path, mode: str, *args: str) -> list[str]:
    """The FSDP2 tests' launcher (`WORLD` gloo ranks, timeout, logs on failure), running this file."""
    monkeypatch.setattr(sharded, "HERE", HERE)
    return sharded.run_ranks(tmp_path, mode, *args)


# ----------------------------------------------------------------------------- tests


@pytest.mark.slow
def test_export_weights_gathers_fsdp1_shards(tiny_model_dir, tmp_path, monkeypatch):
    logs = run_ranks(monkeypatch, tmp_path, "fsdp1", tiny_model_dir)
    assert all(t.count("FSDP1 EXPORT OK") == 3 for t in logs)


@pytest.mark.slow
def test_export_weights_merges_lora_under_fsdp1(tiny_model_dir, tmp_path, monkeypatch):
    logs = run_ranks(monkeypatch, tmp_path, "fsdp1_lora", tiny_model_dir)
    assert all("FSDP1 LORA OK" in t for t in logs)


# ----------------------------------------------------------------------------- workers


def _wrap_fsdp1(model: torch.nn.Module, use_orig_params: bool = True, checkpointing: bool = False):
    """FSDP1 as accelerate's `fsdp_version: 1` applies it (transformer-layer auto-wrap, FULL_SHARD)."""
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={LlamaDecoderLayer})
    root = FullyShardedDataParallel(model, auto_wrap_policy=policy, sharding_strategy=ShardingStrategy.FULL_SHARD,
                                    use_orig_params=use_orig_params, device_id=torch.device("cpu"))
    if checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            CheckpointImpl, apply_activation_checkpointing, checkpoint_wrapper)

        apply_activation_checkpointing(
            root, checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
            check_fn=lambda m: isinstance(m, LlamaDecoderLayer))
    return root


def _assert_sharded(root: torch.nn.Module, full: torch.nn.Module) -> None:
    local = sum(p.numel() for p in root.parameters())
    total = sum(p.numel() for p in full.parameters())
    assert local < 0.75 * total, f"FSDP1 did not shard the model ({local} of {total} elements on this rank)"


def _step(model: torch.nn.Module) -> None:
    """One SGD step on `BATCH` (FSDP1 averages the ranks' identical gradients: the single-process step)."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(input_ids=BATCH, labels=BATCH).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _worker_fsdp1(model_dir: str) -> None:
    from rl.engines_vllm import export_weights

    initial = _load(model_dir).state_dict()
    for use_orig_params, checkpointing in ((True, False), (False, False), (True, True)):
        config = f"use_orig_params={use_orig_params} checkpointing={checkpointing}"
        ref = _load(model_dir)
        root = _wrap_fsdp1(_load(model_dir), use_orig_params, checkpointing)
        _assert_sharded(root, ref)
        unwrapped = root.module  # what accelerator.unwrap_model(policy) hands the engine
        expected = ref.state_dict()
        assert "lm_head.weight" in expected  # tied to the embeddings, which the root wrapper shards
        _assert_exports(list(export_weights(unwrapped)), expected, exact=True)
        _assert_exports(list(export_weights(root)), expected, exact=True)

        for m in (root, ref):
            _step(m)
        _assert_sharded(root, ref)
        expected = ref.state_dict()
        gathered = root.state_dict()  # FSDP1's own full state dict: the same weights through another gather
        assert not torch.equal(expected["model.layers.0.mlp.up_proj.weight"], initial["model.layers.0.mlp.up_proj.weight"])
        assert not torch.equal(expected["model.embed_tokens.weight"], initial["model.embed_tokens.weight"])
        exported = list(export_weights(unwrapped))
        _assert_exports(exported, gathered, exact=True)
        _assert_exports(exported, expected, exact=True)
        _assert_exports(list(export_weights(root)), expected, exact=True)
        # the exported tensors are copies: they outlive the export, and training never sees them
        exported[0][1].add_(1.0)
        assert torch.equal(root.state_dict()["model.embed_tokens.weight"], expected["model.embed_tokens.weight"])
        print("FSDP1 EXPORT OK", config, flush=True)
    assert "vllm" not in sys.modules


def _lora_model(model_dir: str):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_load(model_dir), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(0)  # the same adapter on every rank
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def _worker_fsdp1_lora(model_dir: str) -> None:
    from rl.engines_vllm import export_weights

    model = _lora_model(model_dir)
    ref = copy.deepcopy(model)  # unsharded twin, trained alongside
    merged = copy.deepcopy(model).merge_and_unload().state_dict()
    unsharded = {n: t.clone() for n, t in export_weights(model)}  # the unsharded path: the expected export
    base_q = _load(model_dir).state_dict()["model.layers.0.self_attn.q_proj.weight"]
    root = _wrap_fsdp1(model, use_orig_params=True)
    _assert_sharded(root, ref)
    lora_shapes = {n: p.shape for n, p in ref.named_parameters() if "lora_" in n}
    local = {n.replace("_fsdp_wrapped_module.", ""): p.shape for n, p in root.module.named_parameters() if "lora_" in n}
    assert local.keys() == lora_shapes.keys() and any(local[n] != lora_shapes[n] for n in local), "adapters not sharded"

    for target in (root.module, root):  # accelerator.unwrap_model(policy) (a PeftModel), and the root wrapper
        exported = list(export_weights(target))
        _assert_exports(exported, unsharded, exact=True)
        _assert_exports(exported, merged, exact=False)  # merge_and_unload adds in place: rounding may differ
        assert not torch.equal(dict(exported)["model.layers.0.self_attn.q_proj.weight"], base_q)

    for m in (root, ref):
        _step(m)
    # exact: FSDP1's own full state dict of the trained model, loaded into an unsharded copy and exported there
    check = copy.deepcopy(ref)
    check.load_state_dict(root.state_dict())
    expected = dict(export_weights(check))
    exported = list(export_weights(root.module))
    _assert_exports(exported, expected, exact=True)
    _assert_exports(exported, dict(export_weights(ref)), exact=True)  # the unsharded model's step
    assert not torch.equal(expected["model.layers.0.self_attn.q_proj.weight"], unsharded["model.layers.0.self_attn.q_proj.weight"])
    assert "vllm" not in sys.modules
    print("FSDP1 LORA OK", flush=True)


def _worker_main(mode: str, *args: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # env:// (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)
    try:
        {"fsdp1": _worker_fsdp1, "fsdp1_lora": _worker_fsdp1_lora}[mode](*args)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _worker_main(*sys.argv[1:])

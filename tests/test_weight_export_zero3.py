"""Weight export under DeepSpeed ZeRO stage 3 (accelerate's `deepspeed_config: zero_stage: 3`).

Two CPU processes over gloo, started like `torchrun` would by `run_ranks` of
tests/test_weight_export_sharded.py (its FSDP2 twin), each running a worker below. The
tiny Llama is handed to `deepspeed.initialize` with a stage-3 config and a plain SGD
optimizer; every parameter is then partitioned across the ranks (the persistence
threshold is 0, so even the small ones are), its `.data` an empty placeholder, and
`export_weights` must still yield, on every rank, exactly the unsharded model's
`state_dict()` (names, order, shapes, values; the tied `lm_head.weight` included):

* plain model, before an optimizer step: exactly the checkpoint; after one: exactly the
  weights rebuilt from the ranks' partitions (a plain all_gather of each `ds_tensor`), and
  the same SGD step taken by an unsharded copy on the same batch up to float rounding (the
  ZeRO-3 step is not bitwise the single-process one); the engine must still train after an
  export (every parameter re-partitioned);
* PEFT LoRA model, exported merged: exactly the export of the same model before DeepSpeed
  wrapped it; after a step, exactly the export of a copy loaded from the partitions.

Skipped when `import deepspeed` fails (the optional `deepspeed` extra). The workers run
DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu) and skip its shared-memory collectives
op, which DeepSpeed would otherwise JIT-compile with g++ and ninja on first use (~45 s on
2 cores): the collectives then go through torch.distributed (gloo).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

from test_weight_export_sharded import _load, _lora_model, run_ranks

BATCH = torch.arange(3, 3 + 2 * 12).view(2, 12)  # the same batch on every rank and in the unsharded reference
LR = 0.5
ZERO3_CONFIG = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},  # partition every parameter
    "zero_allow_untested_optimizer": True,  # SGD (a client optimizer) instead of DeepSpeed's Adam
    "gradient_clipping": 0.0,  # DeepSpeed clips to norm 1.0 by default; the unsharded reference step does not clip
    "steps_per_print": 1_000_000,
}


@pytest.fixture(scope="module")
def deepspeed_available() -> None:
    """Skip unless `import deepspeed` works (tried in a subprocess: the test process never imports it)."""
    probe = subprocess.run([sys.executable, "-c", "import deepspeed"], capture_output=True, text=True,
                           env=dict(os.environ, DS_ACCELERATOR="cpu"), timeout=120, check=False)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["(no output)"])[-1]
        pytest.skip(f"`import deepspeed` failed ({last}); it is the optional extra: pip install 'agentrl[deepspeed]'")


# ----------------------------------------------------------------------------- tests


@pytest.mark.slow
def test_export_weights_gathers_zero3_partitions(deepspeed_available, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # inherited by the ranks
    logs = run_ranks(tmp_path, "test_weight_export_zero3:worker_zero3", tiny_model_dir)
    assert all("ZERO3 EXPORT OK" in t for t in logs)


@pytest.mark.slow
def test_export_weights_merges_lora_under_zero3(deepspeed_available, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    logs = run_ranks(tmp_path, "test_weight_export_zero3:worker_zero3_lora", tiny_model_dir)
    assert all("ZERO3 LORA OK" in t for t in logs)


# ----------------------------------------------------------------------------- workers


def _zero3(model: torch.nn.Module):
    """`deepspeed.initialize` with stage 3 and SGD over the trainable parameters; the engine."""
    import importlib

    import deepspeed

    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")  # not `import ... as`: deepspeed.comm.torch is torch
    if hasattr(ds_torch_comm, "build_shm_op"):  # no JIT compile of the shm collectives op (see the module doc)
        ds_torch_comm.build_shm_op = lambda: None
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=copy.deepcopy(ZERO3_CONFIG))
    return engine


def _assert_partitioned(model: torch.nn.Module) -> None:
    params = list(model.parameters())
    assert params and all(hasattr(p, "ds_id") for p in params), "ZeRO-3 did not take every parameter"
    assert all(p.data.numel() == 0 for p in params), "a parameter is still gathered (not re-partitioned)"
    assert all(0 < p.ds_tensor.numel() < p.ds_numel for p in params if p.ds_numel > 1), "each rank should hold a part"


def _gather_partitions(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict rebuilt from each rank's partition (`ds_tensor`) with a plain all_gather: independent
    of DeepSpeed's own gathering, hence of `export_weights`."""
    import torch.distributed as dist

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    full = {}
    for name, p in base.named_parameters(remove_duplicate=False):  # tied weights under both names
        parts = [torch.empty_like(p.ds_tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, p.ds_tensor)
        full[name] = torch.cat(parts)[: p.ds_numel].view(p.ds_shape)  # partitions are padded to equal sizes
    return {n: full.get(n, t) for n, t in base.state_dict().items()}


def _assert_exports(exported: list[tuple[str, torch.Tensor]], expected: dict[str, torch.Tensor],
                    exact: bool = True) -> None:
    assert [n for n, _ in exported] == list(expected), "names or order differ from the unsharded state_dict"
    for name, t in exported:
        assert t.shape == expected[name].shape, (name, t.shape, expected[name].shape)
        if exact:
            assert torch.equal(t, expected[name]), name
        else:
            torch.testing.assert_close(t, expected[name], rtol=1e-5, atol=1e-6, msg=name)


def _step(model_or_engine: torch.nn.Module, opt: torch.optim.Optimizer | None = None) -> None:
    """One training step on BATCH: the engine's own (backward + step), or a plain model's with `opt`."""
    loss = model_or_engine(input_ids=BATCH, labels=BATCH).loss
    if opt is None:
        model_or_engine.backward(loss)
        model_or_engine.step()
    else:
        loss.backward()
        opt.step()
        opt.zero_grad()


def worker_zero3(model_dir: str) -> None:
    from rl.weights import export_weights

    ref = _load(model_dir)
    initial = {n: t.clone() for n, t in ref.state_dict().items()}
    assert "lm_head.weight" in initial  # the tiny model ties it to the embeddings; state_dict has both names
    model = _load(model_dir)
    engine = _zero3(model)
    _assert_partitioned(model)
    assert all(t.numel() == 0 for t in model.state_dict().values()), "state_dict() should hold empty placeholders"
    _assert_exports(list(export_weights(model)), initial)
    _assert_partitioned(model)  # every gathered parameter was re-partitioned

    # after a step (same batch on both ranks: ZeRO's averaged gradient is the single-process one, up to rounding)
    _step(engine)
    _step(ref, torch.optim.SGD(ref.parameters(), lr=LR))
    assert not torch.equal(ref.state_dict()["model.layers.0.mlp.up_proj.weight"],
                           initial["model.layers.0.mlp.up_proj.weight"])
    exported = list(export_weights(model))
    _assert_partitioned(model)
    _assert_exports(exported, _gather_partitions(model))  # the yielded tensors outlive the re-partitioning
    _assert_exports(exported, ref.state_dict(), exact=False)  # and hold the step the unsharded model took
    _step(engine)  # the engine still trains after an export
    assert not torch.equal(dict(export_weights(model))["model.norm.weight"], dict(exported)["model.norm.weight"])
    assert "vllm" not in sys.modules
    print("ZERO3 EXPORT OK", flush=True)


def worker_zero3_lora(model_dir: str) -> None:
    from rl.weights import export_weights

    ref = _lora_model(model_dir)
    unsharded = {n: t.clone() for n, t in export_weights(ref)}
    merged = copy.deepcopy(ref).merge_and_unload().state_dict()
    _assert_exports(list(unsharded.items()), merged, exact=False)
    assert not torch.equal(unsharded["model.layers.0.self_attn.q_proj.weight"],
                           _load(model_dir).state_dict()["model.layers.0.self_attn.q_proj.weight"])

    model = _lora_model(model_dir)
    engine = _zero3(model)
    _assert_partitioned(model)
    q_b = model.get_base_model().model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert hasattr(q_b, "ds_id") and q_b.data.numel() == 0
    _assert_exports(list(export_weights(model)), unsharded)
    _assert_partitioned(model)

    # after a step (only the adapters train): exactly the merge of the partitions, close to the unsharded step
    _step(engine)
    _step(ref, torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=LR))
    expected = {n: t.clone() for n, t in export_weights(ref)}
    assert not torch.equal(expected["model.layers.0.self_attn.q_proj.weight"],
                           unsharded["model.layers.0.self_attn.q_proj.weight"])
    exported = list(export_weights(model))
    _assert_partitioned(model)
    rebuilt = _lora_model(model_dir)
    rebuilt.get_base_model().load_state_dict(_gather_partitions(model))
    _assert_exports(exported, dict(export_weights(rebuilt)))
    _assert_exports(exported, expected, exact=False)
    assert "vllm" not in sys.modules
    print("ZERO3 LORA OK", flush=True)


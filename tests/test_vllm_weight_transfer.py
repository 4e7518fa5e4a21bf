"""`vllm_server` with weight_sync "nccl" / "ipc": vLLM's trainer-side engines, wired on CPU.

NCCL needs GPUs, so here only the transport is replaced: vLLM's real
`NCCLTrainerWeightTransferEngine` and `HTTPVLLMWeightSyncClient` run against the stand-in
server (tests/fake_vllm_server.py, which records the weight-transfer routes), with
`open_trainer_endpoint` (the NCCL communicator) faked and the sender's broadcast replaced by
vLLM's own `_checked_iter` over our source, which checks every sent tensor against the
metadata the server was told to expect, and records what would have been broadcast.
What this covers: our source meets vLLM's `WeightSource` contract (plain, tied, LoRA,
FSDP2 on 2 ranks), the handshake and its order, the NCCL group size, one group for all
syncs, the prefix-cache reset, the weights sent at each sync, and the errors. What it
does not: the NCCL broadcast itself and the server's receive (GPU only, not yet run).
For "ipc" (CUDA IPC, a server on the trainer's GPU) only the CUDA calls are replaced (the
device's uuid, `reduce_tensor`, `ipc_collect`): vLLM's real engine builds one handle per
tensor and sends them pickled through the real HTTP client.
"""

from __future__ import annotations

import base64
import pickle
import sys
import time

import httpx
import pytest
import torch

from test_vllm_server_failures import Servers, _free_port
from test_weight_export_sharded import _load, _perturb, run_ranks

try:
    from vllm.distributed.weight_transfer import ipc_engine, nccl_engine

    _VLLM_ERROR = None
except Exception as e:  # ImportError, or a broken install
    _VLLM_ERROR = f"{type(e).__name__}: {e}"

pytestmark = pytest.mark.skipif(
    _VLLM_ERROR is not None, reason=f"vLLM's weight-transfer API is not importable ({_VLLM_ERROR})"
)


class FakeEndpoint:
    """What `open_trainer_endpoint` returns: stands in for the NCCL communicator."""

    def __init__(self, init_info):
        self.init_info = init_info
        self.destroyed = False

    def destroy(self) -> None:
        self.destroyed = True


def fake_nccl(monkeypatch) -> dict:
    """Replace the NCCL transport of vLLM's trainer engine; returns what it records."""
    record: dict = {"endpoints": [], "sent": []}

    def open_endpoint(init_info):
        record["endpoints"].append(FakeEndpoint(init_info))
        return record["endpoints"][-1]

    real_broadcast = nccl_engine.NCCLTrainerWeightTransferEngine._broadcast

    def broadcast(self, source, meta):
        if not self.is_sender:  # vLLM's own non-sender path: iterate the source (the FSDP gathers)
            return real_broadcast(self, source, meta)
        assert self.model_update_group is record["endpoints"][-1]
        record["sent"].append({n: t.detach().clone() for n, t in self._checked_iter(source, meta)})

    monkeypatch.setattr(nccl_engine, "open_trainer_endpoint", open_endpoint)
    monkeypatch.setattr(nccl_engine.NCCLTrainerWeightTransferEngine, "_broadcast", broadcast)
    return record


def fake_cuda_ipc(monkeypatch) -> list:
    """Replace the CUDA calls of vLLM's IPC trainer engine; returns the tensors it was asked to share."""
    shared: list[torch.Tensor] = []

    def reduce_tensor(t):  # what torch.multiprocessing.reductions.reduce_tensor returns: (rebuild fn, args)
        shared.append(t.clone())
        return None, ("fake-ipc-handle", len(shared) - 1)

    monkeypatch.setattr(ipc_engine, "reduce_tensor", reduce_tensor)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: type("Props", (), {"uuid": "GPU-fake"})())
    monkeypatch.setattr(torch.accelerator, "current_device_index", lambda: 0)
    monkeypatch.setattr(torch.cuda, "ipc_collect", lambda: None)
    return shared


def transfer_log(port: int) -> list:
    return httpx.get(f"http://127.0.0.1:{port}/inflight", timeout=5).json()


# ----------------------------------------------------------------------------- the source


@pytest.mark.parametrize("lora", [False, True])
def test_policy_weight_source_meets_vllms_contract(tiny_model_dir, lora):
    """metadata() and a pass agree element for element (vLLM's own check), on every pass, and the
    tensors are the export's: tied lm_head under both names, LoRA merged, all contiguous."""
    from rl.engines.vllm_server import policy_weight_source
    from rl.weights import export_weights

    model = _load(tiny_model_dir)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    source = policy_weight_source(model)
    meta = source.metadata()
    assert [m.name for m in meta] == [n for n, _ in export_weights(model)]
    assert "lm_head.weight" in [m.name for m in meta] and not any("lora_" in m.name for m in meta)
    check = nccl_engine.NCCLTrainerWeightTransferEngine._checked_iter
    for _ in range(2):  # a fresh pass each round
        sent = list(check(source, source.metadata()))
        expected = dict(export_weights(model))
        assert [n for n, _ in sent] == list(expected)
        for name, t in sent:
            assert t.is_contiguous() and torch.equal(t, expected[name]), name
    if lora:  # the merged q_proj differs from the base weight
        base = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
        assert not torch.equal(dict(sent)["model.layers.0.self_attn.q_proj.weight"], base)


# ----------------------------------------------------------------------------- the handshake


def test_nccl_sync_drives_vllms_handshake_and_sends_the_current_weights(tiny_model_dir, tiny_tokenizer,
                                                                        tmp_path, monkeypatch):
    from rl.engines.vllm_server import VLLMServerEngine
    from rl.weights import export_weights

    record = fake_nccl(monkeypatch)
    servers = Servers(tmp_path)
    port = _free_port()
    servers.start(port, extra=["--world-size", "2"])  # a TP=2 server: an NCCL group of 3
    try:
        model = _load(tiny_model_dir)
        eng = VLLMServerEngine(model, tiny_tokenizer, 4, base_url=f"http://127.0.0.1:{port}", timeout=30,
                               max_retries=0, weight_sync="nccl", nccl_master_port=29555)
        assert eng.inference_world_size == 2 and record["endpoints"] == []  # nothing opened before a sync
        expected = []
        for step in (1, 2):
            _perturb(model, step)
            eng.update_weights(model)
            expected.append({n: t.clone() for n, t in export_weights(model)})
        endpoint = record["endpoints"][0]
        eng.close()
        seen = transfer_log(port)
    finally:
        servers.close()
    # one group for every sync: trainer rank 0 + 2 server workers, at the configured address
    assert len(record["endpoints"]) == 1 and endpoint.destroyed
    assert (endpoint.init_info.master_address, endpoint.init_info.master_port, endpoint.init_info.world_size) \
        == ("127.0.0.1", 29555, 3)
    routes = [r for r, _ in seen["weight_transfer"]]
    assert routes == ["init_weight_transfer_engine"] + ["start_weight_update", "update_weights",
                                                        "finish_weight_update"] * 2 + ["shutdown_weight_transfer_engine"]
    init = seen["weight_transfer"][0][1]["init_info"]
    assert (init["master_address"], init["master_port"], init["world_size"], init["rank_offset"]) == \
        ("127.0.0.1", 29555, 3, 1)
    update = seen["weight_transfer"][2][1]["update_info"]
    assert update["names"] == list(expected[0])
    assert update["shapes"] == [list(t.shape) for t in expected[0].values()]
    assert set(update["dtype_names"]) == {"float32"}
    assert seen["reset_prefix_cache"] == 2 and seen["collective_rpc"] == []  # no disk reload
    assert eng.stats["weight_syncs"] == 2
    # each sync sent that step's weights, exactly
    assert len(record["sent"]) == 2
    for sent, exp in zip(record["sent"], expected):
        assert list(sent) == list(exp)
        assert all(torch.equal(sent[n], exp[n]) for n in exp)
    assert not torch.equal(record["sent"][0]["model.layers.0.mlp.up_proj.weight"],
                           record["sent"][1]["model.layers.0.mlp.up_proj.weight"])


def test_ipc_sync_sends_one_handle_per_tensor_through_vllms_engine(tiny_model_dir, tiny_tokenizer, tmp_path,
                                                                    monkeypatch):
    from rl.engines.vllm_server import VLLMServerEngine
    from rl.weights import export_weights

    shared = fake_cuda_ipc(monkeypatch)
    servers = Servers(tmp_path)
    port = _free_port()
    servers.start(port)
    try:
        model = _load(tiny_model_dir)
        eng = VLLMServerEngine(model, tiny_tokenizer, 4, base_url=f"http://127.0.0.1:{port}", timeout=30,
                               max_retries=0, weight_sync="ipc")
        _perturb(model, 1)
        eng.update_weights(model)
        expected = dict(export_weights(model))
        eng.close()
        seen = transfer_log(port)
    finally:
        servers.close()
    routes = [r for r, _ in seen["weight_transfer"]]
    assert routes == ["init_weight_transfer_engine", "start_weight_update", "update_weights", "finish_weight_update",
                      "shutdown_weight_transfer_engine"]
    assert seen["weight_transfer"][0][1]["init_info"] == {"packed": False}
    update = seen["weight_transfer"][2][1]["update_info"]
    assert update["names"] == list(expected) and update["shapes"] == [list(t.shape) for t in expected.values()]
    # the handles travel pickled (JSON cannot carry them): one per tensor, keyed by the GPU's uuid
    handles = pickle.loads(base64.b64decode(update["ipc_handles_pickled"]))
    assert handles == [{"GPU-fake": ("fake-ipc-handle", i)} for i in range(len(expected))]
    assert len(shared) == len(expected)
    for t, (name, exp) in zip(shared, expected.items()):
        assert torch.equal(t, exp), name
    assert seen["reset_prefix_cache"] == 1 and eng.stats["weight_syncs"] == 1


@pytest.mark.parametrize("backend", ["nccl", "ipc"])
def test_server_without_weight_transfer_routes_is_refused_with_how_to_start_it(tiny_model_dir, tiny_tokenizer,
                                                                               tmp_path, backend):
    from rl.engines.vllm_server import VLLMServerEngine

    servers = Servers(tmp_path)
    port = _free_port()
    servers.start(port, extra=["--no-weight-transfer"])
    try:
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="get_world_size") as err:
            VLLMServerEngine(_load(tiny_model_dir), tiny_tokenizer, 4, base_url=f"http://127.0.0.1:{port}",
                             timeout=10, max_retries=0, weight_sync=backend)
        assert time.monotonic() - t0 < 10
    finally:
        servers.close()
    assert "VLLM_SERVER_DEV_MODE=1" in str(err.value) and f'"backend": "{backend}"' in str(err.value)
    assert ("VLLM_ALLOW_INSECURE_SERIALIZATION=1" in str(err.value)) == (backend == "ipc")
    assert tiny_model_dir in str(err.value)  # the command names the policy's checkpoint


# ----------------------------------------------------------------------------- FSDP2, 2 ranks


@pytest.mark.slow
def test_nccl_sync_under_fsdp2_sends_the_full_weights_from_rank0_only(tiny_model_dir, tmp_path):
    """Both ranks run vLLM's send_weights (rank 1 only joins the all-gathers); rank 0 alone
    drives the server and sends, once per sync, the unsharded weights."""
    servers = Servers(tmp_path)
    port = _free_port()
    servers.start(port)
    try:
        logs = run_ranks(tmp_path, "test_vllm_weight_transfer:worker_nccl_fsdp2", tiny_model_dir, str(port), str(tmp_path / "sent.pt"))
        seen = transfer_log(port)
    finally:
        servers.close()
    assert all("NCCL FSDP2 OK" in t for t in logs)
    assert [r for r, _ in seen["weight_transfer"]] == ["init_weight_transfer_engine"] + [
        "start_weight_update", "update_weights", "finish_weight_update"] * 2 + ["shutdown_weight_transfer_engine"]
    assert seen["weight_transfer"][0][1]["init_info"]["world_size"] == 2
    assert seen["reset_prefix_cache"] == 2
    sent = torch.load(tmp_path / "sent.pt")
    ref = _load(tiny_model_dir)
    for step, weights in zip((1, 2), sent):
        _perturb(ref, step)
        expected = ref.state_dict()
        assert list(weights) == list(expected)
        for name, t in expected.items():
            torch.testing.assert_close(weights[name], t, rtol=0, atol=0, msg=name)


def worker_nccl_fsdp2(model_dir: str, port: str, out: str) -> None:
    """Run inside test_weight_export_sharded's gloo ranks (its `run_ranks`)."""
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from rl.engines.vllm_server import VLLMServerEngine
    from test_weight_export_sharded import _shard

    monkeypatch = pytest.MonkeyPatch()
    record = fake_nccl(monkeypatch)
    model = _load(model_dir)
    _shard(model, model.model.layers)
    eng = VLLMServerEngine(model, AutoTokenizer.from_pretrained(model_dir), 4, base_url=f"http://127.0.0.1:{port}",
                           timeout=30, max_retries=0, weight_sync="nccl")
    for step in (1, 2):
        _perturb(model, step)  # on the shards: the same deterministic change as on the reference
        eng.update_weights(model)
        dist.barrier()
    assert eng.stats["weight_syncs"] == 2
    rank = dist.get_rank()
    assert len(record["endpoints"]) == (1 if rank == 0 else 0)  # only the sender opens the NCCL group
    assert len(record["sent"]) == (2 if rank == 0 else 0)
    if rank == 0:
        torch.save(record["sent"], out)
    eng.close()
    monkeypatch.undo()
    print("NCCL FSDP2 OK", flush=True)


if __name__ == "__main__":
    sys.exit("run with pytest")

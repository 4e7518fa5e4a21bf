"""Rollout engines the tests plug in through a recipe's `rollout.engine: helpers_engines:<Class>`."""

from __future__ import annotations

from collections import Counter

from rl.engines import BaseEngine, HFEngine

CALLS: Counter = Counter()  # protocol calls of every CountingEngine, by method name
BUILT: list[dict] = []  # the engine_kwargs each CountingEngine was built with


class CountingEngine(BaseEngine):
    """A user's engine: the HF engine underneath, every protocol call counted."""

    def __init__(self, model, tokenizer, batch_size: int = 64, **engine_kwargs):
        self.inner = HFEngine(model, tokenizer, batch_size=batch_size)
        BUILT.append(dict(engine_kwargs))

    def generate(self, prompts, params):
        CALLS["generate"] += 1
        CALLS["prompts"] += len(prompts)
        return self.inner.generate(prompts, params)

    def update_weights(self, model):
        CALLS["update_weights"] += 1
        self.inner.update_weights(model)

    def sleep(self):
        CALLS["sleep"] += 1

    def wake(self):
        CALLS["wake"] += 1

    def close(self):
        CALLS["close"] += 1


class NotAnEngine:
    """Samples, but has none of the rest of the protocol (and is no BaseEngine)."""

    def __init__(self, model, tokenizer, batch_size: int = 64):
        pass

    def generate(self, prompts, params):
        return []

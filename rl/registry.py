"""Name -> callable lookup shared by rewards, prompt builders, agents and datasets.

A name is either a key of the given registry or a `package.module:function` path,
so users plug in their own code without touching the toolkit.
"""

from __future__ import annotations

import importlib
from typing import Callable


def lookup(registry: dict[str, Callable], name: str, what: str) -> Callable:
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ValueError(f"{what} '{name}': cannot import module '{module_name}': {e}") from None
        try:
            fn = getattr(module, attr)
        except AttributeError:
            raise ValueError(f"{what} '{name}': module '{module_name}' has no attribute '{attr}'") from None
        if not callable(fn):
            raise ValueError(f"{what} '{name}' is not callable")
        return fn
    if name not in registry:
        raise ValueError(f"unknown {what} '{name}'; registered: {sorted(registry)} (or use 'package.module:function')")
    return registry[name]


def registering(registry: dict[str, Callable]):
    """Decorator factory: `@register("name")` adds a function to `registry`."""

    def register(name: str):
        def deco(fn):
            if name in registry:
                raise ValueError(f"'{name}' is already registered")
            registry[name] = fn
            return fn

        return deco

    return register

"""One registry type for everything pluggable.

Agents, environments, rewards, prompt builders, datasets, metrics, advantage / KL
estimators, policy / value losses, loss aggregations, rollout corrections and rollout
engines are each a `Registry`. A name given in a recipe is either a registered key or a
`package.module:attr` path, so users plug in their own code without editing the toolkit:

    REWARDS = Registry("reward function")

    @REWARDS.register("exact")            # registering a name twice is an error
    def exact(row, traj): ...

    REWARDS.get("exact")                   # a registered name
    REWARDS.get("my_pkg.rewards:shaped")   # or any importable attribute
    REWARDS.get("exatc")                   # ValueError: unknown ... registered: ['exact', ...]

A registry may check what is registered (`check=`, e.g. a loss's call convention) and
carry declared facts about each entry (`register(name, needs_values=True)` ->
`registry.meta(name)`); an entry loaded by path declares them as attributes of the object
(`fn.needs_values = True`), read with the same names.

The registries shared by layers above `rl/` live here, so that the trainer can look an
agent up without importing the package that registers it:
  AGENTS        agent loops: `agent(engine, tokenizer, rows, *, prompt_builder, params, group_size,
                first_group_id, **agent_kwargs) -> list[Trajectory]` (the generic ones are in `agents/`);
  ENVIRONMENTS  environment classes driven by the generic multi-turn agent (`agents/environment.py`);
  METRICS       metric sets of environments for `python -m eval.run` (`eval/metrics.py`).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> object, with `package.module:attr` paths accepted wherever a name is."""

    def __init__(self, kind: str, check: Callable[[str, Any], None] | None = None):
        self.kind = kind  # what an entry is, for error messages ("reward function")
        self._check = check
        self._entries: dict[str, T] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    def register(self, name: str, obj: T | None = None, **meta: Any):
        """`@registry.register("name", **meta)` as a decorator, or `registry.register("name", obj)`."""

        def add(o: T) -> T:
            if not isinstance(name, str) or not name or ":" in name:
                raise ValueError(f"{self.kind} name {name!r}: a non-empty string without ':' is required")
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is already registered ({self._entries[name]!r})")
            if self._check is not None:
                self._check(name, o)
            self._entries[name] = o
            self._meta[name] = dict(meta)
            return o

        return add if obj is None else add(obj)

    def get(self, name: str) -> T:
        """The entry registered as `name`, or the attribute a `package.module:attr` path names."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind}: expected a registered name or 'package.module:attr', got {name!r}")
        if ":" in name:
            return self._load(name)
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(
                f"unknown {self.kind} '{name}'; registered: {sorted(self._entries)} (or use 'package.module:attr')"
            ) from None

    def _load(self, path: str) -> T:
        module_name, _, attr = path.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ValueError(f"{self.kind} '{path}': cannot import module '{module_name}': {e}") from None
        try:
            obj = getattr(module, attr)
        except AttributeError:
            raise ValueError(f"{self.kind} '{path}': module '{module_name}' has no attribute '{attr}'") from None
        if not callable(obj):
            raise ValueError(f"{self.kind} '{path}' is not callable")
        if self._check is not None:
            self._check(path, obj)
        return obj

    def meta(self, name: str, key: str, default: Any = None) -> Any:
        """A fact declared at registration (`register(name, key=value)`), or the entry's attribute `key`."""
        if name in self._meta and key in self._meta[name]:
            return self._meta[name][key]
        return getattr(self.get(name), key, default)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


AGENTS: Registry[Callable[..., list]] = Registry("agent")
ENVIRONMENTS: Registry[Callable[..., Any]] = Registry("environment")
METRICS: Registry[Callable[..., Any]] = Registry("metric set")

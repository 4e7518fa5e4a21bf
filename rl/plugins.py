"""Plugins: the modules a recipe names (`plugins: [envs.search]`), imported before any lookup.

A paper lives in `envs/<paper>/` and registers its environment, rewards, prompt builders,
datasets and metrics when imported; the core never imports it. `load_plugins` imports the
toolkit's generic agents (`CORE_PLUGINS`, always) and then the recipe's plugins, so every
name a recipe uses is registered before the trainer or `eval.run` looks it up.

A paper whose optional dependency is missing fails only the recipes that name it, with one
line naming the extra to install: the paper calls `require(...)` at the top of its package.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Iterable

# The generic agent loops (single turn, multi turn over any environment). Named, not imported,
# here: `agents/` sits above `rl/` and registers into `rl.registry.AGENTS`.
CORE_PLUGINS = ("agents",)


class PluginError(ImportError):
    """A plugin cannot be imported; the message is one line saying what to do."""


def require(*modules: str, extra: str, plugin: str) -> None:
    """Fail with one line naming `pip install 'agentrl[<extra>]'` when a module is not installed."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise PluginError(
            f"plugin '{plugin}' needs {', '.join(missing)}, which is not installed: "
            f"pip install -e '.[{extra}]' (or pip install {' '.join(missing)})"
        )


def load_plugins(names: Iterable[str] = (), source: str = "recipe") -> None:
    """Import the core plugins and then `names` (module paths); errors name the plugin and `source`."""
    for name in (*CORE_PLUGINS, *names):
        if not isinstance(name, str) or not name or ":" in name:
            raise PluginError(f"{source}: plugins: {name!r} is not a module path (e.g. envs.search)")
        try:
            importlib.import_module(name)
        except PluginError as e:
            raise PluginError(f"{source}: {e}") from None
        except ModuleNotFoundError as e:
            if e.name and (name == e.name or name.startswith(e.name + ".")):
                raise PluginError(f"{source}: plugin '{name}' not found (no module '{e.name}')") from None
            raise PluginError(
                f"{source}: plugin '{name}' cannot be imported: it needs the module '{e.name}', which is not installed"
            ) from None

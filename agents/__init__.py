"""Agent loops: turn dataset rows into trajectories through a rollout engine.

Every agent has the signature
    agent(engine, tokenizer, rows, *, prompt_builder, params, group_size, first_group_id, **agent_kwargs)
        -> list[Trajectory]
and is registered by name; recipes pick one with `rollout.agent` (or "module:function").
"""

from typing import Callable

from rl.registry import registering

AGENTS: dict[str, Callable] = {}
register_agent = registering(AGENTS)

from agents import single_turn  # noqa: E402,F401  (registers "single_turn")
from agents import multi_turn  # noqa: E402,F401  (the generic multi-turn loop)
from agents import search  # noqa: E402,F401  (registers "search" and the search_* rewards)

"""The generic agent loops: turn dataset rows into trajectories through a rollout engine.

Every agent has the signature
    agent(engine, tokenizer, rows, *, prompt_builder, params, group_size, first_group_id, **agent_kwargs)
        -> list[Trajectory]
and is registered in `rl.registry.AGENTS`; recipes pick one with `rollout.agent` (or "module:function").
This package is the toolkit's core plugin (`rl.plugins.CORE_PLUGINS`): `single_turn` and the generic
`multi_turn` loop that drives any registered environment. Papers live in `envs/<paper>/`.
"""

from rl.registry import AGENTS

register_agent = AGENTS.register

from agents import single_turn  # noqa: E402,F401  (registers "single_turn")
from agents import multi_turn  # noqa: E402,F401  (the generic multi-turn loop)

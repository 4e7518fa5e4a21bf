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

# Structured-reasoning-trace rewards (MathSpatial-style traces) live with their format in
# sft.srt, which stays free of torch; registered here with the other agents' rewards.
from rl.rewards import register_reward  # noqa: E402
from sft.srt import srt_answer_reward, srt_format_reward  # noqa: E402

register_reward("srt_format")(srt_format_reward)
register_reward("srt_answer")(srt_answer_reward)

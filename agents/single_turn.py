"""Single-turn agent: one chat prompt, G sampled completions, every token trained."""

from __future__ import annotations

from agents import register_agent
from rl.engines import RolloutEngine, SamplingParams
from rl.trajectory import Trajectory


def render_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of the chat template with the generation prompt appended."""
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


@register_agent("single_turn")
def single_turn(
    engine: RolloutEngine,
    tokenizer,
    rows: list[dict],
    *,
    prompt_builder,
    params: SamplingParams,
    group_size: int,
    first_group_id: int = 0,
) -> list[Trajectory]:
    prompts = [render_prompt(tokenizer, prompt_builder(row)) for row in rows]
    # all G samples of all prompts go to the engine in one call so they batch together
    flat = [p for p in prompts for _ in range(group_size)]
    gens = engine.generate(flat, params)
    trajs = []
    for k, gen in enumerate(gens):
        i = k // group_size
        trajs.append(
            Trajectory(
                prompt_ids=prompts[i],
                response_ids=gen.token_ids,
                loss_mask=[1] * len(gen.token_ids),
                rollout_logprobs=gen.logprobs,
                group_id=first_group_id + i,
                row=rows[i],
                response_text=tokenizer.decode(gen.token_ids, skip_special_tokens=True),
                info={"finish_reason": gen.finish_reason, "turns": 1},
            )
        )
    return trajs

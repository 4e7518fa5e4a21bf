"""Single-turn agent: one chat prompt, G sampled completions, every token trained."""

from __future__ import annotations

from agents import register_agent
from rl.engines import RolloutEngine, SamplingParams
from rl.trajectory import Trajectory


def render_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of the chat template with the generation prompt appended."""
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def assemble_trajectories(tokenizer, rows: list[dict], group_size: int, first_group_id: int,
                          samples: list[tuple[list[int], list[int], list[int], list[float], dict]]) -> list[Trajectory]:
    """One `Trajectory` per sample k = (prompt ids, response ids, loss mask, log-probs, info): the G
    samples of row i are k = i*G .. i*G+G-1, with that row and group id `first_group_id + i`.
    Shared by every agent loop, so group ids and rows are laid out one way."""
    trajs = []
    for k, (prompt_ids, response_ids, loss_mask, logprobs, info) in enumerate(samples):
        i = k // group_size
        trajs.append(Trajectory(
            prompt_ids=prompt_ids, response_ids=response_ids, loss_mask=loss_mask, rollout_logprobs=logprobs,
            group_id=first_group_id + i, row=rows[i],
            response_text=tokenizer.decode(response_ids, skip_special_tokens=True), info=info,
        ))
    return trajs


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
    trajs = assemble_trajectories(tokenizer, rows, group_size, first_group_id, [
        (prompts[k // group_size], gen.token_ids, [1] * len(gen.token_ids), gen.logprobs,
         {"finish_reason": gen.finish_reason, "turns": 1})
        for k, gen in enumerate(gens)
    ])
    for t in trajs:  # sampled under it: the trainer renormalises over the same allowed ids (rl.packing)
        t.constraint = params.constraint
    return trajs

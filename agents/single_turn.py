"""Single-turn agent: one chat prompt, G sampled completions, every token trained."""

from __future__ import annotations

from agents import register_agent
from rl.engines import RolloutEngine, SamplingParams
from rl.multimodal import render_chat
from rl.trajectory import Trajectory


def render_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of the chat template with the generation prompt appended (text-only messages; see
    `rl.multimodal.render_chat` for messages with image parts)."""
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def generate(engine: RolloutEngine, prompts: list[list[int]], params: SamplingParams,
             images: list[list] | None = None) -> list:
    """`engine.generate`, with `images` only when some prompt has images: engines written for text
    policies (the protocol's two-argument form) keep working."""
    if images is not None and any(images):
        return engine.generate(prompts, params, images=images)
    return engine.generate(prompts, params)


def assemble_trajectories(tokenizer, rows: list[dict], group_size: int, first_group_id: int,
                          samples: list[tuple[list[int], list[int], list[int], list[float], dict]],
                          images: list[tuple[list, int]] | None = None) -> list[Trajectory]:
    """One `Trajectory` per sample k = (prompt ids, response ids, loss mask, log-probs, info): the G
    samples of row i are k = i*G .. i*G+G-1, with that row and group id `first_group_id + i`.
    `images[k]`: sample k's (images, how many of them are the prompt's), for vision-language policies.
    Shared by every agent loop, so group ids and rows are laid out one way."""
    trajs = []
    for k, (prompt_ids, response_ids, loss_mask, logprobs, info) in enumerate(samples):
        i = k // group_size
        sample_images, prompt_images = images[k] if images is not None else (None, 0)
        trajs.append(Trajectory(
            prompt_ids=prompt_ids, response_ids=response_ids, loss_mask=loss_mask, rollout_logprobs=logprobs,
            group_id=first_group_id + i, row=rows[i],
            response_text=tokenizer.decode(response_ids, skip_special_tokens=True), info=info,
            images=list(sample_images) if sample_images else None, prompt_images=prompt_images if sample_images else 0,
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
    # chat prompts, with their images for vision-language policies (ids as the processor renders them)
    rendered = [render_chat(tokenizer, prompt_builder(row), where=f"prompt of row {i}") for i, row in enumerate(rows)]
    prompts = [ids for ids, _ in rendered]
    # all G samples of all prompts go to the engine in one call so they batch together
    flat = [p for p in prompts for _ in range(group_size)]
    flat_images = [ims for _, ims in rendered for _ in range(group_size)]
    gens = generate(engine, flat, params, flat_images)
    trajs = assemble_trajectories(tokenizer, rows, group_size, first_group_id, [
        (prompts[k // group_size], gen.token_ids, [1] * len(gen.token_ids), gen.logprobs,
         {"finish_reason": gen.finish_reason, "turns": 1})
        for k, gen in enumerate(gens)
    ], images=[(ims, len(ims)) for ims in flat_images])
    for t in trajs:  # sampled under it: the trainer renormalises over the same allowed ids (rl.packing)
        t.constraint = params.constraint
    return trajs

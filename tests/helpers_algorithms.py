"""Algorithm pieces the tests plug in from outside `rl/`, by 'helpers_algorithms:<name>' in a recipe."""

import torch

from rl import algorithms

CALLS = {"nan_first": 0}


def nan_on_first_step(logprobs, old_logprobs, advantages, response_mask, *, clip_ratio=0.2):
    """The clipped loss, NaN on its first call: the trainer must skip that optimizer step."""
    CALLS["nan_first"] += 1
    loss, info = algorithms.clipped_policy_loss(logprobs, old_logprobs, advantages, response_mask,
                                                clip_ratio=clip_ratio)
    return (loss * float("nan") if CALLS["nan_first"] == 1 else loss), info


@torch.no_grad()
def sign_of_score(token_rewards, response_mask, group_ids, values=None, *, margin: float = 0.0):
    """A user's advantage estimator: +1 / -1 on every policy token of a sample whose score is above /
    below its group's mean by more than `margin` (an option only a user's recipe can set)."""
    mask = response_mask.bool()
    scores = (token_rewards * mask).sum(-1)
    _, inv = torch.unique(group_ids, return_inverse=True)
    means = torch.zeros(int(inv.max()) + 1, dtype=scores.dtype).index_add(0, inv, scores)
    means = means / torch.bincount(inv).to(scores.dtype)
    diff = scores - means[inv]
    sign = torch.where(diff > margin, 1.0, torch.where(diff < -margin, -1.0, 0.0)).to(token_rewards.dtype)
    adv = torch.where(mask, sign[:, None].expand_as(token_rewards), torch.zeros_like(token_rewards))
    return adv, adv.clone()

"""The one contract between rollouts and the trainer: token-in-token-out trajectories.

A rollout returns, per sample, the prompt ids and everything after them
(`response_ids`, across all turns) with a `loss_mask` that is 1 exactly where the
policy generated the token and 0 where the environment inserted it. Training tokens
are the tokens the engine produced: nothing here is re-tokenised from text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Trajectory:
    prompt_ids: list[int]
    response_ids: list[int]
    loss_mask: list[int]  # 1 = policy token (trained), 0 = environment token (context only)
    rollout_logprobs: list[float]  # engine log-probs; 0.0 at environment tokens
    group_id: int  # samples of the same prompt share it
    row: dict[str, Any]  # the dataset row, for rewards
    response_text: str = ""
    reward: float = 0.0
    reward_parts: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # turns, searches, finish reason, ...
    # vision-language samples: every image of the sequence, in the order of their image tokens (the
    # prompt's first `prompt_images` of them, then the environment's observations' in the response)
    images: list[Any] | None = None
    prompt_images: int = 0
    # the rl.constraints.TokenTrie the rollout was sampled under (single-turn agent), so the trainer's
    # log-probs are of the same renormalised distribution (rl.packing builds the per-token masks)
    constraint: Any = None

    def __post_init__(self):
        n = len(self.response_ids)
        if len(self.loss_mask) != n or len(self.rollout_logprobs) != n:
            raise ValueError(
                f"trajectory lengths disagree: response_ids={n}, loss_mask={len(self.loss_mask)}, "
                f"rollout_logprobs={len(self.rollout_logprobs)}"
            )
        if self.prompt_images > len(self.images or ()):
            raise ValueError(f"trajectory: prompt_images={self.prompt_images} but {len(self.images or ())} image(s)")


@dataclass
class ResponseTensors:
    """Right-padded `[B, T]` views of a list of trajectories (T = longest response)."""

    response_ids: torch.Tensor  # long
    response_mask: torch.Tensor  # float: loss mask, 0 on padding
    rollout_logprobs: torch.Tensor
    group_ids: torch.Tensor  # [B] long


def to_response_tensors(trajs: list[Trajectory]) -> ResponseTensors:
    T = max([len(t.response_ids) for t in trajs] + [1])
    B = len(trajs)
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T)
    logp = torch.zeros(B, T)
    for i, t in enumerate(trajs):
        n = len(t.response_ids)
        ids[i, :n] = torch.tensor(t.response_ids, dtype=torch.long)
        mask[i, :n] = torch.tensor(t.loss_mask, dtype=torch.float32)
        logp[i, :n] = torch.tensor(t.rollout_logprobs, dtype=torch.float32)
    return ResponseTensors(
        response_ids=ids,
        response_mask=mask,
        rollout_logprobs=logp,
        group_ids=torch.tensor([t.group_id for t in trajs], dtype=torch.long),
    )


def outcome_token_rewards(trajs: list[Trajectory], T: int) -> torch.Tensor:
    """Scalar outcome reward placed on each sample's last policy-generated token."""
    rewards = torch.zeros(len(trajs), T)
    for i, t in enumerate(trajs):
        policy_positions = [j for j, m in enumerate(t.loss_mask) if m]
        if policy_positions:
            rewards[i, policy_positions[-1]] = t.reward
    return rewards

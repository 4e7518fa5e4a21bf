"""Forward passes over micro-batches: per-token log-probs (and entropies) of the response tokens,
critic values, and no-grad passes over a whole rollout batch."""

from __future__ import annotations

import torch

from rl import algorithms
from rl.packing import MicroBatch, scatter_rows

__all__ = ["forward_logprobs", "forward_values", "batch_forward"]


def forward_logprobs(model, mb: MicroBatch, temperature: float, with_entropy: bool):
    """Per-token log-probs (and entropies) of the targets, flat over the micro-batch."""
    device = next(model.parameters()).device
    out = model(
        input_ids=mb.input_ids.to(device),
        position_ids=mb.position_ids.to(device),
        attention_mask=mb.attention_mask.to(device),
        use_cache=False,
        logits_to_keep=mb.cols.to(device),  # logits only where a response token is predicted
    )
    logits = out.logits.flatten(0, 1)[mb.keep.to(device)]
    logits = logits.float() / (temperature if temperature > 0 else 1.0)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, mb.targets.to(device).unsqueeze(-1)).squeeze(-1)
    entropy = algorithms.entropy_from_logits(logits) if with_entropy else None
    return logp, entropy


def forward_values(critic, mb: MicroBatch) -> torch.Tensor:
    device = next(critic.parameters()).device
    values = critic(
        mb.input_ids.to(device), mb.position_ids.to(device), attention_mask=mb.attention_mask.to(device),
        keep=mb.cols.to(device),
    )
    return values.flatten()[mb.keep.to(device)]


@torch.no_grad()
def batch_forward(model, micro_batches: list[MicroBatch], B: int, T: int, temperature=1.0, values=False) -> torch.Tensor:
    """[B, T] log-probs (or critic values) for a whole rollout batch, no gradients."""
    out = torch.zeros(B, T)
    for mb in micro_batches:
        flat = forward_values(model, mb) if values else forward_logprobs(model, mb, temperature, False)[0]
        out += scatter_rows(flat.float().cpu(), mb, B, T)
    return out


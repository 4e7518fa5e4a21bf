"""Forward passes over micro-batches: per-token log-probs (and entropies) of the response tokens,
critic values, and no-grad passes over a whole rollout batch.

Memory: the vocabulary projection is the biggest tensor of a training step. One fp32 logits
tensor for 4096 tokens of SmolLM2 (vocab 49152) is 800 MB, and log_softmax, the entropy's
softmax / products and their gradients make several more of it (measured: 12.2 GB peak RSS for
one update of recipes/search_r1pp_cpu.yaml, docs/performance.md "Memory"). So the model is run
up to its final hidden states only, and the output head is applied in chunks of
`LOGPROB_CHUNK_TOKENS` tokens; under autograd each chunk is checkpointed, so the backward
recomputes a chunk's logits instead of keeping them: at most one chunk's `[chunk, vocab]`
tensors exist at any time. The numbers are the same as the full-vocabulary computation (the
same per-row ops; tests/test_memory.py).
"""

from __future__ import annotations

import ctypes
import sys
import weakref

import torch
from torch.utils.checkpoint import checkpoint

from rl import algorithms
from rl.constraints import mask_logits
from rl.packing import MicroBatch, scatter_rows

__all__ = ["LOGPROB_CHUNK_TOKENS", "forward_logprobs", "forward_values", "batch_forward", "chunked_logprobs",
           "limit_heap_fragmentation", "release_memory"]

# Tokens per chunk of the output head. 1024 x 49152 fp32 = 200 MB per logits copy; smaller
# chunks save little more and make more, smaller matmuls. 0 = the unchunked full-vocab path.
LOGPROB_CHUNK_TOKENS = 1024

# head module -> whether the model's logits are exactly head(final hidden state) (see `_chunkable_head`)
_HEAD_IS_LOGITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _chunk_stats(head, h: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool,
                 allowed: torch.Tensor | None = None):
    # constrained rollouts: renormalised over the allowed ids, as the engine sampled (rl/constraints.py)
    logits = mask_logits(head(h).float() / temperature, allowed)
    # log_softmax then gather (not z[t] - logsumexp(z)): the same ops as the unchunked path, same bits
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if with_entropy:
        return logp, algorithms.entropy_from_logits(logits)
    return logp, None


def chunked_logprobs(head, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                     with_entropy: bool = False, chunk_tokens: int = LOGPROB_CHUNK_TOKENS,
                     allowed: torch.Tensor | None = None):
    """Log-probs of `targets` ([N]) and entropies under `softmax(head(hidden) / temperature)`, `hidden`
    [N, H], `chunk_tokens` rows at a time; with gradients, each chunk is recomputed in the backward
    (`torch.utils.checkpoint`) instead of keeping its `[chunk, vocab]` tensors. `allowed` ([N, K], -1
    padded): each target's distribution renormalised over its allowed ids (`rl.constraints.mask_logits`)."""
    temperature = temperature if temperature > 0 else 1.0
    chunk = chunk_tokens if chunk_tokens > 0 else max(1, hidden.shape[0])
    grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    logps, ents = [], []
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start : start + chunk], targets[start : start + chunk]
        a = allowed[start : start + chunk] if allowed is not None else None
        if grad:
            logp, ent = checkpoint(_chunk_stats, head, h, t, temperature, with_entropy, a, use_reentrant=False)
        else:
            logp, ent = _chunk_stats(head, h, t, temperature, with_entropy, a)
        logps.append(logp)
        ents.append(ent)
    if not logps:  # no targets
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, (empty if with_entropy else None)
    return torch.cat(logps), (torch.cat(ents) if with_entropy else None)


def _is_sharded(model) -> bool:
    """FSDP / DeepSpeed ZeRO-3 parameters are only whole inside their module's forward, so the head
    cannot be re-applied after the model's forward: such models take the unchunked path."""
    for m in model.modules():
        if "FullyShardedDataParallel" in type(m).__name__ or type(m).__name__.startswith("FSDP"):
            return True
    p = next(model.parameters(), None)
    return p is not None and (hasattr(p, "ds_id") or type(p).__name__ == "DTensor")


def _run_to_head(model, head, **inputs) -> torch.Tensor:
    """Run the model (through its wrapper, so DDP's hooks run) and return the hidden states its
    output head receives; the head itself is handed a zero-width input, so it computes nothing."""
    captured = []

    def pre_hook(module, args):
        captured.append(args[0])
        return (args[0][..., :0, :],) + tuple(args[1:])

    handle = head.register_forward_pre_hook(pre_hook)
    try:
        model(**inputs)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"rl.forward: the output head ran {len(captured)} times in one forward (expected 1)")
    return captured[0]


def _chunkable_head(model, mb: MicroBatch, device):
    """The model's output head when its logits are exactly `head(final hidden state)`, else None.

    Checked once per head on a few tokens of the first micro-batch (a hook records the head's
    output; it must equal the model's logits): models that post-process logits (soft-capping,
    scaling), have no output embeddings or are sharded fall back to the full-vocab path instead
    of being wrong. A DDP / DeepSpeed wrapper is looked through for the head, but the forward
    still goes through the wrapper (its gradient hooks need it)."""
    inner = model
    while isinstance(getattr(inner, "module", None), torch.nn.Module):  # DDP, DeepSpeedEngine
        inner = inner.module
    get = getattr(inner, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, torch.nn.Module):
        return None
    if head not in _HEAD_IS_LOGITS:
        same = False
        if not _is_sharded(model):
            seen = []
            handle = head.register_forward_hook(lambda module, args, output: seen.append(output))
            n = min(8, mb.input_ids.shape[1])
            probe = mb.input_ids[:1, :n].clone()
            if mb.image_token_id is not None:  # a text-only probe: no pixel inputs go with it
                probe[probe == mb.image_token_id] = 0
            try:
                with torch.no_grad():
                    out = model(input_ids=probe.to(device), position_ids=torch.arange(n, device=device)[None],
                                use_cache=False, logits_to_keep=1)
            finally:
                handle.remove()
            logits = getattr(out, "logits", None)
            same = (len(seen) == 1 and torch.is_tensor(logits) and logits.shape == seen[0].shape
                    and torch.equal(logits.float(), seen[0].float()))
        _HEAD_IS_LOGITS[head] = same
    return head if _HEAD_IS_LOGITS[head] else None


class _BannedHead(torch.nn.Module):
    """The output head with the ids the engine never samples set to -inf (`MicroBatch.banned_ids`)."""

    def __init__(self, head: torch.nn.Module, banned: torch.Tensor):
        super().__init__()
        self.head, self.banned = head, banned

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(h).index_fill(-1, self.banned, float("-inf"))


def forward_logprobs(model, mb: MicroBatch, temperature: float, with_entropy: bool, chunk_tokens: int | None = None):
    """Per-token log-probs (and entropies) of the targets, flat over the micro-batch.

    `chunk_tokens` (default `LOGPROB_CHUNK_TOKENS`; 0 = off): the output head in chunks (module docstring)."""
    device = next(model.parameters()).device
    chunk = LOGPROB_CHUNK_TOKENS if chunk_tokens is None else chunk_tokens
    inputs = dict(
        input_ids=mb.input_ids.to(device),
        position_ids=mb.position_ids.to(device) if mb.position_ids is not None else None,
        attention_mask=mb.attention_mask.to(device),
        use_cache=False,
        logits_to_keep=mb.cols.to(device),  # logits only where a response token is predicted
        **{k: v.to(device) for k, v in mb.vision_inputs.items()},  # pixel inputs of VLM samples
    )
    keep, targets = mb.keep.to(device), mb.targets.to(device)
    allowed = mb.allowed.to(device) if mb.allowed is not None else None  # constrained rollouts
    head = _chunkable_head(model, mb, device) if chunk > 0 else None
    banned = mb.banned_ids.to(device) if mb.banned_ids is not None and len(mb.banned_ids) else None
    if head is not None:
        hidden = _run_to_head(model, head, **inputs).flatten(0, 1)[keep]  # [N, H], the head's input
        if banned is not None:
            head = _BannedHead(head, banned)
        return chunked_logprobs(head, hidden, targets, temperature, with_entropy, chunk, allowed)
    logits = model(**inputs).logits.flatten(0, 1)[keep]
    if banned is not None:  # ids the engine suppressed (a VLM's image placeholders): not in its distribution
        logits = logits.index_fill(-1, banned, float("-inf"))
    logits = mask_logits(logits.float() / (temperature if temperature > 0 else 1.0), allowed)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = algorithms.entropy_from_logits(logits) if with_entropy else None
    return logp, entropy


def forward_values(critic, mb: MicroBatch) -> torch.Tensor:
    device = next(critic.parameters()).device
    values = critic(
        mb.input_ids.to(device), mb.position_ids.to(device) if mb.position_ids is not None else None,
        attention_mask=mb.attention_mask.to(device), keep=mb.cols.to(device),
        **{k: v.to(device) for k, v in mb.vision_inputs.items()},
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


# ----------------------------------------------------------------------------------------------
# Host memory. glibc malloc serves a large block by mmap and returns it to the OS on free, but
# each such free raises its mmap threshold (up to 32 MB), after which the tens-of-MB activation
# tensors of a training step come from the heap and stay resident, fragmented, after they are
# freed. Measured on SmolLM2-135M, one 4096-token micro-batch forward/backward (gradient
# checkpointing on): peak RSS 5.7 GB with the dynamic threshold, 3.3 GB with a fixed one; RSS
# after the step 4.3 GB vs 1.5 GB (docs/performance.md "Memory").

_LIBC = None
HEAP_MMAP_THRESHOLD = 4 << 20  # blocks above 4 MiB are always mmapped: activations, logits, KV caches


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else False
            _LIBC.mallopt, _LIBC.malloc_trim  # glibc only (musl has neither)
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


def limit_heap_fragmentation() -> bool:
    """Fix glibc's mmap threshold (see above), so big freed tensors go back to the OS. Idempotent;
    a no-op (False) off glibc."""
    libc = _libc()
    return bool(libc) and libc.mallopt(-3, HEAP_MMAP_THRESHOLD) == 1  # -3 = M_MMAP_THRESHOLD


def release_memory() -> None:
    """Between phases: give freed heap pages back to the OS (glibc `malloc_trim`, milliseconds) and
    cached GPU blocks back to the driver, so the next phase's peak does not stack on this one's."""
    libc = _libc()
    if libc:
        libc.malloc_trim(0)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()

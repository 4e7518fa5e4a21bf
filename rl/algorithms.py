"""RL algorithm maths: advantage estimators, KL estimators, policy/value losses, loss aggregation.

Every piece is a small pure tensor function in a string-keyed registry (the layout of verl's
``core_algos.py``), so a recipe picks it by name and a test can check it in isolation.

Conventions
-----------
* ``[B, T]`` tensors run over the *response* tokens: everything after the prompt, across all turns
  of a multi-turn episode.
* ``response_mask`` ``[B, T]`` (bool or 0/1 float) is 1 where the policy generated the token and 0 for
  environment-inserted tokens (observations inside a response) and right padding. It is read as
  binary: any non-zero entry counts as a policy token.
* ``group_ids`` ``[B]`` long: samples of the same prompt share an id.
* Outputs are exactly 0 at masked positions. Masked positions of the inputs are never read
  arithmetically (``torch.where``, not multiplication), so garbage there (``-inf`` log-probs of
  padding, NaN values) cannot leak into outputs or gradients.
* Nothing mutates its inputs.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from rl.registry import Registry

__all__ = [
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "ADVANTAGE_ESTIMATORS",
    "register_advantage_estimator",
    "get_advantage_estimator",
    "compute_advantages",
    "reinforce",
    "rloo",
    "grpo",
    "gae",
    "KL_ESTIMATORS",
    "register_kl_estimator",
    "get_kl_estimator",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_abs",
    "kl_k3_plus",
    "POLICY_LOSS_INFO",
    "check_policy_loss_info",
    "needs_values",
    "estimator_for",
    "ALGORITHM_ESTIMATORS",
    "options_of",
    "call_with_options",
    "POLICY_LOSSES",
    "register_policy_loss",
    "get_policy_loss",
    "clipped_policy_loss",
    "vanilla_policy_loss",
    "VALUE_LOSSES",
    "register_value_loss",
    "get_value_loss",
    "value_loss",
    "entropy_from_logits",
    "ROLLOUT_CORRECTIONS",
    "register_rollout_correction",
    "get_rollout_correction",
    "token_truncated_is",
    "sequence_truncated_is",
    "rollout_mismatch",
    "informative_groups",
    "select_groups",
    "LOSS_AGGREGATIONS",
    "register_loss_aggregation",
    "get_loss_aggregation",
    "aggregate_loss",
]

# exp() of a log-ratio beyond this overflows float16/bfloat16 long before it means anything.
_LOG_RATIO_CLAMP = 20.0


# --------------------------------------------------------------------------------------------
# Registries
# --------------------------------------------------------------------------------------------


def _convention(kind: str, n_positional: int):
    """A `Registry` check enforcing the uniform call convention of one kind of function.

    The first ``n_positional`` parameters are the shared tensors; everything after them must be
    keyword-only with no ``*args``/``**kwargs``, because the trainer passes exactly the options a
    function declares (``inspect.signature``; validated at recipe load by `check_options`) and a
    catch-all would swallow typos.
    """

    def check(name: str, fn: Callable) -> None:
        params = list(inspect.signature(fn).parameters.values())
        head, options = params[:n_positional], params[n_positional:]
        if len(head) < n_positional or any(p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in head):
            raise TypeError(f"{kind} '{name}': the first {n_positional} parameters must be positional")
        bad = [p.name for p in options if p.kind is not p.KEYWORD_ONLY]
        if bad:
            raise TypeError(f"{kind} '{name}': options {bad} must be keyword-only (no *args/**kwargs)")

    return check


def options_of(fn: Callable) -> dict[str, inspect.Parameter]:
    """The keyword-only options a registered function declares."""
    return {k: p for k, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY}


def call_with_options(fn: Callable, options: Mapping[str, Any], *args: Any, **kwargs: Any):
    """``fn(*args, **kwargs, **opts)`` where opts are the entries of ``options`` that ``fn`` declares."""
    declared = options_of(fn)
    return fn(*args, **kwargs, **{k: v for k, v in options.items() if k in declared})


# --------------------------------------------------------------------------------------------
# Masked helpers
# --------------------------------------------------------------------------------------------


def _bool(mask: Tensor) -> Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """``sum(x[mask])`` (over ``dim``, or everything when ``dim`` is None)."""
    kept = torch.where(_bool(mask), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """``sum(x * mask) / max(sum(mask), 1)``: an empty mask gives 0, not NaN."""
    m = _bool(mask)
    count = m.sum() if dim is None else m.sum(dim)
    return masked_sum(x, m, dim) / count.clamp_min(1).to(x.dtype)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the masked-in elements (scalar).

    ``sum((x - mean)^2 * mask) / (n - 1)`` when ``unbiased`` else ``/ n``. Fewer than 2 elements
    (unbiased) or none (biased) give 0 instead of raising, so whitening a degenerate batch just
    centres it.
    """
    m = _bool(mask)
    n = m.sum()
    mean = masked_mean(x, m)
    sq = masked_sum((x - mean) ** 2, m)
    denom = (n - 1) if unbiased else n
    return torch.where(denom > 0, sq / denom.clamp_min(1).to(x.dtype), torch.zeros_like(sq))


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` over all masked-in elements (unbiased var); 0 where masked.

    ``shift_mean=False`` adds the mean back (only the scale is normalised).
    """
    m = _bool(mask)
    mean = masked_mean(x, m)
    out = (x - mean) * torch.rsqrt(masked_var(x, m) + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, torch.zeros((), dtype=out.dtype, device=out.device))


# --------------------------------------------------------------------------------------------
# Advantage estimators
# --------------------------------------------------------------------------------------------

ADVANTAGE_ESTIMATORS: Registry[Callable[..., tuple[Tensor, Tensor]]] = Registry(
    "advantage estimator", check=_convention("advantage estimator", 4)
)


def register_advantage_estimator(name: str, *, needs_values: bool = False):
    """Register ``fn(token_rewards, response_mask, group_ids, values=None, *, <options>)``.

    ``needs_values``: the estimator reads critic values, so the trainer builds a critic (an
    estimator loaded by ``module:function`` declares it as the attribute ``fn.needs_values``).
    Advantages and returns are regression/PG *targets*: the function is run under ``no_grad`` so a
    ``values`` tensor that still requires grad cannot leak critic gradients into the policy loss.
    """

    def deco(fn):
        wrapped = torch.no_grad()(fn)  # functools.wraps keeps the signature visible to inspect
        ADVANTAGE_ESTIMATORS.register(name, wrapped, needs_values=needs_values)
        return wrapped

    return deco


get_advantage_estimator = ADVANTAGE_ESTIMATORS.get


# The named algorithms whose advantage estimator has another name; any other algorithm name is
# itself an estimator (registered or "module:function").
ALGORITHM_ESTIMATORS = {"ppo": "gae"}
ALGORITHMS = ("reinforce", "rloo", "grpo", "ppo")  # the named algorithms (documentation and errors)


def estimator_for(algorithm: str) -> str:
    """The advantage estimator of `algorithm.name`: reinforce | rloo | grpo | ppo (gae) | any estimator."""
    return ALGORITHM_ESTIMATORS.get(algorithm, algorithm)


def needs_values(estimator: str) -> bool:
    """Whether advantage estimator ``estimator`` (a name or ``module:function``) needs a critic."""
    return bool(ADVANTAGE_ESTIMATORS.meta(estimator, "needs_values", False))


def compute_advantages(
    name: str,
    token_rewards: Tensor,
    response_mask: Tensor,
    group_ids: Tensor,
    values: Tensor | None = None,
    **options,
) -> tuple[Tensor, Tensor]:
    """Look up estimator ``name`` and call it; an option it does not declare is a TypeError."""
    return get_advantage_estimator(name)(token_rewards, response_mask, group_ids, values, **options)


def _scores(token_rewards: Tensor, mask: Tensor) -> Tensor:
    """Sequence score ``sum_t r_t * mask_t`` ``[B]``."""
    return masked_sum(token_rewards, mask, dim=-1)


def _group_stats(scores: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-sample ``(group_mean, group_std_unbiased, group_sum, group_size)``, each ``[B]``.

    A single-sample group has no baseline information, so (as in verl) its mean is 0 and its
    std 1: the sample's advantage is then its raw score.
    """
    _, inv, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    g = counts.numel()
    inv = inv.to(scores.device)
    n = counts.to(device=scores.device, dtype=scores.dtype)
    sums = scores.new_zeros(g).index_add(0, inv, scores)
    mean = sums / n
    sq = scores.new_zeros(g).index_add(0, inv, (scores - mean[inv]) ** 2)
    std = (sq / (n - 1).clamp_min(1)).sqrt()
    single = n == 1
    mean = torch.where(single, torch.zeros_like(mean), mean)
    std = torch.where(single, torch.ones_like(std), std)
    return mean[inv], std[inv], sums[inv], n[inv]


def _broadcast(per_seq: Tensor, mask: Tensor) -> Tensor:
    out = per_seq.unsqueeze(-1).expand(mask.shape)
    return torch.where(mask, out, torch.zeros((), dtype=out.dtype, device=out.device))


def _reward_to_go(token_rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """``G_t = r_t + gamma * G_{next policy token}`` over policy tokens only; 0 where masked.

    Masked tokens are transparent: they carry the running return unchanged, so the token before an
    observation block sees the return of the policy tokens after it, one gamma step away.
    """
    zero = torch.zeros((), dtype=token_rewards.dtype, device=token_rewards.device)
    running = token_rewards.new_zeros(token_rewards.shape[0])
    out = torch.zeros_like(token_rewards)
    for t in reversed(range(token_rewards.shape[-1])):
        m = mask[:, t]
        running = torch.where(m, torch.where(m, token_rewards[:, t], zero) + gamma * running, running)
        out[:, t] = torch.where(m, running, zero)
    return out


_REINFORCE_BASELINES = ("none", "batch", "group")


@register_advantage_estimator("reinforce")
def reinforce(
    token_rewards: Tensor,
    response_mask: Tensor,
    group_ids: Tensor,
    values: Tensor | None = None,
    *,
    baseline: str = "none",
    whiten: bool = False,
    gamma: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """REINFORCE with an optional constant baseline.

    ``returns_t = sum_{k >= t, k policy} gamma^{#policy tokens in [t, k)} r_k`` (masked tokens skipped)
    ``advantages_t = (returns_t - b) * mask_t`` with ``b`` =
      ``none``: 0; ``batch``: mean over the batch of the scores ``S_i = sum_t r_t mask_t``;
      ``group``: mean of ``S`` within the sample's group (single-sample group: 0).
    ``whiten``: advantages are then whitened over all policy tokens of the batch.
    """
    if baseline not in _REINFORCE_BASELINES:
        raise ValueError(f"reinforce: baseline '{baseline}' is not one of {list(_REINFORCE_BASELINES)}")
    mask = _bool(response_mask)
    returns = _reward_to_go(token_rewards, mask, gamma)
    if baseline == "none":
        b = torch.zeros_like(returns[:, 0])
    elif baseline == "batch":
        b = _scores(token_rewards, mask).mean().expand(returns.shape[0])
    else:
        b = _group_stats(_scores(token_rewards, mask), group_ids)[0]
    advantages = torch.where(mask, returns - b.unsqueeze(-1), torch.zeros_like(returns))
    if whiten:
        advantages = masked_whiten(advantages, mask)
    return advantages, returns


@register_advantage_estimator("rloo")
def rloo(
    token_rewards: Tensor,
    response_mask: Tensor,
    group_ids: Tensor,
    values: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """REINFORCE leave-one-out (Ahmadian et al. 2024).

    ``A_i = S_i - (sum_{j in g(i), j != i} S_j) / (|g(i)| - 1)``, broadcast over policy tokens;
    a single-sample group has baseline 0. Returns = advantages.
    """
    mask = _bool(response_mask)
    scores = _scores(token_rewards, mask)
    _, _, sums, n = _group_stats(scores, group_ids)
    # the leave-one-out mean keeps the baseline independent of the sample, so the PG stays unbiased
    loo = torch.where(n > 1, (sums - scores) / (n - 1).clamp_min(1), torch.zeros_like(scores))
    adv = _broadcast(scores - loo, mask)
    return adv, adv.clone()


@register_advantage_estimator("grpo")
def grpo(
    token_rewards: Tensor,
    response_mask: Tensor,
    group_ids: Tensor,
    values: Tensor | None = None,
    *,
    normalize_by_std: bool = True,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """GRPO group-relative advantage (Shao et al. 2024).

    ``A_i = (S_i - mean_g S) / (std_g S + eps)`` with the unbiased (n-1) std of the group;
    ``normalize_by_std=False`` is Dr.GRPO (Liu et al. 2025): ``A_i = S_i - mean_g S``.
    Single-sample group: mean 0, std 1. Broadcast over policy tokens; returns = advantages.
    """
    mask = _bool(response_mask)
    scores = _scores(token_rewards, mask)
    mean, std, _, _ = _group_stats(scores, group_ids)
    adv = scores - mean
    if normalize_by_std:
        adv = adv / (std + eps)
    adv = _broadcast(adv, mask)
    return adv, adv.clone()


@register_advantage_estimator("gae", needs_values=True)
def gae(
    token_rewards: Tensor,
    response_mask: Tensor,
    group_ids: Tensor,
    values: Tensor | None = None,
    *,
    gamma: float = 1.0,
    lam: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over policy tokens only.

    For policy tokens ``t`` with ``n(t)`` the next policy token (``V_{n(t)} = 0`` past the last one):
    ``delta_t = r_t + gamma * V_{n(t)} - V_t``; ``A_t = delta_t + gamma * lam * A_{n(t)}``;
    ``returns_t = A_t + V_t``. Masked tokens are skipped entirely, so a response with an observation
    block gets exactly the advantages of the same response with the block cut out.
    """
    if values is None:
        raise ValueError("gae needs values from a critic (values=None)")
    mask = _bool(response_mask)
    zero = torch.zeros((), dtype=token_rewards.dtype, device=token_rewards.device)
    next_value = token_rewards.new_zeros(token_rewards.shape[0])
    last_gae = token_rewards.new_zeros(token_rewards.shape[0])
    advantages = torch.zeros_like(token_rewards)
    for t in reversed(range(token_rewards.shape[-1])):
        m = mask[:, t]
        r = torch.where(m, token_rewards[:, t], zero)
        v = torch.where(m, values[:, t].to(token_rewards.dtype), zero)
        delta = r + gamma * next_value - v
        gae_t = delta + gamma * lam * last_gae
        # a masked token passes the state of the next policy token through unchanged
        last_gae = torch.where(m, gae_t, last_gae)
        next_value = torch.where(m, v, next_value)
        advantages[:, t] = torch.where(m, gae_t, zero)
    returns = torch.where(mask, advantages + values.to(advantages.dtype), zero)
    return advantages, returns


# --------------------------------------------------------------------------------------------
# KL estimators
# --------------------------------------------------------------------------------------------

KL_ESTIMATORS: Registry[Callable[[Tensor, Tensor], Tensor]] = Registry("KL estimator", check=_convention("KL estimator", 2))
register_kl_estimator = KL_ESTIMATORS.register
get_kl_estimator = KL_ESTIMATORS.get


@register_kl_estimator("k1")
def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """``k1 = log pi(x) - log pi_ref(x)``: unbiased for KL(pi || pi_ref), high variance, can be < 0."""
    return logprobs - ref_logprobs


@register_kl_estimator("k2")
def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """``k2 = 0.5 * (log pi(x) - log pi_ref(x))^2``: biased, low variance, >= 0."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


@register_kl_estimator("k3")
def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """``k3 = exp(d) - d - 1`` with ``d = log pi_ref(x) - log pi(x)`` (Schulman 2020): unbiased, >= 0.

    ``d`` is clamped to [-20, 20] (gradient 0 beyond) so one token whose log-probs diverge cannot
    overflow exp() to inf; the clamped ``d`` is used in both terms, which keeps the value >= 0.
    """
    d = (ref_logprobs - logprobs).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    # expm1 avoids the cancellation in exp(d) - 1 near d = 0 that makes the naive form slightly
    # negative; the clamp only removes last-ulp rounding, since the true value is >= 0
    return (torch.expm1(d) - d).clamp_min(0)


@register_kl_estimator("abs")
def kl_abs(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """``|log pi(x) - log pi_ref(x)|`` (veRL's ``abs``): >= 0, a biased distance, not a KL estimate."""
    return (logprobs - ref_logprobs).abs()


@register_kl_estimator("k3+")
def kl_k3_plus(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Straight-through k3 (veRL's ``low_var_kl+``): the value of `kl_k3`, the gradient of `kl_k2`.

    k3's gradient w.r.t. log pi is ``1 - pi_ref/pi``, which is biased as a gradient of KL(pi || pi_ref)
    when taken per sample; k2's, ``log pi - log pi_ref``, is the unbiased one (Tang & Munos 2025).
    ``k3 + (k2 - k2.detach())`` reports k3 and back-propagates k2.
    """
    k2 = kl_k2(logprobs, ref_logprobs)
    return kl_k3(logprobs, ref_logprobs).detach() + (k2 - k2.detach())


# --------------------------------------------------------------------------------------------
# Policy losses
# --------------------------------------------------------------------------------------------

POLICY_LOSSES: Registry[Callable[..., tuple[Tensor, Registry[Tensor]]]] = Registry("policy loss", check=_convention("policy loss", 4))
register_policy_loss = POLICY_LOSSES.register
get_policy_loss = POLICY_LOSSES.get

# Per-token info every policy loss returns and the trainer reads (logged as loss/clipfrac, loss/approx_kl).
POLICY_LOSS_INFO = ("clipped", "approx_kl")


def check_policy_loss_info(name: str, loss: Tensor, info: Mapping[str, Tensor]) -> None:
    """The contract between a policy loss and the trainer: a per-token loss and the `POLICY_LOSS_INFO` keys."""
    missing = [k for k in POLICY_LOSS_INFO if k not in info]
    if missing:
        raise ValueError(f"policy loss '{name}' returned info without {missing}: every policy loss returns "
                         f"(per-token loss, {{{', '.join(repr(k) for k in POLICY_LOSS_INFO)}: per-token tensors}})")
    bad = [k for k in POLICY_LOSS_INFO if tuple(info[k].shape) != tuple(loss.shape)]
    if bad:
        raise ValueError(f"policy loss '{name}': info {bad} must have the loss's shape {tuple(loss.shape)}")


def _ratio(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(ratio, log_ratio)`` with log_ratio 0 (ratio 1) at masked positions and clamped to +-20."""
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    log_ratio = torch.where(mask, logprobs - old_logprobs, zero)
    return torch.exp(log_ratio.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)), log_ratio


def _info(mask: Tensor, **parts: Tensor) -> dict[str, Tensor]:
    return {k: torch.where(mask, v.detach().to(torch.float32), 0.0) for k, v in parts.items()}


def _pg_terms(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, response_mask: Tensor):
    """Shared inputs of the policy losses: bool mask, a typed zero, masked advantages, ratio."""
    mask = _bool(response_mask)
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    adv = torch.where(mask, advantages.to(logprobs.dtype), zero)
    ratio, log_ratio = _ratio(logprobs, old_logprobs, mask)
    return mask, zero, adv, ratio, log_ratio


@register_policy_loss("clipped")
def clipped_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    clip_ratio: float = 0.2,
    clip_ratio_high: float | None = None,
    dual_clip: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017), per token.

    ``rho = exp(logp - logp_old)``; ``L = max(-A rho, -A clip(rho, 1 - eps_lo, 1 + eps_hi))`` with
    ``eps_lo = clip_ratio``, ``eps_hi = clip_ratio_high`` (default ``clip_ratio``; DAPO's clip-higher).
    Dual clip (Ye et al. 2020), ``c > 1``: for ``A < 0``, ``L = min(L, -A c)``, bounding the loss of a
    token whose ratio exploded.
    info: ``clipped`` (either clip bound the loss), ``dual_clipped``, ``ratio``, ``approx_kl``
    (``logp_old - logp``).
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (got {dual_clip})")
    mask, zero, adv, ratio, log_ratio = _pg_terms(logprobs, old_logprobs, advantages, response_mask)
    high = clip_ratio if clip_ratio_high is None else clip_ratio_high
    l1 = -adv * ratio
    l2 = -adv * ratio.clamp(1.0 - clip_ratio, 1.0 + high)
    loss = torch.maximum(l1, l2)
    clipped = l2 > l1
    dual = torch.zeros_like(clipped)
    if dual_clip is not None:
        l3 = -adv * dual_clip
        dual = (adv < 0) & (l3 < loss)
        loss = torch.where(dual, l3, loss)
        clipped = clipped | dual
    loss = torch.where(mask, loss, zero)
    return loss, _info(mask, clipped=clipped, dual_clipped=dual, ratio=ratio, approx_kl=-log_ratio)


@register_policy_loss("vanilla")
def vanilla_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, response_mask: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """Plain policy gradient: ``L = -A * rho`` with ``rho = exp(logp - logp_old)``.

    On-policy (``rho = 1``) its gradient is exactly ``-A * grad(logp)`` (REINFORCE); off-policy it is
    the importance-weighted policy gradient. It declares no clip options, so the trainer
    passes none.
    """
    mask, zero, adv, ratio, log_ratio = _pg_terms(logprobs, old_logprobs, advantages, response_mask)
    loss = torch.where(mask, -adv * ratio, zero)
    no_clip = torch.zeros_like(mask)
    return loss, _info(mask, clipped=no_clip, dual_clipped=no_clip, ratio=ratio, approx_kl=-log_ratio)


# --------------------------------------------------------------------------------------------
# Value loss and entropy
# --------------------------------------------------------------------------------------------

VALUE_LOSSES: Registry[Callable[..., tuple[Tensor, Registry[Tensor]]]] = Registry("value loss", check=_convention("value loss", 4))
register_value_loss = VALUE_LOSSES.register
get_value_loss = VALUE_LOSSES.get


@register_value_loss("clipped")
def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    response_mask: Tensor,
    *,
    value_clip: float | None = 0.5,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss, per token.

    ``L = 0.5 * max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)`` with ``c = value_clip``
    (named like the recipe key `algorithm.value_clip`); ``value_clip=None`` gives
    ``0.5 * (V - R)^2``. info: ``clipped`` where the clipped term is the larger one.
    """
    mask = _bool(response_mask)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    v = torch.where(mask, values, zero)
    v_old = torch.where(mask, old_values.to(values.dtype), zero)
    ret = torch.where(mask, returns.to(values.dtype), zero)
    l1 = (v - ret) ** 2
    if value_clip is None:
        loss, clipped = l1, torch.zeros_like(mask)
    else:
        l2 = (v_old + (v - v_old).clamp(-value_clip, value_clip) - ret) ** 2
        loss, clipped = torch.maximum(l1, l2), l2 > l1
    return torch.where(mask, 0.5 * loss, zero), _info(mask, clipped=clipped)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of ``softmax(logits)`` over the last dim: ``H = logsumexp(z) - sum_i p_i z_i``.

    Computed on ``z - max(z)`` (H is shift-invariant): with raw logits both terms are of the size
    of the logits and their difference loses the entropy to float32 cancellation.
    ``-inf`` logits (vocab masked by top-k/top-p) have p = 0 and contribute 0; they are zeroed
    before the product because ``0 * -inf`` is NaN in the forward and backward pass.
    """
    z = logits - logits.amax(dim=-1, keepdim=True).detach()
    probs = torch.softmax(z, dim=-1)
    finite = torch.where(torch.isneginf(z), torch.zeros_like(z), z)
    return torch.logsumexp(z, dim=-1) - (probs * finite).sum(-1)


# --------------------------------------------------------------------------------------------
# Rollout correction: the engine's sampler and the trainer's forward are different kernels
# (vLLM vs torch, other dtypes, batch shapes), so the engine's log-probs mu are not exactly
# the trainer's pi_old. Truncated importance sampling (TIS, Yao et al. 2025, "Your efficient RL
# framework secretly brings you off-policy RL training") weighs each token's policy loss by
# min(pi_old / mu, cap), detached. The PPO ratio is then taken against the trainer's own pi_old.
# --------------------------------------------------------------------------------------------

ROLLOUT_CORRECTIONS: Registry[Callable[..., Tensor]] = Registry("rollout correction", check=_convention("rollout correction", 3))
register_rollout_correction = ROLLOUT_CORRECTIONS.register
get_rollout_correction = ROLLOUT_CORRECTIONS.get


def _check_cap(cap: float) -> None:
    if not cap >= 1.0:  # also rejects NaN
        raise ValueError(f"rollout correction cap must be >= 1 (got {cap})")


def _log_is(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor) -> Tensor:
    zero = torch.zeros((), dtype=torch.float32, device=old_logprobs.device)
    return torch.where(mask, old_logprobs.float() - rollout_logprobs.float(), zero)


@register_rollout_correction("token")
def token_truncated_is(
    old_logprobs: Tensor, rollout_logprobs: Tensor, response_mask: Tensor, *, cap: float = 2.0
) -> Tensor:
    """Per-token weights ``min(exp(logp_old - logp_rollout), cap)``; 0 at masked positions.

    Taken in log space (``min(d, log cap)`` then exp), so a huge mismatch cannot overflow.
    """
    _check_cap(cap)
    mask = _bool(response_mask)
    d = _log_is(old_logprobs, rollout_logprobs, mask)
    w = torch.exp(d.clamp(max=math.log(cap)))
    return torch.where(mask, w, torch.zeros((), dtype=w.dtype, device=w.device)).detach()


@register_rollout_correction("sequence")
def sequence_truncated_is(
    old_logprobs: Tensor, rollout_logprobs: Tensor, response_mask: Tensor, *, cap: float = 2.0
) -> Tensor:
    """One weight per sequence, ``min(prod_t pi_old / mu, cap)``, on each of its policy tokens.

    Environment tokens (mask 0) are not sampled by the policy and take no part in the product.
    """
    _check_cap(cap)
    mask = _bool(response_mask)
    seq = _log_is(old_logprobs, rollout_logprobs, mask).sum(-1, keepdim=True)
    w = torch.exp(seq.clamp(max=math.log(cap))).expand_as(mask)
    return torch.where(mask, w, torch.zeros((), dtype=w.dtype, device=w.device)).detach()


def rollout_mismatch(old_logprobs: Tensor, rollout_logprobs: Tensor, response_mask: Tensor) -> dict[str, Tensor]:
    """How far the engine's log-probs are from the trainer's, over the policy tokens.

    Returns sums and maxima (so data-parallel ranks combine them exactly): ``abs_diff_sum``
    (``sum |logp_old - logp_rollout|``), ``abs_diff_max``, ``log_ratio_max`` (largest token
    ``log(pi_old / mu)``), ``seq_log_ratio_max`` (largest sequence ``sum_t log(pi_old / mu)``),
    ``k3_sum`` (``sum_t k3(pi_old || mu)``, a KL estimate per token) and ``tokens``. Maxima are
    ``-inf`` when there are no policy tokens.
    """
    mask = _bool(response_mask)
    d = _log_is(old_logprobs, rollout_logprobs, mask)
    neg_inf = torch.tensor(float("-inf"), device=d.device)
    has = mask.any(-1)
    return {
        "abs_diff_sum": d.abs().sum(),
        "abs_diff_max": torch.where(mask, d.abs(), neg_inf).max() if mask.any() else neg_inf,
        "log_ratio_max": torch.where(mask, d, neg_inf).max() if mask.any() else neg_inf,
        "seq_log_ratio_max": torch.where(has, d.sum(-1), neg_inf).max() if has.any() else neg_inf,
        # k3 of KL(mu || pi_old) estimated on mu's samples: exp(-r) - 1 + r with r = log(mu / pi_old)
        "k3_sum": torch.where(mask, torch.expm1(d.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)) - d, 0.0).sum(),
        "tokens": mask.sum().to(torch.float32),
    }


# --------------------------------------------------------------------------------------------
# Dynamic sampling (DAPO, Yu et al. 2025): a group whose samples all got the same reward has
# zero advantage under any group baseline, so it costs a forward/backward and teaches nothing
# (only the entropy / KL terms see it). Rolling out more prompts than a step trains and keeping
# the groups whose rewards differ spends the training compute on samples that carry signal.
# DAPO re-samples until the batch is full of such groups; this bounded variant (one oversampled
# rollout, informative groups first, then the rest in rollout order) keeps every step's batch
# size fixed, which data-parallel ranks need.
# --------------------------------------------------------------------------------------------


def informative_groups(rewards: Tensor, group_ids: Tensor, atol: float = 1e-6) -> dict[int, bool]:
    """``{group id: its rewards are not all equal (within atol)}``; a one-sample group is never informative."""
    out: dict[int, bool] = {}
    for g in torch.unique(group_ids, sorted=False).tolist():
        r = rewards[group_ids == g].double()
        out[int(g)] = bool(r.numel() > 1 and (r.max() - r.min()).item() > atol)
    return out


def select_groups(
    rewards: Tensor, group_ids: Tensor, keep: int, atol: float = 1e-6, informative: dict[int, bool] | None = None
) -> Tensor:
    """Sample indices of ``keep`` whole groups: informative groups first, then the others.

    Groups keep their first-seen order within each class and samples keep their order within
    a group, so the selection is deterministic. ``keep`` larger than the number of groups
    keeps them all. ``informative``: `informative_groups`' result, when the caller has it.
    """
    if keep < 0:
        raise ValueError(f"keep must be >= 0 (got {keep})")
    if informative is None:
        informative = informative_groups(rewards, group_ids, atol)
    order = list(dict.fromkeys(group_ids.tolist()))  # first-seen order
    ranked = [g for g in order if informative[g]] + [g for g in order if not informative[g]]
    chosen = set(ranked[:keep])
    return torch.tensor([i for i, g in enumerate(group_ids.tolist()) if g in chosen], dtype=torch.long)


# --------------------------------------------------------------------------------------------
# Loss aggregation
# --------------------------------------------------------------------------------------------
# Denominators are GLOBAL counts of the whole optimisation batch: with them, the sum over
# micro-batches (and data-parallel ranks) of the aggregated micro-batch losses equals the
# aggregated full-batch loss, so gradient accumulation is exact. Omitted, they default to this
# tensor's own counts, which is the full-batch reference value.

LOSS_AGGREGATIONS: Registry[Callable[..., Tensor]] = Registry("loss aggregation", check=_convention("loss aggregation", 2))
register_loss_aggregation = LOSS_AGGREGATIONS.register
get_loss_aggregation = LOSS_AGGREGATIONS.get


def _denom(value, like: Tensor) -> Tensor:
    return torch.as_tensor(value, dtype=like.dtype, device=like.device).clamp_min(1)


@register_loss_aggregation("token-mean")
def _token_mean(loss_mat, response_mask, *, num_tokens=None, num_seqs=None, norm_len=None) -> Tensor:
    """``sum(L * mask) / num_tokens`` (default ``sum(mask)``): every token weighs the same."""
    mask = _bool(response_mask)
    total = masked_sum(loss_mat, mask)
    return total / _denom(mask.sum() if num_tokens is None else num_tokens, total)


@register_loss_aggregation("seq-mean-token-mean")
def _seq_mean_token_mean(loss_mat, response_mask, *, num_tokens=None, num_seqs=None, norm_len=None) -> Tensor:
    """``sum_i mean_t(L_i * mask_i) / num_seqs`` (default B): every sequence weighs the same.

    A sequence with no policy tokens contributes 0 (but still counts in ``num_seqs``).
    """
    per_seq = masked_mean(loss_mat, response_mask, dim=-1)
    return per_seq.sum() / _denom(loss_mat.shape[0] if num_seqs is None else num_seqs, per_seq)


@register_loss_aggregation("seq-mean-token-sum")
def _seq_mean_token_sum(loss_mat, response_mask, *, num_tokens=None, num_seqs=None, norm_len=None) -> Tensor:
    """``sum(L * mask) / num_seqs`` (default B): longer sequences weigh more."""
    total = masked_sum(loss_mat, response_mask)
    return total / _denom(loss_mat.shape[0] if num_seqs is None else num_seqs, total)


@register_loss_aggregation("seq-mean-token-sum-norm")
def _seq_mean_token_sum_norm(
    loss_mat, response_mask, *, num_tokens=None, num_seqs=None, norm_len=None
) -> Tensor:
    """``sum(L * mask) / (num_seqs * norm_len)`` (Dr.GRPO), defaults B and T.

    The trainer passes a constant ``norm_len`` (max response tokens) so the normaliser depends on
    neither the batch nor its padding, removing GRPO's length bias.
    """
    total = masked_sum(loss_mat, response_mask)
    s = loss_mat.shape[0] if num_seqs is None else num_seqs
    n = loss_mat.shape[-1] if norm_len is None else norm_len
    return total / _denom(s * n, total)


def aggregate_loss(
    loss_mat: Tensor,
    response_mask: Tensor,
    mode: str,
    *,
    num_tokens: int | Tensor | None = None,
    num_seqs: int | Tensor | None = None,
    norm_len: int | None = None,
) -> Tensor:
    """Reduce a per-token loss ``[B, T]`` to a scalar with aggregation ``mode``.

    Pass the optimisation batch's global ``num_tokens`` (policy tokens), ``num_seqs`` (sequences)
    and a fixed ``norm_len`` when ``loss_mat`` is a micro-batch, so micro-batch losses sum to the
    full-batch loss.
    """
    return LOSS_AGGREGATIONS.get(mode)(
        loss_mat, response_mask, num_tokens=num_tokens, num_seqs=num_seqs, norm_len=norm_len
    )

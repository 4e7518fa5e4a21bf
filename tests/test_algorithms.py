"""Closed-form checks of rl/algorithms.py: every number here is computed by hand in the comments."""

import inspect
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rl import algorithms as A

T_ = torch.tensor
F64 = torch.float64


def close(a, b, tol=1e-6):
    b = torch.as_tensor(b, dtype=a.dtype)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, atol=tol, rtol=tol), f"\n{a}\n!=\n{b}"


# ---------------------------------------------------------------------------------------------
# masked helpers
# ---------------------------------------------------------------------------------------------


def test_masked_helpers():
    x = T_([[1.0, 2.0, float("nan")], [3.0, float("inf"), 6.0]])
    m = T_([[1, 1, 0], [1, 0, 1]])
    close(A.masked_sum(x, m), 12.0)
    close(A.masked_sum(x, m, dim=-1), [3.0, 9.0])
    close(A.masked_mean(x, m), 3.0)
    close(A.masked_mean(x, m, dim=-1), [1.5, 4.5])
    # unbiased var of {1,2,3,6}: mean 3, squares 4+1+0+9 = 14, /3
    close(A.masked_var(x, m), 14 / 3)
    close(A.masked_var(x, m, unbiased=False), 14 / 4)
    # empty mask: 0, never NaN
    close(A.masked_mean(x, torch.zeros_like(m)), 0.0)
    close(A.masked_var(x, torch.zeros_like(m)), 0.0)
    w = A.masked_whiten(x, m)
    assert w[0, 2] == 0 and w[1, 1] == 0
    s = math.sqrt(14 / 3)
    close(w, [[-2 / s, -1 / s, 0.0], [0.0, 0.0, 3 / s]], tol=1e-5)
    # shift_mean=False keeps the mean: whitened + 3 at the masked-in elements
    close(A.masked_whiten(x, m, shift_mean=False), [[-2 / s + 3, -1 / s + 3, 0], [3, 0, 3 / s + 3]], tol=1e-5)


def test_helpers_do_not_mutate():
    x = torch.randn(3, 4)
    m = torch.rand(3, 4) > 0.3
    x0, m0 = x.clone(), m.clone()
    A.masked_whiten(x, m)
    A.reinforce(x, m, T_([0, 0, 1]), baseline="group", whiten=True)
    A.gae(x, m, T_([0, 0, 1]), x, gamma=0.9, lam=0.9)
    assert torch.equal(x, x0) and torch.equal(m, m0)


# ---------------------------------------------------------------------------------------------
# advantage estimators
# ---------------------------------------------------------------------------------------------

# 4 sequences, groups {0,1} and {2,3}, T = 3.
#   row0: rewards [0, -0.5, 1.5] (a per-token penalty then the outcome), mask [1,1,1]: score 1
#   row1: rewards [0, 3, 0],  mask [1,1,0]: score 3
#   row2: rewards [0, 0, 2],  mask [1,1,1]: score 2
#   row3: rewards [10, 99, 0], mask [1,0,0]: score 10 (99 is on a masked token: ignored)
REW = T_([[0.0, -0.5, 1.5], [0.0, 3.0, 0.0], [0.0, 0.0, 2.0], [10.0, 99.0, 0.0]])
MASK = T_([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]])
GID = T_([7, 7, 3, 3])
# reward-to-go (gamma = 1)
RTG = [[1.0, 1.0, 1.5], [3.0, 3.0, 0.0], [2.0, 2.0, 2.0], [10.0, 0.0, 0.0]]


def test_reinforce_baselines():
    adv, ret = A.reinforce(REW, MASK, GID)
    close(ret, RTG)
    close(adv, RTG)
    # batch baseline: mean(1, 3, 2, 10) = 4
    adv, ret = A.reinforce(REW, MASK, GID, baseline="batch")
    close(ret, RTG)
    close(adv, [[-3.0, -3.0, -2.5], [-1.0, -1.0, 0.0], [-2.0, -2.0, -2.0], [6.0, 0.0, 0.0]])
    # group baseline: group 7 mean(1, 3) = 2, group 3 mean(2, 10) = 6
    adv, _ = A.reinforce(REW, MASK, GID, baseline="group")
    close(adv, [[-1.0, -1.0, -0.5], [1.0, 1.0, 0.0], [-4.0, -4.0, -4.0], [4.0, 0.0, 0.0]])


def test_reinforce_group_baseline_single_sample_group_is_zero():
    adv, _ = A.reinforce(REW, MASK, T_([0, 1, 2, 2]), baseline="group")
    close(adv[:2], RTG[:2])  # rows 0 and 1 are alone: baseline 0
    close(adv[2:], [[-4.0, -4.0, -4.0], [4.0, 0.0, 0.0]])


def test_reinforce_whiten():
    adv, ret = A.reinforce(REW, MASK, GID, baseline="batch", whiten=True)
    close(ret, RTG)
    raw = torch.tensor([-3.0, -3.0, -2.5, -1.0, -1.0, -2.0, -2.0, -2.0, 6.0])  # masked-in, row-major
    expected = (raw - raw.mean()) / raw.std()  # torch.std is unbiased
    m = MASK.bool()
    close(adv[m], expected, tol=1e-5)
    assert (adv[~m] == 0).all()
    close(adv[m].mean(), 0.0, tol=1e-6)
    close(adv[m].std(), 1.0, tol=1e-5)


def test_reinforce_gamma_with_observation_gap():
    # policy tokens at 0, 1, 4; the 7 on the observation must be ignored.
    # G4 = 1; G1 = 0.5 + 0.5 * G4 = 1; G0 = 0 + 0.5 * G1 = 0.5
    rew = T_([[0.0, 0.5, 7.0, 0.0, 1.0]])
    mask = T_([[1, 1, 0, 0, 1]])
    adv, ret = A.reinforce(rew, mask, T_([0]), gamma=0.5)
    close(ret, [[0.5, 1.0, 0.0, 0.0, 1.0]])
    close(adv, [[0.5, 1.0, 0.0, 0.0, 1.0]])


def test_reinforce_invalid_baseline():
    with pytest.raises(ValueError, match="none.*batch.*group"):
        A.reinforce(REW, MASK, GID, baseline="critic")


def test_rloo_leave_one_out():
    # group 0: scores 1, 2, 6 -> baselines (2+6)/2=4, (1+6)/2=3.5, (1+2)/2=1.5 -> -3, -1.5, 4.5
    # group 1: scores 3, 1 -> 2, -2;  group 2: single sample score 5 -> baseline 0 -> 5
    scores = [1.0, 2.0, 6.0, 3.0, 1.0, 5.0]
    rew = torch.zeros(6, 2)
    rew[:, 1] = torch.tensor(scores)
    mask = torch.ones(6, 2)
    mask[5, 1] = 0  # row 5's score sits on token 0 instead
    rew[5] = T_([5.0, 100.0])
    gid = T_([0, 0, 0, 1, 1, 2])
    adv, ret = A.rloo(rew, mask, gid)
    expected = T_([-3.0, -1.5, 4.5, 2.0, -2.0, 5.0])
    close(adv, torch.where(mask.bool(), expected[:, None], torch.tensor(0.0)))
    close(ret, adv)


def test_grpo_unbiased_std_and_dr_grpo():
    # group 0: scores 0, 1, 1, 2: mean 1, unbiased std sqrt(2/3) (biased would be sqrt(1/2))
    # group 1: single sample score 5: mean 0, std 1 -> 5
    # group 2: scores 4, 4: std 0 -> 0 / eps = 0
    scores = T_([0.0, 1.0, 1.0, 2.0, 5.0, 4.0, 4.0])
    rew = torch.zeros(7, 3)
    mask = torch.ones(7, 3, dtype=torch.bool)
    mask[:, 2] = False
    rew[:, 0] = scores  # put the score on the last *policy* token
    rew[:, 2] = 50.0  # padding garbage
    gid = T_([0, 0, 0, 0, 1, 2, 2])
    s = math.sqrt(2 / 3)
    adv, ret = A.grpo(rew, mask, gid)
    per_seq = T_([-1 / s, 0.0, 0.0, 1 / s, 5.0, 0.0, 0.0])
    close(adv[:, 0], per_seq, tol=1e-5)
    close(adv[:, 1], per_seq, tol=1e-5)
    assert (adv[:, 2] == 0).all()
    close(ret, adv)
    adv, _ = A.grpo(rew, mask, gid, normalize_by_std=False)
    close(adv[:, 0], [-1.0, 0.0, 0.0, 1.0, 5.0, 0.0, 0.0])


def test_grpo_single_sample_group_advantage_is_score():
    adv, _ = A.grpo(T_([[0.0, 0.7]]), T_([[1, 1]]), T_([3]))
    close(adv, [[0.7, 0.7]], tol=1e-5)


def test_gae_gamma_lam_one_is_reward_to_go_minus_value():
    values = T_([[0.3, 0.1, -0.2], [1.0, 2.0, 5.0], [0.5, 0.5, 0.5], [0.25, 9.0, 9.0]])
    adv, ret = A.gae(REW, MASK, GID, values)
    m = MASK.bool()
    close(adv, torch.where(m, T_(RTG) - values, torch.tensor(0.0)))
    close(ret, torch.where(m, T_(RTG), torch.tensor(0.0)))


def test_gae_by_hand():
    # gamma 0.9, lam 0.8, r = [0, 0, 1], V = [0.5, 0.6, 0.7]
    # d2 = 1 - 0.7 = 0.3                   A2 = 0.3
    # d1 = 0.9*0.7 - 0.6 = 0.03            A1 = 0.03 + 0.72*0.3 = 0.246
    # d0 = 0.9*0.6 - 0.5 = 0.04            A0 = 0.04 + 0.72*0.246 = 0.21712
    adv, ret = A.gae(T_([[0.0, 0.0, 1.0]]), T_([[1, 1, 1]]), T_([0]), T_([[0.5, 0.6, 0.7]]), gamma=0.9, lam=0.8)
    close(adv, [[0.21712, 0.246, 0.3]])
    close(ret, [[0.71712, 0.846, 1.0]])


def test_gae_across_observation_gap_equals_compressed():
    # [p, p, obs, obs, p] must equal [p, p, p]; garbage on the observation tokens must not matter
    rew = T_([[0.0, 0.0, 5.0, -3.0, 1.0]])
    val = T_([[0.5, 0.6, float("nan"), 42.0, 0.7]])
    mask = T_([[1, 1, 0, 0, 1]])
    adv, ret = A.gae(rew, mask, T_([0]), val, gamma=0.9, lam=0.8)
    close(adv, [[0.21712, 0.246, 0.0, 0.0, 0.3]])
    close(ret, [[0.71712, 0.846, 0.0, 0.0, 1.0]])


def test_gae_requires_values():
    with pytest.raises(ValueError):
        A.gae(REW, MASK, GID)


def test_estimators_do_not_track_grad():
    v = torch.randn(4, 3, requires_grad=True)
    adv, ret = A.gae(REW, MASK, GID, v)
    assert not adv.requires_grad and not ret.requires_grad


@st.composite
def masked_batch(draw, max_b=3, max_t=8):
    b = draw(st.integers(1, max_b))
    t = draw(st.integers(1, max_t))
    floats = st.floats(-2, 2, allow_nan=False, width=32)
    mask = torch.tensor(draw(st.lists(st.booleans(), min_size=b * t, max_size=b * t))).view(b, t)
    rew = torch.tensor(draw(st.lists(floats, min_size=b * t, max_size=b * t)), dtype=F64).view(b, t)
    val = torch.tensor(draw(st.lists(floats, min_size=b * t, max_size=b * t)), dtype=F64).view(b, t)
    # garbage on masked tokens: must never show up anywhere
    rew = torch.where(mask, rew, torch.tensor(1e3, dtype=F64))
    val = torch.where(mask, val, torch.tensor(float("nan"), dtype=F64))
    return rew, val, mask


@settings(max_examples=60, deadline=None)
@given(masked_batch(), st.floats(0, 1), st.floats(0, 1))
def test_gae_gap_property(batch, gamma, lam):
    rew, val, mask = batch
    adv, ret = A.gae(rew, mask, torch.zeros(len(rew), dtype=torch.long), val, gamma=gamma, lam=lam)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    for i in range(len(rew)):
        m = mask[i]
        if not m.any():
            continue
        ones = torch.ones(1, int(m.sum()), dtype=torch.bool)
        c_adv, c_ret = A.gae(rew[i][m][None], ones, T_([0]), val[i][m][None], gamma=gamma, lam=lam)
        close(adv[i][m], c_adv[0], tol=1e-12)
        close(ret[i][m], c_ret[0], tol=1e-12)


@settings(max_examples=40, deadline=None)
@given(masked_batch(), st.floats(0, 1))
def test_reinforce_gap_property(batch, gamma):
    rew, _, mask = batch
    _, ret = A.reinforce(rew, mask, torch.zeros(len(rew), dtype=torch.long), gamma=gamma)
    assert (ret[~mask] == 0).all()
    for i in range(len(rew)):
        r = rew[i][mask[i]].tolist()
        g, expected = 0.0, []
        for x in reversed(r):
            g = x + gamma * g
            expected.append(g)
        close(ret[i][mask[i]], list(reversed(expected)), tol=1e-12)


@pytest.mark.parametrize("name", sorted(A.ADVANTAGE_ESTIMATORS))
def test_every_estimator_zero_at_masked_positions_and_finite(name):
    torch.manual_seed(0)
    rew = torch.randn(5, 6)
    mask = torch.rand(5, 6) > 0.4
    mask[4] = False  # an all-masked row
    vals = torch.randn(5, 6)
    adv, ret = A.compute_advantages(name, rew, mask.float(), T_([0, 0, 1, 2, 2]), vals)
    assert adv.shape == ret.shape == rew.shape
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


def test_compute_advantages_forwards_options_strictly():
    adv, _ = A.compute_advantages("grpo", REW, MASK, GID, normalize_by_std=False)
    close(adv[:, 0], [-1.0, 1.0, -4.0, 4.0])
    with pytest.raises(TypeError):
        A.compute_advantages("rloo", REW, MASK, GID, gamma=0.9)


# ---------------------------------------------------------------------------------------------
# KL estimators
# ---------------------------------------------------------------------------------------------


def test_kl_values():
    lp = torch.log(T_([0.5, 0.25, 0.3]))
    ref = torch.log(T_([0.25, 0.5, 0.3]))
    ln2 = math.log(2)
    close(A.get_kl_estimator("k1")(lp, ref), [ln2, -ln2, 0.0])
    close(A.get_kl_estimator("k2")(lp, ref), [0.5 * ln2**2, 0.5 * ln2**2, 0.0])
    # k3: d = ref - lp; exp(d) - d - 1: d=-ln2 -> 0.5 + ln2 - 1; d=ln2 -> 2 - ln2 - 1
    close(A.get_kl_estimator("k3")(lp, ref), [ln2 - 0.5, 1 - ln2, 0.0])


def test_k3_clamps_exponent():
    out = A.kl_k3(T_([-100.0, 100.0]), T_([0.0, 0.0]))
    # d = 100 -> clamped to 20; d = -100 -> -20
    close(out, [math.exp(20) - 21, math.exp(-20) + 19], tol=1e-5)


@settings(max_examples=200, deadline=None)
@given(st.floats(-60, 60, width=32), st.floats(-60, 60, width=32))
def test_k3_nonnegative(lp, ref):
    out = A.kl_k3(T_([lp]), T_([ref]))
    assert torch.isfinite(out).all() and (out >= 0).all()


def test_kl_is_differentiable():
    lp = torch.tensor([-1.0, -2.0], requires_grad=True)
    A.kl_k3(lp, T_([-1.5, -1.0])).sum().backward()
    # d/dlp [exp(ref - lp) - (ref - lp) - 1] = 1 - exp(ref - lp)
    close(lp.grad, [1 - math.exp(-0.5), 1 - math.exp(1.0)], tol=1e-5)


# ---------------------------------------------------------------------------------------------
# policy losses
# ---------------------------------------------------------------------------------------------


def _pl(name, ratios, advs, **kw):
    lp = torch.log(T_([ratios], dtype=F64))
    return A.get_policy_loss(name)(lp, torch.zeros_like(lp), T_([advs], dtype=F64), torch.ones_like(lp), **kw)


def test_clipped_loss_cases():
    # clip 0.2:
    #  A=+1 r=1.1: inside                -> -1.1
    #  A=+1 r=1.5: l1=-1.5, l2=-1.2       -> -1.2 clipped
    #  A=+1 r=0.5: l1=-0.5, l2=-0.8       -> -0.5 (pessimistic side is never clipped)
    #  A=-1 r=0.5: l1=0.5,  l2=0.8        ->  0.8 clipped
    #  A=-1 r=1.5: l1=1.5,  l2=1.2        ->  1.5
    #  A=-1 r=0.9: inside                 ->  0.9
    loss, info = _pl("clipped", [1.1, 1.5, 0.5, 0.5, 1.5, 0.9], [1.0, 1.0, 1.0, -1.0, -1.0, -1.0])
    close(loss, [[-1.1, -1.2, -0.5, 0.8, 1.5, 0.9]], tol=1e-9)
    close(info["clipped"], [[0.0, 1.0, 0.0, 1.0, 0.0, 0.0]])
    close(info["ratio"], [[1.1, 1.5, 0.5, 0.5, 1.5, 0.9]])
    close(info["approx_kl"], [[-math.log(r) for r in (1.1, 1.5, 0.5, 0.5, 1.5, 0.9)]])


def test_clipped_loss_asymmetric_high():
    # A=+1 r=1.25: symmetric 0.2 clips to 1.2; clip_ratio_high=0.28 lets 1.25 through.
    # A=-1 r=0.75: the low side still uses clip_ratio 0.2 -> 0.8
    loss, info = _pl("clipped", [1.25, 0.75], [1.0, -1.0])
    close(loss, [[-1.2, 0.8]], tol=1e-9)
    loss, info = _pl("clipped", [1.25, 0.75, 1.3], [1.0, -1.0, 1.0], clip_ratio_high=0.28)
    close(loss, [[-1.25, 0.8, -1.28]], tol=1e-9)
    close(info["clipped"], [[0.0, 1.0, 1.0]])


def test_dual_clip():
    # c = 3: A=-1 r=5: max(5, 1.2) = 5 -> min(5, 3) = 3 (dual clipped)
    #        A=-1 r=2: 2 < 3, untouched;  A=+1 r=5: -1.2 (dual clip only for A < 0)
    loss, info = _pl("clipped", [5.0, 2.0, 5.0], [-1.0, -1.0, 1.0], dual_clip=3.0)
    close(loss, [[3.0, 2.0, -1.2]], tol=1e-9)
    close(info["dual_clipped"], [[1.0, 0.0, 0.0]])
    close(info["clipped"], [[1.0, 0.0, 1.0]])
    # dual clip bounds the loss: its gradient wrt the ratio is 0
    lp = torch.log(T_([[5.0]], dtype=F64)).requires_grad_()
    l, _ = A.clipped_policy_loss(lp, torch.zeros_like(lp), T_([[-1.0]], dtype=F64), T_([[1]]), dual_clip=3.0)
    l.sum().backward()
    assert lp.grad.item() == 0
    with pytest.raises(ValueError):
        _pl("clipped", [1.0], [1.0], dual_clip=1.0)


def test_clipped_loss_gradient_and_masking():
    # unclipped token: d(-A r)/dlogp = -A r; clipped token: 0; masked token (with -inf logp): 0
    lp = torch.log(T_([[1.1, 1.5, 1.0]], dtype=F64))
    lp[0, 2] = -float("inf")
    lp.requires_grad_()
    loss, info = A.clipped_policy_loss(lp, torch.zeros_like(lp), T_([[2.0, 2.0, 9.0]], dtype=F64), T_([[1, 1, 0]]))
    loss.sum().backward()
    close(lp.grad, [[-2.2, 0.0, 0.0]], tol=1e-9)
    assert loss[0, 2] == 0 and all(v[0, 2] == 0 for v in info.values())


def test_vanilla_gradient_on_policy_is_minus_advantage():
    torch.manual_seed(0)
    lp = torch.randn(3, 4, dtype=F64, requires_grad=True)
    adv = torch.randn(3, 4, dtype=F64)
    mask = torch.rand(3, 4) > 0.3
    loss, info = A.vanilla_policy_loss(lp, lp.detach(), adv, mask)
    loss.sum().backward()
    close(lp.grad, torch.where(mask, -adv, torch.zeros((), dtype=F64)), tol=1e-12)
    close(loss, torch.where(mask, -adv, torch.zeros((), dtype=F64)), tol=1e-12)
    assert (info["clipped"] == 0).all()


def test_vanilla_off_policy_is_importance_weighted():
    loss, _ = _pl("vanilla", [3.0, 0.5], [1.0, -2.0])
    close(loss, [[-3.0, 1.0]], tol=1e-9)


# ---------------------------------------------------------------------------------------------
# value loss and entropy
# ---------------------------------------------------------------------------------------------


def test_value_loss():
    # c = 0.5, V_old = 1 everywhere
    #  V=2,   R=2: l1=0,    Vclip=1.5, l2=0.25 -> 0.125 clipped
    #  V=1.2, R=2: l1=0.64, Vclip=1.2, l2=0.64 -> 0.32
    #  V=0,   R=2: l1=4,    Vclip=0.5, l2=2.25 -> 2
    #  V=0,   R=0: l1=0,    Vclip=0.5, l2=0.25 -> 0.125 clipped
    #  masked token -> 0
    v = T_([[2.0, 1.2, 0.0, 0.0, 7.0]], dtype=F64)
    old = torch.ones_like(v)
    ret = T_([[2.0, 2.0, 2.0, 0.0, -5.0]], dtype=F64)
    mask = T_([[1, 1, 1, 1, 0]])
    loss, info = A.value_loss(v, old, ret, mask, value_clip=0.5)
    close(loss, [[0.125, 0.32, 2.0, 0.125, 0.0]], tol=1e-9)
    close(info["clipped"], [[1.0, 0.0, 0.0, 1.0, 0.0]])
    loss, info = A.get_value_loss("clipped")(v, old, ret, mask, value_clip=None)
    close(loss, [[0.0, 0.32, 2.0, 0.0, 0.0]], tol=1e-9)
    assert (info["clipped"] == 0).all()


def test_entropy():
    close(A.entropy_from_logits(torch.zeros(2, 3, 7)), torch.full((2, 3), math.log(7)), tol=1e-6)
    assert abs(A.entropy_from_logits(T_([100.0, 0.0, 0.0, 0.0])).item()) < 1e-6
    # a huge offset must not overflow
    close(A.entropy_from_logits(T_([1e4, 1e4])), math.log(2), tol=1e-6)
    # -inf logits (top-k masked vocabulary) contribute 0, and gradients stay finite
    z = T_([0.0, 0.0, -float("inf")], requires_grad=True)
    h = A.entropy_from_logits(z)
    close(h, math.log(2), tol=1e-6)
    h.backward()
    assert torch.isfinite(z.grad).all()


# ---------------------------------------------------------------------------------------------
# loss aggregation
# ---------------------------------------------------------------------------------------------

AGG_LOSS = T_([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 0.0, 0.0], [100.0, 100.0, 100.0, 100.0]])
AGG_MASK = T_([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]])


@pytest.mark.parametrize(
    "mode,kw,expected",
    [
        ("token-mean", {}, 17 / 5),  # (1+2+3+5+6) / 5 tokens
        ("token-mean", {"num_tokens": 10}, 17 / 10),
        ("seq-mean-token-mean", {}, (2.0 + 5.5 + 0.0) / 3),  # empty row contributes 0, still counts
        ("seq-mean-token-mean", {"num_seqs": 5}, 7.5 / 5),
        ("seq-mean-token-sum", {}, 17 / 3),
        ("seq-mean-token-sum", {"num_seqs": 4}, 17 / 4),
        ("seq-mean-token-sum-norm", {}, 17 / (3 * 4)),  # norm_len defaults to T = 4
        ("seq-mean-token-sum-norm", {"norm_len": 10}, 17 / 30),
        ("seq-mean-token-sum-norm", {"num_seqs": 2, "norm_len": 10}, 17 / 20),
    ],
)
def test_aggregation_by_hand(mode, kw, expected):
    close(A.aggregate_loss(AGG_LOSS, AGG_MASK, mode, **kw), expected)


@pytest.mark.parametrize("mode", sorted(A.LOSS_AGGREGATIONS))
def test_aggregation_empty_mask_is_zero(mode):
    out = A.aggregate_loss(torch.full((2, 3), float("nan")), torch.zeros(2, 3), mode, num_tokens=0, num_seqs=0)
    assert out.item() == 0


def test_aggregation_unknown_mode():
    with pytest.raises(ValueError, match="token-mean"):
        A.aggregate_loss(AGG_LOSS, AGG_MASK, "sum")


def _split(b, cuts):
    bounds = [0] + sorted({c for c in cuts if 0 < c < b}) + [b]
    return [list(range(lo, hi)) for lo, hi in zip(bounds, bounds[1:])]


def _trim(mask_rows):
    """A micro-batch is padded to its own longest response: cut trailing all-masked columns."""
    used = mask_rows.any(0).nonzero()
    return int(used.max()) + 1 if len(used) else 1


def _micro_sum(make_loss, mask, mode, cuts, perm):
    b, t = mask.shape
    globals_ = dict(num_tokens=int(mask.sum()), num_seqs=b, norm_len=t)
    total = 0.0
    for chunk in _split(b, cuts):
        rows = perm[chunk]
        width = _trim(mask[rows])
        total = total + A.aggregate_loss(make_loss(rows)[:, :width], mask[rows][:, :width], mode, **globals_)
    return total


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 6),
    st.integers(1, 6),
    st.lists(st.integers(0, 6), max_size=5),
    st.randoms(use_true_random=False),
)
def test_micro_batches_sum_to_full_batch(b, t, cuts, rnd):
    g = torch.Generator().manual_seed(rnd.randrange(2**31))
    loss = torch.randn(b, t, dtype=F64, generator=g)
    mask = torch.rand(b, t, generator=g) > 0.4
    perm = torch.randperm(b, generator=g)
    for mode in A.LOSS_AGGREGATIONS:
        full = A.aggregate_loss(loss, mask, mode)
        micro = _micro_sum(lambda rows: loss[rows], mask, mode, cuts, perm)
        close(torch.as_tensor(micro, dtype=F64), full, tol=1e-12)


@pytest.mark.parametrize("mode", sorted(A.LOSS_AGGREGATIONS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_micro_batch_gradients_match_full_batch(mode, seed):
    g = torch.Generator().manual_seed(seed)
    b, t = 6, 5
    # a real per-token loss: PPO clipped surrogate of parameters standing in for log-probs
    theta = (0.3 * torch.randn(b, t, dtype=F64, generator=g)).requires_grad_()
    old = 0.3 * torch.randn(b, t, dtype=F64, generator=g)
    adv = torch.randn(b, t, dtype=F64, generator=g)
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[0, -1] = True  # the full batch is as long as T

    def make_loss(rows):
        return A.clipped_policy_loss(theta[rows], old[rows], adv[rows], mask[rows])[0]

    (full_grad,) = torch.autograd.grad(A.aggregate_loss(make_loss(torch.arange(b)), mask, mode), theta)
    micro = _micro_sum(make_loss, mask, mode, cuts=[1, 4], perm=torch.randperm(b, generator=g))
    (micro_grad,) = torch.autograd.grad(micro, theta)
    assert full_grad.abs().sum() > 0
    close(micro_grad, full_grad, tol=1e-12)


# ---------------------------------------------------------------------------------------------
# registries
# ---------------------------------------------------------------------------------------------


def test_registry_contents():
    assert set(A.ADVANTAGE_ESTIMATORS) == {"reinforce", "rloo", "grpo", "gae"}
    assert set(A.KL_ESTIMATORS) == {"k1", "k2", "k3", "abs", "k3+"}
    assert set(A.POLICY_LOSSES) == {"clipped", "vanilla"}
    assert set(A.LOSS_AGGREGATIONS) == {
        "token-mean",
        "seq-mean-token-mean",
        "seq-mean-token-sum",
        "seq-mean-token-sum-norm",
    }


@pytest.mark.parametrize(
    "getter,registry",
    [
        (A.get_advantage_estimator, A.ADVANTAGE_ESTIMATORS),
        (A.get_kl_estimator, A.KL_ESTIMATORS),
        (A.get_policy_loss, A.POLICY_LOSSES),
        (A.get_value_loss, A.VALUE_LOSSES),
        (A.get_loss_aggregation, A.LOSS_AGGREGATIONS),
    ],
)
def test_unknown_names_list_valid_ones(getter, registry):
    with pytest.raises(ValueError) as e:
        getter("nope")
    for name in registry:
        assert name in str(e.value)


@pytest.mark.parametrize("name", sorted(A.ADVANTAGE_ESTIMATORS))
def test_estimator_signatures_keyword_only_options(name):
    params = list(inspect.signature(A.get_advantage_estimator(name)).parameters.values())
    assert [p.name for p in params[:4]] == ["token_rewards", "response_mask", "group_ids", "values"]
    assert params[3].default is None
    for p in params[4:]:
        assert p.kind is inspect.Parameter.KEYWORD_ONLY, p
        assert p.default is not inspect.Parameter.empty
    assert not any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in params)


@pytest.mark.parametrize("name", sorted(A.POLICY_LOSSES))
def test_policy_loss_signatures_uniform(name):
    # the same four tensors first; options (only those a loss uses) are keyword-only and
    # named like the AlgorithmConfig fields the trainer passes by name
    from rl.config import AlgorithmConfig

    params = inspect.signature(A.get_policy_loss(name)).parameters
    assert list(params)[:4] == ["logprobs", "old_logprobs", "advantages", "response_mask"]
    options = list(params)[4:]
    assert all(params[k].kind is inspect.Parameter.KEYWORD_ONLY for k in options)
    assert all(hasattr(AlgorithmConfig(), k) for k in options)


def test_registration_rejects_catch_all_and_duplicates():
    with pytest.raises(TypeError):

        @A.register_advantage_estimator("bad")
        def bad(token_rewards, response_mask, group_ids, values=None, **kwargs):
            pass

    with pytest.raises(TypeError):

        @A.register_advantage_estimator("bad2")
        def bad2(token_rewards, response_mask, group_ids, values=None, gamma=1.0):
            pass

    with pytest.raises(ValueError):
        A.register_kl_estimator("k1")(lambda a, b: a)
    assert "bad" not in A.ADVANTAGE_ESTIMATORS and "bad2" not in A.ADVANTAGE_ESTIMATORS


# ----------------------------------------------------------------------------- rollout correction


@st.composite
def logprob_pairs(draw, max_b=3, max_t=8):
    """(trainer log-probs, engine log-probs, mask) with garbage at masked positions."""
    b, t = draw(st.integers(1, max_b)), draw(st.integers(1, max_t))
    lp = st.floats(-30, 0, allow_nan=False, width=32)
    mask = torch.tensor(draw(st.lists(st.booleans(), min_size=b * t, max_size=b * t))).view(b, t)
    old = torch.tensor(draw(st.lists(lp, min_size=b * t, max_size=b * t))).view(b, t)
    rollout = torch.tensor(draw(st.lists(lp, min_size=b * t, max_size=b * t))).view(b, t)
    rollout = torch.where(mask, rollout, torch.tensor(float("nan")))  # never read
    return old, rollout, mask


@settings(max_examples=60, deadline=None)
@given(logprob_pairs(), st.sampled_from(["token", "sequence"]), st.floats(1, 10))
def test_rollout_correction_weights_properties(pair, level, cap):
    old, rollout, mask = pair
    w = A.get_rollout_correction(level)(old, rollout, mask, cap=cap)
    assert w.shape == old.shape and not w.requires_grad
    assert (w[~mask] == 0).all()
    assert torch.isfinite(w).all() and (w[mask] > 0).all() and (w[mask] <= cap * (1 + 1e-6)).all()
    if level == "token":  # untruncated weights are exactly the ratio
        ratio = torch.exp(old.double() - rollout.double())
        below = mask & (ratio < cap * 0.999)
        close(w[below].double(), ratio[below], tol=1e-4 * ratio[below].abs().max().item() if below.any() else 0)
    else:  # one weight per sequence, the product of its token ratios, capped
        for i in range(len(w)):
            if mask[i].any():
                assert torch.allclose(w[i][mask[i]], w[i][mask[i]][0].expand(int(mask[i].sum())))
                log_prod = (old[i][mask[i]].double() - rollout[i][mask[i]].double()).sum()
                expect = math.exp(min(log_prod.item(), math.log(cap)))
                assert math.isclose(w[i][mask[i]][0].item(), expect, rel_tol=1e-4)


@given(logprob_pairs(), st.sampled_from(["token", "sequence"]))
@settings(max_examples=30, deadline=None)
def test_rollout_correction_is_one_when_engine_and_trainer_agree(pair, level):
    old, _, mask = pair
    w = A.get_rollout_correction(level)(old, old.clone(), mask, cap=2.0)
    assert (w[mask] == 1).all() and (w[~mask] == 0).all()
    m = A.rollout_mismatch(old, old.clone(), mask)
    assert m["abs_diff_sum"].item() == 0 and m["k3_sum"].item() == 0 and m["tokens"].item() == mask.sum()


def test_rollout_correction_caps_huge_mismatch_without_overflow():
    old = torch.tensor([[0.0, -0.1, 0.0]])
    rollout = torch.tensor([[-500.0, -0.1, -1e-3]])  # the engine thought token 0 nearly impossible
    mask = torch.tensor([[True, True, True]])
    tok = A.token_truncated_is(old, rollout, mask, cap=3.0)
    close(tok, torch.tensor([[3.0, 1.0, math.exp(1e-3)]]), tol=1e-6)
    seq = A.sequence_truncated_is(old, rollout, mask, cap=3.0)
    close(seq, torch.full((1, 3), 3.0), tol=1e-6)
    m = A.rollout_mismatch(old, rollout, mask)
    assert math.isclose(m["abs_diff_max"].item(), 500.0) and math.isclose(m["log_ratio_max"].item(), 500.0)
    assert torch.isfinite(m["k3_sum"]) and m["k3_sum"].item() > 0
    with pytest.raises(ValueError, match="cap must be >= 1"):
        A.token_truncated_is(old, rollout, mask, cap=0.5)
    with pytest.raises(ValueError, match="registered: \\['sequence', 'token'\\]"):
        A.get_rollout_correction("tokens")


def test_rollout_correction_weights_the_policy_gradient():
    """With weight w on a token, the loss gradient is w times the uncorrected one (w detached)."""
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    old = logp.detach().clone()
    adv = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    w = A.token_truncated_is(old, torch.tensor([[-1.5, -1.0]]), mask, cap=2.0)  # [1.65, 0.37]
    loss, _ = A.vanilla_policy_loss(logp, old, adv, mask)
    (g_plain,) = torch.autograd.grad(loss.sum(), logp, retain_graph=True)
    (g_weighted,) = torch.autograd.grad((loss * w).sum(), logp)
    close(g_weighted, g_plain * w, tol=1e-6)


# --- dynamic sampling --------------------------------------------------------------------------


@st.composite
def scored_groups(draw):
    """Rewards of several groups (some constant, some not), samples of a group contiguous."""
    n_groups = draw(st.integers(1, 8))
    size = draw(st.integers(1, 5))
    first = draw(st.integers(0, 1000))
    rewards, groups = [], []
    for g in range(n_groups):
        if draw(st.booleans()):
            rewards += [draw(st.sampled_from([0.0, 1.0, -0.2]))] * size
        else:
            rewards += [draw(st.sampled_from([0.0, 0.5, 1.0])) for _ in range(size)]
        groups += [first + 3 * g] * size
    return torch.tensor(rewards, dtype=torch.float64), torch.tensor(groups)


@given(scored_groups(), st.integers(0, 10))
def test_select_groups_keeps_whole_groups_informative_first(batch, keep):
    rewards, groups = batch
    informative = A.informative_groups(rewards, groups)
    for g, flag in informative.items():  # informative <=> the group's rewards are not all equal
        assert flag == (len(set(rewards[groups == g].tolist())) > 1)
    idx = A.select_groups(rewards, groups, keep)
    assert idx.tolist() == sorted(set(idx.tolist()))  # rollout order, no repeats
    chosen = set(groups[idx].tolist())
    assert len(chosen) == min(keep, len(informative))
    for g in chosen:  # whole groups only
        assert set(idx.tolist()) >= set(torch.nonzero(groups == g).flatten().tolist())
    n_informative = sum(informative.values())
    # no uninformative group is kept while an informative one is left out
    assert sum(informative[g] for g in chosen) == min(len(chosen), n_informative)
    assert torch.equal(idx, A.select_groups(rewards, groups, keep))  # deterministic


def test_select_groups_order_and_errors():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5, 0.0, 1.0])
    groups = torch.tensor([7, 7, 3, 3, 9, 9, 1, 1])
    assert A.informative_groups(rewards, groups) == {7: False, 3: True, 9: False, 1: True}
    assert A.select_groups(rewards, groups, 2).tolist() == [2, 3, 6, 7]
    assert A.select_groups(rewards, groups, 3).tolist() == [0, 1, 2, 3, 6, 7]  # then first-seen order
    assert A.informative_groups(torch.tensor([0.3]), torch.tensor([5])) == {5: False}
    with pytest.raises(ValueError, match="keep must be >= 0"):
        A.select_groups(rewards, groups, -1)

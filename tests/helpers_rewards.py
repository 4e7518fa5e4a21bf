"""Reward functions the tests plug in through 'helpers_rewards:<name>'."""

import math

CALLS = {"n": 0}


def digit_fraction(row, traj):
    """Fraction of digit characters: varies across random samples, so advantages are non-zero."""
    text = traj.response_text
    return sum(c.isdigit() for c in text) / max(1, len(text))


def raises_on_odd(row, traj):
    CALLS["n"] += 1
    if CALLS["n"] % 2:
        raise RuntimeError("deliberate failure")
    return 1.0


def returns_dict(row, traj):
    return {"score": 0.5, "length": float(len(traj.response_ids))}


def returns_nan(row, traj):
    return math.nan


def informative_on_even_answers(row, traj):
    """Differs within a group (alternating 0/1 by call) when the answer is even, else a constant 0.5:
    the groups of odd-answer prompts carry no advantage signal (dynamic-sampling tests)."""
    if int(row["answer"]) % 2:
        return 0.5
    CALLS["n"] += 1
    return float(CALLS["n"] % 2)


def word_jaccard_similarity(preds, refs):
    """A stand-in for a sentence-embedding similarity (no model load): the Jaccard of the word sets."""
    out = []
    for p, r in zip(preds, refs):
        a, b = set(p.split()), set(r.split())
        out.append(len(a & b) / len(a | b) if a | b else 0.0)
    return out

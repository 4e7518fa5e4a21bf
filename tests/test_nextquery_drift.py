"""envs.nextquery.drift against hand-computed cases, and the replay command on a tiny stream."""

import math

import pytest

from envs.nextquery.drift import (DriftConfig, DriftTrigger, drift_score, drift_terms, entropy_bits, jaccard,
                                  js_divergence, tag_distribution)
from rl.common import UserError

L2_3 = math.log2(3)


def ev(*tags, t=0):
    return {"item_id": "i", "title": " ".join(tags) or "untagged", "category": tags[0] if tags else "none",
            "brand": "", "tags": list(tags), "action": "click", "time": t}


def test_tag_distribution_one_unit_per_event():
    assert tag_distribution([ev("a", "b"), ev("a")]) == {"a": 0.75, "b": 0.25}
    assert tag_distribution([ev("a", "a")]) == {"a": 1.0}  # a repeated tag is one tag
    assert tag_distribution([]) == {} and tag_distribution([ev()]) == {}


def test_components_hand_computed():
    p, q = {"a": 0.5, "b": 0.5}, {"a": 1.0}
    assert entropy_bits(p) == pytest.approx(1.0) and entropy_bits(q) == 0.0
    assert jaccard(p, q) == 0.5
    # m = (0.75, 0.25): KL(p||m) = .5*log2(.5/.75) + .5*log2(.5/.25); KL(q||m) = log2(1/.75)
    js = 0.5 * (0.5 * math.log2(0.5 / 0.75) + 0.5 * 1.0) + 0.5 * math.log2(1 / 0.75)
    assert js_divergence(p, q) == pytest.approx(js) == pytest.approx(0.311278, abs=1e-6)
    assert js_divergence(q, p) == pytest.approx(js)  # symmetric
    t = drift_terms(p, q)
    assert t == pytest.approx({"dh": 1.0, "one_minus_jaccard": 0.5, "js": js})  # |dH| = 1 bit / log2(2 tags)
    assert drift_score(p, q) == pytest.approx(0.4 + 0.15 + 0.3 * js) == pytest.approx(0.643383, abs=1e-6)


def test_identical_disjoint_and_empty_windows():
    p = {"a": 0.25, "b": 0.75}
    assert drift_score(p, dict(p)) == pytest.approx(0.0, abs=1e-12)
    # disjoint, equally spread: 1 - J = 1, JS = 1, dH = 0 -> 0.6: does not fire at 0.8
    assert drift_score({"a": 0.5, "b": 0.5}, {"c": 0.5, "d": 0.5}) == pytest.approx(0.6)
    # disjoint and the interest narrows: dH = 1 bit / log2(3 tags)
    assert drift_score({"a": 0.5, "b": 0.5}, {"c": 1.0}) == pytest.approx(0.4 / L2_3 + 0.6)
    assert drift_score({}, {}) == 0.0
    # one empty: all mass moved; dH = H(other) / log2(|union|)
    assert drift_terms({}, {"a": 0.5, "b": 0.5}) == pytest.approx({"dh": 1.0, "one_minus_jaccard": 1.0, "js": 1.0})
    assert drift_terms({"a": 1.0}, {}) == pytest.approx({"dh": 0.0, "one_minus_jaccard": 1.0, "js": 1.0})
    cfg = DriftConfig(w_h=1.0, w_j=0.0, w_js=0.0)
    assert drift_score({"a": 0.5, "b": 0.5}, {"a": 1.0}, cfg) == pytest.approx(1.0)  # weights are used


def test_trigger_previous_windows():
    trig = DriftTrigger(window=2)
    seq = [ev("x"), ev("x"), ev("x"), ev("x"), ev("y", "z"), ev("w")]
    fires = [trig.update(e) for e in seq]
    # event 1: cold start; 2-4: under 2*window events or no change; 6: {y .25, z .25, w .5} vs {x}
    assert fires == [True, False, False, False, False, True]
    assert trig.last_drift == pytest.approx(0.4 * 1.5 / 2 + 0.6)  # H 1.5 bits vs 0, 4 tags, disjoint
    trig2 = DriftTrigger(window=2)
    for e in seq[:5]:
        trig2.update(e)
    # event 5: previous {x} vs current {x .5, y .25, z .25}
    p, q = {"x": 1.0}, {"x": 0.5, "y": 0.25, "z": 0.25}
    assert trig2.last_drift == pytest.approx(drift_score(q, p))
    expected = 0.4 * 1.5 / L2_3 + 0.3 * (2 / 3) + 0.3 * js_divergence(p, q)
    assert trig2.last_drift == pytest.approx(expected) == pytest.approx(0.671938, abs=1e-5)
    assert trig.n_fires == 2 and trig.n_events == 6


def test_trigger_last_fire_reference_and_cache():
    seq = [ev("x"), ev("x"), ev("y"), ev("y"), ev("y"), ev("y")]
    prev = DriftTrigger(window=2, threshold=0.5)
    assert [prev.update(e) for e in seq] == [True, False, False, True, True, False]  # 0.6 then 0.643, then 0
    last = DriftTrigger(window=2, threshold=0.5, reference="last_fire")
    # e3: {x .5, y .5} vs the cold-start window {x}: 0.643 fires; e4: {y} vs {x .5, y .5}: 0.643 fires
    assert [last.update(e) for e in seq] == [True, False, True, True, False, False]
    last.store("tent pegs")
    assert last.cached == "tent pegs"
    assert not last.update(ev("y")) and last.cached == "tent pegs"


def test_config_errors():
    with pytest.raises(UserError, match="reference 'prev'"):
        DriftConfig(reference="prev")
    with pytest.raises(UserError, match="window must be >= 1"):
        DriftConfig(window=0)
    with pytest.raises(UserError, match="not both"):
        DriftTrigger(DriftConfig(), window=3)

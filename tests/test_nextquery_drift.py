"""envs.nextquery.drift against hand-computed cases, and the replay command on a tiny stream."""

import json
import math

import pytest

from envs.nextquery.drift import (DriftConfig, DriftTrigger, drift_score, drift_terms, entropy_bits, jaccard,
                                  js_divergence, tag_distribution)
from envs.nextquery import replay as rp
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
    # dh_norm="bits": the raw entropy difference (1.5 bits here), unbounded
    assert drift_terms({"a": 0.5, "b": 0.25, "c": 0.25}, {"d": 1.0}, "bits")["dh"] == pytest.approx(1.5)
    assert drift_score({"a": 0.5, "b": 0.25, "c": 0.25}, {"d": 1.0}, DriftConfig(dh_norm="bits")) == pytest.approx(1.2)
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
    with pytest.raises(UserError, match="dh_norm 'nats'"):
        DriftConfig(dh_norm="nats")
    with pytest.raises(UserError, match="window must be >= 1"):
        DriftConfig(window=0)
    with pytest.raises(UserError, match="not both"):
        DriftTrigger(DriftConfig(), window=3)


def _stream(user, topics, queries):
    events = []
    for i, topic in enumerate(topics):
        events.append({"item_id": f"{user}{i}", "title": f"{topic} item {i}", "category": topic, "brand": "",
                       "tags": [topic] if topic != "sock" else [topic, f"colour{i}"], "action": "click", "time": 1000 + 60 * i})
    return {"user_id": user, "events": events, "queries": queries}


def test_replay_last_title(tmp_path):
    # u1: 6 tents (one tag), then 6 socks in varied colours; the trigger (window 3) fires on event 0 and
    # when socks fill the window (the interest moves AND widens: 0.6 + 0.4*|dH| > 0.8; a switch between two
    # equally spread interests would score 0.6 and not fire, see envs/nextquery/drift.py)
    s1 = _stream("u1", ["tent"] * 6 + ["sock"] * 6, [
        {"after_event": 5, "time": 1400, "query": "tent item 5", "next_items": []},
        {"after_event": 9, "time": 1600, "query": "sock item 9", "next_items": []},
        {"after_event": 11, "time": 1800, "query": "sock item 11", "next_items": []}])
    s2 = _stream("u2", ["stove"] * 4, [{"after_event": 3, "time": 1300, "query": "stove item 3", "next_items": []}])
    path = tmp_path / "streams_test.jsonl"
    path.write_text("\n".join(json.dumps(s) for s in (s1, s2)) + "\n")
    out = tmp_path / "replay.json"
    assert rp.main(["--streams", str(path), "--window", "3", "--no-emb-sim", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    trig = DriftTrigger(window=3)
    fires1 = [i for i, e in enumerate(s1["events"]) if trig.update(e)]
    assert fires1[0] == 0 and 8 in fires1 and all(f >= 8 for f in fires1[1:])  # socks fill the window at 8
    assert rep["n_events"] == 16 and rep["n_queries"] == 4 and rep["n_fires"] == len(fires1) + 1
    assert rep["trigger_rate"] == pytest.approx((len(fires1) + 1) / 16)
    # always-on serves the last title at each query point: all 4 exact
    assert rep["always_on"] == {"em": 1.0, "f1": 1.0}
    # trigger: query 1 served from event 0 ("tent item 0": f1 2/3), query 2 from the latest fire <= 9,
    # query 3 from the latest fire <= 11, u2 from event 0 ("stove item 0" vs "stove item 3")
    served = [0, max(f for f in fires1 if f <= 9), max(f for f in fires1 if f <= 11)]
    assert rep["cache_hit_rate"] == pytest.approx((sum(f < a for f, a in zip(served, [5, 9, 11])) + 1) / 4)
    em = (sum(f == a for f, a in zip(served, [5, 9, 11])) + 0) / 4
    assert rep["trigger"]["em"] == pytest.approx(em)
    assert rep["retained"]["em"] == pytest.approx(em)


def test_replay_with_a_callable_and_errors(tmp_path):
    s = _stream("u1", ["tent"] * 4, [{"after_event": 3, "time": 1300, "query": "tent", "next_items": []}])
    seen = []

    def predictor(rows):
        seen.extend(rows)
        return ["tent"] * len(rows)

    rep = rp.replay([s], predictor, DriftConfig(window=2), emb_sim=False)
    assert rep["trigger"]["em"] == 1.0 and rep["cache_hit_rate"] == 1.0 and rep["n_fires"] == 1
    assert [r["id"] for r in seen] == ["u1-e0", "u1-e3"]  # the serving fire and the always-on point, once each
    assert seen[1]["time"] == 1180 and len(seen[1]["history"]) == 4
    # the periodic control runs as often (1 fire in 4 events: every 4th event, i.e. event 0 here)
    assert rep["periodic"]["period_events"] == 4 and rep["periodic"]["trigger_rate"] == 0.25
    assert rep["periodic"]["quality"] == {"em": 1.0, "f1": 1.0}
    mixed = _stream("u2", ["tent", "sock", "tent", "sock"], s["queries"])
    sweep = rp.replay_many([mixed], predictor, [DriftConfig(window=2, reference="last_fire", threshold=t)
                                                for t in (0.8, 0.0)], emb_sim=False)
    # threshold 0, against the last fire's window: e0 (cold start), e1 ({tent, sock, colour1} vs {tent}),
    # not e2 (the same window as e1's), e3 (colour3 instead of colour1)
    assert [r["n_fires"] for r in sweep] == [1, 3] and [r["config"]["threshold"] for r in sweep] == [0.8, 0.0]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"user_id": "u", "events": s["events"], "queries": [
        {"after_event": 9, "time": 2000, "query": "q", "next_items": []}]}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl.*after_event.*9 is not an index into the 4 events"):
        rp.load_streams(bad)
    assert rp.main(["--streams", str(tmp_path / "none.jsonl"), "--no-emb-sim"]) == 2
    from envs.nextquery.__main__ import main as nextquery_main

    out = tmp_path / "r.json"
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps(s) + "\n")
    assert nextquery_main(["replay", "--streams", str(good), "--window", "2", "--no-emb-sim", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["n_fires"] == 1
    assert nextquery_main(["replay", "--streams", str(good), "--predictor", "recent-category-attribute", "--no-emb-sim",
                           "--thresholds", "0.8", "0.1", "--out", str(out)]) == 0
    sweep = json.loads(out.read_text())["sweep"]
    assert [r["predictor"] for r in sweep] == ["recent-category-attribute"] * 2
    assert sweep[0]["always_on"]["f1"] == 1.0  # the category "tent" (no attribute tags) = the query
    assert rp.main(["--streams", str(good), "--no-emb-sim", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["always_on"]["f1"] == 0.5  # last-title: "tent item 3" vs "tent"

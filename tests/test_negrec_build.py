"""`python -m envs.negrec build` end to end on a small random ratings table (no MiniLM, no download):
the files the recipes, the eval agent and the benchmark read, and their consistency."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest

from envs.negrec.__main__ import main
from envs.negrec.build import BuildConfig, build
from envs.negrec.data import load_tables
from rl.common import read_jsonl

GENRES = ["Drama", "Comedy", "Horror", "Action", "Romance"]


class HashEncoder:
    """A deterministic stand-in for the sentence model: one random unit vector per text."""

    def encode(self, texts, **kwargs):
        out = np.stack([np.random.default_rng(zlib.crc32(t.encode())).normal(size=24) for t in texts])
        return out.astype(np.float32)


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    d = tmp_path_factory.mktemp("negrec_tables")
    rng = np.random.default_rng(0)
    n_items, n_users = 60, 30
    items = ["item,title,year,genres"] + [
        f"{i},Movie {i},{1980 + i % 20},{GENRES[i % 5]}|{GENRES[(i * 3) % 5]}" for i in range(1, n_items + 1)]
    rows = ["user,item,rating,timestamp"]
    for u in range(1, n_users + 1):
        seen = rng.choice(np.arange(1, n_items + 1), size=int(rng.integers(12, 30)), replace=False)
        t0 = 1_000_000 + int(rng.integers(0, 40)) * 86400
        for j, i in enumerate(seen):
            rows.append(f"{u},{i},{int(rng.integers(1, 6))},{t0 + j * 3600 * int(rng.integers(1, 30))}")
    (d / "items.csv").write_text("\n".join(items) + "\n")
    (d / "ratings.csv").write_text("\n".join(rows) + "\n")
    return d


@pytest.fixture(scope="module")
def built(tables, tmp_path_factory):
    out = tmp_path_factory.mktemp("negrec_build")
    data = load_tables(tables / "ratings.csv", tables / "items.csv")
    cfg = BuildConfig(codebook_size=4, gts_neighbours=2, sft_alignment_rows=20)
    stats = build(data, out, cfg, encoder=HashEncoder(), log=lambda *_: None)
    return out, stats


def test_files_are_consistent(built):
    out, stats = built
    items = read_jsonl(out / "items.jsonl")
    sids = (out / "sids.txt").read_text().splitlines()
    assert [r["sid"] for r in items] == sids and len(set(sids)) == len(sids) == 60  # one SID per item
    emb = np.load(out / "sid_embeddings.npy")
    assert emb.shape[0] == len(items) and emb.dtype == np.float32
    tokens = {r["token"] for r in read_jsonl(out / "sid_tokens.jsonl")}
    for sid in sids:  # every SID is made of added tokens only
        parts = sid.replace("><", ">\n<").split("\n")
        assert len(parts) == 3 and set(parts) <= tokens
    known = {r["item"] for r in items}
    sid_of = {r["item"]: r["sid"] for r in items}
    for split in ("train", "valid", "test"):
        rows = read_jsonl(out / "examples" / f"{split}.jsonl")
        assert len(rows) == stats["examples"][split] > 0
        for r in rows:
            assert r["split"] == split
            assert r["gts"][: len(r["future_negatives"])] == r["future_negatives"]  # future negatives first
            assert set(r["gts"]) <= known and set(r["long_tail_items"]) <= set(r["future_negatives"])
            assert all(h["sid"] == sid_of[h["item"]] for h in r["negatives"] + r["positives"])
    sft = read_jsonl(out / "sft" / "train.jsonl")
    assert {r["task"] for r in sft} == {"sid2title", "title2sid", "alignment"}
    assert sum(r["task"] == "sid2title" for r in sft) == 60
    assert all(r["messages"][-1]["role"] == "assistant" for r in sft)
    board = read_jsonl(out / "baselines.jsonl")
    labels = {r["model"] for r in board}
    assert labels == {"random (seed 0)", "random (seed 1)", "neg_popularity", "co_negative_knn"}
    assert {r["dataset"] for r in board} == {"valid", "test"}
    assert all(r["invalid_rate"] == 0 for r in board)
    saved = json.loads((out / "stats.json").read_text())
    assert saved["sid"]["collision_rate_after"] == 0.0 and saved["examples"] == stats["examples"]


def test_cli_refuses_to_overwrite_a_build(built, tables, capsys):
    out, _ = built
    assert main(["build", "--out", str(out), "--interactions", str(tables / "ratings.csv")]) == 2
    assert "already holds a build" in capsys.readouterr().err
    assert main(["build", "--out", str(out / "new"), "--interactions", str(tables / "ratings.csv")]) == 2
    assert "--interactions and --items go together" in capsys.readouterr().err

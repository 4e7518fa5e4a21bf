"""Real behaviour, rule-written targets: MovieLens-100k sequences as next-query rows.

MovieLens has real, timestamped behaviour but **no search queries**. The "query" of a row here is
written by a fixed rule from the attributes of the movies the user rated positively next; it is a
next-interest label, not anything a user typed (docs/nextquery.md says so next to every number).

Data: `envs.common.interactions` (the loader and the MovieLens-100k fetch the negrec paper uses too):
943 users, 1,682 movies, 100,000 ratings with timestamps.

Mapping (documented in docs/nextquery.md):
* item -> catalogue item: title ``"Toy Story (1995)"``, category = the first genre (as a query word,
  below; ``movie`` for a film with no known genre), brand ``""``, attributes ``{"decade": "90s"}`` (absent when the year is unknown), tags = the
  genre words + the decade.
* rating -> action (engagement grows with the rating): 1-2 ``click`` (watched, disliked), 3 ``cart``,
  4 ``favorite``, 5 ``purchase``. A positive is a rating >= 4.
* genre words: lowercase, ``Sci-Fi`` -> ``sci-fi``, ``Film-Noir`` -> ``film noir``, ``Children's`` ->
  ``children's``; the genre ``unknown`` is dropped.
* split: per user by time (as envs/negrec): the last 10% of a user's ratings are test, the 10% before
  valid, the rest train (ties in time keep the loader's order: time, then item id).
* example rows: a query point p in a split's portion; history = the (at most 20) ratings before p (any
  split: the past is no leak), time = the time of rating p; next_items = the first (at most 3) positives
  among ratings p .. p+9 **of the same split**; a point with no such positive is skipped (counted in
  `stats`). Train: every `train_stride`-th position of the train portion (from the 5th); valid / test:
  the first position of that portion (one row per user).
* the query rule: over the next items, each genre scores (count) x idf, idf = ln(n movies / n movies of
  the genre), so a specific genre (sci-fi) beats the ubiquitous drama at equal counts (ties: the first
  genre of the first next item); the decade is added when at least half of the next items share it:
  ``"90s sci-fi movies"``, else ``"sci-fi movies"``.
* streams (the drift-trigger replay): users whose valid + test portions hold at least 10 ratings, the
  first `n_streams` of them in a seeded order; events = those ratings; a query after every 5th event
  (from the same rule over the positives among the next 10 events of the stream; none -> no query).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import asdict, dataclass, field

from envs.common.interactions import RecData

__all__ = ["MovieLensConfig", "action_of", "build_movielens", "genre_word", "query_for"]

ACTION_OF_RATING = {1: "click", 2: "click", 3: "cart", 4: "favorite", 5: "purchase"}
POSITIVE = 4.0


@dataclass
class MovieLensConfig:
    history_len: int = 20
    next_k: int = 3  # next items per row (positives)
    lookahead: int = 10  # ratings after the query point searched for them
    train_stride: int = 15  # one train row every N positions (~5k rows on ML-100k)
    valid_share: float = 0.1
    test_share: float = 0.1
    n_streams: int = 100
    stream_every: int = 5
    seed: int = 0
    stats: dict = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("stats")
        return d


def action_of(rating: float) -> str:
    """1-2 click, 3 cart, 4 favorite, 5 purchase (half stars round down)."""
    r = min(5, max(1, int(rating)))
    return ACTION_OF_RATING[r]


def genre_word(genre: str) -> str:
    return genre.lower().replace("film-noir", "film noir")


def _decade(year: str) -> str:
    if not year or not year.isdigit():
        return ""
    y = int(year)
    return f"{y // 10 * 10}s" if y >= 2000 else f"{y % 100 // 10 * 10:02d}s"


def make_items(data: RecData) -> list[dict]:
    items = []
    for r in data.items.to_dict("records"):
        genres = [genre_word(g) for g in (r.get("genres") or []) if g.lower() != "unknown"]
        decade = _decade(str(r.get("year") or ""))
        title = f"{r['title']} ({r['year']})" if r.get("year") else r["title"]
        items.append({
            "item_id": str(r["item"]), "title": title, "category": genres[0] if genres else "movie", "brand": "",
            "attributes": {"decade": decade} if decade else {}, "tags": genres + ([decade] if decade else []),
            "genres": genres, "decade": decade,
        })  # fmt: skip
    return items


def query_for(next_items: list[dict], idf: dict[str, float]) -> str:
    """The rule-written query of a list of catalogue items (module docstring)."""
    counts: Counter = Counter()
    order: list[str] = []
    for it in next_items:
        for g in it["genres"]:
            counts[g] += 1
            if g not in order:
                order.append(g)
    if counts:
        genre = max(order, key=lambda g: (counts[g] * idf.get(g, 1.0), -order.index(g)))
    else:
        genre = ""
    decades = Counter(it["decade"] for it in next_items if it["decade"])
    decade = ""
    if decades:
        d, n = decades.most_common(1)[0]
        if 2 * n >= len(next_items):
            decade = d
    return " ".join(w for w in (decade, genre, "movies") if w)


def _event(item: dict, rating: float, t: float) -> dict:
    return {"item_id": item["item_id"], "title": item["title"], "category": item["category"], "brand": "",
            "tags": list(item["tags"]), "action": action_of(rating), "time": int(t)}


def build_movielens(data: RecData, cfg: MovieLensConfig | None = None) -> dict:
    """`{"catalog", "train", "valid", "test", "streams", "stats"}` from MovieLens-style data."""
    cfg = cfg or MovieLensConfig()
    items = make_items(data)
    by_id = {it["item_id"]: it for it in items}
    n = len(items)
    genre_n = Counter(g for it in items for g in set(it["genres"]))
    idf = {g: math.log(n / c) for g, c in genre_n.items()}
    out: dict = {"catalog": [{k: v for k, v in it.items() if k not in ("genres", "decade")} for it in items],
                 "train": [], "valid": [], "test": [], "streams": []}
    skipped = Counter()
    stream_users = []
    inter = data.interactions
    for user, g in inter.groupby("user", sort=True):
        seq = list(zip(g["item"].astype(str), g["rating"].astype(float), g["timestamp"].astype(float)))
        events = [_event(by_id[i], r, t) for i, r, t in seq]
        m = len(seq)
        n_test = max(1, round(cfg.test_share * m))
        n_valid = max(1, round(cfg.valid_share * m))
        bounds = {"train": (0, m - n_test - n_valid), "valid": (m - n_test - n_valid, m - n_test), "test": (m - n_test, m)}

        def row(p: int, split: str, lo: int, hi: int) -> dict | None:
            nxt = [by_id[seq[j][0]] for j in range(p, min(hi, p + cfg.lookahead)) if seq[j][1] >= POSITIVE]
            nxt = nxt[: cfg.next_k]
            if not nxt or p == 0:
                skipped[split] += 1
                return None
            return {
                "id": f"ml-u{user}-p{p}", "user_id": f"u{user}", "time": int(seq[p][2]),
                "history": [dict(e) for e in events[max(0, p - cfg.history_len):p]],
                "query": query_for(nxt, idf), "next_items": [it["item_id"] for it in nxt],
                "source": "movielens", "target_kind": "behaviour", "intent": {},
            }  # fmt: skip

        lo, hi = bounds["train"]
        for p in range(max(lo, 5), hi, cfg.train_stride):
            r = row(p, "train", lo, hi)
            if r:
                out["train"].append(r)
        for split in ("valid", "test"):
            lo, hi = bounds[split]
            r = row(lo, split, lo, hi)
            if r:
                out[split].append(r)
        s_lo = bounds["valid"][0]
        if m - s_lo >= 10:
            stream_users.append((f"u{user}", seq[s_lo:], events[s_lo:]))
    random.Random(cfg.seed).shuffle(stream_users)
    for uid, seq, events in stream_users[: cfg.n_streams]:
        queries = []
        for i in range(cfg.stream_every - 1, len(events) - 1, cfg.stream_every):
            nxt = [by_id[seq[j][0]] for j in range(i + 1, min(len(seq), i + 1 + cfg.lookahead)) if seq[j][1] >= POSITIVE]
            nxt = nxt[: cfg.next_k]
            if nxt:
                queries.append({"after_event": i, "time": int(seq[i][2]), "query": query_for(nxt, idf),
                                "next_items": [it["item_id"] for it in nxt]})
        out["streams"].append({"user_id": uid, "events": [dict(e) for e in events], "queries": queries})
    out["stats"] = {"skipped_no_positive_next": dict(skipped), "stream_candidates": len(stream_users),
                    "action_of_rating": ACTION_OF_RATING, "config": cfg.to_dict()}
    return out

"""Negative-feedback data for CoNRec: labels, the chronological split, the long tail, example rows.

The interaction tables come from `envs.common.interactions` (RecBole atomic files, plain tables, the
MovieLens-100k fetch), re-exported here.

`prepare(data, cfg)` adds, per interaction:

* ``label``: ``neg`` if rating <= ``negative_max_rating`` (2), ``pos`` if rating >=
  ``positive_min_rating`` (4), else ``neutral``;
* ``day``: ``floor((timestamp - min timestamp of the whole table) / 86400)``;
* ``pos``: the 0-based index in the user's time order (ties of timestamp broken by item id, so the
  order and everything below is deterministic);
* ``split``, chronological per user: with ``n`` interactions, the last ``ceil(test_frac * n)`` are
  ``test``, the ``ceil(valid_frac * n)`` before them ``valid``, the rest ``train``; a user with fewer
  than 3 interactions is all ``train``; a user with 3 or more always keeps at least one train
  interaction (and gets at least one test / valid interaction when that fraction is > 0). Train
  precedes valid precedes test in every user's own time line, so no split sees a later one.

`long_tail(prepared, cfg)` (from TRAIN rows only):

* long-tail items: every item of the table that is not in the head. The head (Pareto rule) is the
  top ``long_tail_item_head`` (20%) of the table's items by train interaction count: the items whose
  train count is at least the count of the ``round(0.2 * n_items)``-th most interacted item (ties at
  the cut all join the head, so the rule does not depend on how ids sort); an item with no train
  interaction is never in the head.
* long-tail users: users whose train interaction count is <= the ``long_tail_user_quantile`` (20%)
  quantile (numpy's linear interpolation) of the users' train counts.

`build_examples(prepared, cfg, split)` makes one example per anchor (a negative of `split`):
train anchors are all train negatives with at least ``min_history_negatives`` earlier negatives;
valid / test have one anchor per user, the first negative of the user's valid / test portion
(users without one are skipped and counted in the returned list's ``.stats``). The row's history
(``negatives``, ``positives``) is everything of the user strictly before the anchor (any split: the
past is never a leak); its future (``future_negatives``, ``future_positives``: the anchor and later
interactions with ``day <= anchor_day + window_days``) only comes from the anchor's own split, so
train rewards never see valid / test interactions.

Candidates (Cand.Acc; the paper picks the true negative among ~20 same-day *exposures*, which
MovieLens does not record): the true negative plus ``n_candidates - 1`` distractors, taken in order
from

1. the user's own non-negative interactions (rating > ``negative_max_rating``) with
   ``|day - anchor_day| <= window_days``, nearest in time first: items the user chose to watch in
   the same period and did not dislike (the closest thing to an exposure that was not rejected).
   Only interactions of the anchor's split or an earlier one are used, so a train row never names
   the user's valid / test items;
2. if too few, items other users interacted with in those same days that this user never rated,
   drawn without replacement with probability proportional to their interaction count in the window
   (what was on screens at the time);
3. if still too few (a tiny table), items of the whole table the user never rated, proportional to
   their total count, and then the user's own non-negatives of other days (same split rule as 1),
   nearest in time first.

Never an item the user rated negatively at any time. Draws and the final order (the true negative
at a random position) come from a generator seeded by ``(cfg.seed, crc32(user), anchor_pos)``, so
examples are deterministic and independent of which other users are in the table.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np
import pandas as pd

from envs.common.interactions import (  # noqa: F401  (re-exported: the loaders are part of this module's API)
    MOVIELENS_PACKAGE,
    SECONDS_PER_DAY,
    MovieLensFetchError,
    RecData,
    RecDataError,
    fetch_movielens_100k,
    load_recbole,
    load_tables,
    movielens_dir,
)

__all__ = [
    "Examples",
    "FeedbackConfig",
    "MOVIELENS_PACKAGE",
    "RecData",
    "RecDataError",
    "build_examples",
    "fetch_movielens_100k",
    "load_recbole",
    "load_tables",
    "long_tail",
    "movielens_dir",
    "prepare",
    "summary",
]

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- labels and split


@dataclass
class FeedbackConfig:
    """What counts as negative / positive feedback, the split, the windows and the candidates (recipe
    keys of the negrec data section; see the module docstring for each rule)."""

    negative_max_rating: float = 2.0
    positive_min_rating: float = 4.0
    valid_frac: float = 0.1  # per user, by time: the fractions before the test part
    test_frac: float = 0.1  # per user, by time: the last fraction
    window_days: int = 7  # future window for FHR / rewards, and the +- window of candidates
    n_candidates: int = 20
    long_tail_user_quantile: float = 0.2
    long_tail_item_head: float = 0.2
    min_history_negatives: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> RecDataError:
            return RecDataError(f"FeedbackConfig: {key}={getattr(self, key)!r}: {why}")

        if not self.negative_max_rating < self.positive_min_rating:
            raise bad("negative_max_rating", f"must be below positive_min_rating={self.positive_min_rating!r}")
        for key in ("valid_frac", "test_frac"):
            if not 0 <= getattr(self, key) < 1:
                raise bad(key, "must be in [0, 1)")
        if self.valid_frac + self.test_frac >= 1:
            raise bad("test_frac", f"valid_frac + test_frac must be < 1 (got {self.valid_frac + self.test_frac})")
        if self.window_days < 0:
            raise bad("window_days", "must be >= 0")
        if self.n_candidates < 1:
            raise bad("n_candidates", "must be >= 1")
        for key in ("long_tail_user_quantile", "long_tail_item_head"):
            if not 0 <= getattr(self, key) <= 1:
                raise bad(key, "must be in [0, 1]")
        if self.min_history_negatives < 0:
            raise bad("min_history_negatives", "must be >= 0")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "FeedbackConfig":
        """From a recipe section; an unknown key is an error listing the known ones."""
        d = dict(d or {})
        known = set(asdict(cls()))
        unknown = sorted(set(d) - known)
        if unknown:
            raise RecDataError(f"negrec data config: unknown key {unknown[0]!r} (known: {sorted(known)})")
        return cls(**d)


def _split_counts(n: np.ndarray, frac: float) -> np.ndarray:
    # the epsilon keeps ceil(0.1 * 30) at 3 (0.1 * 30 = 3.0000000000000004 in floats)
    k = np.ceil(frac * n - 1e-9).astype(np.int64)
    return np.where((n >= 3) & (frac > 0), np.maximum(k, 1), 0)


def prepare(data: RecData, cfg: FeedbackConfig | None = None) -> pd.DataFrame:
    """The interactions with ``day``, ``label``, ``split`` and ``pos`` added (rules: module
    docstring), sorted by (user, pos)."""
    cfg = cfg or FeedbackConfig()
    inter = data.interactions
    for col in ("user", "item", "rating", "timestamp"):
        if col not in inter.columns:
            raise RecDataError(f"RecData.interactions: missing column {col!r} (columns: {list(inter.columns)})")
    if len(inter) == 0:
        raise RecDataError("RecData.interactions: no interactions")
    df = inter.sort_values(["user", "timestamp", "item"], kind="mergesort").reset_index(drop=True)
    ts = df["timestamp"].to_numpy(dtype=float)
    df["day"] = np.floor((ts - ts.min()) / SECONDS_PER_DAY).astype(np.int64)
    rating = df["rating"].to_numpy(dtype=float)
    df["label"] = np.where(rating <= cfg.negative_max_rating, "neg",
                           np.where(rating >= cfg.positive_min_rating, "pos", "neutral"))
    g = df.groupby("user", sort=False)
    pos = g.cumcount().to_numpy()
    n = g["item"].transform("size").to_numpy()
    n_test = _split_counts(n, cfg.test_frac)
    n_valid = _split_counts(n, cfg.valid_frac)
    # keep one train interaction: shrink valid first, then test (only reachable with large fractions)
    over = np.maximum(n_test + n_valid - (n - 1), 0) * (n >= 3)
    cut = np.minimum(over, n_valid)
    n_valid -= cut
    n_test -= over - cut
    split = np.full(len(df), "train", dtype=object)
    split[pos >= n - n_test - n_valid] = "valid"
    split[pos >= n - n_test] = "test"
    df["split"] = split
    df["pos"] = pos.astype(np.int64)
    return df


def long_tail(prepared: pd.DataFrame, cfg: FeedbackConfig | None = None) -> tuple[set[str], set[str]]:
    """(long-tail users, long-tail items), from train rows only (rules: module docstring)."""
    cfg = cfg or FeedbackConfig()
    train = prepared[prepared["split"] == "train"]
    items = pd.Index(prepared["item"].unique())
    counts = train["item"].value_counts().reindex(items, fill_value=0)
    n_head = int(round(cfg.long_tail_item_head * len(items)))
    if n_head > 0:
        cutoff = int(counts.sort_values(ascending=False, kind="mergesort").iloc[n_head - 1])
        head = set(counts.index[(counts >= max(cutoff, 1)).to_numpy()])
    else:
        head = set()
    lt_items = {str(i) for i in items if i not in head}
    users = pd.Index(prepared["user"].unique())
    ucounts = train["user"].value_counts().reindex(users, fill_value=0)
    q = float(np.quantile(ucounts.to_numpy(dtype=float), cfg.long_tail_user_quantile))
    lt_users = {str(u) for u in ucounts.index[(ucounts.to_numpy() <= q)]}
    return lt_users, lt_items


# ----------------------------------------------------------------------------- examples


class Examples(list):
    """The example rows (a plain list) with ``.stats``: counts of what was built and skipped."""

    stats: dict[str, Any]


_SPLIT_RANK = {"train": 0, "valid": 1, "test": 2}


class _WindowCounts:
    """Interaction counts per item over ``[day - w, day + w]``, for any day (cached per day)."""

    def __init__(self, days: np.ndarray, codes: np.ndarray, n_items: int, w: int):
        order = np.argsort(days, kind="mergesort")
        self.days, self.codes, self.n, self.w = days[order], codes[order], n_items, w
        self.cache: dict[int, np.ndarray] = {}
        self.total = np.bincount(codes, minlength=n_items).astype(float)

    def __call__(self, day: int) -> np.ndarray:
        c = self.cache.get(day)
        if c is None:
            lo = np.searchsorted(self.days, day - self.w, side="left")
            hi = np.searchsorted(self.days, day + self.w, side="right")
            c = np.bincount(self.codes[lo:hi], minlength=self.n).astype(float)
            self.cache[day] = c
        return c


def _draw(rng: np.random.Generator, weights: np.ndarray, k: int) -> np.ndarray:
    nz = int(np.count_nonzero(weights))
    k = min(k, nz)
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    return rng.choice(len(weights), size=k, replace=False, p=weights / weights.sum())


def _codes(items: set[str], index: pd.Index) -> np.ndarray:
    codes = index.get_indexer(list(items))
    return codes[codes >= 0]


def build_examples(
    prepared: pd.DataFrame,
    cfg: FeedbackConfig | None = None,
    split: str = "train",
    *,
    sid_of: Mapping[str, str] | None = None,
) -> Examples:
    """Example rows of `split` (one per anchor negative; fields in docs / the module docstring).

    Returns an `Examples` list whose ``.stats`` counts examples, users without an anchor (train: no
    negative with enough earlier negatives), anchors without negative history, and candidate lists filled from each source."""
    cfg = cfg or FeedbackConfig()
    if split not in _SPLIT_RANK:
        raise RecDataError(f"build_examples: split {split!r} is not one of {list(_SPLIT_RANK)}")
    for col in ("user", "item", "timestamp", "day", "label", "split", "pos"):
        if col not in prepared.columns:
            raise RecDataError(f"build_examples: column {col!r} missing: pass the output of prepare()")
    lt_users, _ = long_tail(prepared, cfg)

    item_index = pd.Index(pd.unique(prepared["item"]))
    item_names = item_index.to_numpy()
    codes_all = item_index.get_indexer(prepared["item"])
    window = _WindowCounts(prepared["day"].to_numpy(), codes_all, len(item_index), cfg.window_days)

    def sid(item: str) -> str:
        if sid_of is None:
            return ""
        try:
            return sid_of[item]
        except KeyError:
            raise RecDataError(f"build_examples: item {item!r} has no semantic id in sid_of") from None

    sid_cache: dict[str, str] = {}

    def entry(item: str, day: int) -> dict:
        s = sid_cache.get(item)
        if s is None:
            s = sid_cache[item] = sid(item)
        return {"item": item, "sid": s, "day": day}

    rank = _SPLIT_RANK[split]
    need = cfg.n_candidates - 1
    out = Examples()
    stats = {"split": split, "n_examples": 0, "n_users": 0, "users_without_anchor": 0,
             "anchors_without_negative_history": 0, "candidates_from_own": 0, "candidates_from_window": 0,
             "candidates_from_table": 0, "candidates_short": 0}
    cols = ["user", "item", "timestamp", "day", "label", "split", "pos", "rating"]
    for user, g in prepared[cols].groupby("user", sort=True):
        user = str(user)
        stats["n_users"] += 1
        items = g["item"].to_numpy()
        ts = g["timestamp"].to_numpy(dtype=float)
        days = g["day"].to_numpy()
        labels = g["label"].to_numpy()
        splits = g["split"].to_numpy()
        poss = g["pos"].to_numpy()
        codes = codes_all[g.index.to_numpy()]
        is_neg = labels == "neg"
        is_pos = labels == "pos"
        in_split = splits == split
        anchors = np.flatnonzero(is_neg & in_split)
        neg_before = np.cumsum(is_neg) - is_neg  # negatives strictly before each row
        if split == "train":
            anchors = anchors[neg_before[anchors] >= cfg.min_history_negatives]
        else:
            if len(anchors) == 0:
                stats["users_without_anchor"] += 1
                continue
            anchors = anchors[:1]
        if len(anchors) == 0:  # train: no negative with enough history
            stats["users_without_anchor"] += 1
            continue
        neg_idx = np.flatnonzero(is_neg)
        pos_idx = np.flatnonzero(is_pos)
        neg_items = set(items[neg_idx])
        rated_codes = np.unique(codes)
        visible = np.array([_SPLIT_RANK[s] <= rank for s in splits])  # own rows a row of `split` may name
        own_ok = visible & (labels != "neg") & np.array([it not in neg_items for it in items])
        user_key = zlib.crc32(user.encode("utf-8"))
        for a in anchors:
            a_day = int(days[a])
            a_item = str(items[a])
            h_neg = neg_idx[neg_idx < a]
            h_pos = pos_idx[pos_idx < a]
            if len(h_neg) == 0:
                stats["anchors_without_negative_history"] += 1
            later = (np.arange(len(items)) >= a) & in_split & (days <= a_day + cfg.window_days)
            fut_neg = [str(x) for x in items[later & is_neg]]
            fut_pos = [str(x) for x in items[later & is_pos & (np.arange(len(items)) > a)]]
            rng = np.random.default_rng([cfg.seed, user_key, int(poss[a])])
            # 1. the user's own non-negative interactions near the anchor, nearest first
            own = np.flatnonzero(own_ok)
            own = own[np.lexsort((items[own], np.abs(ts[own] - ts[a])))]
            near = np.abs(days[own] - a_day) <= cfg.window_days
            picked: list[str] = []
            seen = {a_item}

            def take(rows: np.ndarray) -> int:
                n0 = len(picked)
                for j in rows:
                    if len(picked) >= need:
                        break
                    it = str(items[j])
                    if it not in seen:
                        seen.add(it)
                        picked.append(it)
                return len(picked) - n0

            n_own = take(own[near])
            # 2. other users' items of the same days; 3. the whole table (never an item the user rated)
            n_win = n_tab = 0
            for source in ("window", "table"):
                if len(picked) >= need:
                    break
                w = (window(a_day) if source == "window" else window.total).copy()
                w[rated_codes] = 0.0
                w[_codes(seen, item_index)] = 0.0
                drawn = [str(item_names[c]) for c in _draw(rng, w, need - len(picked))]
                seen.update(drawn)
                picked.extend(drawn)
                if source == "window":
                    n_win = len(drawn)
                else:
                    n_tab = len(drawn)
            # 4. a tiny table only: the user's own non-negatives of other days, nearest first
            n_own += take(own[~near])
            stats["candidates_from_own"] += n_own
            stats["candidates_from_window"] += n_win
            stats["candidates_from_table"] += n_tab
            if len(picked) < need:
                stats["candidates_short"] += 1
            cands = [a_item] + picked
            cands = [cands[i] for i in rng.permutation(len(cands))]
            out.append({
                "user": user,
                "split": split,
                "anchor_pos": int(poss[a]),
                "anchor_day": a_day,
                "negatives": [entry(str(items[j]), int(days[j])) for j in h_neg],
                "positives": [entry(str(items[j]), int(days[j])) for j in h_pos],
                "next_negative": a_item,
                "future_negatives": fut_neg,
                "future_positives": fut_pos,
                "gts": list(fut_neg),
                "candidates": cands,
                "long_tail_user": user in lt_users,
            })
    stats["n_examples"] = len(out)
    out.stats = stats
    log.info("negrec %s examples: %s", split, stats)
    return out


def summary(prepared: pd.DataFrame, cfg: FeedbackConfig | None = None) -> dict[str, Any]:
    """Counts for stats.json / logs: interactions per split, label shares, long-tail sizes."""
    cfg = cfg or FeedbackConfig()
    lt_users, lt_items = long_tail(prepared, cfg)
    return {
        "interactions": int(len(prepared)),
        "users": int(prepared["user"].nunique()),
        "items": int(prepared["item"].nunique()),
        "days": int(prepared["day"].max()) + 1,
        "split_sizes": {s: int((prepared["split"] == s).sum()) for s in _SPLIT_RANK},
        "label_shares": {k: round(float(v), 4) for k, v in prepared["label"].value_counts(normalize=True).items()},
        "long_tail_users": len(lt_users),
        "long_tail_items": len(lt_items),
    }


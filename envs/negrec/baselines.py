"""Non-LLM baselines for the negative-feedback leaderboard, scored by the same metrics as the models.

Each baseline answers an example row (see `envs/negrec/data.py`'s `build_examples`) in two ways:
  `recommend(row, k)`: k distinct items the user is predicted to dislike next, best first (HR@K,
      FHR@K, LUF@K, LIF@K); the items of the row's history negatives (`row["negatives"]`) are never
      recommended: on MovieLens a user rates an item once, so they cannot be the next negative;
  `pick(row)`: one of `row["candidates"]` (Cand.Acc).

  RandomBaseline(items, seed)            uniform, seeded per row (user + anchor), so reruns agree
  NegativePopularity(counts, items)      the items most users disliked in train
  CoNegativeKNN(swing, counts, items)    score(j) = sum over the history negatives i of swing(i, j);
                                         ties and items no history item reaches are ordered by
                                         negative popularity (so an empty history is popularity)

`fit_baselines(train)` builds all three from the train negatives, given as any of
  * the train example rows (each carries its user's earlier negatives and the anchor itself; a user
    whose only train negative has no example row is missed: prefer the next two when you have them),
  * `(user, item)` pairs of train negatives,
  * `envs.negrec.data.prepare`'s DataFrame (its rows with label == "neg" and split == "train").
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from envs.negrec.swing import swing_similarity

__all__ = ["CoNegativeKNN", "NegativePopularity", "RandomBaseline", "fit_baselines", "train_negatives"]


def _history(row: Mapping) -> set[str]:
    return {str(n["item"]) for n in row.get("negatives", ())}


def _candidates(row: Mapping) -> list[str]:
    cands = [str(c) for c in row.get("candidates", ())]
    if not cands:
        raise ValueError(f"example row of user {row.get('user')!r} (anchor {row.get('anchor_pos')}): no 'candidates' "
                         "to pick from")
    return cands


def _row_seed(seed: int, row: Mapping) -> int:
    """A stable per-row seed (Python's hash() of a str changes between processes)."""
    return zlib.crc32(f"{seed}\x1f{row.get('user')}\x1f{row.get('anchor_pos')}".encode())


class RandomBaseline:
    """Uniformly random items (not in the history) and a uniformly random candidate."""

    name = "random"

    def __init__(self, items: Iterable[str], seed: int = 0):
        self.items = sorted({str(i) for i in items})
        if not self.items:
            raise ValueError("RandomBaseline: no items to recommend")
        self.seed = seed

    def recommend(self, row: Mapping, k: int) -> list[str]:
        rng = np.random.default_rng(_row_seed(self.seed, row))
        hist = _history(row)
        pool = [i for i in self.items if i not in hist]
        return [pool[j] for j in rng.permutation(len(pool))[:k]]

    def pick(self, row: Mapping) -> str:
        cands = _candidates(row)
        return cands[int(np.random.default_rng(_row_seed(self.seed + 1, row)).integers(len(cands)))]


class NegativePopularity:
    """The items disliked by the most users in train (ties by item id)."""

    name = "neg_popularity"

    def __init__(self, train_negative_counts: Mapping[str, int], items: Iterable[str] = ()):
        self.counts = {str(i): int(c) for i, c in train_negative_counts.items()}
        # items never disliked in train come last, so recommend() can fill k slots whatever the history
        universe = set(self.counts) | {str(i) for i in items}
        self.ranking = sorted(universe, key=lambda i: (-self.counts.get(i, 0), i))

    def recommend(self, row: Mapping, k: int) -> list[str]:
        hist = _history(row)
        out = []
        for i in self.ranking:
            if len(out) == k:
                break
            if i not in hist:
                out.append(i)
        return out

    def pick(self, row: Mapping) -> str:
        # max() keeps the first of equals: ties go to the earlier candidate (the row's seeded order)
        return max(_candidates(row), key=lambda c: self.counts.get(c, 0))


class CoNegativeKNN:
    """Item-kNN over Swing co-negative similarity: the items most similar to the user's past dislikes."""

    name = "co_negative_knn"

    def __init__(self, swing: Mapping[str, Sequence[tuple[str, float]]], train_negative_counts: Mapping[str, int],
                 items: Iterable[str] = ()):
        self.swing = swing
        self.popularity = NegativePopularity(train_negative_counts, items)

    def scores(self, row: Mapping) -> dict[str, float]:
        """score(j) = sum over the row's history negatives i of swing(i, j) (j with a positive sum)."""
        out: dict[str, float] = {}
        for i in _history(row):
            for j, s in self.swing.get(i, ()):
                out[j] = out.get(j, 0.0) + s
        return out

    def _key(self, scores: Mapping[str, float]):
        counts = self.popularity.counts
        return lambda j: (-scores.get(j, 0.0), -counts.get(j, 0))

    def recommend(self, row: Mapping, k: int) -> list[str]:
        hist = _history(row)
        scores = self.scores(row)
        ranked = sorted((j for j in scores if j not in hist), key=lambda j: (*self._key(scores)(j), j))[:k]
        if len(ranked) < k:  # the rest by popularity
            have = set(ranked)
            ranked += [j for j in self.popularity.recommend(row, k + len(have)) if j not in have][: k - len(ranked)]
        return ranked

    def pick(self, row: Mapping) -> str:
        scores, cands = self.scores(row), _candidates(row)
        key = self._key(scores)
        return min(cands, key=key)  # min of (-score, -count): the best; ties to the earlier candidate


def train_negatives(train: Any) -> list[tuple[str, str]]:
    """The distinct `(user, item)` train negatives from example rows, pairs, or a prepared DataFrame
    (see the module docstring), sorted."""
    pairs: set[tuple[str, str]] = set()
    if hasattr(train, "columns"):  # a pandas DataFrame from data.prepare
        missing = [c for c in ("user", "item", "label", "split") if c not in train.columns]
        if missing:
            raise ValueError(f"train_negatives: the DataFrame lacks column(s) {missing} (expected data.prepare's output)")
        sel = train[(train["label"] == "neg") & (train["split"] == "train")]
        return sorted(set(zip(sel["user"].astype(str), sel["item"].astype(str))))
    for k, r in enumerate(train):
        if isinstance(r, Mapping):
            if "user" not in r or "negatives" not in r or "next_negative" not in r:
                raise ValueError(f"train_negatives: row {k + 1} is neither an example row (user, negatives, "
                                 f"next_negative) nor a (user, item) pair: keys {sorted(r)}")
            if r.get("split", "train") != "train":
                raise ValueError(f"train_negatives: row {k + 1} is a {r['split']!r} example: baselines are fitted on "
                                 "train only (its history and anchor would leak)")
            u = str(r["user"])
            pairs.add((u, str(r["next_negative"])))
            pairs.update((u, str(n["item"])) for n in r["negatives"])
        else:
            try:
                u, i = r
            except (TypeError, ValueError):
                raise ValueError(f"train_negatives: row {k + 1} is neither an example row nor a (user, item) pair: "
                                 f"{r!r}") from None
            pairs.add((str(u), str(i)))
    return sorted(pairs)


def fit_baselines(train: Any, *, items: Iterable[str] = (), seed: int = 0,
                  swing: Mapping[str, Sequence[tuple[str, float]]] | None = None,
                  **swing_kwargs: Any) -> dict[str, Any]:
    """`{name: baseline}` for the three baselines, from the train negatives (`train_negatives`).
    `items`: the whole catalogue (random draws from it; popularity fills with it); default: the
    items of the train negatives. `swing`: a precomputed `swing_similarity` (else computed here,
    with `swing_kwargs`)."""
    pairs = train_negatives(train)
    if not pairs:
        raise ValueError("fit_baselines: no train negatives")
    counts = Counter(i for _, i in pairs)
    catalogue = {str(i) for i in items} | set(counts)
    if swing is None:
        by_user: dict[str, set[str]] = {}
        for u, i in pairs:
            by_user.setdefault(u, set()).add(i)
        swing = swing_similarity(by_user, **swing_kwargs)
    return {
        RandomBaseline.name: RandomBaseline(catalogue, seed=seed),
        NegativePopularity.name: NegativePopularity(counts, catalogue),
        CoNegativeKNN.name: CoNegativeKNN(swing, counts, catalogue),
    }

"""Swing item-item similarity over co-NEGATIVE feedback (CoNRec's collaborative signal).

Swing (Yang et al., "Large Scale Product Graph Construction for Recommendation in E-commerce",
Alibaba 2020): two items are similar when *pairs* of users both interacted with both of them, and a
pair counts more the less else those two users share:

    sim(i, j) = sum over unordered user pairs {u, v}, u != v, both with i and j of
                w_u * w_v / (alpha + |I_u ∩ I_v|)

with `I_u` the user's items and `w_u = 1 / sqrt(|I_u|)` when `user_weight=True` (the common
refinement damping heavy users), else 1. Here the items of a user are the ones they rated
NEGATIVELY in the train split, so `sim` says "users who disliked i also disliked j, and not because
they dislike everything together". The paper uses it to add co-negative neighbours to the reward's
ground-truth set (`expand_gts`) and the CoNegativeKNN baseline scores with it.

Computation, per item i (dense numpy, no Python loop over user pairs): with `X_i` the 0/1 rows of
the users of i over the items they have and `M` the strictly upper-triangular matrix of pair
weights `w_u w_v / (alpha + |I_u ∩ I_v|)`, row i of the similarity is `sum(X_i * (M @ X_i), axis=0)`
(each pair's weight lands on exactly the items both users share). Cost ~ sum_i n_i^2 * width_i.

The cap: an item with more than `max_users_per_item` users (default 300) uses a seeded random
subset of that many of them for its own row, bounding the per-item `n_i^2` term. MovieLens-100k
has at most 120 negative raters per item (17,480 ratings <= 2 from 915 users, all splits), so the
cap does not bind there and the result is exact; it is for larger data. Pair overlaps
`|I_u ∩ I_v|` always use the full histories. Measured: 0.46 s for all of ML-100k's negatives on
one core (54k neighbour entries at top_n=50).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

__all__ = ["expand_gts", "swing_similarity"]


def swing_similarity(
    user_items: Mapping[str, Iterable[str]],
    *,
    alpha: float = 1.0,
    top_n: int = 50,
    user_weight: bool = False,
    max_users_per_item: int | None = 300,
    seed: int = 0,
) -> dict[str, list[tuple[str, float]]]:
    """item -> its `top_n` most similar other items `(item, sim)`, best first (ties by item id); only
    positive similarities are listed, so an item with no co-negative partner maps to `[]`. Every
    item of `user_items` is a key."""
    if alpha <= 0:
        raise ValueError(f"swing_similarity: alpha must be > 0 (it keeps 1/(alpha + overlap) finite), got {alpha}")
    if top_n < 1:
        raise ValueError(f"swing_similarity: top_n must be >= 1, got {top_n}")
    users = sorted(str(u) for u in user_items)
    sets = [sorted({str(i) for i in user_items[u]}) for u in sorted(user_items, key=str)]
    items = sorted({i for s in sets for i in s})
    out: dict[str, list[tuple[str, float]]] = {i: [] for i in items}
    if not items:
        return out
    col = {i: k for k, i in enumerate(items)}
    from scipy import sparse

    rows = np.repeat(np.arange(len(users)), [len(s) for s in sets])
    cols = np.array([col[i] for s in sets for i in s], dtype=np.int64)
    X = sparse.csr_matrix((np.ones(len(cols), dtype=np.float64), (rows, cols)), shape=(len(users), len(items)))
    Xc = X.tocsc()
    overlap = (X @ X.T).tocsr()  # |I_u ∩ I_v| for every pair sharing an item
    w = 1.0 / np.sqrt(np.maximum(np.asarray(X.sum(axis=1)).ravel(), 1.0)) if user_weight else np.ones(len(users))
    rng = np.random.default_rng(seed)
    for i in range(len(items)):
        us = Xc.indices[Xc.indptr[i] : Xc.indptr[i + 1]]
        if len(us) < 2:
            continue
        if max_users_per_item is not None and len(us) > max_users_per_item:
            us = np.sort(rng.choice(us, size=max_users_per_item, replace=False))
        sub = X[us]
        width = np.unique(sub.indices)  # only the items these users have
        Xi = sub[:, width].toarray()
        M = np.triu(1.0 / (alpha + overlap[us][:, us].toarray()), k=1) * np.outer(w[us], w[us])
        sim = (Xi * (M @ Xi)).sum(axis=0)
        sim[np.searchsorted(width, i)] = 0.0  # not its own neighbour
        keep = np.nonzero(sim > 0)[0]
        if len(keep) == 0:
            continue
        # best first, ties by item id (width is in item-id order, and the sort is stable)
        order = keep[np.argsort(-sim[keep], kind="stable")][:top_n]
        out[items[i]] = [(items[width[k]], float(sim[k])) for k in order]
    return out


def expand_gts(
    future_negatives: Sequence[str],
    swing: Mapping[str, Sequence[tuple[str, float]]],
    *,
    top_n: int = 5,
    min_sim: float = 0.0,
) -> list[str]:
    """The reward's ground-truth set: the future negatives (in their order, deduplicated), then for
    each of them its Swing neighbours with `sim >= min_sim`, at most `top_n` per future negative,
    each item once. A future negative Swing never saw (no train negative) adds nothing."""
    out = list(dict.fromkeys(str(i) for i in future_negatives))
    seen = set(out)
    for item in list(out):
        taken = 0
        for j, s in swing.get(item, ()):
            if taken >= top_n:
                break
            if s < min_sim:
                continue
            taken += 1
            if j not in seen:
                seen.add(j)
                out.append(j)
    return out

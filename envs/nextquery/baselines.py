"""Heuristic next-query baselines (no model), scored by the metric set's own `metrics.score`.

Each baseline is `predict(row) -> str` over a row's history (envs/nextquery/data.py); those that need
statistics are fitted on the **train** rows only:

  last item title            the title of the most recent event ("" for an empty history)
  most frequent category     the category most events of the history have (ties: the most recent)
  category + attribute       that category and the tag its events carry most often besides the
                             category and the brand (the attribute the user keeps choosing; ties: the
                             most recent), e.g. "waterproof running shoes"
  recent category + attribute  the same over the last RECENT (5) events only: the category most of
                             them have (ties: the most recent), and its most frequent attribute tag
                             over the whole history (a drifted user's new interest, not the old one)
  popular query              the most frequent query of the train rows (ties: the first seen)
  popular query of category  the most frequent train query among train rows whose most frequent
                             history category is this row's (falls back to the popular query)

A reference, not a baseline (synthetic rows only, where `row["intent"]` holds the latent intent):

  latent intent (oracle)     the intent's preferred attribute values and its category, in one fixed
                             wording ("waterproof running shoes"): what a model that read the hidden
                             intent perfectly but not the query's random wording, brand or price word
                             would say; the headroom above the heuristics

The untrained student and the teacher are models: they go through `python -m eval.run` (docs/nextquery.md).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

__all__ = ["BASELINES", "ORACLE", "fit_baselines", "latent_intent", "last_item_title", "most_frequent_category", "category_attribute"]


def _mode_recent(values: Sequence[str]) -> str:
    """The most frequent value; ties go to the one seen last (the most recent event)."""
    if not values:
        return ""
    counts = Counter(values)
    last = {v: i for i, v in enumerate(values)}
    return max(counts, key=lambda v: (counts[v], last[v]))


def last_item_title(row: Mapping) -> str:
    h = row["history"]
    return h[-1]["title"] if h else ""


def most_frequent_category(row: Mapping) -> str:
    return _mode_recent([e["category"] for e in row["history"]])


RECENT = 5


def category_attribute(row: Mapping, recent: int | None = None) -> str:
    """The most frequent category (of the last `recent` events; None: all) + its most frequent attribute tag."""
    events = row["history"] if recent is None else row["history"][-recent:]
    cat = _mode_recent([e["category"] for e in events])
    if not cat:
        return ""
    tags = [t for e in row["history"] if e["category"] == cat for t in e.get("tags", [])
            if t != cat and t != e.get("brand")]
    attr = _mode_recent(tags)
    return f"{attr} {cat}".strip()


def latent_intent(row: Mapping) -> str:
    intent = row.get("intent") or {}
    if not intent.get("category"):
        raise ValueError(f"row {row.get('id')!r}: no latent intent (only synthetic rows have one)")
    # rows read through `datasets` pad the attribute struct of every category with None: skip those
    return " ".join([*(v for v in (intent.get("attributes") or {}).values() if v), intent["category"]])


class PopularQuery:
    def __init__(self, train_rows: Sequence[Mapping], by_category: bool = False):
        self.by_category = by_category
        self.top = Counter(r["query"] for r in train_rows).most_common(1)[0][0] if train_rows else ""
        per: dict[str, Counter] = {}
        if by_category:
            for r in train_rows:
                per.setdefault(most_frequent_category(r), Counter())[r["query"]] += 1
        self.per = {c: cnt.most_common(1)[0][0] for c, cnt in per.items()}

    def __call__(self, row: Mapping) -> str:
        if self.by_category:
            return self.per.get(most_frequent_category(row), self.top)
        return self.top


BASELINES = ("last item title", "most frequent category", "category + attribute", "recent category + attribute",
             "popular query", "popular query of category")


ORACLE = "latent intent (oracle)"


def fit_baselines(train_rows: Sequence[Mapping], oracle: bool = False) -> dict:
    """`{name: predict(row) -> str}` for every baseline of `BASELINES`, fitted on `train_rows` (+ the
    latent-intent reference `ORACLE` when `oracle`: synthetic rows only)."""
    return {
        **({ORACLE: latent_intent} if oracle else {}),
        "last item title": last_item_title,
        "most frequent category": most_frequent_category,
        "category + attribute": category_attribute,
        "recent category + attribute": lambda row: category_attribute(row, RECENT),
        "popular query": PopularQuery(train_rows),
        "popular query of category": PopularQuery(train_rows, by_category=True),
    }

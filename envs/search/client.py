"""HTTP client for a Search-R1 protocol retrieval server, usable wherever a Retriever is.

``RetrievalClient(url).search(queries, topk)`` has the same signature and
return shape as the in-process retrievers (``envs.search.retrievers``): one
list of ``{"id", "contents", "score"}`` per query.  It never raises into a
rollout: when the server still fails after the retries, every query of the
failed batch gets an :class:`~envs.search.retrievers.UnavailableHits` (an
empty list with ``.unavailable == True``) and ``stats["failures"]`` counts
it; the agent can then show a "retrieval unavailable" observation
(``envs.search.corpus.format_docs`` does that).

Retries (with exponential backoff and jitter): connection errors, timeouts,
HTTP 408/429/5xx and malformed responses.  Other 4xx answers are not retried;
for a multi-query batch the client falls back to one request per query so
that one bad query does not take the others down.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any, Callable, Sequence

import httpx

from .retrievers import UnavailableHits

__all__ = ["RetrievalClient", "get_retriever"]

_RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


class _BadResponse(Exception):
    pass


class _Fatal(Exception):
    """Non-retryable failure (4xx other than the retry statuses)."""

    def __init__(self, status: int, detail: str):
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status


class RetrievalClient:
    """Batched, retrying client for ``POST {url}/retrieve``.

    ``url`` is the server's base URL (``http://127.0.0.1:8000``) or the full
    ``.../retrieve`` endpoint.  ``stats`` counts ``requests``, ``retries``,
    ``failures`` (queries answered with ``UnavailableHits``),
    ``failed_batches``, ``queries`` and ``errors`` (by kind); read it with
    :meth:`stats_snapshot`.  Thread-safe.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 10.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
        jitter: bool = True,
        batch_size: int = 64,
        max_query_chars: int | None = 2000,
        seed: int = 0,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        base = url.rstrip("/")
        self.retrieve_url = base if base.endswith("/retrieve") else base + "/retrieve"
        self.base_url = self.retrieve_url[: -len("/retrieve")]
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.jitter = jitter
        self.batch_size = batch_size
        self.max_query_chars = max_query_chars
        self._sleep = sleep
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._http = httpx.Client(timeout=httpx.Timeout(timeout), transport=transport)
        self.stats: dict[str, Any] = {
            "queries": 0,
            "requests": 0,
            "retries": 0,
            "failures": 0,
            "failed_batches": 0,
            "errors": {},
        }
        self.last_error: str | None = None

    # -- bookkeeping -------------------------------------------------------
    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.stats[key] += n

    def _error(self, kind: str, msg: str) -> None:
        with self._lock:
            self.stats["errors"][kind] = self.stats["errors"].get(kind, 0) + 1
            self.last_error = msg

    def stats_snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {**self.stats, "errors": dict(self.stats["errors"])}

    def _delay(self, attempt: int) -> float:
        d = min(self.max_backoff, self.backoff * (2**attempt))
        if self.jitter and d > 0:
            with self._lock:
                d *= 0.5 + 0.5 * self._rng.random()
        return d

    # -- HTTP ----------------------------------------------------------------
    def _post_once(self, queries: list[str], topk: int) -> list[list[dict]]:
        self._count("requests")
        resp = self._http.post(self.retrieve_url, json={"queries": queries, "topk": topk, "return_scores": True})
        if resp.status_code != 200:
            detail = resp.text[:300]
            if resp.status_code in _RETRY_STATUSES:
                raise _BadResponse(f"HTTP {resp.status_code}: {detail}")
            raise _Fatal(resp.status_code, detail)
        try:
            result = resp.json()["result"]
        except Exception as e:
            raise _BadResponse(f"malformed response body: {e}") from None
        if not isinstance(result, list) or len(result) != len(queries):
            raise _BadResponse(f"expected {len(queries)} result lists, got {type(result).__name__}")
        out = []
        for items in result:
            if not isinstance(items, list):
                raise _BadResponse("a per-query result is not a list")
            hits = []
            for it in items:
                if not isinstance(it, dict):
                    raise _BadResponse("a result item is not an object")
                doc = it.get("document", it)
                if not isinstance(doc, dict) or "contents" not in doc:
                    raise _BadResponse("a result item has no document contents")
                score = it.get("score") if "document" in it else None
                hits.append({"id": str(doc.get("id", "")), "contents": doc["contents"], "score": None if score is None else float(score)})
            out.append(hits)
        return out

    def _post_with_retries(self, queries: list[str], topk: int) -> list[list[dict]]:
        """Returns results, or raises _Fatal / the last retryable error after the retries."""
        attempt = 0
        while True:
            try:
                return self._post_once(queries, topk)
            except _Fatal:
                raise
            except (httpx.TimeoutException, httpx.TransportError, _BadResponse) as e:
                kind = "timeout" if isinstance(e, httpx.TimeoutException) else (
                    "transport" if isinstance(e, httpx.TransportError) else "bad_response"
                )
                self._error(kind, f"{type(e).__name__}: {e}")
                if attempt >= self.max_retries:
                    raise
                self._count("retries")
                self._sleep(self._delay(attempt))
                attempt += 1

    def _search_batch(self, queries: list[str], topk: int) -> list[list[dict]]:
        try:
            return self._post_with_retries(queries, topk)
        except _Fatal as e:
            self._error(f"http_{e.status}", str(e))
            if len(queries) > 1:  # isolate the bad query
                out: list[list[dict]] = []
                for q in queries:
                    out.extend(self._search_batch([q], topk))
                return out
            reason = f"rejected by server: {e}"
        except Exception as e:  # retries exhausted (or anything unexpected): never raise into a rollout
            if not isinstance(e, (httpx.HTTPError, _BadResponse)):
                self._error("unexpected", f"{type(e).__name__}: {e}")
            reason = f"unavailable after {self.max_retries} retries: {type(e).__name__}: {e}"
        self._count("failed_batches")
        self._count("failures", len(queries))
        return [UnavailableHits(reason) for _ in queries]

    # -- public --------------------------------------------------------------
    def search(self, queries: Sequence[str], topk: int = 3) -> list[list[dict]]:
        """Top-``topk`` hits per query; failed queries get ``UnavailableHits`` (no exception)."""
        if isinstance(queries, str):
            raise TypeError("queries must be a list of strings, not a single string")
        if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
            raise ValueError(f"topk must be a positive integer, got {topk!r}")
        queries = list(queries)
        self._count("queries", len(queries))
        results: list[list[dict] | None] = [None] * len(queries)
        todo: list[int] = []
        for i, q in enumerate(queries):
            if q is None or not str(q).strip():
                results[i] = []  # nothing to search for: no hits (the server would reject it)
            else:
                todo.append(i)
        for s in range(0, len(todo), self.batch_size):
            idx = todo[s : s + self.batch_size]
            batch = [str(queries[i]) for i in idx]
            if self.max_query_chars:
                batch = [q[: self.max_query_chars] for q in batch]
            for i, hits in zip(idx, self._search_batch(batch, topk)):
                results[i] = hits
        return results  # type: ignore[return-value]

    def health(self) -> dict | None:
        """``GET /health`` as a dict, or ``None`` when the server cannot be reached."""
        try:
            r = self._http.get(self.base_url + "/health")
            r.raise_for_status()
            return r.json()
        except Exception:
            return None

    def wait_ready(self, timeout: float = 30.0, interval: float = 0.2) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.health() is not None:
                return True
            time.sleep(interval)
        return False

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "RetrievalClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def get_retriever(spec: str, *, kind: str = "bm25", **kwargs: Any):
    """A retriever from a spec: an ``http(s)://`` URL -> :class:`RetrievalClient`,
    otherwise a corpus path -> in-process ``make_retriever(kind, path)``.
    """
    if spec.startswith(("http://", "https://")):
        return RetrievalClient(spec, **kwargs)
    from .retrievers import make_retriever

    return make_retriever(kind, spec, **kwargs)

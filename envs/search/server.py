"""Retrieval server speaking the Search-R1 protocol (FastAPI + uvicorn).

``POST /retrieve`` with ``{"queries": [str], "topk": int, "return_scores": bool}``
returns ``{"result": [[{"document": {"id", "contents"}, "score": float}, ...] per query]}``;
without ``return_scores`` each item is the document object itself.
``GET /health`` returns ``{"status": "ok", "retriever": ..., "num_docs": ...}``.

Bad requests get a 4xx JSON ``{"detail": "..."}`` and the server keeps serving:
non-JSON or too deeply nested body (400), body larger than ``max_body_bytes`` (413), wrong types,
empty query list, empty query string, too many queries, too long a query,
topk out of ``[1, max_topk]`` (422).

Run: ``python -m envs.search.server --corpus PATH [--retriever bm25|dense] [--host 127.0.0.1] [--port 8000]
[--log-level info]``. ``--log-level`` is uvicorn's (``info`` logs one access line per request) and also the
level of this process's other loggers (root, ``bm25s``, ``sentence_transformers``); above ``info`` the
index-build progress bars are off too, so ``--log-level warning`` prints only warnings and errors.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

__all__ = ["ServerLimits", "configure_logging", "create_app", "parse_retrieve_request", "main"]

logger = logging.getLogger(__name__)


@dataclass
class ServerLimits:
    max_queries: int = 512
    max_topk: int = 50
    max_query_chars: int = 2000
    max_body_bytes: int = 1 << 20  # 1 MiB
    default_topk: int = 3


class RequestError(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


def parse_retrieve_request(body: bytes, limits: ServerLimits) -> tuple[list[str], int, bool]:
    """Validate a raw ``/retrieve`` body; raises :class:`RequestError` with a 4xx status."""
    if len(body) > limits.max_body_bytes:
        raise RequestError(413, f"request body of {len(body)} bytes exceeds the limit of {limits.max_body_bytes} bytes")
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"request body is not valid JSON: {e}") from None
    except RecursionError:
        # e.g. b"[" * 100000: the parser recurses once per level; the protocol's body nests 2 deep
        raise RequestError(400, "request body nests JSON arrays/objects too deeply to parse (the protocol's body "
                           'is {"queries": [str, ...], "topk": int, "return_scores": bool})') from None
    if not isinstance(payload, dict):
        raise RequestError(422, 'request body must be a JSON object {"queries": [...], "topk": int, "return_scores": bool}')
    if "queries" not in payload:
        raise RequestError(422, "missing field 'queries' (a non-empty list of strings)")
    queries = payload["queries"]
    if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
        raise RequestError(422, "'queries' must be a list of strings")
    if not queries:
        raise RequestError(422, "'queries' is empty: send at least one query")
    if len(queries) > limits.max_queries:
        raise RequestError(422, f"too many queries: {len(queries)} > max_queries={limits.max_queries}")
    for i, q in enumerate(queries):
        if not q.strip():
            raise RequestError(422, f"queries[{i}] is an empty string")
        if len(q) > limits.max_query_chars:
            raise RequestError(422, f"queries[{i}] has {len(q)} characters > max_query_chars={limits.max_query_chars}")
    topk = payload.get("topk")
    if topk is None:
        topk = limits.default_topk
    if isinstance(topk, bool) or not isinstance(topk, int):
        raise RequestError(422, f"'topk' must be an integer, got {type(topk).__name__}")
    if topk < 1 or topk > limits.max_topk:
        raise RequestError(422, f"'topk'={topk} is out of range [1, {limits.max_topk}]")
    return_scores = payload.get("return_scores", False)
    if return_scores is None:
        return_scores = False
    if not isinstance(return_scores, bool):
        raise RequestError(422, "'return_scores' must be a boolean")
    return queries, topk, return_scores


def format_results(hits_per_query: list[list[dict]], return_scores: bool) -> dict:
    result = []
    for hits in hits_per_query:
        items = []
        for h in hits:
            doc = {"id": h["id"], "contents": h["contents"]}
            items.append({"document": doc, "score": float(h["score"])} if return_scores else doc)
        result.append(items)
    return {"result": result}


def create_app(retriever: Any, limits: ServerLimits | None = None, *, name: str | None = None):
    """FastAPI app serving ``retriever`` (anything with ``search(queries, topk)``)."""
    limits = limits or ServerLimits()
    lock = threading.Lock()  # one search at a time: retrievers are not all thread-safe
    app = FastAPI(title="agentrl retrieval server", version="1")
    app.state.retriever = retriever
    app.state.limits = limits

    def _search(queries: list[str], topk: int) -> list[list[dict]]:
        with lock:
            return retriever.search(queries, topk)

    async def _read_body(request: Request) -> bytes:
        cl = request.headers.get("content-length")
        if cl is not None:
            try:
                n = int(cl)
            except ValueError:
                raise RequestError(400, "invalid Content-Length header") from None
            if n > limits.max_body_bytes:
                raise RequestError(413, f"request body of {n} bytes exceeds the limit of {limits.max_body_bytes} bytes")
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limits.max_body_bytes:
                raise RequestError(413, f"request body exceeds the limit of {limits.max_body_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    @app.post("/retrieve")
    async def retrieve(request: Request):
        try:
            body = await _read_body(request)
            queries, topk, return_scores = parse_retrieve_request(body, limits)
        except RequestError as e:
            return JSONResponse(status_code=e.status, content={"detail": e.detail})
        try:
            hits = await run_in_threadpool(_search, queries, topk)
        except Exception as e:  # keep serving; report the failure
            logger.exception("retrieval failed")
            return JSONResponse(status_code=500, content={"detail": f"retrieval failed: {type(e).__name__}: {e}"})
        return format_results(hits, return_scores)

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "retriever": name or getattr(retriever, "kind", type(retriever).__name__),
            "num_docs": len(retriever) if hasattr(retriever, "__len__") else None,
            "limits": asdict(limits),
        }

    return app


LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's


def configure_logging(level: str) -> bool:
    """Apply `--log-level` to the root logger and the retrieval libraries' loggers (uvicorn sets its own);
    returns whether progress bars (index building) should show: only at `info` or below."""
    num = logging.DEBUG if level.lower() == "trace" else getattr(logging, level.upper())
    logging.basicConfig(level=num, format="%(levelname)s:%(name)s:%(message)s")
    # basicConfig leaves an already configured root alone (e.g. when embedded): set the levels explicitly.
    # bm25s resets its logger to DEBUG on import; BM25Retriever undoes that, so bm25s inherits this level.
    for name in ("", "bm25s", "sentence_transformers", "faiss"):
        logging.getLogger(name).setLevel(num)
    return num <= logging.INFO


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m envs.search.server", description="Search-R1 protocol retrieval server")
    ap.add_argument("--corpus", required=True, help="Search-R1 jsonl corpus")
    ap.add_argument("--retriever", choices=["bm25", "dense"], default="bm25")
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default %(default)s: local only)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--model", default=None, help="dense: local sentence-transformers path (default all-MiniLM-L6-v2)")
    ap.add_argument("--index-dir", default=None, help="index cache dir (default: next to the corpus)")
    d = ServerLimits()
    ap.add_argument("--max-queries", type=int, default=d.max_queries)
    ap.add_argument("--max-topk", type=int, default=d.max_topk)
    ap.add_argument("--max-query-chars", type=int, default=d.max_query_chars)
    ap.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    ap.add_argument("--default-topk", type=int, default=d.default_topk)
    ap.add_argument("--log-level", default="info", choices=LOG_LEVELS,
                    help="uvicorn's log level and this process's (default %(default)s)")
    args = ap.parse_args(argv)

    show_progress = configure_logging(args.log_level)
    from .retrievers import make_retriever

    kw: dict[str, Any] = {"index_dir": args.index_dir, "show_progress": show_progress}
    if args.retriever == "dense" and args.model:
        kw["model"] = args.model
    retriever = make_retriever(args.retriever, args.corpus, **kw)
    limits = ServerLimits(
        max_queries=args.max_queries,
        max_topk=args.max_topk,
        max_query_chars=args.max_query_chars,
        max_body_bytes=args.max_body_bytes,
        default_topk=args.default_topk,
    )
    app = create_app(retriever, limits, name=args.retriever)
    import uvicorn

    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

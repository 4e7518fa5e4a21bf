"""QA data for the search agent: loaders for the published formats and a wiki QA generator.

Loaders (both return a ``datasets.Dataset`` with columns ``id``, ``question``,
``golden_answers`` (list[str]) and ``data_source``):

* :func:`load_search_r1_parquet` - Search-R1 training/eval parquet rows
  (``data_source``, ``prompt`` chat messages, ``ability``,
  ``reward_model: {"style": "rule", "ground_truth": {"target": [...]}}``,
  ``extra_info: {"split", "index"}``);
* :func:`load_flashrag_jsonl` - FlashRAG jsonl (``question``,
  ``golden_answers``, optional ``id``).

Generator: ``python -m envs.search.qa_data generate --out DIR --seed 0`` builds
train/dev/test questions over the offline wiki10k corpus
(``envs.search.corpus``) whose short (1-4 word) answers are in the corpus,
and writes each split as FlashRAG jsonl (``{split}.jsonl``) and Search-R1
parquet (``{split}.parquet``), plus ``meta.json``.  Question types:

* ``desc2title``  "Who/What is described as "<short description>"?" -> title
* ``title2desc``  "What is <title>? ..." -> its short description (only when it occurs in the article)
* ``cloze``       a sentence of an article with a year or a linked entity blanked out
* ``bridge``      two-hop: "The Wikipedia article on <A> mentions something described as "<B's description>". What is it?" -> B,
                  where B's title occurs in A's text (search A, then check/confirm B)

Articles are split into train/dev/test first, so test questions are about articles
that no train question is built from (bridge answers may still be shared).

``--types natural,twohop`` builds questions people ask instead (facts stated in the
passages, and two-hop questions through a bridge article; ``envs.search.natural_qa``),
optionally mixed with the types above; the default is the four types above.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from eval.qa_metrics import normalize_answer
from rl.common import JsonlError, atomic_write_lines, atomic_write_text, iter_jsonl, read_jsonl

__all__ = [
    "QADataError",
    "PROMPT_TEMPLATES",
    "make_prompt",
    "load_search_r1_parquet",
    "load_flashrag_jsonl",
    "load_qa",
    "row_metadata",
    "write_flashrag_jsonl",
    "write_search_r1_parquet",
    "generate_wiki_qa",
    "write_qa_splits",
    "answer_in_topk",
    "main",
]

DATA_SOURCE = "wiki10k_qa"

# Search-R1's "base" template (Slow Thinking), verbatim.
_SLOW = (
    "Answer the given question. "
    "You must conduct reasoning inside <think> and </think> first every time you get new information. "
    "After reasoning, if you find you lack some knowledge, you can call a search engine by <search> query </search> "
    "and it will return the top searched results between <information> and </information>. "
    "You can search as many times as your want. "
    "If you find no further external knowledge needed, you can directly provide the answer inside <answer> and </answer>, "
    "without detailed illustrations. For example, <answer> Beijing </answer>. Question: {question}\n"
)
# Fast Thinking (Search-R1++): the same instructions without the mandatory <think> step (wording assumed).
_FAST = (
    "Answer the given question. "
    "If you lack some knowledge, you can call a search engine by <search> query </search> "
    "and it will return the top searched results between <information> and </information>. "
    "You can search as many times as you want. "
    "If you find no further external knowledge needed, you can directly provide the answer inside <answer> and </answer>, "
    "without detailed illustrations. For example, <answer> Beijing </answer>. Question: {question}\n"
)
PROMPT_TEMPLATES = {"slow": _SLOW, "fast": _FAST}


def make_prompt(question: str, template: str = "slow") -> str:
    try:
        tpl = PROMPT_TEMPLATES[template]
    except KeyError:
        raise ValueError(f"unknown template {template!r}; choose from {sorted(PROMPT_TEMPLATES)}") from None
    return tpl.format(question=question)


class QADataError(ValueError):
    """A QA data row is malformed; the message names the file and the row/line."""


# ---------------------------------------------------------------------------
# loaders
# ---------------------------------------------------------------------------


def _to_dataset(rows: list[dict]):
    import datasets

    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "question": datasets.Value("string"),
            "golden_answers": datasets.List(datasets.Value("string"))
            if hasattr(datasets, "List")
            else datasets.Sequence(datasets.Value("string")),
            "data_source": datasets.Value("string"),
            # free-form per-row extras (question type, source titles, Search-R1 extra_info),
            # kept as JSON text because rows of one file may carry differently shaped dicts,
            # which an Arrow struct column cannot hold; `row_metadata` decodes it
            "metadata": datasets.Value("string"),
        }
    )
    for r in rows:
        r["metadata"] = json.dumps(r.get("metadata") or {}, ensure_ascii=False)
    cols = {k: [r[k] for r in rows] for k in features}
    return datasets.Dataset.from_dict(cols, features=features)


def _answers_list(value: Any, where: str, field: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    elif value is None or isinstance(value, (bytes, dict)) or not hasattr(value, "__iter__"):
        raise QADataError(f"{where}: '{field}' must be a string or a list of strings, got {type(value).__name__}")
    out = []
    for v in value:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)
        if not isinstance(v, str):
            raise QADataError(f"{where}: '{field}' contains a {type(v).__name__}, expected strings")
        out.append(v)
    if not out or not any(a.strip() for a in out):
        raise QADataError(f"{where}: '{field}' is empty")
    return out


_QUESTION_RE = re.compile(r"Question:\s*(.*?)\s*$", re.DOTALL)


def _question_from_prompt(prompt: Any, where: str) -> str:
    if isinstance(prompt, str):
        content = prompt
    else:
        try:
            msgs = list(prompt)
        except TypeError:
            raise QADataError(f"{where}: 'prompt' must be a list of chat messages") from None
        users = [m for m in msgs if isinstance(m, Mapping) and m.get("role") == "user"]
        if not users or not isinstance(users[-1].get("content"), str):
            raise QADataError(f"{where}: 'prompt' has no user message with string content")
        content = users[-1]["content"]
    idx = content.rfind("Question:")
    q = _QUESTION_RE.match(content[idx:]).group(1) if idx >= 0 else content.strip()
    if not q:
        raise QADataError(f"{where}: empty question in 'prompt'")
    return q


def load_search_r1_parquet(paths: str | os.PathLike | Sequence[str | os.PathLike]):
    """Load Search-R1 parquet file(s) into the normalised QA ``Dataset``.

    The question is the row's ``question`` column when present (Search-R1's
    preprocessing keeps it), else the text after the last ``Question:`` of the
    last user message of ``prompt``.  Gold answers come from
    ``reward_model.ground_truth.target``.  ``id``: the row's ``id`` if any, else
    ``{data_source}_{extra_info.split}_{extra_info.index}``.
    """
    import pyarrow.parquet as pq

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    rows: list[dict] = []
    for path in paths:
        path = Path(path)
        try:
            table = pq.read_table(path)
        except Exception as e:
            raise QADataError(f"{path}: cannot read parquet: {e}") from None
        for i, r in enumerate(table.to_pylist()):
            where = f"{path}: row {i}"
            ds = r.get("data_source")
            if not isinstance(ds, str) or not ds:
                raise QADataError(f"{where}: missing field 'data_source'")
            q = r.get("question")
            if not isinstance(q, str) or not q.strip():
                if r.get("prompt") is None:
                    raise QADataError(f"{where}: missing field 'prompt' (and no 'question' column)")
                q = _question_from_prompt(r["prompt"], where)
            rm = r.get("reward_model")
            if not isinstance(rm, Mapping):
                raise QADataError(f"{where}: missing field 'reward_model'")
            gt = rm.get("ground_truth")
            if not isinstance(gt, Mapping) or gt.get("target") is None:
                raise QADataError(f"{where}: missing field 'reward_model.ground_truth.target'")
            golds = _answers_list(gt["target"], where, "reward_model.ground_truth.target")
            rid = r.get("id")
            if rid is None or rid == "":
                ei = r.get("extra_info") if isinstance(r.get("extra_info"), Mapping) else {}
                split, index = ei.get("split"), ei.get("index")
                rid = f"{ds}_{split}_{index}" if split is not None and index is not None else f"{path.stem}_{i}"
            # our writer keeps the row's metadata; other Search-R1 files carry extra_info
            extra = row_metadata(r) if r.get("metadata") else (
                r.get("extra_info") if isinstance(r.get("extra_info"), Mapping) else {}
            )
            rows.append(
                {"id": str(rid), "question": q.strip(), "golden_answers": golds, "data_source": ds, "metadata": extra}
            )
    return _to_dataset(rows)


def load_flashrag_jsonl(path: str | os.PathLike, *, data_source: str | None = None):
    """Load a FlashRAG jsonl file (``question``, ``golden_answers``, optional ``id``).

    ``data_source``: the argument, else the row's ``data_source`` field, else
    the parent directory's name (FlashRAG lays files out as ``<dataset>/<split>.jsonl``).
    """
    path = Path(path)
    default_ds = data_source or path.resolve().parent.name or path.stem
    rows = []
    try:
        lines = list(iter_jsonl(path))
    except JsonlError as e:
        raise QADataError(str(e)) from None
    for lineno, r in lines:
        where = f"{path}:{lineno}"
        q = r.get("question")
        if not isinstance(q, str) or not q.strip():
            raise QADataError(f"{where}: missing field 'question'")
        if "golden_answers" not in r:
            raise QADataError(f"{where}: missing field 'golden_answers'")
        golds = _answers_list(r["golden_answers"], where, "golden_answers")
        meta = r.get("metadata", {})
        if meta is not None and not isinstance(meta, dict):
            raise QADataError(f"{where}: 'metadata' must be a JSON object, got {type(meta).__name__}")
        rid = r.get("id")
        ds = data_source or (r.get("data_source") if isinstance(r.get("data_source"), str) else None) or default_ds
        rows.append(
            {
                "id": str(rid) if rid not in (None, "") else f"{ds}_{lineno - 1}",
                "question": q.strip(),
                "golden_answers": golds,
                "data_source": ds,
                "metadata": meta,
            }
        )
    return _to_dataset(rows)


def row_metadata(row: Mapping[str, Any]) -> dict:
    """A QA row's `metadata` as a dict: the JSON text `load_qa` stores, or a dict as is
    (rows read by `datasets`' own json loader), `{}` when absent."""
    meta = row.get("metadata")
    if isinstance(meta, str):
        meta = json.loads(meta) if meta else {}
    return dict(meta) if isinstance(meta, Mapping) else {}


def load_qa(path: str | os.PathLike, **kwargs: Any):
    """Dispatch on the extension: ``.parquet`` -> Search-R1, ``.jsonl``/``.json`` -> FlashRAG."""
    p = str(path)
    if p.endswith(".parquet"):
        return load_search_r1_parquet(path)
    if p.endswith((".jsonl", ".json")):
        return load_flashrag_jsonl(path, **kwargs)
    raise QADataError(f"{path}: unknown QA file type (expected .parquet or .jsonl)")


# ---------------------------------------------------------------------------
# writers
# ---------------------------------------------------------------------------


def write_flashrag_jsonl(rows: Iterable[Mapping[str, Any]], path: str | os.PathLike) -> Path:

    keys = ("id", "question", "golden_answers", "metadata")
    path = Path(path)
    atomic_write_lines(
        path, (json.dumps({k: r[k] for k in keys if k in r}, ensure_ascii=False, sort_keys=False) for r in rows)
    )
    return path


def write_search_r1_parquet(
    rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, *, split: str, template: str = "slow"
) -> Path:
    """Write rows in Search-R1's parquet layout (also keeping ``id``/``question``/``golden_answers``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("id", pa.string()),
            ("question", pa.string()),
            ("golden_answers", pa.list_(pa.string())),
            ("data_source", pa.string()),
            ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
            ("ability", pa.string()),
            (
                "reward_model",
                pa.struct([("style", pa.string()), ("ground_truth", pa.struct([("target", pa.list_(pa.string()))]))]),
            ),
            ("extra_info", pa.struct([("split", pa.string()), ("index", pa.int64())])),
            ("qtype", pa.string()),
            ("metadata", pa.string()),  # the row's metadata as JSON text (what load_qa returns)
        ]
    )
    recs = []
    for i, r in enumerate(rows):
        meta = row_metadata(r)
        recs.append(
            {
                "id": r["id"],
                "question": r["question"],
                "golden_answers": list(r["golden_answers"]),
                "data_source": r.get("data_source", DATA_SOURCE),
                "prompt": [{"role": "user", "content": make_prompt(r["question"], template)}],
                "ability": "fact-reasoning",
                "reward_model": {"style": "rule", "ground_truth": {"target": list(r["golden_answers"])}},
                "extra_info": {"split": split, "index": i},
                "qtype": meta.get("qtype", ""),
                "metadata": json.dumps(meta, ensure_ascii=False),
            }
        )
    table = pa.Table.from_pylist(recs, schema=schema)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


# ---------------------------------------------------------------------------
# generator
# ---------------------------------------------------------------------------

# sentence boundary: . ! ? then a capital/digit/quote, but not after initials ("Ulysses S. Grant") or "St." etc.
_SENT_SPLIT_RE = re.compile(
    r"(?<!\b[A-Z]\.)(?<!\bSt\.)(?<!\bDr\.)(?<!\bMr\.)(?<!\bMs\.)(?<!\bJr\.)(?<!\bSr\.)(?<!\bMrs\.)(?<!\bvs\.)(?<!\bNo\.)"
    r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])"
)
_YEAR_RE = re.compile(r"(?<![\d\w–×^.,-])(1[0-9]{3}|20[0-2][0-9])(?![\d\w–-])")
_BLANK = "____"
DEFAULT_MIX = {"desc2title": 0.35, "cloze": 0.30, "bridge": 0.25, "title2desc": 0.10}


def _nwords(s: str) -> int:
    return len(normalize_answer(s).split())


def _contains(haystack: str, needle: str) -> bool:
    """Whole-word containment after normalisation."""
    n = normalize_answer(needle)
    return bool(n) and f" {n} " in f" {normalize_answer(haystack)} "


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENT_SPLIT_RE.split(text) if s.strip()]


class _Entities:
    """Corpus titles usable as entity answers, and where they are mentioned."""

    def __init__(self, articles: Sequence[Mapping[str, str]]):
        words = Counter()
        for a in articles:
            words.update(re.findall(r"\w+", a["extract"]))
        self.titles: dict[str, Mapping[str, str]] = {}
        for a in articles:
            t = a["title"]
            if len(t) < 3 or not re.search(r"[A-Za-z]", t) or not t[0].isupper() or "(" in t or _nwords(t) > 4:
                continue
            if " " not in t:  # single word: only if it is mostly written capitalised (a name, not "Bird")
                cap, low = words[t], words[t.lower()]
                if t.lower() == t or low > 0.1 * max(cap, 1):
                    continue
            self.titles[t] = a
        self.max_words = max((len(t.split()) for t in self.titles), default=0)

    def mentions(self, sentence: str, exclude: str) -> list[str]:
        """Entity titles mentioned mid-sentence (longest match first), not glued to other capitalised words."""
        words = sentence.split()
        out: list[str] = []
        i = 1  # never the sentence's first word (capitalised anyway, and usually the subject)
        while i < len(words):
            found = 0
            for n in range(min(self.max_words, len(words) - i), 0, -1):
                span = words[i : i + n]
                if span[0][:1] in "(\"'":
                    span = [span[0][1:]] + span[1:]
                cand = " ".join(span)
                tail = cand.rstrip(",.;:!?\"')")
                if tail not in self.titles:
                    continue
                found = n
                before = words[i - 1]
                after = words[i + n] if i + n < len(words) else ""
                glued_before = before[:1].isupper() and not before.endswith((",", ";", ":", ")")) and words[i][:1] != "("
                glued_after = tail == cand and after[:1].isupper()
                if tail != exclude and not glued_before and not glued_after and tail not in out:
                    out.append(tail)
                break
            i += found or 1
        return out


def _q(qtype: str, question: str, answers: list[str], titles: list[str], **meta: Any) -> dict:
    return {"question": question, "golden_answers": answers, "metadata": {"qtype": qtype, "titles": titles, **meta}}


def _ok_answer(ans: str, question: str, max_answer_words: int) -> bool:
    n = _nwords(ans)
    return 1 <= n <= max_answer_words and not _contains(question, ans)


def _candidates_for(
    a: Mapping[str, str],
    ents: _Entities,
    desc_count: Counter,
    rng: random.Random,
    max_answer_words: int,
) -> dict[str, list[dict]]:
    title, extract, desc = a["title"], a["extract"], a.get("description", "")
    out: dict[str, list[dict]] = defaultdict(list)
    is_person = a.get("topic") == "People"
    # desc2title: the (unique, informative) short description -> title
    if desc and desc_count[desc.casefold()] == 1 and _nwords(desc) >= 3:
        q = f'{"Who" if is_person else "What"} is described as "{desc}"?'
        short = re.sub(r"\s*\([^)]*\)$", "", title).strip() or title  # "Don (river)" -> "Don"
        golds = [short] if short == title else [short, title]
        if _ok_answer(short, q, max_answer_words) and not _contains(desc, short):
            out["desc2title"].append(_q("desc2title", q, golds, [title]))
    # title2desc: "What is X?" -> short description that the article itself states
    if desc and 1 <= _nwords(desc) <= max_answer_words and _contains(extract, desc) and _nwords(desc) >= 2:
        q = f"What is {title}? Answer with a short description."
        if _ok_answer(desc, q, max_answer_words):
            out["title2desc"].append(_q("title2desc", q, [desc], [title]))
    # cloze: blank a year or a linked entity in one sentence of the article
    sents = [s for s in _sentences(extract) if 8 <= len(s.split()) <= 45]
    for s in sents:
        years = _YEAR_RE.findall(s)
        for y in sorted(set(years)):
            if years.count(y) != 1:
                continue
            masked = _YEAR_RE.sub(lambda m: _BLANK if m.group(1) == y else m.group(1), s)
            q = f'In the Wikipedia article "{title}", which year fills the blank: "{masked}"?'
            if _ok_answer(y, q, max_answer_words):
                out["cloze"].append(_q("cloze", q, [y], [title], blank="year"))
        for e in ents.mentions(s, exclude=title):
            if s.count(e) != 1:
                continue
            masked = s.replace(e, _BLANK)
            q = f'In the Wikipedia article "{title}", which name fills the blank: "{masked}"?'
            if _ok_answer(e, q, max_answer_words):
                out["cloze"].append(_q("cloze", q, [e], [title, e], blank="entity"))
    # bridge: A mentions B; ask for B by B's description, through A
    for s in _sentences(extract):
        for e in ents.mentions(s, exclude=title):
            b = ents.titles[e]
            bdesc = b.get("description", "")
            if not bdesc or desc_count[bdesc.casefold()] != 1 or _nwords(bdesc) < 2 or _contains(bdesc, e):
                continue
            q = f'The Wikipedia article on {title} mentions something described as "{bdesc}". What is it?'
            if _ok_answer(e, q, max_answer_words):
                out["bridge"].append(_q("bridge", q, [e], [title, e]))
    # one candidate per type and article, chosen at random: keeps questions spread over articles
    return {k: [rng.choice(v)] for k, v in out.items() if v}


def _split_articles(n: int, rng: random.Random, frac_dev: float, frac_test: float) -> dict[str, list[int]]:
    order = list(range(n))
    rng.shuffle(order)
    n_test = max(1, round(n * frac_test)) if n >= 3 else 0
    n_dev = max(1, round(n * frac_dev)) if n >= 3 else 0
    return {"test": order[:n_test], "dev": order[n_test : n_test + n_dev], "train": order[n_test + n_dev :]}


def generate_wiki_qa(
    articles: Sequence[Mapping[str, str]],
    *,
    seed: int = 0,
    n_train: int = 4000,
    n_dev: int = 300,
    n_test: int = 500,
    mix: Mapping[str, float] | None = None,
    frac_dev: float = 0.1,
    frac_test: float = 0.1,
    max_answer_words: int = 4,
    data_source: str = DATA_SOURCE,
) -> dict[str, list[dict]]:
    """Build ``{"train": [...], "dev": [...], "test": [...]}`` question rows, deterministically for a seed.

    ``articles``: dicts with ``title``, ``extract``, ``description``, ``topic``
    (``envs.search.corpus.load_wiki_articles``).  Each row: ``id``,
    ``question``, ``golden_answers``, ``data_source``, ``metadata`` (``qtype``,
    ``titles`` the question is built from, ...).  ``mix`` gives the target
    share of each question type; a type short of candidates is topped up
    from the others.
    """
    mix = dict(mix or DEFAULT_MIX)
    if not mix or any(v < 0 for v in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError("mix must map question types to non-negative shares with a positive sum")
    unknown = set(mix) - set(DEFAULT_MIX)
    if unknown:
        raise ValueError(f"unknown question types {sorted(unknown)}; known: {sorted(DEFAULT_MIX)}")
    arts = sorted(articles, key=lambda a: a["title"])
    rng = random.Random(seed)
    ents = _Entities(arts)
    desc_count = Counter(a.get("description", "").casefold() for a in arts if a.get("description"))
    parts = _split_articles(len(arts), rng, frac_dev, frac_test)
    wanted = {"train": n_train, "dev": n_dev, "test": n_test}
    result: dict[str, list[dict]] = {}
    seen_questions: set[str] = set()
    for split in ("test", "dev", "train"):
        srng = random.Random(f"{seed}-{split}")
        pools: dict[str, list[dict]] = defaultdict(list)
        for ai in sorted(parts[split]):
            for qtype, cands in _candidates_for(arts[ai], ents, desc_count, srng, max_answer_words).items():
                if qtype in mix and mix[qtype] > 0:
                    pools[qtype].extend(cands)
        for qtype in sorted(pools):
            srng.shuffle(pools[qtype])
        n = min(wanted[split], sum(len(v) for v in pools.values()))
        total = sum(mix.values())
        quota = {t: int(round(n * mix[t] / total)) for t in sorted(mix)}
        chosen: list[dict] = []
        used_titles: set[str] = set()

        def take(qtype: str, k: int) -> None:
            pool = pools.get(qtype, [])
            while k > 0 and pool and len(chosen) < n:
                row = pool.pop()
                key = normalize_answer(row["question"])
                primary = row["metadata"]["titles"][0]
                if key in seen_questions or (primary, qtype) in used_titles:
                    continue
                seen_questions.add(key)
                used_titles.add((primary, qtype))
                chosen.append(row)
                k -= 1

        for qtype in sorted(quota):
            take(qtype, quota[qtype])
        # top up from whatever is left, round-robin over types
        while len(chosen) < n and any(pools.values()):
            for qtype in sorted(pools):
                take(qtype, 1)
        srng.shuffle(chosen)
        for i, row in enumerate(chosen):
            row["id"] = f"{data_source}_{split}_{i:05d}"
            row["data_source"] = data_source
        result[split] = [
            {"id": r["id"], "question": r["question"], "golden_answers": r["golden_answers"], "data_source": r["data_source"], "metadata": r["metadata"]}
            for r in chosen
        ]
    return {k: result[k] for k in ("train", "dev", "test")}


def write_qa_splits(
    splits: Mapping[str, Sequence[Mapping[str, Any]]],
    out_dir: str | os.PathLike,
    *,
    template: str = "slow",
    meta: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, str]]:
    """Write ``{split}.jsonl`` (FlashRAG) and ``{split}.parquet`` (Search-R1) for each split, plus ``meta.json``."""

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict[str, str]] = {}
    for split, rows in splits.items():
        j = write_flashrag_jsonl(rows, out / f"{split}.jsonl")
        p = write_search_r1_parquet(rows, out / f"{split}.parquet", split=split, template=template)
        files[split] = {"flashrag": j.name, "search_r1": p.name}
    counts = {s: dict(sorted(Counter(r["metadata"]["qtype"] for r in rows).items())) for s, rows in splits.items()}
    info = {"files": files, "counts": counts, "template": template, **(meta or {})}
    atomic_write_text(out / "meta.json", json.dumps(info, indent=2, sort_keys=True) + "\n")
    return files


def answer_in_topk(rows: Iterable[Mapping[str, Any]], retriever: Any, *, topk: int = 3, batch_size: int = 256) -> dict:
    """Fraction of questions whose gold answer (normalised, whole words) occurs in the top-``topk`` hits
    retrieved for the question text itself; overall and per ``metadata.qtype``."""
    rows = list(rows)
    hit_by: dict[str, list[int]] = defaultdict(list)
    for s in range(0, len(rows), batch_size):
        chunk = rows[s : s + batch_size]
        results = retriever.search([r["question"] for r in chunk], topk)
        for r, hits in zip(chunk, results):
            text = " ".join(h["contents"] for h in hits)
            ok = int(any(_contains(text, g) for g in r["golden_answers"]))
            qtype = (r.get("metadata") or {}).get("qtype", "all")
            hit_by[qtype].append(ok)
            if qtype != "all":
                hit_by["all"].append(ok)
    return {
        "topk": topk,
        "n": len(hit_by["all"]),
        "fraction": (sum(hit_by["all"]) / len(hit_by["all"])) if hit_by["all"] else 0.0,
        "by_qtype": {k: round(sum(v) / len(v), 4) for k, v in sorted(hit_by.items()) if k != "all"},
    }


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def _read_rows(path: str | os.PathLike) -> list[dict]:
    return read_jsonl(path)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m envs.search.qa_data")
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="build the wiki QA benchmark (FlashRAG jsonl + Search-R1 parquet)")
    g.add_argument("--out", required=True)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--wiki-json", default=None, help="summaries json (default: fetch into the cache)")
    g.add_argument("--cache-dir", default=None)
    g.add_argument("--n-train", type=int, default=4000)
    g.add_argument("--n-dev", type=int, default=300)
    g.add_argument("--n-test", type=int, default=500)
    g.add_argument("--template", choices=sorted(PROMPT_TEMPLATES), default="slow")
    g.add_argument("--no-check", action="store_true", help="skip measuring answerability with BM25 top-3")
    g.add_argument(
        "--types",
        default=",".join(DEFAULT_MIX),
        help="comma-separated question types: the generated ones (desc2title,title2desc,cloze,bridge; the default) "
        "and/or natural,twohop (envs.search.natural_qa: facts people ask about, two-hop through a bridge article)",
    )
    c = sub.add_parser("check", help="fraction of questions whose answer is in the BM25 top-k for the question text")
    c.add_argument("--data", required=True, help="FlashRAG jsonl")
    c.add_argument("--corpus", default=None, help="Search-R1 jsonl corpus (default: wiki10k from the cache)")
    c.add_argument("--topk", type=int, default=3)
    args = ap.parse_args(argv)

    from . import corpus as C

    if args.cmd == "generate":
        src = Path(args.wiki_json) if args.wiki_json else C.fetch_wiki_json(args.cache_dir)
        from .natural_qa import LEGACY_TYPES, NATURAL_TYPES, generate_natural_qa

        types = [t.strip() for t in args.types.split(",") if t.strip()]
        unknown = [t for t in types if t not in LEGACY_TYPES + NATURAL_TYPES]
        if not types or unknown:
            ap.error(f"--types: unknown question type(s) {unknown}; choose from {','.join(LEGACY_TYPES + NATURAL_TYPES)}")
        articles = C.load_wiki_articles(src)
        sizes = {"seed": args.seed, "n_train": args.n_train, "n_dev": args.n_dev, "n_test": args.n_test}
        retriever = None
        if all(t in DEFAULT_MIX for t in types):  # the generated types only: the original generator
            data_source = DATA_SOURCE
            splits = generate_wiki_qa(articles, mix={t: DEFAULT_MIX[t] for t in types}, **sizes)
        else:  # natural/two-hop questions (optionally mixed with the generated types), split by article
            data_source = "wiki10k_nq"
            if not args.no_check:  # BM25 picks oracle queries that find each hop's passage at top-1
                from .retrievers import BM25Retriever

                retriever = BM25Retriever(C.articles_to_passages(articles), show_progress=False)
            splits = generate_natural_qa(articles, types=types, data_source=data_source, retriever=retriever, **sizes)
        meta: dict[str, Any] = {"seed": args.seed, "source": src.name, "source_sha256": C.file_sha256(src),
                                "data_source": data_source, "types": types}  # fmt: skip
        if not args.no_check:
            from .retrievers import BM25Retriever

            docs = C.articles_to_passages(articles)  # the wiki10k corpus, one passage per article
            stats = answer_in_topk(splits["test"], retriever or BM25Retriever(docs, show_progress=False), topk=3)
            meta["test_answer_in_bm25_top3"] = stats
            print(f"test: gold answer in BM25 top-3 for the question text: {stats['fraction']:.3f}  {stats['by_qtype']}")
        write_qa_splits(splits, args.out, template=args.template, meta=meta)
        print(json.dumps({s: len(v) for s, v in splits.items()}), "->", args.out)
    elif args.cmd == "check":
        from .retrievers import BM25Retriever

        corpus_path = args.corpus or C.fetch_wiki()
        stats = answer_in_topk(_read_rows(args.data), BM25Retriever(corpus_path, show_progress=False), topk=args.topk)
        print(json.dumps(stats, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The next-query data format (rows, streams, catalogue) and its validating loaders; bring your own logs.

Every file is JSON lines, one object per line. The same format serves the synthetic world
(`envs/nextquery/world.py`), MovieLens (`envs/nextquery/movielens.py`) and a user's own logs.

Event (a behaviour event; the item's text is inlined, so a prompt needs no catalogue):
  {"item_id": str, "title": str, "category": str, "brand": str ("" if none), "tags": [str, ...],
   "action": "click" | "cart" | "favorite" | "purchase", "time": unix seconds (int or float)}

Example row (`train/valid/test.jsonl`):
  {"id": str (unique in the file), "user_id": str, "time": unix seconds of the query ("now"),
   "history": [Event, ...] (oldest first, times non-decreasing and <= time; may be empty),
   "query": str (the real next query: the target, non-empty),
   "next_items": [item_id, ...] (what the user engaged with after the query; retrieval hit@10),
   "source": "synthetic" | "movielens" | "user", "target_kind": "behaviour" | "complementary" |
   "teacher_rewrite" | "anchor", "intent": {...} (synthetic: the latent intent; {} otherwise)}
  Optional, filled when absent: next_items [], source "user", target_kind "behaviour", intent {}.
  Extra keys are kept as they are.

Stream (`streams_test.jsonl`, the drift-trigger replay; one user per line):
  {"user_id": str, "events": [Event, ...] (oldest first),
   "queries": [{"after_event": int (index into events of the last event before the query),
                "time": unix seconds (>= that event's time), "query": str, "next_items": [item_id, ...]}]}

Catalogue item (`catalog.jsonl`):
  {"item_id": str (unique), "title": str, "category": str, "brand": str, "attributes": {str: str},
   "tags": [str, ...]}  (extra keys, e.g. price, kept)

Every loader reads the whole file and checks every field; the first problem is one `DataError` (a
`UserError`: the CLIs print one ``error:`` line) naming the file, the row (0-based data row and the
1-based line) and the key, e.g. ``logs.jsonl row 3 (line 4): history[2].action: 'view' is not one of
['click', 'cart', 'favorite', 'purchase']``. Nothing is dropped or repaired silently.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rl.common import JsonlError, iter_jsonl
from rl.data import DataError

__all__ = [
    "ACTIONS",
    "SOURCES",
    "TARGET_KINDS",
    "check_event",
    "check_item",
    "check_row",
    "check_rows",
    "check_stream",
    "load_catalog",
    "load_rows",
    "load_streams",
]

ACTIONS = ("click", "cart", "favorite", "purchase")
SOURCES = ("synthetic", "movielens", "user")
TARGET_KINDS = ("behaviour", "complementary", "teacher_rewrite", "anchor")
ROW_DEFAULTS = {"next_items": list, "source": lambda: "user", "target_kind": lambda: "behaviour", "intent": dict}


class _Bad(Exception):
    """A problem inside one object: `key` (a path such as ``history[2].action``) and what is wrong."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key}: {reason}")


def _get(obj: Mapping, key: str, prefix: str) -> Any:
    if key not in obj:
        raise _Bad(prefix + key, "missing")
    return obj[key]


def _str(obj: Mapping, key: str, prefix: str = "", *, empty: bool = False) -> str:
    v = _get(obj, key, prefix)
    if not isinstance(v, str):
        raise _Bad(prefix + key, f"expected a string, got {type(v).__name__} {v!r}"[:200])
    if not empty and not v.strip():
        raise _Bad(prefix + key, "empty string")
    return v


def _time(obj: Mapping, key: str, prefix: str = "") -> float:
    v = _get(obj, key, prefix)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _Bad(prefix + key, f"expected unix seconds (a number), got {v!r}"[:200])
    return v


def _str_list(obj: Mapping, key: str, prefix: str = "") -> list[str]:
    v = _get(obj, key, prefix)
    if not isinstance(v, list):
        raise _Bad(prefix + key, f"expected a list of strings, got {type(v).__name__}")
    for i, x in enumerate(v):
        if not isinstance(x, str) or not x.strip():
            raise _Bad(f"{prefix}{key}[{i}]", f"expected a non-empty string, got {x!r}"[:200])
    return v


def _mapping(v: Any, key: str) -> Mapping:
    if not isinstance(v, Mapping):
        raise _Bad(key, f"expected an object, got {type(v).__name__}")
    return v


def check_event(ev: Any, prefix: str = "") -> None:
    """One Event (module docstring); `prefix` names it in errors (``history[3].``)."""
    _mapping(ev, prefix.rstrip(".") or "event")
    _str(ev, "item_id", prefix)
    _str(ev, "title", prefix)
    _str(ev, "category", prefix)
    _str(ev, "brand", prefix, empty=True)
    _str_list(ev, "tags", prefix)
    action = _get(ev, "action", prefix)
    if action not in ACTIONS:
        raise _Bad(prefix + "action", f"{action!r} is not one of {list(ACTIONS)}")
    _time(ev, "time", prefix)


def _events(obj: Mapping, key: str, until: float | None = None) -> list:
    events = _get(obj, key, "")
    if not isinstance(events, list):
        raise _Bad(key, f"expected a list of events, got {type(events).__name__}")
    last = -math.inf
    for i, ev in enumerate(events):
        check_event(ev, f"{key}[{i}].")
        if ev["time"] < last:
            raise _Bad(f"{key}[{i}].time", f"{ev['time']} is earlier than the event before ({last}): events "
                       "go oldest first")
        if until is not None and ev["time"] > until:
            raise _Bad(f"{key}[{i}].time", f"{ev['time']} is after the row's time {until} (history is the past)")
        last = ev["time"]
    return events


def check_row(row: Any) -> dict:
    """One example row, validated; returns it with the optional keys filled (a new dict)."""
    _mapping(row, "row")
    row = dict(row)
    for key, default in ROW_DEFAULTS.items():
        if key not in row:
            row[key] = default()
    _str(row, "id")
    _str(row, "user_id")
    now = _time(row, "time")
    _events(row, "history", until=now)
    _str(row, "query")
    _str_list(row, "next_items")
    if row["source"] not in SOURCES:
        raise _Bad("source", f"{row['source']!r} is not one of {list(SOURCES)}")
    if row["target_kind"] not in TARGET_KINDS:
        raise _Bad("target_kind", f"{row['target_kind']!r} is not one of {list(TARGET_KINDS)}")
    _mapping(row["intent"], "intent")
    return row


def check_stream(obj: Any) -> dict:
    """One stream (module docstring), validated."""
    _mapping(obj, "stream")
    _str(obj, "user_id")
    events = _events(obj, "events")
    queries = _get(obj, "queries", "")
    if not isinstance(queries, list):
        raise _Bad("queries", f"expected a list, got {type(queries).__name__}")
    last = -1
    for i, q in enumerate(queries):
        p = f"queries[{i}]."
        _mapping(q, p.rstrip("."))
        after = _get(q, "after_event", p)
        if isinstance(after, bool) or not isinstance(after, int) or not 0 <= after < len(events):
            raise _Bad(p + "after_event", f"{after!r} is not an index into the {len(events)} events")
        if after < last:
            raise _Bad(p + "after_event", f"{after} comes before the previous query's {last}: queries go in order")
        last = after
        t = _time(q, "time", p)
        if t < events[after]["time"]:
            raise _Bad(p + "time", f"{t} is before event {after}'s time {events[after]['time']}")
        _str(q, "query", p)
        _str_list(q, "next_items", p)
    return dict(obj)


def check_item(obj: Any) -> dict:
    """One catalogue item (module docstring), validated."""
    _mapping(obj, "item")
    _str(obj, "item_id")
    _str(obj, "title")
    _str(obj, "category")
    _str(obj, "brand", empty=True)
    attrs = _mapping(_get(obj, "attributes", ""), "attributes")
    for k, v in attrs.items():
        if not isinstance(v, str):
            raise _Bad(f"attributes.{k}", f"expected a string, got {type(v).__name__} {v!r}"[:200])
    _str_list(obj, "tags")
    return dict(obj)


def _load(path: str | os.PathLike, check, what: str, unique: str | None) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file ({what})")
    out, seen = [], {}
    try:
        for i, (lineno, obj) in enumerate(iter_jsonl(path)):
            try:
                obj = check(obj)
            except _Bad as e:
                raise DataError(f"{path} row {i} (line {lineno}): {e}") from None
            if unique is not None:
                key = obj[unique]
                if key in seen:
                    raise DataError(f"{path} row {i} (line {lineno}): {unique}: duplicate {key!r} "
                                    f"(first at row {seen[key]})")
                seen[key] = i
            out.append(obj)
    except JsonlError as e:
        raise DataError(f"{path} row {e.row} (line {e.lineno}): {e.reason} ({what})") from None
    if not out:
        raise DataError(f"{path}: no rows ({what})")
    return out


def load_rows(path: str | os.PathLike) -> list[dict]:
    """Example rows (module docstring), every field checked; ids unique; optional keys filled."""
    return _load(path, check_row, "next-query example rows", "id")


def load_streams(path: str | os.PathLike) -> list[dict]:
    """Behaviour streams for the drift-trigger replay (module docstring); one user per line."""
    return _load(path, check_stream, "next-query streams", "user_id")


def load_catalog(path: str | os.PathLike) -> list[dict]:
    """Catalogue items (module docstring); item ids unique."""
    return _load(path, check_item, "next-query catalogue", "item_id")


def check_rows(rows: Sequence[Mapping], name: str = "rows") -> list[dict]:
    """In-memory rows (e.g. handed to `eval.run.evaluate`), validated as `load_rows` does."""
    out, seen = [], {}
    for i, row in enumerate(rows):
        try:
            row = check_row(row)
        except _Bad as e:
            raise DataError(f"{name} row {i}: {e}") from None
        if row["id"] in seen:
            raise DataError(f"{name} row {i}: id: duplicate {row['id']!r} (first at row {seen[row['id']]})")
        seen[row["id"]] = i
        out.append(row)
    return out

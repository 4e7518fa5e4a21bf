"""Prompt datasets, prompt builders and the resumable prompt sampler."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import datasets
import numpy as np

from rl.registry import Registry

PROMPT_BUILDERS: Registry[Callable[[dict], list[dict]]] = Registry("prompt builder")
register_prompt_builder = PROMPT_BUILDERS.register
# Functions returning a datasets.Dataset (or DatasetDict); a data source names one, or a file
DATASETS: Registry[Callable[..., Any]] = Registry("dataset")
register_dataset = DATASETS.register

_FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@register_prompt_builder("messages")
def messages_column(row: dict) -> list[dict]:
    """The row's `messages` column, as is (chat messages with role/content)."""
    return row["messages"]


@register_prompt_builder("question")
def question_column(row: dict) -> list[dict]:
    return [{"role": "user", "content": row["question"]}]


@register_prompt_builder("prompt")
def prompt_column(row: dict) -> list[dict]:
    prompt = row["prompt"]
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def load_source(source: str, kwargs: dict[str, Any] | None = None, split: str = "train") -> datasets.Dataset:
    """A dataset from a registered dataset name or "module:function", a data file, or a `save_to_disk` directory."""
    kwargs = kwargs or {}
    path = Path(source).expanduser()
    if (":" in source or source in DATASETS) and not path.exists():
        ds = DATASETS.get(source)(**kwargs)
    elif path.is_dir():
        ds = datasets.load_from_disk(str(path))
    elif path.is_file():
        fmt = _FILE_FORMATS.get(path.suffix)
        if fmt is None:
            raise ValueError(f"{path}: unsupported data file type '{path.suffix}' (use {sorted(_FILE_FORMATS)})")
        ds = datasets.load_dataset(fmt, data_files=str(path), split="train")
    else:
        raise FileNotFoundError(f"dataset source not found: '{source}' (a file, a directory, a registered dataset "
                                f"{DATASETS.names()}, or 'module:function')")
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"{source}: no split '{split}' (has {list(ds)})")
        ds = ds[split]
    if not isinstance(ds, datasets.Dataset):
        raise TypeError(f"{source}: expected a datasets.Dataset, got {type(ds).__name__}")
    if len(ds) == 0:
        raise ValueError(f"{source}: the dataset is empty")
    return ds


def check_columns(ds: datasets.Dataset, columns: list[str], source: str) -> None:
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing}; the dataset has {ds.column_names}")


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

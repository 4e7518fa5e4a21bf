"""What the text path (`sft.data`) and the vision path (`sft.vlm`) share: loaded rows, how
errors name them, and the label value that carries no loss.

Imports point one way: `sft.data` -> `sft.vlm` -> `sft.rows` (and `sft.data` -> `sft.rows`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rl.common import UserError

__all__ = ["IGNORE_INDEX", "MAX_LISTED", "RawRows", "SFTDataError", "format_problems", "looks_like_local"]

IGNORE_INDEX = -100  # label of a position that carries no loss (transformers' convention)
MAX_LISTED = 5  # bad rows listed in one error message


LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def looks_like_local(source: str) -> bool:
    """A data source that names a local file (rather than a hub dataset or "module:function")."""
    return source.endswith(LOCAL_SUFFIXES) or source.startswith((".", "/", "~"))


class SFTDataError(UserError, ValueError):
    """Rows that cannot be trained on; the message names the file and the rows. A `UserError`:
    the CLIs print it as one ``error:`` line."""


@dataclass
class RawRows:
    rows: Sequence[dict]  # a list of dicts or a datasets.Dataset
    source: str  # how errors name it (the path as given)
    path: Path | None = None  # the local file, if any (relative image paths resolve against its folder)
    lines: list[int] | None = None  # .jsonl: the 1-based line of each row

    def where(self, i: int) -> str:
        return f"row {i} (line {self.lines[i]})" if self.lines else f"row {i}"


def format_problems(raw: RawRows, problems: list[tuple[int, str]], what: str, total: int | None = None) -> str:
    """One message for all bad rows: the row itself when there is one, else the first few."""
    if len(problems) == 1:
        i, problem = problems[0]
        return f"{raw.source}: {raw.where(i)}: {problem}"
    total = len(raw.rows) if total is None else total
    listed = [f"  {raw.where(i)}: {p}" for i, p in problems[:MAX_LISTED]]
    if len(problems) > MAX_LISTED:
        listed.append(f"  ... and {len(problems) - MAX_LISTED} more")
    return f"{raw.source}: {len(problems)} of {total} rows are invalid ({what}):\n" + "\n".join(listed)

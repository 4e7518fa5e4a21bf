"""Live MiniWoB++ episodes as dataset rows (`{"task", "seed"}`) for the `miniwob` environment: RL in the
browser and the live leaderboard (`gui_live`), split by the same rule as the recorded episodes
(`envs.gui.episodes.split_episodes`: held-out task types and seeds >= `test_seed_min` are test), so a
live evaluation never runs a (task, seed) the oracle data trained on."""

from __future__ import annotations

import datasets

from envs.gui.episodes import DEFAULT_HELDOUT_TASKS, DEFAULT_TEST_SEED_MIN, split_episodes
from rl.data import DataError, register_dataset, register_prompt_builder

__all__ = ["miniwob_task_prompt", "miniwob_tasks"]


@register_dataset("miniwob_tasks")
def miniwob_tasks(split: str = "train", tasks: list[str] | None = None, seeds: list[int] | str | None = None,
                  heldout_tasks: list[str] | None = None, test_seed_min: int = DEFAULT_TEST_SEED_MIN):
    """Rows `{"task", "seed"}` of `split` ("train" | "test") over `tasks` x `seeds` (default: the recorder's
    training task types plus the held-out types; seeds 0..39; "0-29" style strings work)."""
    from envs.gui.__main__ import HELDOUT_SEEDS, TRAIN_SEEDS, TRAIN_TASKS, parse_seeds

    if split not in ("train", "test"):
        raise DataError(f"miniwob_tasks: split must be train or test, got {split!r}")
    held = list(DEFAULT_HELDOUT_TASKS if heldout_tasks is None else heldout_tasks)
    if tasks is None:
        tasks = [*TRAIN_TASKS, *held]
    if isinstance(seeds, str):
        seeds = parse_seeds(seeds)
    rows = []
    for task in tasks:
        for seed in seeds if seeds is not None else (HELDOUT_SEEDS if task in held else TRAIN_SEEDS):
            rows.append({"task": str(task), "seed": int(seed)})
    train, test = split_episodes(rows, heldout_tasks=held, test_seed_min=test_seed_min)
    chosen = train if split == "train" else test
    if not chosen:
        raise DataError(f"miniwob_tasks: no {split} rows for tasks {tasks} and seeds {seeds} (held out: {held}, "
                        f"test seeds >= {test_seed_min})")
    return datasets.Dataset.from_list(chosen)


@register_prompt_builder("miniwob_task")
def miniwob_task_prompt(row: dict) -> list[dict]:
    """The recipe-level prompt of a live row. The `miniwob` environment writes each episode's real first
    prompt itself at reset (the instruction and the screen exist only once the page is loaded), so this
    one only names the row: the trainer builds it up front to check the data, and logs show it."""
    if "task" not in row or "seed" not in row:
        raise DataError(f"miniwob_task prompt: the row needs 'task' and 'seed' (columns: {sorted(row)})")
    return [{"role": "user", "content": f"MiniWoB++ task {row['task']} (seed {row['seed']})"}]

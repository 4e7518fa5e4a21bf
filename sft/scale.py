"""Data-scale runner: one SFT recipe at several training-set sizes, each evaluated, one table.

    python -m sft.scale RECIPE.yaml --sizes 32,64,128 --out DIR [--evaluator NAME ...] [key.path=value ...]

For every size n (ascending) the recipe runs as `sft.train` would (the same in-process
`sft.trainer.train`) with ``data.max_train_rows=n`` and ``output_dir=DIR/n<n>``; the
subsets are seeded by ``seed`` and nested (the 32-row set lies inside the
64-row set) and are drawn after ``data.eval_size`` rows are held out, so every size is
evaluated on the same held-out rows (see `sft.data.train_subset_indices`). Then every
evaluator scores ``DIR/n<n>/final``, and ``DIR/results.md`` + ``DIR/results.json``
(+ ``results.png``, each metric against the size) are rewritten atomically after each size,
so a crash leaves the finished sizes' table behind. Columns: size, rows used (= size:
`sft.data` refuses a size larger than the data), optimizer steps, final train loss (the
last logged one), the evaluators' metrics, training minutes.

Training steps follow the recipe: with ``steps`` every size gets the same
number of steps; with ``training.epochs`` (``steps: 0``) the steps grow with the size.

A size whose run finished before (``DIR/n<n>/scale_point.json`` with the same recipe and a
``final/``) is not trained again, only re-evaluated; ``--retrain`` trains it anew (the
recipe's ``overwrite_output_dir`` then decides whether its old directory may be replaced).

Evaluators, ``f(model_dir: str, recipe: SFTRecipe) -> dict[str, float]``:

* ``heldout_loss`` (built in): the held-out SFT loss the trainer records at the end of
  training in ``<output_dir>/metrics.jsonl`` (needs ``data.eval`` or ``data.eval_size``,
  checked before anything trains);
* ``package.module:function``: any user function with that signature (e.g. generation
  accuracy). A function may carry a ``check(recipe)`` attribute that raises on a recipe it
  cannot evaluate; it runs before the first size trains.

Under ``accelerate launch -m sft.scale`` every process trains; only the main process
evaluates and writes the results.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from rl.common import atomic_write, atomic_write_text, read_jsonl
from rl.registry import Registry
from sft.config import ConfigError, SFTRecipe, read_recipe_mapping, recipe_from_dict, recipe_to_dict

__all__ = ["EVALUATORS", "heldout_loss", "main", "parse_sizes", "register_evaluator", "run_scale"]

EVALUATORS: Registry[Callable[..., dict]] = Registry("evaluator")
register_evaluator = EVALUATORS.register

_POINT_FILE = "scale_point.json"
_RUNNER_KEYS = ("output_dir", "data.max_train_rows")  # set per size by the runner


def _has_eval_set(recipe: SFTRecipe) -> bool:
    return bool(recipe.data.eval) or recipe.data.eval_size > 0


def _check_heldout(recipe: SFTRecipe) -> None:
    if not _has_eval_set(recipe):
        raise ConfigError(
            "evaluator heldout_loss needs a held-out set: set data.eval (a file) or data.eval_size "
            "(rows held out of data.train)"
        )


@register_evaluator("heldout_loss")
def heldout_loss(model_dir: str, recipe: SFTRecipe) -> dict[str, float]:
    """The last `eval_loss` in `<recipe.output_dir>/metrics.jsonl`: the trainer evaluates
    the final model on the held-out set when training ends (`sft.trainer.train`), so this is
    the loss of `model_dir` (`<output_dir>/final`) without a second pass over the data."""
    _check_heldout(recipe)
    path = Path(recipe.output_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"heldout_loss: {path} not found (was {model_dir} trained by sft.train?)")
    loss = None
    try:
        records = read_jsonl(path)
    except ValueError as e:  # rl.common.JsonlError: names the file and the line
        raise ValueError(f"heldout_loss: {e}") from None
    for record in records:
        if "eval_loss" in record:
            loss = float(record["eval_loss"])
    if loss is None:
        raise ValueError(f"heldout_loss: {path} records no eval_loss")
    return {"eval_loss": loss}


heldout_loss.check = _check_heldout  # type: ignore[attr-defined]  # run before anything trains


# ----------------------------------------------------------------------------- runner


def parse_sizes(text: str) -> list[int]:
    """'32,64,128' -> [32, 64, 128] (sorted); every size a distinct positive integer."""
    sizes = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) < 1:
            raise ConfigError(f"--sizes: {part!r} is not a positive integer (expected e.g. 32,64,128)")
        sizes.append(int(part))
    if len(set(sizes)) != len(sizes):
        raise ConfigError(f"--sizes: {text!r} repeats a size")
    return sorted(sizes)


def _is_main() -> bool:
    # accelerate sets RANK for every launched process; asking accelerate itself would create
    # its PartialState before sft.trainer.train configures it (cpu=... on GPU-less machines)
    return os.environ.get("RANK", "0") == "0"


def _size_recipes(recipe_path: str, sizes: list[int], out: Path, overrides: list[str]) -> dict[int, SFTRecipe]:
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in _RUNNER_KEYS:
            raise ConfigError(f"override {item!r}: the runner sets {key} for each size (use --out / --sizes)")
    base = read_recipe_mapping(recipe_path, overrides)
    recipes = {}
    for n in sizes:
        data = copy.deepcopy(base)
        # set in the mapping rather than as "key=value" strings, which YAML would re-parse
        data.setdefault("data", {})
        if not isinstance(data["data"], dict):
            raise ConfigError(f"{recipe_path}: data must be a mapping of keys")
        data["data"]["max_train_rows"] = n
        data["output_dir"] = str(out / f"n{n}")
        recipes[n] = recipe_from_dict(data, f"{recipe_path} (size {n})")
    return recipes


def _comparable(recipe: SFTRecipe) -> dict:
    d = recipe_to_dict(recipe)
    d.pop("overwrite_output_dir")  # whether a rerun may delete the dir does not change the run
    return d


def _finished_point(recipe: SFTRecipe) -> dict | None:
    run_dir = Path(recipe.output_dir)
    path = run_dir / _POINT_FILE
    if not path.is_file() or not (run_dir / "final").is_dir():
        return None
    try:
        point = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e.msg}); delete it or pass --retrain") from None
    if point.get("recipe") != _comparable(recipe):
        if recipe.overwrite_output_dir:
            return None  # trained again; sft.trainer replaces the directory
        raise FileExistsError(
            f"{run_dir} holds a finished run of a different recipe; choose another --out, "
            "or pass overwrite_output_dir=true to replace it"
        )
    return point


def _train_point(recipe: SFTRecipe, size: int) -> dict:
    from sft.trainer import train

    start = time.perf_counter()
    result = train(recipe)
    minutes = (time.perf_counter() - start) / 60
    losses = [e["loss"] for e in result["log_history"] if "loss" in e]
    point = {
        "size": size,
        "rows": size,  # sft.data trains on exactly max_train_rows rows or raises
        "steps": int(result["global_step"]),
        "train_loss": float(losses[-1]) if losses else float(result["train_loss"]),
        "train_loss_mean": float(result["train_loss"]),
        "minutes": minutes,
        "recipe": _comparable(recipe),
    }
    if _is_main():
        atomic_write_text(Path(recipe.output_dir) / _POINT_FILE, json.dumps(point, indent=2) + "\n")
    return point


def _evaluate(evaluators: dict[str, Callable], recipe: SFTRecipe) -> tuple[dict[str, float], float]:
    model_dir = str(Path(recipe.output_dir) / "final")
    metrics: dict[str, float] = {}
    start = time.perf_counter()
    for name, fn in evaluators.items():
        out = fn(model_dir, recipe)
        if not isinstance(out, dict):
            raise ValueError(f"evaluator '{name}' returned {type(out).__name__}, expected a dict of metric -> number")
        for key, value in out.items():
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"evaluator '{name}': metric {key!r} = {value!r} is not a number") from None
            if key in metrics:
                raise ValueError(f"evaluator '{name}': metric {key!r} is already reported by another evaluator")
            metrics[str(key)] = value
    return metrics, (time.perf_counter() - start) / 60


def _cell(value: Any) -> Any:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _write_results(out: Path, points: list[dict], summary: dict) -> None:
    from rl.report import markdown_table

    metric_names: list[str] = []
    for p in points:
        metric_names += [k for k in p["metrics"] if k not in metric_names]
    header = ["size", "rows", "steps", "final train loss", *metric_names, "minutes"]
    table_rows = [
        [p["size"], p["rows"], p["steps"], p["train_loss"], *(_cell(p["metrics"].get(m)) for m in metric_names),
         f"{p['minutes']:.2f}"]
        for p in points
    ]
    public = [{k: v for k, v in p.items() if k != "recipe"} for p in points]
    atomic_write_text(out / "results.json", json.dumps({**summary, "results": public}, indent=2) + "\n")
    title = f"# SFT data scale: {summary['recipe']}\n\n"
    notes = (f"\nEvaluators: {', '.join(summary['evaluators'])}. Subsets seeded by the recipe seed "
             f"({summary['seed']}) and nested. Minutes = training time on {summary['device']}.\n")
    if summary["overrides"]:
        notes += "Overrides: " + " ".join(f"`{o}`" for o in summary["overrides"]) + "\n"
    atomic_write_text(out / "results.md", title + markdown_table(header, table_rows) + "\n" + notes)
    if metric_names and points:
        _plot(out / "results.png", points, metric_names, summary["recipe"])


def _plot(path: Path, points: list[dict], metric_names: list[str], title: str) -> None:
    from rl.report import plt  # matplotlib with the headless backend set

    fig, axes = plt.subplots(1, len(metric_names), figsize=(4.5 * len(metric_names), 3.5), squeeze=False)
    for ax, name in zip(axes[0], metric_names):
        xs = [p["size"] for p in points if name in p["metrics"]]
        ax.plot(xs, [p["metrics"][name] for p in points if name in p["metrics"]], "o-")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])  # the sizes themselves, not powers of 2
        ax.minorticks_off()
        ax.set_xlabel("training rows")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, dpi=110, format="png"), binary=True)  # as the tables
    plt.close(fig)


def run_scale(
    recipe_path: str,
    sizes: list[int],
    out: str | Path,
    evaluators: list[str] | None = None,
    overrides: list[str] | None = None,
    retrain: bool = False,
) -> list[dict]:
    """Train and evaluate the recipe at each size; returns the result rows (also written to `out`)."""
    from tqdm.auto import tqdm

    out = Path(out)
    names = list(evaluators or ["heldout_loss"])
    fns = {name: EVALUATORS.get(name) for name in names}  # import errors before training
    recipes = _size_recipes(recipe_path, sizes, out, list(overrides or []))
    for name, fn in fns.items():
        check = getattr(fn, "check", None)
        if check is not None:
            try:
                check(recipes[sizes[0]])
            except ConfigError as e:
                raise ConfigError(f"{recipe_path}: {e}") from None
    import torch

    summary = {
        "recipe": str(recipe_path),
        "overrides": list(overrides or []),
        "sizes": sizes,
        "evaluators": names,
        "seed": recipes[sizes[0]].seed,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU",
    }
    points: list[dict] = []
    bar = tqdm(sizes, desc="data scale", unit="size", disable=not _is_main())
    for n in bar:
        recipe = recipes[n]
        bar.set_postfix_str(f"n={n} -> {recipe.output_dir}")
        point = None if retrain else _finished_point(recipe)
        if point is not None:
            tqdm.write(f"n={n}: reusing the finished run in {recipe.output_dir} (--retrain to train again)",
                       file=sys.stderr)
        else:
            point = _train_point(recipe, n)
        if not _is_main():
            continue
        point["metrics"], point["eval_minutes"] = _evaluate(fns, recipe)
        point["run_dir"] = recipe.output_dir
        points.append(point)
        _write_results(out, points, summary)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in point["metrics"].items())
        tqdm.write(f"n={n}: {point['steps']} steps, train loss {point['train_loss']:.4g}"
                   + (f", {shown}" if shown else "") + f", {point['minutes']:.1f} min", file=sys.stderr)
    bar.close()
    return points


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sft.scale", description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="SFT recipe YAML (as for sft.train)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4")
    parser.add_argument("--sizes", required=True, help="training-set sizes, e.g. 32,64,128")
    parser.add_argument("--out", required=True, help="directory for n<size>/ runs and results.md/.json")
    parser.add_argument("--evaluator", action="append", default=None,
                        help="heldout_loss (default) or package.module:function; repeatable")
    parser.add_argument("--retrain", action="store_true", help="train sizes that have a finished run again")
    args = parser.parse_intermixed_args(argv)
    from sft.data import SFTDataError

    try:
        sizes = parse_sizes(args.sizes)
        points = run_scale(args.recipe, sizes, args.out, args.evaluator, args.overrides, args.retrain)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (SFTDataError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if _is_main():
        print(f"done: {len(points)} sizes -> {Path(args.out) / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

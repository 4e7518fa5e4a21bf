"""The CoNRec ablation ladder on real MovieLens-100k ratings, over seeds, next to the baselines.

Rows (each a training run of SmolLM2-135M with LoRA, then a top-20 constrained beam-search evaluation on
the held-out test anchors through `python -m eval.run --agent negrec_topk`):

  translation      Stage-1 SFT on SID <-> title translation only
  alignment        + the item-level alignment task (recipes/negrec_sft.yaml as is)
  prog_hit         + Progressive GRPO (3 context stages) with the sparse hit reward (1 / 0.1 / 0.01)
  prog_similarity  + the future-negative similarity reward (no future-positive penalty: gamma = 0)
  prog_full        + the future-positive penalty (recipes/negrec_progressive_grpo.yaml as is): CoNRec
  single_stage     GRPO with all context at once (recipes/negrec_single_stage_grpo.yaml), same steps
  next_negative    alignment + the LC-Rec-style next-negative task (the stage-(ii) prompt -> the anchor's SID,
                   as many rows as the alignment task), the same SFT steps
  nn_prog_full     prog_full started from the `next_negative` model

Every other GRPO row starts from the same seed's `alignment` model. The baselines (random over 2 seeds,
negative popularity, co-negative Swing kNN) come from the build (`baselines.jsonl`). The script prints
Cand.Acc, HR@20 and FHR@20 (+ LUF/LIF, invalid rate) per row: mean over seeds, seed spread (max - min),
minutes per run. Re-running resumes (finished runs and evaluations are kept in results.json).

    python -m envs.negrec build                       # once: data/negrec/ml-100k/
    python benchmarks/negrec_ablation.py              # all rows x seeds 0 1 (hours on 2 CPU cores)
    python benchmarks/negrec_ablation.py --rows alignment prog_full single_stage --seeds 0
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from envs.negrec.tasks import sft_rows  # noqa: E402
from rl.common import atomic_write_text, read_jsonl  # noqa: E402

SFT_RECIPE = "recipes/negrec_sft.yaml"
PROGRESSIVE_RECIPE = "recipes/negrec_progressive_grpo.yaml"
SINGLE_RECIPE = "recipes/negrec_single_stage_grpo.yaml"
TRANSLATION_TASKS = ("sid2title", "title2sid")

# row -> (kind, recipe, reward kwargs overriding the recipe's negrec_future_negative kwargs)
ROWS = {
    "translation": ("sft", SFT_RECIPE, None),
    "alignment": ("sft", SFT_RECIPE, None),
    "prog_hit": ("grpo", PROGRESSIVE_RECIPE, {"variant": "hit", "gamma": 0.0}),
    "prog_similarity": ("grpo", PROGRESSIVE_RECIPE, {"variant": "similarity", "gamma": 0.0}),
    "prog_full": ("grpo", PROGRESSIVE_RECIPE, {}),
    "single_stage": ("grpo", SINGLE_RECIPE, {}),
    "next_negative": ("sft", SFT_RECIPE, None),
    "nn_prog_full": ("grpo", PROGRESSIVE_RECIPE, {}),
}
# row -> the SFT row whose model a GRPO row starts from (default: alignment)
START = {"nn_prog_full": "next_negative"}
# row -> extra recipe overrides (before the command line's)
EXTRA: dict[str, list[str]] = {}
METRICS = ("cand_acc", "hr@20", "fhr@20", "luf@20", "lif@20", "invalid_rate")


def run(cmd: list[str], log: Path) -> float:
    """Run `cmd` in the repo, its output appended to `log`; minutes taken; exit on failure."""
    print(f"   $ {' '.join(cmd[2:]) if cmd[0] == sys.executable else ' '.join(cmd)}", flush=True)
    t0 = time.time()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode:
        sys.exit(f"failed with exit code {proc.returncode}: see {log}")
    return (time.time() - t0) / 60


def reward_override(recipe: str, kwargs: dict) -> str:
    """`rewards=[...]` with the recipe's negrec_future_negative kwargs updated (recipe lists cannot be
    overridden item by item)."""
    rewards = yaml.safe_load((REPO / recipe).read_text())["rewards"]
    for r in rewards:
        if r["name"] == "negrec_future_negative":
            r["kwargs"] = {**r.get("kwargs", {}), **kwargs}
    return "rewards=" + json.dumps(rewards)


def train(row: str, seed: int, out: Path, data: Path, overrides: list[str]) -> tuple[Path, float]:
    kind, recipe, reward_kwargs = ROWS[row]
    run_dir = out / row / f"seed{seed}"
    common = [f"seed={seed}", f"output_dir={run_dir}", "overwrite_output_dir=true", *EXTRA.get(row, []), *overrides]
    if kind == "sft":
        train_file = data / "sft" / "train.jsonl"
        if row == "translation":  # the same rows minus the alignment task
            train_file = out / "data" / "sft_translation.jsonl"
            rows = [r for r in read_jsonl(data / "sft" / "train.jsonl") if r.get("task") in TRANSLATION_TASKS]
            atomic_write_text(train_file, "".join(json.dumps(r) + "\n" for r in rows))
        elif row == "next_negative":  # the same rows plus as many next-negative rows as alignment rows
            train_file = out / "data" / "sft_next_negative.jsonl"
            rows = read_jsonl(data / "sft" / "train.jsonl")
            n_alignment = sum(r.get("task") == "alignment" for r in rows)
            rows += sft_rows(read_jsonl(data / "items.jsonl"), read_jsonl(data / "examples" / "train.jsonl"),
                             tasks=("next_negative",), seed=seed, max_next_negative_rows=n_alignment)
            atomic_write_text(train_file, "".join(json.dumps(r) + "\n" for r in rows))
        cmd = [sys.executable, "-m", "sft.train", recipe, f"data.train={train_file}", *common]
    else:
        start_row = START.get(row, "alignment")
        start = out / start_row / f"seed{seed}" / "final"
        if not start.is_dir():
            sys.exit(f"{row}: needs the {start_row} model {start}: run the '{start_row}' row first")
        cmd = [sys.executable, "-m", "rl.train", recipe, f"model.name_or_path={start}",
               "eval_before_training=false", *common]
        if reward_kwargs:
            cmd.append(reward_override(recipe, reward_kwargs))
    minutes = run(cmd, out / "logs" / f"{row}-seed{seed}.log")  # not in run_dir: the trainer owns it
    return run_dir / "final", minutes


def evaluate(model: Path, label: str, out: Path, data: Path, split: str, limit: int | None) -> dict:
    ev_dir = out / "eval" / label
    cmd = [sys.executable, "-m", "eval.run", "--recipe", PROGRESSIVE_RECIPE, "--model", f"{label}={model}",
           "--data", f"{split}={data / 'examples' / f'{split}.jsonl'}", "--agent", "negrec_topk",
           "--agent-kwarg", f"items={data / 'items.jsonl'}", "--out", str(ev_dir), "--overwrite"]
    if limit:
        cmd += ["--limit", str(limit)]
    run(cmd, ev_dir.with_suffix(".log"))
    board = json.loads((ev_dir / "leaderboard.json").read_text())
    return board["results"][label]["datasets"][split]


def table(results: dict, baselines: list[dict], rows: list[str], seeds: list[int], split: str) -> str:
    # n: anchors scored; a --limit run scores fewer than the baselines (always the whole split)
    head = ["row", "seeds", "n", *[f"{m} (mean ± spread)" for m in METRICS], "min/run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def fmt(vals):
        vals = [v for v in vals if isinstance(v, (int, float)) and v == v]
        if not vals:
            return "-"
        return f"{statistics.mean(vals):.4f} ± {max(vals) - min(vals):.4f}" if len(vals) > 1 else f"{vals[0]:.4f}"

    by_label: dict[str, list[dict]] = {}
    for b in baselines:
        if b["dataset"] == split:
            by_label.setdefault(b["model"].split(" (seed")[0], []).append(b)
    for label, recs in by_label.items():
        lines.append(f"| baseline: {label} | {len(recs)} | {recs[0].get('n', '-')} | "
                     + " | ".join(fmt([r.get(m) for r in recs]) for m in METRICS)
                     + " | - |")
    for row in rows:
        done = [results[f"{row}/seed{s}"] for s in seeds if f"{row}/seed{s}" in results]
        if not done:
            continue
        n = sorted({d["metrics"].get("n") for d in done}, key=str)
        lines.append(f"| {row} | {len(done)} | {'/'.join(map(str, n))} | "
                     + " | ".join(fmt([d["metrics"].get(m) for d in done]) for m in METRICS)
                     + f" | {max(d['minutes'] for d in done):.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--data", default="data/negrec/ml-100k", help="the build dir (python -m envs.negrec build)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=None, help="evaluate on the first N anchors only")
    ap.add_argument("--out", default="outputs/bench_negrec")
    ap.add_argument("overrides", nargs="*", help="recipe overrides for every training run (key.path=value)")
    args = ap.parse_args()
    data, out = Path(args.data), Path(args.out)
    if not (data / "stats.json").is_file():
        sys.exit(f"{data}: no build there: run `python -m envs.negrec build` first")
    out.mkdir(parents=True, exist_ok=True)
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    order = [r for r in ROWS if r in args.rows]
    for start_row in dict.fromkeys(START.get(r, "alignment") for r in order if ROWS[r][0] == "grpo"):
        if start_row not in order:  # the GRPO rows start from it (skipped when already trained)
            order.insert(0, start_row)
    for seed in args.seeds:
        for row in order:
            key = f"{row}/seed{seed}"
            if key in results:
                continue
            print(f"== {key}", flush=True)
            final = out / row / f"seed{seed}" / "final"
            minutes = 0.0
            if not final.is_dir():
                final, minutes = train(row, seed, out, data, args.overrides)
            metrics = evaluate(final, f"{row}-seed{seed}", out, data, args.split, args.limit)
            results[key] = {"metrics": {k: metrics.get(k) for k in (*METRICS, "n")}, "minutes": minutes}
            atomic_write_text(out / "results.json", json.dumps(results, indent=2))
            print("   " + ", ".join(f"{m} {metrics.get(m)}" for m in METRICS) + f" ({minutes:.1f} min)", flush=True)
    baselines = read_jsonl(data / "baselines.jsonl")
    text = (f"CoNRec ablation on {data} ({args.split} anchors{f', first {args.limit}' if args.limit else ''}), "
            f"seeds {args.seeds}\n\n" + table(results, baselines, order, args.seeds, args.split))
    print("\n" + text)
    atomic_write_text(out / "results.md", text + "\n")


if __name__ == "__main__":
    main()

"""Does VLM RL learn? GRPO on easy-vqa from the SFT'd SmolLM2-135M VLM, over seeds, before/after.

For each seed: `python -m rl.train <recipe> seed=<seed>` from the SFT checkpoint (`--start`, default the
recipe's `outputs/vlm_vqa_sft/final`), then `python -m envs.vqa eval` (greedy exact match, per question type)
on the held-out test questions for the start (once: greedy, so one number for every seed) and every seed's
final model. Prints accuracy overall and per question type for the start, each seed, their mean and spread
(max - min over seeds), the gain of the mean over the start, and whether the gain exceeds the spread (the
bar of issue 13, point 3), plus minutes of RL per seed. The table is also written to `<out>/table.md`.

    python benchmarks/vlm_grpo_seeds.py                       # seeds 0 1, all 1,000 test questions
    python benchmarks/vlm_grpo_seeds.py steps=20 optim.lr=1e-4 --out outputs/bench_vlm_grpo_lr1e-4

Re-running resumes: a seed whose `final/` exists is not trained again, and an eval whose JSON exists (same
model, test file and limit) is not run again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rl.common import atomic_write_text  # noqa: E402

TYPES = ("color", "shape", "yes/no")


def run(cmd: list[str], log: Path | None = None) -> float:
    """Run a project command (output to `log` if given); minutes it took. Exits with its code on failure."""
    print("== " + " ".join(cmd[2:]) + (f"  (log: {log})" if log else ""), flush=True)
    t0 = time.time()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if log:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    else:
        proc = subprocess.run(cmd, cwd=REPO, env=env)
    if proc.returncode:
        sys.exit(f"failed with exit code {proc.returncode}: {' '.join(cmd)}" + (f" (see {log})" if log else ""))
    return (time.time() - t0) / 60


def evaluate(model: Path, test: str, limit: int | None, out: Path) -> dict:
    """`python -m envs.vqa eval` of `model`, cached in `out` while model, test file and limit are the same."""
    if out.is_file():
        cached = json.loads(out.read_text())
        if cached.get("model") == str(model) and cached.get("data") == test and cached.get("n_limit") == limit:
            return cached
    cmd = [sys.executable, "-m", "envs.vqa", "eval", "--model", str(model), "--data", test, "--json", str(out)]
    if limit:
        cmd += ["--limit", str(limit)]
    run(cmd)
    result = json.loads(out.read_text())
    result["n_limit"] = limit
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    return result


def row(result: dict) -> list[float]:
    return [result["accuracy"], *(result["per_type"].get(t, {}).get("accuracy", float("nan")) for t in TYPES)]


def table(start: dict, seeds: dict[int, dict], minutes: dict[str, float]) -> str:
    head = "| model | all | colour | shape | yes/no | RL minutes |\n|---|---|---|---|---|---|"
    fmt = lambda xs: " | ".join(f"{x:.3f}" for x in xs)  # noqa: E731
    lines = [head, f"| SFT start | {fmt(row(start))} | - |",
             f"| majority per question text (ignores the image) | {start['majority_per_question']['accuracy']:.3f} | "
             + " | ".join(f"{start['per_type'][t]['majority_per_question_accuracy']:.3f}" if t in start["per_type"] else "-"
                          for t in TYPES) + " | - |"]
    rows = {s: row(r) for s, r in seeds.items()}
    for s, r in rows.items():
        lines.append(f"| GRPO seed {s} | {fmt(r)} | {minutes.get(str(s), float('nan')):.1f} |")
    cols = list(zip(*rows.values()))
    mean = [sum(c) / len(c) for c in cols]
    spread = [max(c) - min(c) for c in cols]
    gain = [m - s for m, s in zip(mean, row(start))]
    lines += [f"| GRPO mean of {len(rows)} seeds | {fmt(mean)} | |",
              f"| seed spread (max - min) | {fmt(spread)} | |",
              "| gain of the mean over the start | " + " | ".join(f"{g:+.3f}" for g in gain) + " | |"]
    verdict = (f"gain over the SFT start {gain[0]:+.3f} vs seed spread {spread[0]:.3f}: "
               + ("the gain exceeds the spread" if gain[0] > spread[0] else "the gain does NOT exceed the spread"))
    if any(r[0] <= row(start)[0] for r in rows.values()):
        verdict += " (and not every seed improved)"
    return "\n".join(lines) + "\n\n" + verdict + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/vlm_vqa_grpo.yaml")
    ap.add_argument("--start", default="outputs/vlm_vqa_sft/final", help="the SFT'd VLM RL starts from")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--test", default="data/easy_vqa/test.jsonl")
    ap.add_argument("--limit", type=int, default=None, help="first N test questions (default: all)")
    ap.add_argument("--out", default="outputs/bench_vlm_grpo")
    ap.add_argument("overrides", nargs="*", help="extra RL recipe overrides (key=value)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start_dir = Path(args.start)
    for path in (start_dir / "config.json", Path(args.test)):
        if not (REPO / path).exists():
            sys.exit(f"{path} not found: run the SmolLM2 VLM's build and SFT first (docs/vlm.md, Commands)")
    minutes_path = out / "minutes.json"
    minutes = json.loads(minutes_path.read_text()) if minutes_path.is_file() else {}
    start = evaluate(start_dir, args.test, args.limit, out / "eval" / "start.json")
    results = {}
    for seed in args.seeds:
        run_dir = out / f"seed{seed}"
        if not (run_dir / "final" / "config.json").is_file():
            minutes[str(seed)] = run([sys.executable, "-m", "rl.train", args.recipe, f"model.name_or_path={start_dir}",
                                      f"seed={seed}", f"output_dir={run_dir}", "overwrite_output_dir=true",
                                      *args.overrides], log=out / f"seed{seed}.log")
            atomic_write_text(minutes_path, json.dumps(minutes, indent=2) + "\n")
        results[seed] = evaluate(run_dir / "final", args.test, args.limit, out / "eval" / f"seed{seed}.json")
    text = table(start, results, minutes)
    atomic_write_text(out / "table.md", text)
    print(text)


if __name__ == "__main__":
    main()

"""Does every algorithm learn? Held-out accuracy before/after, over seeds.

Runs one recipe (default: the arithmetic task) for each algorithm and seed as
`python -m rl.train` subprocesses, reads each run's eval_results.json, and prints:
the untrained model's held-out accuracy, the trained accuracy per seed, the seed
spread (max - min), whether mean(after) - before exceeds that spread, and minutes
per run. Greedy evaluation of the untrained model is deterministic, so "before" is
one number shared by all runs.

    python benchmarks/learning.py                       # 4 algorithms x 2 seeds, ~1 h on 2 cores
    nohup python benchmarks/learning.py > learning.log &  # in the background
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from rl.common import atomic_write_text

REPO = Path(__file__).resolve().parents[1]

# per-algorithm settings on top of the recipe (equal sample budget for all)
ALGORITHMS = {
    "reinforce": ["algorithm.name=reinforce", "algorithm.baseline=batch", "algorithm.policy_loss=vanilla"],
    "rloo": ["algorithm.name=rloo"],
    "grpo": ["algorithm.name=grpo"],
    # the critic: the first 8 of the 30 layers + a value head (a full-depth critic made PPO
    # the slowest run: 9.5 min vs 6.6-7.1 for the others; measured in the README)
    "ppo": ["algorithm.name=ppo", "algorithm.critic_lr=3.0e-5", "algorithm.critic_layers=8"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/arithmetic_grpo.yaml")
    ap.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--out", default="outputs/bench_learning")
    ap.add_argument("--metric", default="eval/reward")
    ap.add_argument("overrides", nargs="*", help="extra recipe overrides for every run")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    before = results.get("_before")
    for algo in args.algorithms:
        for seed in args.seeds:
            key = f"{algo}/seed{seed}"
            if key in results:  # re-running the script resumes the table
                continue
            run_dir = out / algo / f"seed{seed}"
            cmd = [
                sys.executable, "-m", "rl.train", args.recipe, *ALGORITHMS[algo], f"seed={seed}",
                f"output_dir={run_dir}", "overwrite_output_dir=true", "save_total_limit=1",
                f"eval_before_training={'false' if before is not None else 'true'}", *args.overrides,
            ]
            print(f"== {key}: {' '.join(cmd[2:])}", flush=True)
            t0 = time.time()
            proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            if proc.returncode:
                sys.exit(f"{key} failed with exit code {proc.returncode}")
            ev = json.loads((run_dir / "eval_results.json").read_text())
            if before is None:
                before = ev["before"][args.metric]
                results["_before"] = before
            results[key] = {"after": ev["after"][args.metric], "minutes": (time.time() - t0) / 60}
            atomic_write_text(out / "results.json", json.dumps(results, indent=2))
            print(f"   {key}: before {before:.3f} -> after {results[key]['after']:.3f} "
                  f"({results[key]['minutes']:.1f} min)", flush=True)

    lines = [
        f"Held-out {args.metric} (greedy), recipe {args.recipe}, seeds {args.seeds}",
        "",
        "| algorithm | before (untrained) | after, per seed | mean after | seed spread | gain > spread | min/run |",
        "|---|---|---|---|---|---|---|",
    ]
    for algo in args.algorithms:
        afters = [results[f"{algo}/seed{s}"]["after"] for s in args.seeds]
        minutes = [results[f"{algo}/seed{s}"]["minutes"] for s in args.seeds]
        mean = sum(afters) / len(afters)
        spread = max(afters) - min(afters)
        lines.append(
            f"| {algo} | {before:.3f} | {', '.join(f'{a:.3f}' for a in afters)} | {mean:.3f} | {spread:.3f} | "
            f"{'yes' if mean - before > spread else 'NO'} | {max(minutes):.1f} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    atomic_write_text(out / "results.md", table + "\n")


if __name__ == "__main__":
    main()

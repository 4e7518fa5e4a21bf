"""Does the search agent learn? The Search-R1++ CPU pipeline over seeds, before/after.

For each seed: SFT warm-start on the oracle episodes (`recipes/search_sft_warmstart.yaml`,
`seed=<seed>`), then RL (`--recipe`, default `recipes/search_r1pp_cpu.yaml`,
`seed=<seed>`, starting from that seed's warm-start), then one `eval.run` leaderboard on
the held-out test questions over the untrained model (greedy, so one number for all
seeds), every seed's warm-start and every seed's RL result. Prints, per stage, EM /
answer rate / invalid-action rate per seed, their mean and seed spread (max - min),
whether the gain over the untrained model (and over the warm-start, for RL) exceeds
the spread, and minutes of training per seed.

Needs the oracle episodes and the QA data (`make demo` writes both):
    python benchmarks/search_seeds.py                          # seeds 0 1, 128 test questions
    python benchmarks/search_seeds.py --rl-recipe recipes/search_grpo_cpu.yaml --rl-name grpo   # same warm-starts
    python benchmarks/search_seeds.py --rl-alone-steps 12    # + RL from the untrained model, no warm-start
    python benchmarks/search_seeds.py --out outputs/bench_search_slow --rl-recipe recipes/search_r1_cpu.yaml \
        --rl-name ppo --sft-override data.train=data/wiki10k_qa/oracle_sft_slow.jsonl   # PPO, Slow template
With --rl-alone-steps N, each seed also trains RL alone (the same RL recipe from the
untrained model, N steps): choose N so its minutes match the warm-start's SFT + RL
minutes, and the table compares SFT -> RL with RL alone at (about) equal CPU time.
Re-running resumes: finished training runs (their `final/` or `checkpoint-*`) are kept, and
so is each model's leaderboard (`<out>/leaderboards/<label>/`) while the model, the test
file, the limit and the recipe are unchanged.
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
METRICS = ("em", "f1", "answer_rate", "invalid_action_rate", "avg_searches")


def run(cmd: list[str]) -> float:
    """Run a project command; minutes it took. Exits with its code on failure."""
    print("== " + " ".join(cmd[2:]), flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode:
        sys.exit(f"failed with exit code {proc.returncode}: {' '.join(cmd)}")
    return (time.time() - t0) / 60


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sft-recipe", default="recipes/search_sft_warmstart.yaml")
    ap.add_argument("--rl-recipe", default="recipes/search_r1pp_cpu.yaml")
    ap.add_argument("--base-model", default="smollm2-135m", help="the untrained model")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--test", default="data/wiki10k_qa/test.jsonl")
    ap.add_argument("--limit", type=int, default=128, help="test questions")
    ap.add_argument("--out", default="outputs/bench_search")
    ap.add_argument("--rl-name", default="rl",
                    help="name of the RL stage (its run dirs and labels): several RL recipes can share one --out "
                         "and its warm-starts, e.g. --rl-recipe recipes/search_grpo_cpu.yaml --rl-name grpo")
    ap.add_argument("--rl-alone-steps", type=int, default=0,
                    help="also train RL from the untrained model for this many steps (0: not)")
    ap.add_argument("--sft-override", action="append", default=[], metavar="KEY=VALUE",
                    help="SFT recipe override (repeatable), e.g. data.train=data/wiki10k_qa/oracle_sft_slow.jsonl "
                         "for a warm-start on Slow-template episodes")
    ap.add_argument("rl_overrides", nargs="*", help="extra RL recipe overrides (key=value)")
    args = ap.parse_args()
    rl = args.rl_name
    if not rl.isidentifier():
        sys.exit(f"--rl-name must be a plain name (letters, digits, _), got {rl!r}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path in (args.test,):
        if not (REPO / path).exists():
            sys.exit(f"{path} not found: run `make demo` (or its first steps) to build the QA data")
    py = sys.executable
    minutes_path = out / "minutes.json"
    minutes: dict = json.loads(minutes_path.read_text()) if minutes_path.exists() else {}
    for seed in args.seeds:
        sft_dir, rl_dir = out / f"seed{seed}" / "sft", out / f"seed{seed}" / rl
        if not list((sft_dir / "final").glob("*.safetensors")):  # a dir whose weights were deleted is retrained
            minutes[f"sft/seed{seed}"] = run([py, "-m", "sft.train", args.sft_recipe, f"seed={seed}",
                                              f"output_dir={sft_dir}", "overwrite_output_dir=true",
                                              *args.sft_override])
        if not list(rl_dir.glob("checkpoint-*")):
            minutes[f"{rl}/seed{seed}"] = run([py, "-m", "rl.train", args.rl_recipe, f"seed={seed}",
                                             f"model.name_or_path={sft_dir / 'final'}", f"output_dir={rl_dir}",
                                             "overwrite_output_dir=true", *args.rl_overrides])
        alone_dir = out / f"seed{seed}" / f"{rl}_alone"
        if args.rl_alone_steps and not list(alone_dir.glob("checkpoint-*")):
            minutes[f"{rl}alone/seed{seed}"] = run([py, "-m", "rl.train", args.rl_recipe, f"seed={seed}",
                                                  f"model.name_or_path={args.base_model}", f"output_dir={alone_dir}",
                                                  "overwrite_output_dir=true", *args.rl_overrides,
                                                  f"steps={args.rl_alone_steps}"])
        atomic_write_text(minutes_path, json.dumps(minutes, indent=2))

    stages = ("sft", rl) + ((f"{rl}alone",) if args.rl_alone_steps else ())
    models = [f"untrained={args.base_model}"]
    for seed in args.seeds:
        models += [f"sft_seed{seed}={out / f'seed{seed}' / 'sft' / 'final'}", f"{rl}_seed{seed}={out / f'seed{seed}' / rl}"]
        if args.rl_alone_steps:
            models.append(f"{rl}alone_seed{seed}={out / f'seed{seed}' / f'{rl}_alone'}")
    # one leaderboard per model, kept while its inputs are unchanged: adding a stage (e.g. RL alone)
    # to a finished study evaluates only the new models
    score = {}
    from eval.run import plan_from_recipe

    # what the evaluation depends on: the agent settings (not the recipe's file name), the questions
    eval_args = {"agent": plan_from_recipe(args.rl_recipe).fingerprint(), "test": args.test, "limit": args.limit}
    for m in models:
        label, spec = m.split("=", 1)
        board_dir = out / "leaderboards" / label
        board_file, args_file = board_dir / "leaderboard.json", board_dir / "eval_args.json"
        trained = Path(spec)
        fresh = (board_file.exists() and args_file.exists() and json.loads(args_file.read_text()) == eval_args
                 and (not trained.exists() or board_file.stat().st_mtime > max(
                     p.stat().st_mtime for p in [trained, *trained.rglob("*")])))
        if not fresh:
            run([py, "-m", "eval.run", "--recipe", args.rl_recipe, "--data", f"test={args.test}", "--limit",
                 str(args.limit), "--out", str(board_dir), "--overwrite", "--model", m])
            atomic_write_text(args_file, json.dumps(eval_args))
        else:
            print(f"== {label}: reusing {board_file}", flush=True)
        score[label] = json.loads(board_file.read_text())["results"][label]["avg"]

    untrained = score["untrained"]
    lines = [
        f"Search agent on {args.limit} held-out questions of {args.test} (greedy), seeds {args.seeds}",
        f"SFT: {args.sft_recipe} {' '.join(args.sft_override)}; RL: {args.rl_recipe} {' '.join(args.rl_overrides)}",
        "",
        "| model | metric | per seed | mean | seed spread | gain vs untrained > spread | gain vs SFT > spread |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in METRICS:
        lines.append(f"| untrained | {m} | {untrained[m]:.3f} | {untrained[m]:.3f} | - | - | - |")
    sft_means = {}
    for stage in stages:
        for m in METRICS:
            vals = [score[f"{stage}_seed{s}"][m] for s in args.seeds]
            mean, spread = sum(vals) / len(vals), max(vals) - min(vals)
            if stage == "sft":
                sft_means[m] = mean
            # for the invalid-action rate lower is better
            sign = -1.0 if m == "invalid_action_rate" else 1.0
            vs_base = "yes" if sign * (mean - untrained[m]) > spread else "NO"
            vs_sft = "-" if stage == "sft" else ("yes" if sign * (mean - sft_means[m]) > spread else "NO")
            label = {"sft": "SFT warm-start", rl: f"SFT + RL ({rl})",
                     f"{rl}alone": f"RL alone ({rl}, {args.rl_alone_steps} steps)"}[stage]
            lines.append(f"| {label} | {m} | {', '.join(f'{v:.3f}' for v in vals)} | {mean:.3f} | {spread:.3f} | "
                         f"{vs_base} | {vs_sft} |")
    lines += ["", "Training minutes per seed: " + ", ".join(
        f"seed {s}: SFT {minutes.get(f'sft/seed{s}', float('nan')):.1f} + RL {minutes.get(f'{rl}/seed{s}', float('nan')):.1f}"
        + (f"; RL alone {minutes.get(f'{rl}alone/seed{s}', float('nan')):.1f}" if args.rl_alone_steps else "")
        for s in args.seeds)]
    table = "\n".join(lines)
    print("\n" + table)
    atomic_write_text(out / "results.md", table + "\n")


if __name__ == "__main__":
    main()

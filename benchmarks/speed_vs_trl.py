"""Side-by-side speed: this trainer vs TRL 1.16's GRPOTrainer, in one run.

Same model (SmolLM2-135M-Instruct, fp32, CPU), same prompts (the arithmetic task), same
group size, completion length, temperature, learning rate, loss aggregation (token
mean over the batch), no KL, no gradient checkpointing, one optimizer step per
generation, same step count. Runs alternate (ours, TRL, ours, TRL, ...) in fresh
subprocesses so each gets a clean memory high-water mark and the machine's drift
hits both sides equally.

    python benchmarks/speed_vs_trl.py --steps 8 --repeats 2

Prints per-side medians and the ratios ours/TRL. Throughputs are per whole step
(generation + training): generated tokens/s and trained (real, non-padding prompt +
completion) tokens/s. "Final reward" is the mean training reward over the last
3 steps, to show both sides learn alike at equal settings.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

COMMON = dict(prompts_per_step=8, group_size=8, max_new_tokens=16, temperature=0.7, lr=1e-5, seed=0)
DATA = dict(n_train=700, n_test=200, low=1, high=30, seed=0)


def run_ours(steps: int, packing: bool = True) -> dict:
    from rl.config import config_from_dict
    from rl.trainer import train

    out = tempfile.mkdtemp(prefix="bench_ours_")
    cfg = config_from_dict(
        {
            "model": {"name_or_path": "smollm2-135m"},
            "data": {"train": "envs.arithmetic:make_dataset", "train_kwargs": DATA, "shuffle": True},
            "rollout": {
                "group_size": COMMON["group_size"],
                "max_new_tokens": COMMON["max_new_tokens"],
                "temperature": COMMON["temperature"],
            },
            "rewards": [{"name": "final_number"}],
            "algorithm": {"name": "grpo", "loss_agg_mode": "token-mean"},
            "optim": {"lr": COMMON["lr"]},
            "steps": steps,
            "prompts_per_step": COMMON["prompts_per_step"],
            "micro_batch_tokens": 4096,
            "packing": packing,
            "output_dir": out,
            "overwrite_output_dir": True,
            "seed": COMMON["seed"],
        }
    )
    result = train(cfg)
    steps_ = [h for h in result["history"] if "reward/mean" in h]
    n, prompt_len = COMMON["prompts_per_step"] * COMMON["group_size"], mean_prompt_len()
    return {
        "step_times": [h["time/step"] for h in steps_],
        "generated_tokens": [h["tokens/generated"] for h in steps_],
        # the same definition as TRL's side: every sample's prompt + completion (packing
        # computes each prompt once per group, which is where part of the speed comes from)
        "trained_tokens": [h["tokens/generated"] + prompt_len * n for h in steps_],
        "packed_tokens": [h["tokens/trained"] for h in steps_],
        "rewards": [h["reward/mean"] for h in steps_],
    }


def mean_prompt_len() -> float:
    from transformers import AutoTokenizer

    from envs.arithmetic import make_dataset
    from rl.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    msgs = make_dataset(**DATA)["train"]["messages"][:200]
    return statistics.mean(
        len(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=False)) for m in msgs
    )


def run_trl(steps: int) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from envs.arithmetic import make_dataset
    from rl.models import resolve_model

    path = resolve_model("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    train_ds = make_dataset(**DATA)["train"]
    ds = datasets.Dataset.from_dict({"prompt": train_ds["messages"], "answer": train_ds["answer"]})
    prompt_len = mean_prompt_len()
    eos = tok.eos_token_id

    def final_number(prompts, completions, completion_ids, answer, **_):
        # the same rule as rl.rewards.final_number: ended by itself, last number == gold
        out = []
        for comp, ids, gold in zip(completions, completion_ids, answer):
            text = comp[0]["content"] if isinstance(comp, list) else comp
            nums = re.findall(r"-?\d+(?:\.\d+)?", text.replace(",", ""))
            ended = len(ids) > 0 and ids[-1] == eos
            out.append(1.0 if ended and nums and float(nums[-1]) == float(gold) else 0.0)
        return out

    log: dict = {"step_times": [], "completion_len": [], "rewards": []}

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            log["step_times"].append(time.perf_counter() - self.t)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                log["completion_len"].append(logs["completions/mean_length"])
                log["rewards"].append(logs["reward"])

    n = COMMON["prompts_per_step"] * COMMON["group_size"]
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_trl_"),
        per_device_train_batch_size=n,
        gradient_accumulation_steps=1,
        num_generations=COMMON["group_size"],
        max_completion_length=COMMON["max_new_tokens"],
        temperature=COMMON["temperature"],
        learning_rate=COMMON["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        beta=0.0,
        loss_type="dapo",  # token mean over the batch = our token-mean
        max_steps=steps,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,  # TRL defaults to True; ours does not checkpoint either
        seed=COMMON["seed"],
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=final_number, args=args, train_dataset=ds, processing_class=tok)
    trainer.add_callback(Timer())
    trainer.train()
    gen = [length * n for length in log["completion_len"]]
    return {
        "step_times": log["step_times"],
        "generated_tokens": gen,
        "trained_tokens": [g + prompt_len * n for g in gen],
        "rewards": log["rewards"],
    }


def child(side: str, steps: int) -> None:
    import torch

    torch.manual_seed(0)
    result = run_ours(steps) if side == "ours" else run_trl(steps)
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print("BENCH_RESULT " + json.dumps(result), flush=True)


def summarise(runs: list[dict], skip: int) -> dict:
    times = [t for r in runs for t in r["step_times"][skip:]]
    gen = [g for r in runs for g in r["generated_tokens"][skip:]]
    trained = [g for r in runs for g in r["trained_tokens"][skip:]]
    return {
        "step_s": statistics.median(times),
        "gen_tok_s": sum(gen) / sum(times),
        "train_tok_s": sum(trained) / sum(times),
        "peak_rss_gb": max(r["peak_rss_gb"] for r in runs),
        "final_reward": statistics.mean(x for r in runs for x in r["rewards"][-3:]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip", type=int, default=1, help="warm-up steps left out of the timings")
    ap.add_argument("--child", choices=["ours", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--out", default="outputs/bench_speed_vs_trl.json")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.steps)
        return
    runs: dict[str, list] = {"ours": [], "trl": []}
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    for rep in range(args.repeats):
        for side in ("ours", "trl") if rep % 2 == 0 else ("trl", "ours"):
            print(f"[{rep + 1}/{args.repeats}] {side} ...", flush=True)
            proc = subprocess.run(
                [sys.executable, __file__, "--child", side, "--steps", str(args.steps)],
                env=env, capture_output=True, text=True,
            )
            line = next((x for x in proc.stdout.splitlines() if x.startswith("BENCH_RESULT ")), None)
            if proc.returncode != 0 or line is None:
                sys.exit(f"{side} run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
            runs[side].append(json.loads(line.removeprefix("BENCH_RESULT ")))
    ours, trl = summarise(runs["ours"], args.skip), summarise(runs["trl"], args.skip)
    rows = [
        ("median step time (s)", "step_s", "lower is better"),
        ("generated tokens/s", "gen_tok_s", ""),
        ("trained tokens/s", "train_tok_s", ""),
        ("peak RSS (GB)", "peak_rss_gb", "lower is better"),
        ("final train reward", "final_reward", ""),
    ]
    print(f"\nGRPO, SmolLM2-135M fp32 CPU, {COMMON}, {args.steps} steps x {args.repeats} runs per side")
    print(f"| metric | ours | TRL {_trl_version()} | ours / TRL |\n|---|---|---|---|")
    for label, key, note in rows:
        ratio = ours[key] / trl[key] if trl[key] else float("nan")
        print(f"| {label} | {ours[key]:.3f} | {trl[key]:.3f} | {ratio:.2f}x {note} |")
    throughput = trl["step_s"] / ours["step_s"]
    print(f"\nthroughput ratio (TRL step time / ours): {throughput:.2f}x")
    from rl.common import atomic_write_text  # creates the parent directory

    atomic_write_text(args.out, json.dumps({"ours": ours, "trl": trl, "runs": runs, "settings": COMMON}, indent=2))


def _trl_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("trl")


if __name__ == "__main__":
    main()

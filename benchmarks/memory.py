"""Peak resident memory (RSS) per phase of RL training steps: setup, rollout, prepare_batch
(pi_old / reference log-probs, values), update, eval; the old full-vocabulary log-prob path vs the
chunked one side by side with `--compare`.

`ru_maxrss` is a process-lifetime maximum, and tracemalloc does not see torch's allocations, so a
background thread samples the process RSS (psutil) every `--interval` seconds and keeps one
high-water mark per phase, reset when the phase starts. The phases are the trainer's step
functions, wrapped by monkeypatching `rl.trainer` (no trainer change needed). Each configuration
runs in a fresh process, so one run's freed-but-kept heap does not inflate the other's peaks.

    # one RL step of the main job's recipe (model and data overridden where the demo's are missing)
    python benchmarks/memory.py --compare --steps 1 model.name_or_path=smollm2-135m \\
        data.train=data/wiki10k_qa/train.jsonl data.eval=data/wiki10k_qa/dev.jsonl
    python benchmarks/memory.py --recipe recipes/arithmetic_grpo.yaml --compare   # needs no data
    python benchmarks/memory.py --logprob-chunk 0 ...   # one run, the unchunked path only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("setup_run", "rollout_step", "prepare_batch", "update_step", "evaluate")
LABELS = {"setup_run": "setup (models, engine, data)", "rollout_step": "rollout", "prepare_batch":
          "prepare_batch (old/ref log-probs)", "update_step": "update (forward/backward/step)", "evaluate": "eval"}
GB = 1024**3


class PhaseSampler:
    """RSS high-water mark per phase, from a sampling thread (reset at each phase start)."""

    def __init__(self, interval: float):
        self.proc = psutil.Process()
        self.interval = interval
        self.peak = 0
        self.lock = threading.Lock()
        self.stats: dict[str, dict] = {}
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self.proc.memory_info().rss
            with self.lock:
                self.peak = max(self.peak, rss)
            time.sleep(self.interval)

    def wrap(self, name: str, fn):
        def wrapped(*args, **kwargs):
            with self.lock:
                self.peak = start = self.proc.memory_info().rss
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds = time.perf_counter() - t0
                end = self.proc.memory_info().rss
                with self.lock:
                    peak = max(self.peak, end)
                s = self.stats.setdefault(name, {"calls": 0, "peak": 0, "start": 0, "end": 0, "seconds": []})
                s["calls"] += 1
                s["peak"] = max(s["peak"], peak)
                s["start"] = max(s["start"], start)
                s["end"] = max(s["end"], end)
                s["seconds"].append(seconds)

        return wrapped

    def close(self) -> None:
        self._stop.set()
        self.thread.join()


def run_once(args) -> dict:
    """Train `--steps` steps of the recipe in this process and return the per-phase numbers."""
    if args.repo:  # measure another checkout (e.g. the tree before a change) with this script
        sys.path.insert(0, str(Path(args.repo).resolve()))
    else:
        sys.path.insert(0, str(ROOT))
    import torch

    import rl.forward
    import rl.trainer
    from rl.config import load_config

    if args.logprob_chunk is not None:
        if not hasattr(rl.forward, "LOGPROB_CHUNK_TOKENS"):
            raise SystemExit(f"--logprob-chunk: {rl.forward.__file__} has no LOGPROB_CHUNK_TOKENS (an older tree?)")
        rl.forward.LOGPROB_CHUNK_TOKENS = args.logprob_chunk
    out_dir = tempfile.mkdtemp(prefix="agentrl_memory_")
    overrides = [f"steps={args.steps}", f"output_dir={out_dir}", "overwrite_output_dir=true", "save_steps=0",
                 "eval_steps=0", "eval_before_training=false", f"data.eval_size={args.eval_size}", "report_to=[]"]
    cfg = load_config(args.recipe, overrides + list(args.overrides))
    sampler = PhaseSampler(args.interval)
    for name in PHASES:
        fn = getattr(rl.trainer, name, None)
        if fn is None:
            print(f"warning: rl.trainer has no {name}; its phase is not measured", file=sys.stderr)
            continue
        setattr(rl.trainer, name, sampler.wrap(name, fn))
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    try:
        rl.trainer.train(cfg)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)  # its checkpoint holds weights + optimizer state: GBs
    total = time.perf_counter() - t0
    sampler.close()
    steps = [sum(sampler.stats[p]["seconds"][i] for p in ("rollout_step", "prepare_batch", "update_step")
                 if p in sampler.stats) for i in range(args.steps)]
    return {
        "phases": sampler.stats,
        "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
        "step_seconds": steps,
        "total_seconds": total,
        "logprob_chunk": getattr(rl.forward, "LOGPROB_CHUNK_TOKENS", 0),
        "repo": str(Path(args.repo).resolve()) if args.repo else str(ROOT),
    }


def print_single(res: dict) -> None:
    print(f"tree {res['repo']}, log-prob chunk {res['logprob_chunk']} tokens")
    print("| phase | peak RSS (GB) | RSS at end (GB) | seconds |\n|---|---|---|---|")
    for name in PHASES:
        s = res["phases"].get(name)
        if s:
            print(f"| {LABELS[name]} | {s['peak'] / GB:.2f} | {s['end'] / GB:.2f} | {sum(s['seconds']):.1f} |")
    print(f"process max RSS (ru_maxrss): {res['max_rss'] / GB:.2f} GB; "
          f"step seconds (rollout + prepare + update): {', '.join(f'{s:.1f}' for s in res['step_seconds'])}")


def print_compare(base: dict, cand: dict, base_name: str, cand_name: str) -> None:
    print(f"baseline: {base_name}\ncandidate: {cand_name}")
    print("| phase | baseline peak RSS (GB) | candidate peak RSS (GB) | candidate / baseline | "
          "baseline s | candidate s | time ratio |\n|---|---|---|---|---|---|---|")
    for name in PHASES:
        b, c = base["phases"].get(name), cand["phases"].get(name)
        if b and c:
            bs, cs = sum(b["seconds"]), sum(c["seconds"])
            print(f"| {LABELS[name]} | {b['peak'] / GB:.2f} | {c['peak'] / GB:.2f} | {c['peak'] / b['peak']:.2f} | "
                  f"{bs:.1f} | {cs:.1f} | {cs / bs:.2f} |")
    bm, cm = base["max_rss"], cand["max_rss"]
    print(f"| process max RSS | {bm / GB:.2f} | {cm / GB:.2f} | {cm / bm:.2f} | | | |")
    bs, cs = sum(base["step_seconds"]), sum(cand["step_seconds"])
    print(f"| RL step time (rollout + prepare + update) | | | | {bs:.1f} | {cs:.1f} | {cs / bs:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="recipe overrides, e.g. model.name_or_path=smollm2-135m")
    ap.add_argument("--recipe", default=str(ROOT / "recipes/search_r1pp_cpu.yaml"))
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--eval-size", type=int, default=8, help="held-out prompts for the eval phase (speed)")
    ap.add_argument("--logprob-chunk", type=int, default=None,
                    help="tokens per log-prob chunk (rl.forward.LOGPROB_CHUNK_TOKENS); 0 = the full-vocab path")
    ap.add_argument("--compare", action="store_true",
                    help="baseline (--baseline-repo's tree, else --logprob-chunk 0) vs this tree's default, "
                    "each in a fresh process")
    ap.add_argument("--baseline-repo", default=None, help="a checkout to run as the baseline (e.g. before a change)")
    ap.add_argument("--baseline-json", default=None, help="a baseline measured before (--json of a single run)")
    ap.add_argument("--repo", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help="write the numbers here")
    ap.add_argument("--interval", type=float, default=0.02, help="RSS sampling period, seconds")
    args = ap.parse_args()
    if not args.compare:
        res = run_once(args)
        print_single(res)
        if args.json:
            Path(args.json).write_text(json.dumps(res))
        return

    def child(extra: list[str], tag: str) -> dict:
        path = Path(tempfile.mkdtemp(prefix="agentrl_memory_")) / f"{tag}.json"
        cmd = [sys.executable, __file__, "--recipe", args.recipe, "--steps", str(args.steps), "--eval-size",
               str(args.eval_size), "--interval", str(args.interval), "--json", str(path), *extra, *args.overrides]
        subprocess.run(cmd, check=True, env=dict(os.environ))
        return json.loads(path.read_text())

    if args.baseline_json:
        base, base_name = json.loads(Path(args.baseline_json).read_text()), f"{args.baseline_json} (measured before)"
    elif args.baseline_repo:
        base, base_name = child(["--repo", args.baseline_repo], "baseline"), f"tree {args.baseline_repo}"
    else:
        base, base_name = child(["--logprob-chunk", "0"], "baseline"), "this tree, --logprob-chunk 0 (full vocab)"
    cand_extra = ["--logprob-chunk", str(args.logprob_chunk)] if args.logprob_chunk is not None else []
    cand = child(cand_extra, "candidate")
    print_compare(base, cand, base_name, f"this tree, log-prob chunk {cand['logprob_chunk']} tokens")
    if args.json:
        Path(args.json).write_text(json.dumps({"baseline": base, "candidate": cand}))


if __name__ == "__main__":
    main()

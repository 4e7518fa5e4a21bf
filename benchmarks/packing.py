"""Padding-free packed micro-batches vs the padded path, side by side, in one run.

The same variable-length batch (prompt + response lengths drawn like an RL batch:
short prompts, responses from a few tokens to the budget) goes through the trainer's
`forward_logprobs` + backward, packed and padded, alternating, on SmolLM2-135M fp32.
Prints real (non-padding) tokens/s for each and the ratio packed / padded.

    python benchmarks/packing.py --batch 16 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rl.models import resolve_model  # noqa: E402
from rl.forward import forward_logprobs  # noqa: E402
from rl.packing import make_micro_batch  # noqa: E402
from rl.trajectory import Trajectory  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--min-response", type=int, default=8)
    ap.add_argument("--max-response", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model(args.model), dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    trajs = []
    for i in range(args.batch):
        # long-tailed response lengths, as in RL batches where a few samples ramble
        frac = torch.rand(1, generator=g).item() ** 3
        n = int(args.min_response + frac * (args.max_response - args.min_response))
        p = args.prompt + int(torch.randint(-8, 9, (1,), generator=g))
        ids = torch.randint(100, vocab, (p + n,), generator=g).tolist()
        trajs.append(Trajectory(ids[:p], ids[p:], [1] * n, [0.0] * n, i, {}))
    rows = list(range(len(trajs)))
    real = sum(len(t.prompt_ids) + len(t.response_ids) for t in trajs)
    padded_tokens = len(trajs) * max(len(t.prompt_ids) + len(t.response_ids) for t in trajs)

    def step(packed: bool) -> float:
        mb = make_micro_batch(trajs, rows, packed, 0)
        t0 = time.perf_counter()
        logp, _ = forward_logprobs(model, mb, 1.0, False)
        logp.sum().backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    step(True), step(False)  # warm-up
    times = {True: [], False: []}
    for _ in range(args.repeats):
        for packed in (True, False):
            times[packed].append(step(packed))
    tp = {k: real / statistics.median(v) for k, v in times.items()}
    print(f"batch {args.batch}, real tokens {real}, padded tokens {padded_tokens} "
          f"({padded_tokens / real:.2f}x), forward+backward, median of {args.repeats}")
    print("| path | s/step | real tokens/s |\n|---|---|---|")
    print(f"| padded | {statistics.median(times[False]):.2f} | {tp[False]:.0f} |")
    print(f"| packed | {statistics.median(times[True]):.2f} | {tp[True]:.0f} |")
    print(f"packed / padded throughput: {tp[True] / tp[False]:.2f}x")


if __name__ == "__main__":
    main()

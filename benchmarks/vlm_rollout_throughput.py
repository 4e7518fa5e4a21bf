"""Rollout tokens/s of a vision-language policy: the HF engine (the named baseline) vs vLLM colocate.

The policy is a LLaVA-style VLM built from SmolLM2-135M (envs/vqa/llava.py): `--model DIR`, by default the
project's built VLM in the cache (`smollm2-135m-vlm`, else `smollm2-135m-vlm-init`), else one built here from
SmolLM2-135M with a random vision tower (throughput does not depend on trained weights). Prompts are what an
RL step sends: `--prompts` chat prompts, each with `--images` drawn shape images (easy-vqa style) and a
question, rendered by the model's processor (placeholders expanded), each repeated `--group` times in a row
(a GRPO group: one vLLM request with n = group), sampled at `--temperature` up to `--new-tokens` tokens.
Both engines get the same prompts and images through the engine protocol
(`generate(prompts, params, images)`).

Throughput = generated tokens / wall seconds of the `generate` call. The engines alternate within each of
`--rounds` rounds (the starting engine rotates; `--settle` seconds of quiet between runs: vLLM's CPU worker
busy-polls ~1 s after work); each round's vLLM tok/s is divided by the HF engine's of the same round and the
median ratio is reported, with the medians of the tok/s. Also reported: vLLM's start time and one weight
sync (`update_weights`, in-place reload of the vision tower, projector and language model).
Results: `<out>/results.json` and `<out>/results.md` (also printed).

    python benchmarks/vlm_rollout_throughput.py                                  # 8 prompts x 4, 2 images, 64 tokens
    python benchmarks/vlm_rollout_throughput.py --prompts 2 --group 2 --new-tokens 8 --rounds 1   # smoke test

Needs vLLM (`make setup-vllm` on CPU) and SmolLM2-135M (fetched on first use). `--threads 1` (default) as in
benchmarks/engine_throughput.py: the HF engine stalls in OpenMP with 2 threads on a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rl.engines import HFEngine, SamplingParams, build_engine  # noqa: E402

T0 = time.perf_counter()
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "gray"]
SHAPES = ["ellipse", "rectangle", "triangle"]


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def draw(k: int, side: int = 64):
    """Image k: a shape of a colour on white (easy-vqa style), deterministic in k."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (side, side), "white")
    d = ImageDraw.Draw(im)
    color, shape = COLORS[k % len(COLORS)], SHAPES[(k // len(COLORS)) % len(SHAPES)]
    box = (8 + k % 5, 10, side - 10, side - 8 - k % 7)
    if shape == "triangle":
        d.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=color)
    else:
        getattr(d, shape)(box, fill=color)
    return im


def default_model(out: Path) -> str:
    """The project's built VLM if cached, else a LLaVA built here from SmolLM2-135M (random vision tower)."""
    from rl.common import cache_root
    from rl.models import resolve_model

    for name in ("smollm2-135m-vlm", "smollm2-135m-vlm-init"):  # envs/vqa/build_vlm.py's outputs
        path = cache_root() / "models" / name
        if (path / "config.json").is_file():
            return str(path)
    path = out / "smollm2-135m-llava"
    if not (path / "config.json").is_file():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from envs.vqa.llava import build_llava, build_llava_processor, save_llava

        text_dir = resolve_model("smollm2-135m")
        tok = AutoTokenizer.from_pretrained(text_dir)
        text = AutoModelForCausalLM.from_pretrained(text_dir, dtype=torch.float32)
        processor = build_llava_processor(tok, image_side=64, patch_size=16)
        model = build_llava(text, tok, image_side=64, patch_size=16, vision_hidden=192, vision_layers=4,
                            vision_heads=3, seed=0)
        save_llava(model, processor, path)
        log(f"built {path}")
    return str(path)


def make_prompts(processor, n_prompts: int, n_images: int, group: int) -> tuple[list[list[int]], list[list]]:
    prompts, images = [], []
    for i in range(n_prompts):
        ims = [draw(i * n_images + j) for j in range(n_images)]
        content = [*({"type": "image", "image": im} for im in ims),
                   {"type": "text", "text": "What shapes and colors are in the images? Answer in one sentence."}]
        ids = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"][0]
        prompts += [list(ids)] * group
        images += [ims] * group
    return prompts, images


def timed(engine, prompts, params, images) -> dict:
    t0 = time.perf_counter()
    gens = engine.generate(prompts, params, images=images)
    wall = time.perf_counter() - t0
    tokens = sum(len(g.token_ids) for g in gens)
    return {"wall": wall, "tokens": tokens, "tok_s": tokens / wall}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a LLaVA / Qwen2-VL checkpoint dir (default: see the doc)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--images", type=int, default=2, help="images per prompt")
    ap.add_argument("--group", type=int, default=4, help="samples per prompt (consecutive copies)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--settle", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kv-cache-gb", type=float, default=0.5)
    ap.add_argument("--out", default="outputs/bench_vlm_rollout")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    loadavg_start = os.getloadavg()[0]

    from rl.multimodal import load_pretrained_model, load_tokenizer_and_processor

    path = args.model or default_model(out)
    tok, processor = load_tokenizer_and_processor(path)
    if processor is None:
        raise SystemExit(f"{path} is not a vision-language checkpoint (no vision_config)")
    model = load_pretrained_model(path, torch.float32, "sdpa").eval()
    prompts, images = make_prompts(processor, args.prompts, args.images, args.group)
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=args.temperature)
    log(f"model {path}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters; "
        f"{len(prompts)} samples, prompts of {len(prompts[0])} tokens with {args.images} image(s)")

    hf = HFEngine(model, tok, batch_size=len(prompts))
    t0 = time.perf_counter()
    vllm = build_engine("vllm", model, tok, len(prompts), kv_cache_gb=args.kv_cache_gb,
                        max_model_len=len(prompts[0]) + args.new_tokens + 16)
    start_s = time.perf_counter() - t0
    log(f"vLLM colocate started in {start_s:.1f} s")
    engines = {"hf": hf, "vllm": vllm}
    try:
        timed(vllm, prompts[: args.group], SamplingParams(max_new_tokens=4), images[: args.group])  # warm-up
        timed(hf, prompts[: args.group], SamplingParams(max_new_tokens=4), images[: args.group])
        rounds = []
        for r in range(args.rounds):
            order = list(engines) if r % 2 == 0 else list(reversed(engines))
            row = {}
            for name in order:
                time.sleep(args.settle)
                row[name] = timed(engines[name], prompts, params, images)
                log(f"round {r + 1} {name}: {row[name]['tokens']} tokens in {row[name]['wall']:.1f} s = "
                    f"{row[name]['tok_s']:.1f} tok/s")
            row["ratio"] = row["vllm"]["tok_s"] / row["hf"]["tok_s"]
            rounds.append(row)
        t0 = time.perf_counter()
        vllm.update_weights(model)
        sync_s = time.perf_counter() - t0
    finally:
        vllm.close()
    res = {
        "model": path,
        "settings": vars(args),
        "samples": len(prompts),
        "prompt_tokens": len(prompts[0]),
        "hf_tok_s": statistics.median(r["hf"]["tok_s"] for r in rounds),
        "vllm_tok_s": statistics.median(r["vllm"]["tok_s"] for r in rounds),
        "ratio_vs_hf": statistics.median(r["ratio"] for r in rounds),
        "vllm_start_s": start_s,
        "vllm_sync_s": sync_s,
        "rounds": rounds,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__, "loadavg_start": loadavg_start, "loadavg_end": os.getloadavg()[0],
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
    }
    md = "\n".join([
        f"VLM rollout throughput ({Path(path).name}; {len(prompts)} samples = {args.prompts} prompts x {args.group}, "
        f"{args.images} image(s) and {len(prompts[0])} tokens per prompt, up to {args.new_tokens} new tokens at "
        f"T={args.temperature}; median of {args.rounds} round(s))",
        "",
        "| engine | tok/s | vs HF |",
        "|---|---:|---:|",
        f"| hf (baseline) | {res['hf_tok_s']:.1f} | 1.00x |",
        f"| vllm colocate | {res['vllm_tok_s']:.1f} | {res['ratio_vs_hf']:.2f}x |",
        "",
        f"vLLM start {start_s:.1f} s, one weight sync {sync_s:.2f} s; {os.cpu_count()} CPUs, torch threads "
        f"{torch.get_num_threads()}, load average {loadavg_start:.2f} at start / {res['machine']['loadavg_end']:.2f} "
        f"at end; {res['machine']['date']}.",
    ])
    (out / "results.json").write_text(json.dumps(res, indent=2))
    (out / "results.md").write_text(md + "\n")
    print(md)
    return res


if __name__ == "__main__":
    main()

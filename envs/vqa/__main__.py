"""`python -m envs.vqa {fetch,init-model,eval}`: easy-vqa data, the tiny VLM, accuracy.

    python -m envs.vqa fetch          # -> data/easy_vqa/{train,test}.jsonl (all 38,575 train, 1,000 test questions)
    python -m envs.vqa init-model     # -> outputs/vqa_tiny_init (tiny random Qwen2-VL, tokenizer, processor)
    python -m sft.train recipes/vqa_sft_cpu.yaml
    python -m envs.vqa eval --model outputs/vqa_sft_cpu/final --data data/easy_vqa/test.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rl.common import read_jsonl


def _texts(path: Path) -> list[str]:
    """The user and assistant texts of SFT rows (the tokenizer's training corpus)."""
    texts = []
    for row in read_jsonl(path):
        for m in row["messages"]:
            c = m["content"]
            texts.append(c if isinstance(c, str) else "".join(p.get("text") or "" for p in c))
    return texts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m envs.vqa", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="pip-download easy-vqa into the cache and write SFT jsonl rows")
    f.add_argument("--out", default="data/easy_vqa", help="where train.jsonl / test.jsonl / meta.json go")
    f.add_argument("--train-size", type=int, default=0, help="training questions, a seeded subset (0 = all 38,575)")
    f.add_argument("--test-size", type=int, default=1000, help="test questions, a seeded subset (0 = all 9,673)")
    f.add_argument("--balance-types", action="store_true",
                   help="equal numbers of yes/no, shape and colour training questions (the test split keeps its mix)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--cache-dir", default=None, help="cache root (default $AGENTRL_CACHE or ~/.cache/agentrl)")
    f.add_argument("--force", action="store_true", help="download and extract again")
    m = sub.add_parser("init-model", help="a tiny random Qwen2-VL + tokenizer (BPE on the rows' texts) + processor")
    m.add_argument("--data", default="data/easy_vqa/train.jsonl", help="rows whose texts train the tokenizer")
    m.add_argument("--out", default="outputs/vqa_tiny_init")
    m.add_argument("--vocab-size", type=int, default=512)
    m.add_argument("--image-side", type=int, default=112, help="images are resized to this square (multiple of 28)")
    m.add_argument("--hidden-size", type=int, default=128)
    m.add_argument("--layers", type=int, default=2)
    m.add_argument("--vision-depth", type=int, default=4, help="vision blocks (4: needed to learn shapes, 2 learn colours only)")
    m.add_argument("--vision-dim", type=int, default=64)
    m.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("eval", help="held-out accuracy vs the majority baselines (same as python -m envs.vqa.eval)")
    e.add_argument("rest", nargs=argparse.REMAINDER)
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["eval"]:
        from envs.vqa.eval import main as eval_main

        return eval_main(argv[1:])
    args = ap.parse_args(argv)
    if args.cmd == "fetch":
        from envs.vqa.data import convert, fetch_easy_vqa

        try:
            data_dir = fetch_easy_vqa(args.cache_dir)
            paths = convert(data_dir, args.out, train_size=args.train_size, test_size=args.test_size, seed=args.seed,
                            balance_train=args.balance_types)
        except (RuntimeError, ValueError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        meta = json.loads((Path(args.out) / "meta.json").read_text())
        print(f"easy-vqa data: {data_dir}")
        for split, path in paths.items():
            s = meta["splits"][split]
            print(f"{path}: {s['rows']} of {s['of']} questions, {s['images']} images, {s['question_types']}")
        return 0
    from envs.vqa.model import save_tiny_vlm

    data = Path(args.data)
    if not data.is_file():
        print(f"error: {data} not found (run `python -m envs.vqa fetch` first)", file=sys.stderr)
        return 1
    out = save_tiny_vlm(
        args.out,
        _texts(data),
        vocab_size=args.vocab_size,
        image_side=args.image_side,
        hidden_size=args.hidden_size,
        num_layers=args.layers,
        vision_depth=args.vision_depth,
        vision_dim=args.vision_dim,
        seed=args.seed,
    )
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as sf:
        params = sum(_numel(sf.get_slice(k).get_shape()) for k in sf.keys())
    print(f"{out}: tiny Qwen2-VL (random init), {params:,} parameters")
    return 0


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


if __name__ == "__main__":
    sys.exit(main())

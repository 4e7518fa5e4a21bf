"""`python -m envs.vqa {fetch,init-model,eval,digit-scenes,captions,build-vlm,vlm-stats}`: easy-vqa data, VLMs, accuracy.

    python -m envs.vqa fetch          # -> data/easy_vqa/{train,test}.jsonl (all 38,575 train, 1,000 test questions)
    python -m envs.vqa init-model     # -> outputs/vqa_tiny_init (tiny random Qwen2-VL, tokenizer, processor)
    python -m sft.train recipes/vqa_sft_cpu.yaml
    python -m envs.vqa eval --model outputs/vqa_sft_cpu/final --data data/easy_vqa/test.jsonl

The SmolLM2-135M VLM (envs/vqa/build_vlm.py, docs/vlm.md):

    python -m envs.vqa digit-scenes   # -> data/digit_scenes/ (sklearn digits tiled 2x2; questions + captions)
    python -m envs.vqa captions --digit-scenes data/digit_scenes   # -> data/vlm_captions/
    python -m envs.vqa build-vlm      # SmolLM2 + CLIP tower + projector; stage 0 (tower on image labels),
                                      # stage 1 (projector on captions) -> the cache
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
    d = sub.add_parser("digit-scenes", help="scikit-learn's 8x8 digits (pip-downloaded) tiled into scenes: questions + captions")
    d.add_argument("--out", default="data/digit_scenes")
    d.add_argument("--train-scenes", type=int, default=4000)
    d.add_argument("--test-scenes", type=int, default=500)
    d.add_argument("--grid", type=int, default=2, help="digits per side (1, 2 or 3)")
    d.add_argument("--side", type=int, default=64, help="scene size in pixels")
    d.add_argument("--test-fraction", type=float, default=0.2, help="source digits only held-out scenes use")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--cache-dir", default=None, help="cache root (default $AGENTRL_CACHE or ~/.cache/agentrl)")
    c = sub.add_parser("captions", help="image-caption rows: easy-vqa shapes (+ digit scenes) for VLM pre-training")
    c.add_argument("--out", default="data/vlm_captions")
    c.add_argument("--digit-scenes", default=None, help="a digit-scenes dir whose caption rows to include")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--cache-dir", default=None, help="cache root (default $AGENTRL_CACHE or ~/.cache/agentrl)")
    b = sub.add_parser("build-vlm", help="SmolLM2-135M + CLIP tower + projector (LLaVA), tower pre-training, then caption pre-training")
    b.add_argument("--out", default=None, help="the pre-trained VLM (default <cache>/models/smollm2-135m-vlm)")
    b.add_argument("--init", default=None, help="the untrained build (default <cache>/models/smollm2-135m-vlm-init)")
    b.add_argument("--init-only", action="store_true", help="build and save the untrained VLM, no pre-training")
    b.add_argument("--text-model", default="smollm2-135m", help="a rl.models name or a local Llama checkpoint")
    b.add_argument("--recipe", default=None, help="the pre-training recipe (default recipes/vlm_caption_pretrain.yaml)")
    b.add_argument("--image-side", type=int, default=None)
    b.add_argument("--patch-size", type=int, default=None)
    b.add_argument("--vision-hidden", type=int, default=None)
    b.add_argument("--vision-layers", type=int, default=None)
    b.add_argument("--vision-heads", type=int, default=None)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--tower", default=None,
                   help="stage 0's output: the init with its tower pre-trained on image labels and the projector "
                        "rescaled (default <cache>/models/smollm2-135m-vlm-tower; reused if it exists)")
    b.add_argument("--tower-epochs", type=int, default=None, help="stage 0 epochs over the labelled images")
    b.add_argument("--easy-vqa-dir", default=None, help="easy-vqa's extracted data (default: the fetch cache)")
    b.add_argument("--digit-scenes", default="data/digit_scenes", help="digit scenes whose digits label stage 0")
    b.add_argument("--force", action="store_true", help="rebuild the init / tower, replace --out if they exist")
    b.add_argument("overrides", nargs="*", help="recipe overrides for the pre-training (key.path=value)")
    v = sub.add_parser("vlm-stats", help="image-feature norms and cosines of a LLaVA checkpoint (collapse check)")
    v.add_argument("--model", required=True)
    v.add_argument("--images", nargs="+", required=True, help="image files (at least 2)")
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
    if args.cmd in ("digit-scenes", "captions", "build-vlm", "vlm-stats"):
        return _vlm_command(args)
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


def _vlm_command(args) -> int:
    from rl.common import UserError, WheelFetchError

    try:
        if args.cmd == "vlm-stats":
            from envs.vqa.build_vlm import image_feature_stats

            print(json.dumps(image_feature_stats(args.model, args.images), indent=2))
            return 0
        if args.cmd == "digit-scenes":
            from envs.vqa.digits import fetch_digits, make_scenes

            paths = make_scenes(fetch_digits(args.cache_dir), args.out, train_scenes=args.train_scenes,
                                test_scenes=args.test_scenes, grid=args.grid, side=args.side,
                                test_fraction=args.test_fraction, seed=args.seed)
            meta = json.loads((Path(args.out) / "meta.json").read_text())
            for split in ("train", "test"):
                s = meta["splits"][split]
                print(f"{paths[split]}: {s['questions']} questions, {paths['captions_' + split]}: {s['captions']} "
                      f"captions ({s['scenes']} scenes from {s['source_digits']} source digits)")
            return 0
        if args.cmd == "captions":
            from envs.vqa.captions import write_captions
            from envs.vqa.data import fetch_easy_vqa

            paths = write_captions(fetch_easy_vqa(args.cache_dir), args.out, digit_scenes=args.digit_scenes,
                                   seed=args.seed)
            meta = json.loads((Path(args.out) / "meta.json").read_text())
            for split, path in paths.items():
                s = meta["splits"][split]
                print(f"{path}: {s['rows']} rows: {json.dumps(s['sources'])}")
            return 0
        from envs.vqa.build_vlm import PRETRAIN_RECIPE, VISION_DEFAULTS, build_smollm2_vlm, default_init, pretrain

        init = Path(args.init).expanduser() if args.init else default_init()
        vision = {k: getattr(args, k) for k in VISION_DEFAULTS if getattr(args, k) is not None}
        if init.exists() and not args.force:
            if vision:
                print(f"error: {init} exists; pass --force to rebuild it with {vision}", file=sys.stderr)
                return 1
            print(f"{init}: exists, reused (--force rebuilds it)")
        else:
            init, counts = build_smollm2_vlm(init, text_model=args.text_model, seed=args.seed, force=args.force,
                                             **vision)
            print(f"{init}: {args.text_model} + CLIP vision tower + projector (image path untrained): "
                  + ", ".join(f"{k} {v:,}" for k, v in counts.items()) + " parameters")
        if args.init_only:
            return 0
        tower = _stage0(args, init)
        out, result = pretrain(tower, args.out or _default_out(), recipe=args.recipe or PRETRAIN_RECIPE,
                               overrides=args.overrides, force=args.force)
        print(f"{out}: caption pre-trained VLM ({result['global_step']} steps, train loss {result['train_loss']:.4f}, "
              f"held-out caption loss {result['eval'].get('eval_loss', float('nan')):.4f})")
        return 0
    except (FileExistsError, FileNotFoundError, ValueError, RuntimeError, UserError, WheelFetchError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def _stage0(args, init: Path) -> Path:
    """Stage 0 (`envs.vqa.tower_pretrain`): the tower pre-trained on image labels, the projector rescaled;
    an existing output is reused unless --force."""
    from envs.vqa.build_vlm import default_tower
    from envs.vqa.data import vqa_cache_dir
    from envs.vqa.tower_pretrain import TOWER_DEFAULTS, pretrain_tower

    tower = Path(args.tower).expanduser() if args.tower else default_tower()
    if tower.exists() and not args.force:
        print(f"{tower}: exists, reused (--force redoes stage 0)")
        return tower
    easy = Path(args.easy_vqa_dir) if args.easy_vqa_dir else vqa_cache_dir()
    scenes = Path(args.digit_scenes) if args.digit_scenes else None
    tower, report = pretrain_tower(init, tower, easy_vqa_dir=easy, digit_scenes_dir=scenes, force=args.force,
                                   epochs=args.tower_epochs or TOWER_DEFAULTS["epochs"], seed=args.seed)
    acc = ", ".join(f"{k} {v:.3f}" for k, v in report["held_out_accuracy"].items())
    print(f"{tower}: stage 0, tower pre-trained on {report['images']['train']:,} labelled images "
          f"({report['seconds']:.0f} s); held-out accuracy {acc}; projector output norm "
          f"{report['projector_norm_before']:.2f} -> {report['projector_norm_after']:.2f}")
    return tower


def _default_out() -> Path:
    from envs.vqa.build_vlm import default_out

    return default_out()


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


if __name__ == "__main__":
    sys.exit(main())

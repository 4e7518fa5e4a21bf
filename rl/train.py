"""`python -m rl.train recipe.yaml [key.path=value ...] [--resume latest|DIR]`

Also runs under `accelerate launch -m rl.train recipe.yaml` for DDP / FSDP / DeepSpeed.
"""

from __future__ import annotations

import argparse
import sys

from rl.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rl.train", description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="recipe YAML file (see recipes/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. algorithm.kl_coef=0.01 steps=20")
    parser.add_argument("--resume", default=None, help="'latest' (in output_dir) or a checkpoint directory")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.recipe, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from rl.trainer import train  # heavy imports only once the recipe is known to be valid

    result = train(cfg, resume=args.resume)
    after = result.get("eval_after") or {}
    if after:
        print(f"done: {cfg.output_dir} (held-out reward {after.get('eval/reward', float('nan')):.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

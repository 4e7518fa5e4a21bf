"""`python -m rl.train recipe.yaml [key.path=value ...] [--resume latest|DIR]`

Also runs under `accelerate launch -m rl.train recipe.yaml` for DDP / FSDP / DeepSpeed.
The trained policy ends up in `<output_dir>/final/` (a plain Hugging Face model + tokenizer).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rl.common import is_user_error, plain_library_progress
from rl.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rl.train", description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="recipe YAML file (see recipes/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. algorithm.kl_coef=0.01 steps=20")
    parser.add_argument("--resume", default=None, help="'latest' (in output_dir) or a checkpoint directory")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.recipe, args.overrides)
        plain_library_progress()  # in a log file, transformers' nested bars would write escape codes
        from rl.trainer import train  # heavy imports only once the recipe is known to be valid

        result = train(cfg, resume=args.resume)
    except Exception as e:
        # errors the user fixes from their one-line message (a bad recipe or override, a missing recipe
        # or data file, an output_dir in the way, nothing to resume, a model path that is not a model):
        # `error: ...`, exit code 2. Any other exception is a bug and keeps its traceback.
        if not (isinstance(e, ConfigError) or is_user_error(e)):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return 0
    after = result.get("eval_after") or {}
    tail = f" (held-out reward {after['eval/reward']:.4f})" if "eval/reward" in after else ""
    print(f"done: {Path(cfg.output_dir) / 'final'}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

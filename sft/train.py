"""`python -m sft.train recipe.yaml [key.path=value ...] [--resume latest|DIR]`

Also runs under `accelerate launch -m sft.train recipe.yaml` for DDP / FSDP / DeepSpeed.
"""

from __future__ import annotations

import argparse
import sys

from rl.common import is_user_error, plain_library_progress, quiet_deepspeed
from sft.config import ConfigError, load_recipe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sft.train", description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="recipe YAML file (see recipes/sft_smoke.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.lr=1e-4 training.max_steps=20")
    parser.add_argument("--resume", default=None, help="'latest' (in output_dir) or a checkpoint directory")
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    quiet_deepspeed()  # no DeepSpeed "Setting accelerator to CPU" warning on machines without a GPU
    # heavy imports only once the recipe is known to be valid
    from sft.data import SFTDataError
    from sft.trainer import train

    plain_library_progress()  # in a log file, nested progress bars would write escape codes
    try:
        result = train(recipe, resume=args.resume)
    except Exception as e:
        # errors the user fixes from the one line (a bad data row or recipe, a missing data file, an
        # output_dir in the way, nothing to resume, a model path that is not a model): exit code 2;
        # any other exception is a bug and keeps its traceback
        if not (isinstance(e, (SFTDataError, ConfigError)) or is_user_error(e)):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return 0
    loss = result["eval"].get("eval_loss")
    tail = f", eval_loss {loss:.4f}" if loss is not None else ""
    print(f"done: {result['final_dir']} (step {result['global_step']}, train_loss {result['train_loss']:.4f}{tail})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

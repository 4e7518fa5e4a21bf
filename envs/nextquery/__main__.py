"""`python -m envs.nextquery build`: the synthetic world and MovieLens-100k as next-query data (docs/nextquery.md).

    python -m envs.nextquery build                      # both sources -> data/nextquery/{synthetic,movielens}/
    python -m envs.nextquery build --source synthetic --users 2000 --seed 1 --out data/nextquery_s1
    python -m envs.nextquery build --source movielens --recbole DIR   # other RecBole atomic files
    python -m envs.nextquery check data/mine/test.jsonl  # validate your own rows (or --streams / --catalog)
    python -m envs.nextquery replay --streams data/nextquery/synthetic/streams_test.jsonl   # drift trigger (replay.py)

What each file holds: envs/nextquery/build.py; the row format: envs/nextquery/data.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rl.common import UserError


def _build(args) -> None:
    from envs.nextquery.build import build_movielens_source, build_synthetic
    from envs.nextquery.world import WorldConfig

    sources = ("synthetic", "movielens") if args.source == "all" else (args.source,)
    for source in sources:
        out = Path(args.out) / source
        if (out / "stats.json").exists() and not args.overwrite:
            raise UserError(f"{out} already holds a build (stats.json); pass --overwrite to replace it")
    for source in sources:
        out = Path(args.out) / source
        if source == "synthetic":
            cfg = WorldConfig(seed=args.seed, n_users=args.users, items_per_category=args.items_per_category)
            build_synthetic(out, cfg, n_streams=args.streams)
        else:
            from envs.common.interactions import fetch_movielens_100k, load_recbole
            from envs.nextquery.movielens import MovieLensConfig

            data = load_recbole(args.recbole or fetch_movielens_100k(args.cache_dir))
            build_movielens_source(out, data, MovieLensConfig(seed=args.seed, n_streams=args.streams))


def _check(args) -> None:
    from envs.nextquery import data

    load = data.load_streams if args.streams else data.load_catalog if args.catalog else data.load_rows
    for path in args.paths:
        print(f"{path}: {len(load(path))} ok")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m envs.nextquery", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write data/nextquery/<source>/ (rows, streams, SFT rows, baselines)")
    b.add_argument("--source", choices=["all", "synthetic", "movielens"], default="all")
    b.add_argument("--out", default="data/nextquery", help="parent dir: one subdir per source")
    b.add_argument("--seed", type=int, default=0, help="the world's seed (and the user split's, stream sample's)")
    b.add_argument("--users", type=int, default=1000, help="synthetic users")
    b.add_argument("--items-per-category", type=int, default=120)
    b.add_argument("--streams", type=int, default=100, help="test users replayed as streams")
    b.add_argument("--recbole", default=None, help="RecBole atomic files instead of MovieLens-100k")
    b.add_argument("--cache-dir", default=None, help="datasets dir for the MovieLens-100k fetch")
    b.add_argument("--overwrite", action="store_true", help="replace an existing build")
    c = sub.add_parser("check", help="validate jsonl files in the next-query format (envs/nextquery/data.py)")
    c.add_argument("paths", nargs="+")
    kind = c.add_mutually_exclusive_group()
    kind.add_argument("--streams", action="store_true", help="the files are streams")
    kind.add_argument("--catalog", action="store_true", help="the files are catalogues")
    from envs.nextquery import replay  # the drift-trigger replay (envs/nextquery/replay.py)

    replay.build_parser(sub.add_parser("replay", help="replay streams through the drift trigger and a predictor"))
    args = ap.parse_args(argv)
    try:
        if args.cmd == "build":
            _build(args)
        elif args.cmd == "check":
            _check(args)
        elif args.cmd == "replay":
            replay.run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

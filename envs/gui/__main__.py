"""The GUI data CLI: record oracle episodes in headless Chromium, build training / benchmark rows, convert datasets.

    python -m envs.gui record --out data/gui/episodes                       # the default task set (below)
    python -m envs.gui record --tasks click-button,login-user --seeds 0-39 --out data/gui/episodes
    python -m envs.gui build --episodes data/gui/episodes/episodes.jsonl --out data/gui
    python -m envs.gui build ... --history-modes semantic,none,raw --history-k 3 --images
    python -m envs.gui convert androidcontrol data/ac/episodes.jsonl --out data/gui/androidcontrol
    python -m envs.gui convert androidlens data/lens/bench.json --out data/gui/androidlens

``record`` (`envs.gui.oracle`): one episode per (task, seed) with screenshots, the oracle's actions, thoughts
and semantic contexts, milestones, and every valid action found by replay. Without ``--tasks`` it records
the default set: the training task types `TRAIN_TASKS` with seeds 0..39 and the held-out types
`envs.gui.episodes.DEFAULT_HELDOUT_TASKS` with seeds 0..19. Resumable: episodes already in
``<out>/episodes.jsonl`` are kept and not recorded again; the file is rewritten (atomically) after every task.
An episode the oracle does not solve is left out (it is no demonstration) and listed, with its reason, in
``<out>/record_stats.json`` next to the timings and replay counts.

``build`` (`envs.gui.episodes.build_rows`): sft.jsonl, grounding.jsonl, static_{train,test}.jsonl and
stats.json from the episodes, with the split rule of `envs.gui.episodes.split_episodes`.

``convert`` (`envs.gui.adapters`): AndroidControl-style or AndroidLens/CMGUI-style episodes -> episodes.jsonl.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from rl.common import atomic_write_text, is_user_error

__all__ = ["TRAIN_TASKS", "main", "parse_seeds", "record"]

# 8 training task types: single-screen clicks (button, link, dialog, focus) and multi-step forms / tabs
TRAIN_TASKS = ("click-button", "click-link", "click-dialog", "focus-text", "click-tab-2", "enter-text",
               "login-user", "click-checkboxes")
TRAIN_SEEDS = range(0, 40)
HELDOUT_SEEDS = range(0, 20)

log = logging.getLogger("envs.gui")


def parse_seeds(spec: str) -> list[int]:
    """"0-39" / "3,5,7" / "0-9,20-29" -> sorted unique seeds."""
    seeds: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = part.split("-", 1)
                lo_i, hi_i = int(lo), int(hi)
                if hi_i < lo_i:
                    raise ValueError
                seeds.update(range(lo_i, hi_i + 1))
            else:
                seeds.add(int(part))
        except ValueError:
            raise SystemExit(f"error: bad seed range {part!r} in --seeds {spec!r} (e.g. 0-39 or 1,4,9)") from None
    if not seeds:
        raise SystemExit(f"error: --seeds {spec!r} names no seed")
    return sorted(seeds)


def record(
    plan: list[tuple[str, list[int]]],
    out: str | Path,
    *,
    replay: bool = True,
    max_candidates: int | None = None,
    screenshots: bool = True,
    session=None,
) -> dict:
    """Record the oracle on every (task, seeds) of `plan` into ``out/episodes.jsonl`` (+ ``out/screens``),
    resuming from what is there; returns the stats also written to ``out/record_stats.json``."""
    from envs.gui.browser import BrowserCrashed
    from envs.gui.episodes import episode_id, read_episodes, write_episodes
    from envs.gui.oracle import MAX_CANDIDATES, POLICIES, OracleError, record_episode

    for task, _ in plan:
        if task not in POLICIES:
            raise SystemExit(f"error: no oracle for task {task!r}; supported: {', '.join(POLICIES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "episodes.jsonl"
    episodes = read_episodes(path) if path.exists() else []
    have = {ep["episode_id"] for ep in episodes}
    if episodes:
        log.info("%s: %d episodes already recorded, resuming", path, len(episodes))
    own_session = session is None
    if own_session:
        from envs.gui.browser import MiniWobSession

        session = MiniWobSession(screenshots=screenshots)
    stats: dict = {"tasks": {}, "failures": [], "resumed": len(episodes)}
    t_all = time.monotonic()
    try:
        for task, seeds in plan:
            t_task, n_new = time.monotonic(), 0
            ts = stats["tasks"].setdefault(task, {"recorded": 0, "failed": 0, "seconds": 0.0, "replays": 0,
                                                   "candidates": 0, "steps": 0, "valid_actions": 0,
                                                   "oracle_only_steps": 0})
            for seed in seeds:
                if episode_id(task, seed) in have:
                    continue
                try:
                    ep, c = record_episode(session, task, seed, screens_dir=out / "screens", screens_rel="screens",
                                           replay=replay, max_candidates=max_candidates or MAX_CANDIDATES)
                except (OracleError, BrowserCrashed) as e:
                    # a crashed browser is restarted by the next reset: one lost episode, listed, not the run
                    ts["failed"] += 1
                    stats["failures"].append({"task": task, "seed": seed, "reason": f"{type(e).__name__}: {e}"})
                    log.warning("%s seed %d: %s: %s", task, seed, type(e).__name__, e)
                    continue
                if not ep["success"]:
                    ts["failed"] += 1
                    stats["failures"].append({"task": task, "seed": seed,
                                              "reason": f"not solved (raw reward {ep['raw_reward']})"})
                    log.warning("%s seed %d: the oracle did not solve it (raw reward %s); left out",
                                task, seed, ep["raw_reward"])
                    continue
                episodes.append(ep)
                have.add(ep["episode_id"])
                n_new += 1
                ts["recorded"] += 1
                ts["replays"] += c.get("replays", 0)
                ts["candidates"] += c.get("candidates", 0)
                ts["steps"] += len(ep["steps"])
                ts["valid_actions"] += sum(len(s["valid_actions"]) for s in ep["steps"])
                ts["oracle_only_steps"] += sum(s["valid_actions_source"] == "oracle" for s in ep["steps"])
            ts["seconds"] = round(ts["seconds"] + time.monotonic() - t_task, 2)
            if n_new:
                write_episodes(path, episodes)
            log.info("%s: %d recorded, %d failed, %.1f s", task, ts["recorded"], ts["failed"], ts["seconds"])
    finally:
        if own_session:
            session.close()
    stats["seconds"] = round(time.monotonic() - t_all, 2)
    stats["episodes"] = len(episodes)
    atomic_write_text(out / "record_stats.json", json.dumps(stats, indent=2) + "\n")
    return stats


def _default_plan() -> list[tuple[str, list[int]]]:
    from envs.gui.episodes import DEFAULT_HELDOUT_TASKS

    return [(t, list(TRAIN_SEEDS)) for t in TRAIN_TASKS] + [(t, list(HELDOUT_SEEDS)) for t in DEFAULT_HELDOUT_TASKS]


def main(argv: list[str] | None = None) -> int:
    from envs.gui.episodes import DEFAULT_HELDOUT_TASKS, DEFAULT_TEST_SEED_MIN

    p = argparse.ArgumentParser(prog="python -m envs.gui", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record", help="record oracle episodes in headless Chromium")
    r.add_argument("--tasks", help="comma-separated MiniWoB tasks (default: the default train + held-out set)")
    r.add_argument("--seeds", default="0-39", help="seeds for --tasks, e.g. 0-39 or 1,4,9 (default 0-39)")
    r.add_argument("--out", required=True, help="folder for episodes.jsonl, screens/ and record_stats.json")
    r.add_argument("--no-replay", action="store_true", help="skip valid actions by replay (only the oracle's)")
    r.add_argument("--max-candidates", type=int, default=None, help="candidate clicks tried per step (default 40)")
    r.add_argument("--no-screenshots", action="store_true")
    b = sub.add_parser("build", help="SFT, grounding and static benchmark rows from episodes")
    b.add_argument("--episodes", required=True, nargs="+", help="episodes.jsonl file(s)")
    b.add_argument("--out", required=True)
    b.add_argument("--history-modes", default="semantic", help="comma-separated; the first is the default files'")
    b.add_argument("--history-k", type=int, default=1, help="screens shown by the 'raw' history mode")
    b.add_argument("--images", action="store_true", help="rows carry the screenshots (VLM policies)")
    b.add_argument("--history-images", action="store_true",
                   help="with --images, also picture the shown history screens (default: the current screen only)")
    b.add_argument("--click-format", default="auto", choices=("auto", "element", "point"),
                   help="clicks in SFT / grounding answers: element refs or box-centre points (auto: points with "
                        "--images, refs without)")
    b.add_argument("--heldout-tasks", default=",".join(DEFAULT_HELDOUT_TASKS))
    b.add_argument("--test-seed-min", type=int, default=DEFAULT_TEST_SEED_MIN)
    b.add_argument("--element-budget", type=int, default=None, help="max characters of a screen's element list")
    c = sub.add_parser("convert", help="AndroidControl / AndroidLens-style episodes -> episodes.jsonl")
    c.add_argument("kind", choices=("androidcontrol", "androidlens"))
    c.add_argument("path")
    c.add_argument("--out", required=True)
    c.add_argument("--unsupported", default="skip", choices=("skip", "truncate", "error"),
                   help="AndroidControl episodes with actions the GUI action space lacks")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.cmd == "record":
            plan = ([(t.strip(), parse_seeds(args.seeds)) for t in args.tasks.split(",") if t.strip()]
                    if args.tasks else _default_plan())
            stats = record(plan, args.out, replay=not args.no_replay, max_candidates=args.max_candidates,
                           screenshots=not args.no_screenshots)
            print(json.dumps({k: stats[k] for k in ("episodes", "seconds")} | {"failures": len(stats["failures"])}))
        elif args.cmd == "build":
            from envs.gui.episodes import EpisodeError, build_rows, read_episodes

            episodes, dirs = [], set()
            for f in args.episodes:
                eps = read_episodes(f)
                dirs.add(str(Path(f).parent.resolve()))
                episodes += eps
            if len(dirs) != 1:
                # screenshot paths are relative to their file: rows from several folders need one base each
                raise EpisodeError(f"build: give episodes files of ONE folder (got {sorted(dirs)}); convert or "
                                   "record into one folder")
            stats = build_rows(
                episodes, episodes_dir=dirs.pop(), out_dir=args.out,
                history_modes=[m.strip() for m in args.history_modes.split(",") if m.strip()],
                history_k=args.history_k, images=args.images, history_images=args.history_images,
                click_format=args.click_format,
                heldout_tasks=[t.strip() for t in args.heldout_tasks.split(",") if t.strip()],
                test_seed_min=args.test_seed_min, element_budget=args.element_budget)
            print(json.dumps({"episodes": stats["episodes"], "steps": stats["steps"], "files": stats["files"]}))
        else:
            from envs.gui.adapters import convert

            kwargs = {"unsupported": args.unsupported} if args.kind == "androidcontrol" else {}
            print(json.dumps(convert(args.kind, args.path, args.out, **kwargs)))
    except Exception as e:
        if is_user_error(e):
            print(f"error: {e}", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())

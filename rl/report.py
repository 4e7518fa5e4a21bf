"""Reports: before/after tables (Markdown + JSON) and reward-curve PNGs."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: training machines have no display
import matplotlib.pyplot as plt  # noqa: E402


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def plot_reward_curve(history: list[dict], path: Path, title: str = "") -> None:
    train = [(h["step"], h["reward/mean"]) for h in history if "reward/mean" in h]
    evals = [(h["step"], h["eval/reward"]) for h in history if "eval/reward" in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train reward (mean over samples)", alpha=0.8)
    if evals:
        ax.plot(*zip(*evals), "o-", label="held-out reward (greedy)")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.set_title(title or "reward")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_training_report(output_dir: Path, history: list[dict], before: dict, after: dict) -> None:
    output_dir = Path(output_dir)
    plot_reward_curve(history, output_dir / "reward_curve.png", title=output_dir.name)
    (output_dir / "eval_results.json").write_text(json.dumps({"before": before, "after": after}, indent=2))
    keys = [k for k in after if k.startswith("eval/") and k != "eval/samples"] or [k for k in before if k.startswith("eval/")]
    if before:
        header = ["metric", "before", "after"]
        rows = [[k.removeprefix("eval/"), before.get(k, float("nan")), after.get(k, float("nan"))] for k in keys]
    else:  # eval_before_training: false (e.g. an outside leaderboard measures "before")
        header, rows = ["metric", "after"], [[k.removeprefix("eval/"), after.get(k, float("nan"))] for k in keys]
    (output_dir / "eval_results.md").write_text(
        f"# Held-out evaluation: {output_dir.name}\n\n" + markdown_table(header, rows) + "\n"
    )

"""Reports: before/after tables (Markdown + JSON), the run report `report.png` (2 x 2: reward, held-out
metrics, response length, KL / loss) and its reward panel alone, `reward_curve.png`."""

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


_NOT_REWARD_FUNCTIONS = {"mean", "std"}


def _train(history: list[dict]) -> list[dict]:
    return [h for h in history if "reward/mean" in h]


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(h["step"], h[key]) for h in records if isinstance(h.get(key), (int, float)) and not isinstance(h[key], bool)]
    return ([p[0] for p in pts], [p[1] for p in pts]) if pts else ([], [])


def smooth(values: list[float], weight: float = 0.6) -> list[float]:
    """TensorBoard's smoothing (its default weight, 0.6): a debiased exponential moving average, `weight`
    being the old value's share."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def _curve(ax, x, y, label: str, color=None):
    """The raw points faint, the smoothed line over them (few points: the raw line alone)."""
    if len(y) > 3:
        raw = ax.plot(x, y, alpha=0.25, lw=1, color=color)[0]
        ax.plot(x, smooth(y), lw=1.8, color=raw.get_color(), label=label)
    else:
        ax.plot(x, y, "o-", lw=1.5, ms=3, color=color, label=label)


def reward_function_names(history: list[dict]) -> list[str]:
    """The reward functions logged as `reward/<name>` (not the extras `reward/<name>/<key>`)."""
    names = {k.split("/", 1)[1] for h in _train(history) for k in h if k.startswith("reward/") and k.count("/") == 1}
    return sorted(names - _NOT_REWARD_FUNCTIONS)


def _episodes_axis(ax, train: list[dict]) -> None:
    """A second x axis on top: episodes (samples rolled out), proportional to the step."""
    last = [h for h in train if h.get("episodes") and h["step"]]
    if not last:
        return
    per_step = last[-1]["episodes"] / last[-1]["step"]
    top = ax.secondary_xaxis("top", functions=(lambda s: s * per_step, lambda e: e / per_step))
    top.set_xlabel("episodes")


def _finish(ax, title: str, ylabel: str, train: list[dict] | None = None, handles=None) -> None:
    """What every panel ends with: axis labels, title, grid, a legend when something is labelled and,
    for panels over training steps (`train`), the episodes axis on top."""
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    handles, labels = handles if handles is not None else ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, fontsize=7)
    if train is not None:
        _episodes_axis(ax, train)


def plot_reward_panel(ax, history: list[dict]) -> None:
    """The total reward and every reward function by name (smoothed over faint raw points), the total's
    spread over samples (mean +- std) as a band, held-out rewards where evaluations were taken."""
    train = _train(history)
    x, y = _series(train, "reward/mean")
    if x:
        _curve(ax, x, y, "total (train)", color="C0")
        sx, sd = _series(train, "reward/std")
        if len(sx) == len(x):
            ax.fill_between(x, [m - s for m, s in zip(y, sd)], [m + s for m, s in zip(y, sd)], color="C0",
                            alpha=0.12, lw=0, label="total +- std over samples")
    names = reward_function_names(history)
    if len(names) > 1 or (names and train and any(h.get(f"reward/{names[0]}") != h["reward/mean"] for h in train)):
        for i, name in enumerate(names):  # one function equal to the total (weight 1) would repeat it
            _curve(ax, *_series(train, f"reward/{name}"), name, color=f"C{i + 2}")
    ex, ey = _series(history, "eval/reward")
    if ex:
        ax.plot(ex, ey, "s--", color="C1", ms=5, lw=1, label="total (held-out)")
    _finish(ax, "reward", "reward", train)


def _eval_panel(ax, history: list[dict]) -> None:
    evals = [h for h in history if "eval/reward" in h]
    skip = {"eval/samples", "eval/response_length"}
    keys = sorted({k for h in evals for k in h if k.startswith("eval/") and k not in skip
                   and not k.startswith("eval/info/")})
    for i, key in enumerate(keys):
        x, y = _series(evals, key)
        ax.plot(x, y, "o-", ms=4, lw=1.2, color=f"C{i}", label=key.removeprefix("eval/"))
    _finish(ax, "held-out metrics", "held-out mean")
    if not keys:
        ax.text(0.5, 0.5, "no held-out evaluation", ha="center", va="center", transform=ax.transAxes)


def _length_panel(ax, history: list[dict]) -> None:
    train = _train(history)
    x, y = _series(train, "response_length/mean")
    if x:
        _curve(ax, x, y, "train", color="C0")
    ex, ey = _series(history, "eval/response_length")
    if ex:
        ax.plot(ex, ey, "s--", color="C1", ms=5, lw=1, label="held-out")
    _finish(ax, "response length", "tokens per response", train)


def _loss_panel(ax, history: list[dict]) -> None:
    """The loss terms and KL (per token); the policy's entropy, on another scale, on a right-hand axis."""
    train = _train(history)
    keys = sorted({k for h in train for k in h if k.startswith("loss/")})
    keys = [k for k in keys if any(h.get(k) for h in train)]  # a term that is 0 throughout says nothing
    for i, key in enumerate(k for k in keys if k != "loss/entropy"):
        _curve(ax, *_series(train, key), key.removeprefix("loss/"), color=f"C{i}")
    handles, labels = ax.get_legend_handles_labels()
    if "loss/entropy" in keys:
        right = ax.twinx()
        _curve(right, *_series(train, "loss/entropy"), "entropy (right axis)", color="C7")
        right.set_ylabel("entropy per token")
        more = right.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    _finish(ax, "KL / loss", "per token", train, (handles, labels))


def report_figure(history: list[dict], title: str = ""):
    """(figure, axes) of the run report: 2 x 2 panels "reward", "held-out metrics", "response length",
    "KL / loss", over steps (and episodes on top)."""
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    plot_reward_panel(axes[0, 0], history)
    _eval_panel(axes[0, 1], history)
    _length_panel(axes[1, 0], history)
    _loss_panel(axes[1, 1], history)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig, axes


def plot_report(history: list[dict], path: Path, title: str = "") -> None:
    fig, _ = report_figure(history, title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reward_curve(history: list[dict], path: Path, title: str = "") -> None:
    """The reward panel alone (reward_curve.png, which the README and docs show)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    plot_reward_panel(ax, history)
    if title:
        ax.set_title(f"reward: {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_training_report(output_dir: Path, history: list[dict], before: dict, after: dict) -> None:
    output_dir = Path(output_dir)
    plot_reward_curve(history, output_dir / "reward_curve.png", title=output_dir.name)
    plot_report(history, output_dir / "report.png", title=output_dir.name)
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

"""Report writers (Markdown tables, reward-curve PNGs): they live in `rl.report`, below the trainer
that writes its own report; re-exported here for the leaderboard code."""

from rl.report import markdown_table, plot_reward_curve, plt, write_training_report  # noqa: F401

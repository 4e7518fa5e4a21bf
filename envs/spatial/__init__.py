"""MathSpatial (arXiv 2602.11635): structured reasoning traces (SRT) for spatial problems.

Importing the package (a recipe's ``plugins: [envs.spatial]``) registers its rewards in
`rl.rewards.REWARDS`: ``srt_format`` (is the completion one valid trace) and ``srt_answer``
(does its final answer match the row's). The traces themselves (validator, renderer,
never-raising parser, the rewards, SFT rows, toy data, CLI ``python -m envs.spatial.srt``)
are in `envs.spatial.srt`. No torch is imported.

The registered functions import `envs.spatial.srt` on their first call rather than here, so
that ``python -m envs.spatial.srt`` does not find its module already imported by the package
(runpy would warn and execute it twice).
"""

from rl.rewards import register_reward


@register_reward("srt_format")
def srt_format(row: dict, traj, **options) -> dict:
    """`envs.spatial.srt.srt_format_reward` (options: embedded_credit)."""
    from envs.spatial.srt import srt_format_reward

    return srt_format_reward(row, traj, **options)


@register_reward("srt_answer")
def srt_answer(row: dict, traj, **options) -> float:
    """`envs.spatial.srt.srt_answer_reward` (options: answer_column, require_valid)."""
    from envs.spatial.srt import srt_answer_reward

    return srt_answer_reward(row, traj, **options)

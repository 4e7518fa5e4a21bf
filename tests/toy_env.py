"""A toy paper, written only against the documented environment protocol (agents/environment.py):
guess the number. It registers itself from its own module, as `envs/<paper>/` does, and a recipe
uses it with `plugins: [toy_env]`; nothing in rl/ or agents/ knows about it.

Rows (dataset `toy_numbers`): {"secret", "low", "high", "messages"}. The policy replies
`<guess> N </guess>` (a stop string); the environment answers "higher" / "lower" (text, or with
`structured: true` the same hint as token ids it tokenised itself), ends the episode on the secret,
and answers anything else with a corrective message (counted as invalid).
"""

from __future__ import annotations

import random
import re

import datasets

from agents.environment import Environment, Prompt, StepResult
from eval.metrics import MetricSet, mean
from rl.data import register_dataset
from rl.registry import ENVIRONMENTS, METRICS
from rl.rewards import register_reward

INVALID = "\nReply with a number between <guess> and </guess>.\n"
LAST_CHANCE = "\nLast chance: your final <guess> N </guess>.\n"
_GUESS = re.compile(r"<guess>\s*(-?\d+)\s*</guess>")


def question(low: int, high: int) -> str:
    return f"I am thinking of a number between {low} and {high}. Guess it: reply <guess> N </guess>."


class GuessEnv(Environment):
    stop = ("</guess>",)
    final_turn_text = LAST_CHANCE
    loop_defaults = {"max_turns": 3, "max_obs_tokens": 64}
    metrics = "toy_guess"

    def __init__(self, structured: bool = False, use_prompt_builder: bool = False):
        self.structured = structured
        self.use_prompt_builder = use_prompt_builder

    def reset(self, rows):
        self.rows = rows
        self.state = [{"guesses": 0, "solved": False, "last_guess": None} for _ in rows]
        if self.use_prompt_builder:  # the recipe's data.prompt_builder builds the prompt
            return [None] * len(rows)
        return [Prompt(messages=[{"role": "user", "content": question(r["low"], r["high"])}]) for r in rows]

    def step(self, turns):
        out = []
        for t in turns:
            st, secret = self.state[t.sample], int(self.rows[t.sample]["secret"])
            m = _GUESS.search(t.text)
            if m is None:
                out.append(StepResult(observation=INVALID, action="invalid", valid=False))
                continue
            guess = int(m.group(1))
            st["guesses"] += 1
            st["last_guess"] = guess
            if guess == secret:
                st["solved"] = True
                out.append(StepResult(done=True, reason="solved", action="guess"))
                continue
            hint = "\nhigher\n" if secret > guess else "\nlower\n"
            if self.structured:
                ids = self.tokenizer(hint, add_special_tokens=False)["input_ids"]
                out.append(StepResult(observation_ids=ids, action="guess"))
            else:
                out.append(StepResult(observation=hint, action="guess"))
        return out

    def info(self, sample):
        return dict(self.state[sample])


ENVIRONMENTS.register("toy_guess", GuessEnv)


@register_reward("toy_solved")
def toy_solved(row, traj) -> float:
    return float(traj.info.get("solved", False))


@register_dataset("toy_numbers")
def toy_numbers(n_train: int = 32, n_test: int = 8, low: int = 1, high: int = 8, seed: int = 0):
    rng = random.Random(seed)

    def rows(n):
        secrets = [rng.randint(low, high) for _ in range(n)]
        return datasets.Dataset.from_dict({
            "secret": secrets, "low": [low] * n, "high": [high] * n,
            "messages": [[{"role": "user", "content": question(low, high)}] for _ in range(n)],
        })  # fmt: skip

    return datasets.DatasetDict({"train": rows(n_train), "test": rows(n_test)})


def record(traj) -> dict:
    info = traj.info
    return {"secret": traj.row["secret"], "solved": float(info["solved"]), "guesses": info["guesses"],
            "invalid_actions": info["invalid_actions"], "turns": info["turns"], "termination": info["termination"]}


def aggregate(records) -> dict:
    return {"n": len(records), "solved": mean([r["solved"] for r in records]),
            "avg_guesses": mean([r["guesses"] for r in records]),
            "avg_invalid": mean([r["invalid_actions"] for r in records])}


METRICS.register("toy_guess", MetricSet(
    record=record, aggregate=aggregate, title="Guess-the-number leaderboard", progress="solved",
    columns={"n": "n", "solved": "solved", "avg_guesses": "guesses", "avg_invalid": "invalid"},
))  # fmt: skip

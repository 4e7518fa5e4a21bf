"""Reverse the word: a multi-turn environment built from the protocol alone (docs/custom_environment.md)."""

import random
import re

import datasets

from agents.environment import Environment, StepResult
from rl.data import register_dataset
from rl.registry import ENVIRONMENTS
from rl.rewards import register_reward

WORDS = ("apple bread chair cloud dream earth flame glass grape green heart horse house juice knife lemon light "
         "music ocean paper piano plant river smile stone table tiger water").split()

ASK = "Reverse the word '{}' letter by letter. Reply with the reversed word only."


def in_place(attempt: str, word: str) -> float:
    """The fraction of the reversed word's letters that `attempt` has in the right place."""
    return sum(a == b for a, b in zip(attempt, word[::-1])) / len(word)


def feedback(attempt: str, word: str) -> str | None:
    """None if `attempt` is `word` reversed, else what is wrong with it (the environment's next turn)."""
    target = word[::-1]
    if attempt == target:
        return None
    if len(attempt) != len(target):
        return f"Not quite: the reversed word has {len(target)} letters. Try again."
    wrong = next(k for k, (a, b) in enumerate(zip(attempt, target)) if a != b)
    return f"Not quite: letter {wrong + 1} is wrong. Try again."


class ReverseWord(Environment):
    # the policy ends each attempt with its end-of-turn token; the environment answers with a new user turn
    loop_defaults = {"max_turns": 3, "stop_on_eos": False}

    def reset(self, rows):
        self.words = [row["word"] for row in rows]
        self.state = [{"solved": False, "attempts": 0, "in_place": 0.0} for _ in rows]
        return [None] * len(rows)  # the prompt: the recipe's prompt builder (the rows' "messages")

    def step(self, turns):
        results = []
        for t in turns:
            st, word, found = self.state[t.sample], self.words[t.sample], re.findall(r"[a-z]+", t.text.lower())
            attempt = found[-1] if found else ""  # the reply's last word
            st["attempts"], st["in_place"] = st["attempts"] + 1, in_place(attempt, word)
            wrong = feedback(attempt, word)
            if wrong is None:
                st["solved"] = True
                results.append(StepResult(done=True, reason="solved", action="answer"))
            else:  # a chat turn of its own, rendered through the chat template (never raise on bad output)
                results.append(StepResult(message={"role": "user", "content": wrong}, action="answer",
                                          valid=bool(found)))
        return results

    def info(self, sample):
        return dict(self.state[sample])


ENVIRONMENTS.register("reverse_word", ReverseWord)


@register_reward("reverse_word")
def reverse_word_reward(row, traj) -> float:
    """1 for the reversed word (in any turn); else half the fraction of letters in place in the last attempt."""
    return 1.0 if traj.info["solved"] else 0.5 * traj.info["in_place"]


@register_dataset("reverse_words")
def reverse_words(n_train: int = 64, n_test: int = 16, seed: int = 0) -> datasets.DatasetDict:
    """Rows {"word", "messages"}; the test words are words never seen in training."""
    words = sorted(WORDS)
    random.Random(seed).shuffle(words)
    rng, cut = random.Random(seed + 1), len(words) * 3 // 4

    def split(pool, n):
        chosen = [rng.choice(pool) for _ in range(n)]
        return datasets.Dataset.from_dict({"word": chosen, "messages": [[{"role": "user", "content": ASK.format(w)}]
                                                                        for w in chosen]})

    return datasets.DatasetDict({"train": split(words[:cut], n_train), "test": split(words[cut:], n_test)})

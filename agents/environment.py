"""The environment protocol: what a paper implements so that the generic `multi_turn` agent can drive it.

An environment resets a batch of dataset rows (one first observation per sample) and steps on the
policy's turns (one batched call per turn for every sample still running), returning observations,
done flags and per-sample info. It never sees tokens it must not (the loop owns the token ids) and
it never raises on bad model output: an unparseable action gets a corrective observation and is
counted as invalid (`StepResult(valid=False)`).

Life cycle, for one rollout call of the agent (one batch of rows, `group_size` samples per row):

    env = EnvClass(**env_kwargs)            # once per rollout call (cache costly things yourself,
                                            # e.g. per process, as the search env caches its retriever)
    env.tokenizer = tokenizer               # set by the loop before reset (for `observation_ids`)
    first = env.reset(samples)              # samples[k] = rows[k // group_size]: one row per sample,
                                            # the G copies of a row are consecutive; -> one Prompt per sample
    while samples are running:
        results = env.step(turns)           # one Turn per sample that generated in this turn, in order;
                                            # -> one StepResult per turn, same order
    info = env.info(k)                      # per sample, merged into Trajectory.info after the loop's keys

What the loop (`agents.multi_turn.multi_turn`) owns, so that no environment re-does it: prompt
rendering through the chat template, G-fold copying, group ids, stop strings (the loop adds the
environment's `stop` to the sampling params), turn and token limits, the final answer-only turn,
tokenising observations (alone, `split_special_tokens=True`, loss mask 0; a chat-message observation
through the chat template), and `Trajectory` assembly.

The first observation (`Prompt`) gives the prompt: chat `messages` rendered with the tokenizer's
chat template and the generation prompt, or `prompt_ids` used as they are (structured), or nothing
(`None`, or `Prompt()`): the recipe's prompt builder (`data.prompt_builder`, or a Progressive GRPO
stage's) builds the messages from the row. `reset` may also return plain message lists or `None`.

Observations after a turn (`StepResult`): `observation` is text, tokenised on its own (mask 0) and
truncated to the loop's `max_obs_tokens`; `observation_suffix` follows it and is never truncated
(e.g. a closing tag); `observation_ids` is a structured observation: token ids appended as they are
(mask 0, truncated like text; give text or ids, not both). Text and ids stay inside the assistant
turn (Search-R1's `<information>...</information>`: no role turn). `message` is an observation as a
chat turn of its own, e.g. `{"role": "user", "content": "not quite"}` or `{"role": "tool", ...}`: the
loop closes the policy's assistant turn, appends the message and opens the next assistant turn, all
through the tokenizer's chat template (the delta between the rendering of the conversation so far and
the rendering with the message and the generation prompt), so the structural tokens (`<|im_end|>`,
`<|im_start|>`) are the real special tokens while the content stays plain text (`split_special_tokens`:
a retrieved page that contains `<|im_start|>` cannot forge a turn). The content is truncated to
`max_obs_tokens`; a message excludes the other observation fields. `images` is the slot of VLM observations
(screens, figures): the multimodal issue fills it; until then the loop raises NotImplementedError when
an environment sets it (here or in `Prompt.images`).

A new paper is `envs/<paper>/` (an Environment subclass registered in `rl.registry.ENVIRONMENTS`,
rewards in `rl.rewards.REWARDS`, a metric set in `rl.registry.METRICS`, datasets in
`rl.data.DATASETS`) + `recipes/<paper>*.yaml` with `plugins: [envs.<paper>]`; see envs/README.md.
Nothing in `rl/` or `agents/` changes (tests/toy_env.py is such an environment, written only
against this module).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

if TYPE_CHECKING:  # keep this module import-light: it is the one a paper subclasses
    from rl.engines import Generation

__all__ = ["Environment", "Prompt", "Turn", "StepResult"]


@dataclass
class Prompt:
    """The first observation of one sample: what the policy is prompted with."""

    messages: list[dict] | None = None  # chat messages; rendered with the chat template + generation prompt
    prompt_ids: list[int] | None = None  # structured: the prompt's token ids, used as they are
    images: list[Any] | None = None  # VLM prompts: filled by the multimodal issue (NotImplementedError now)


@dataclass
class Turn:
    """One engine turn of one sample, as the environment sees it."""

    sample: int  # the sample's index in the batch (the index `reset` got it at)
    turn: int  # 0-based model turn of this sample (the final answer-only turn is `max_turns`)
    text: str  # decode(this turn's engine ids, skip_special_tokens=True): read it, never re-tokenise it
    generation: "Generation"  # the engine's ids, log-probs, finish reason and stop string
    last: bool  # nothing will follow this turn (final turn, eos, cap, or no turns left): do not run tools
    final: bool = False  # this is the final answer-only turn


@dataclass
class StepResult:
    """The environment's reply to one turn."""

    observation: str | None = None  # text appended after the turn (mask 0); truncated to max_obs_tokens
    observation_suffix: str = ""  # appended after the (possibly truncated) observation, never truncated
    done: bool = False  # the episode ends here
    reason: str = "answered"  # termination reason when done (info["termination"])
    action: str | None = None  # action name, counted in info["actions"]
    valid: bool = True  # counted in info["valid_actions"] / info["invalid_actions"]
    observation_ids: list[int] | None = None  # structured observation: token ids appended as is (mask 0)
    images: list[Any] | None = None  # VLM observations: filled by the multimodal issue (NotImplementedError now)
    # an observation as a chat turn of its own: {"role": "user" | "tool" | ..., "content": str}, rendered
    # through the chat template (closes the assistant turn, opens the next one); not with the fields above
    message: dict[str, Any] | None = None


class Environment:
    """Base class of environments (defaults for everything optional); subclass it for a paper.

    Class attributes a subclass may set:
      stop          stop strings that end a turn (added to the sampling params' own `stop`);
      final_turn_text  text appended before the final answer-only turn (when the loop runs one),
                    e.g. "searching is no longer possible"; None = no message;
      loop_defaults defaults of the loop options for this environment (`max_turns`, `max_obs_tokens`,
                    `final_answer_turn`, ...); a recipe's `rollout.agent_kwargs` still wins;
      metrics       the name of this environment's metric set in `rl.registry.METRICS`, which
                    `python -m eval.run` computes (None: the recipe's reward means, "rewards").
    """

    stop: ClassVar[Sequence[str]] = ()
    final_turn_text: str | None = None
    loop_defaults: ClassVar[dict[str, Any]] = {}
    metrics: ClassVar[str | None] = None
    tokenizer: Any = None  # set by the loop before `reset`

    @classmethod
    def check(cls, **env_kwargs: Any) -> None:
        """Fail fast on unusable settings (a missing corpus file, ...) before any model loads.

        `python -m eval.run` calls it during its setup; raise ValueError / FileNotFoundError with one line.
        """

    def reset(self, rows: list[dict]) -> list[Prompt | list[dict] | None]:
        """One first observation per sample (`rows[k]` is sample k's dataset row)."""
        return [None] * len(rows)

    def step(self, turns: list[Turn]) -> list[StepResult]:
        """One StepResult per turn, in order. Must not raise on bad model output."""
        raise NotImplementedError(f"{type(self).__name__} must implement step(turns)")

    def final_turn_message(self, sample: int) -> str | None:
        """Text appended before sample `sample`'s final answer-only turn (default: `final_turn_text`)."""
        return self.final_turn_text

    def info(self, sample: int) -> dict[str, Any]:
        """Per-sample facts merged into `Trajectory.info` (answer, tool calls, ...)."""
        return {}

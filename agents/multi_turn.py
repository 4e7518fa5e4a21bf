"""Generic token-in-token-out multi-turn agent: `multi_turn` (registered) drives any environment.

`multi_turn` (`rollout.agent: multi_turn`) is the one agent every multi-turn paper uses: it builds
the environment named in `rollout.agent_kwargs.env` (`rl.registry.ENVIRONMENTS`, or "module:Class")
with `env_kwargs`, resets it on the G-fold copied rows, renders the prompts through the chat
template, adds the environment's stop strings, runs `run_episodes` and assembles the
`Trajectory`s (group ids, loss masks, log-probs, info). The protocol is `agents/environment.py`.

`run_episodes` alternates engine turns and environment replies for a batch of
samples. Each turn, ONE `engine.generate` call continues every sample still
running (its prompt ids + everything so far); the engine's token ids and
log-probs are appended as they are (loss mask 1). The environment answers with
TEXT, which is tokenised on its own (`tokenizer(text, add_special_tokens=False,
split_special_tokens=True)`), truncated to `max_obs_tokens` and appended with
loss mask 0 and log-prob 0.0 (or with a structured observation: token ids, appended
as they are, truncated the same way). Decoded model text is only *read* (to parse the
action); it is never re-tokenised, so the ids the trainer sees are exactly the
ids the engine sampled and the ids the policy attended to during the rollout.

Episode structure:
    turn 0 .. max_turns-1   generate with `params`; the environment acts on the turn
                            (search, answer, corrective message, ...)
    final turn (optional)   when `final_turn_params` is given, samples still running
                            after `max_turns` turns get `final_message` (env text, e.g.
                            "searching is no longer possible") and one more generation;
                            the environment only judges it (`Turn.last` is True).
Termination reasons (`info["termination"]`): `answered` (the environment said done),
`eos` (the turn ended with an end-of-sequence token and no terminal action),
`max_turns` (no turns left), `length_cap` (the response reached `max_response_tokens`).

Token exactness (tests/test_multi_turn.py checks all of this with hypothesis, on the
tiny ChatML tokenizer and on a locally built Llama-3-style tokenizer/template):

* Always, by construction: `response_ids` is the in-order concatenation of the
  engine's ids (mask 1, their log-probs) and the environment pieces' ids (mask 0,
  log-prob 0.0), so training sees exactly the rollout's tokens.
* Always (text level): `decode(prompt_ids + response_ids)` equals the chat template's
  rendering of the prompt messages plus one assistant message whose content is
  `decode(response_ids)` (rendered with `continue_final_message=True`; when the episode
  ended with the eos token, the closed rendering starts with it). Exception: templates
  that `trim` message content (Llama-3) drop leading/trailing whitespace of the
  assistant content, so the equality holds only when that content has none.
* NOT always (token level): `tokenizer(rendered_text)` can differ from
  `prompt_ids + response_ids`, for two reasons that no agent loop can remove without
  re-tokenising (and so changing) what the policy sampled:
    1. the engine may sample a non-canonical segmentation of its own text (`"P" "aris"`
       where the tokenizer would write `"Paris"`);
    2. BPE merges across a boundary between a model piece and an environment piece:
       a pre-tokenizer pre-token can straddle the boundary. Llama-3's split regex
       makes `">\\n\\n"` one pre-token, so the model's `</search>` followed by the
       environment's `\\n\\n<information>` re-tokenises to a `">\\n\\n"` token that
       neither side produced; with GPT-2's regex (SmolLM2) the environment's trailing
       `"\\n\\n"` is one pre-token on its own but splits into `"\\n" "\\n"` before the
       model's next `<`, which differs whenever the vocabulary has a `"\\n\\n"` token.
  When neither happens (canonical engine ids, and pre-tokenising the whole text gives
  the same pre-tokens as pre-tokenising each piece alone), the token sequences are
  equal; the tests check equality on well-formed search episodes with the tiny ChatML
  tokenizer (its vocabulary has no `"\\n\\n"` merge) and exhibit case 2 with the
  Llama-3-style tokenizer.
* Environment text is tokenised with `split_special_tokens=True`: a retrieved passage
  that contains `"<|im_end|>"` is shown to the policy as plain text, never as a real
  end-of-turn token. (Re-tokenising the rendered text would turn it into the special
  token: one more place where text-level and token-level equality part.)

Chat-message observations (`StepResult.message`, a `user` / `tool` / ... turn): the ids appended are
the chat template's delta (`message_delta`): the rendering of the conversation so far plus the
policy's assistant turn, the message and the generation prompt, minus what is already there. They
close the assistant turn (its `<|im_end|>\n`; an eos the policy already ended with is not repeated),
hold the message's turn and open the next assistant turn (`<|im_start|>assistant\n`). The template's
structure is tokenised with real special tokens, the content as plain text (`encode_frame`), so
`prompt_ids + response_ids` equal `apply_chat_template(conversation, tokenize=True)` whenever the
policy's ids are canonical, its turns do not start with whitespace (case 2 above, at the template's
"assistant\n") and no content holds a special-token string (tests/test_multi_turn.py:
hypothesis over random user/assistant/tool conversations, tiny ChatML, Llama-3-style and SmolLM2).
A template that renders the conversation so far differently once the message follows (stripping
earlier thinking, trimming content) is a ValueError naming the tokenizer, never a silent misalignment.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from agents import register_agent
from agents.environment import Environment, Prompt, StepResult, Turn
from agents.single_turn import generate
from rl.engines import Generation, RolloutEngine, SamplingParams
from rl.multimodal import (
    VisionInputs,
    attach_images,
    expand_image_tokens,
    image_key,
    load_image,
    processor_of,
    render_chat,
    vision_inputs_of,
)

__all__ = [
    "Environment", "Prompt", "Turn", "StepResult", "Episode", "LOOP_DEFAULTS", "run_episodes", "tokenize_env_text",
    "multi_turn", "resolve_environment", "loop_options", "message_delta", "encode_frame",
]


@dataclass
class Episode:
    response_ids: list[int]
    loss_mask: list[int]
    logprobs: list[float]
    info: dict[str, Any]
    # (source, start, end) per piece, in order: source is "model" or "env"
    segments: list[tuple[str, int, int]] = field(default_factory=list)
    images: list = field(default_factory=list)  # image observations of the environment, in order

    def __iter__(self):  # `ids, mask, logprobs, info = episode`
        return iter((self.response_ids, self.loss_mask, self.logprobs, self.info))


def _check_step_result(res: Any) -> None:
    if not isinstance(res, StepResult):
        raise TypeError(f"the environment returned a {type(res).__name__}, expected agents.environment.StepResult")
    if res.images is not None and res.message is None:
        raise ValueError("StepResult.images: image observations come as a chat turn: give them with a "
                         "StepResult.message (e.g. {'role': 'user', 'content': 'the new screen'})")
    if res.observation_ids is not None and res.observation:
        raise ValueError("StepResult: give the observation as text or as observation_ids, not both")
    if res.message is not None:
        m = res.message
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"StepResult.message must be a dict with a str 'role' and a str 'content', got {m!r}")
        if m["role"] == "assistant":  # the loop opens every assistant turn itself; its tokens are the policy's
            raise ValueError("StepResult.message: an environment message cannot have the role 'assistant'")
        if res.observation or res.observation_ids is not None or res.observation_suffix:
            raise ValueError("StepResult: give the observation as a message or as text / observation_ids, not both")


def tokenize_env_text(tokenizer, text: str) -> list[int]:
    """Ids of environment text, tokenised on its own; special-token strings stay plain text."""
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


# Stands in for a message's content when rendering its turn's frame (see `message_delta`); no template
# alters it (no whitespace at its ends, no markup).
_CONTENT = "AGENTRLENVCONTENT7f3a9c"


def _tokenizer_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def _special_split(tokenizer, text: str) -> list[str]:
    """`text` cut before and after every special-token string (the pieces alternate text / special)."""
    specials = sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.special}, key=len, reverse=True)
    if not specials:
        return [text]
    return re.split("(" + "|".join(map(re.escape, specials)) + ")", text)


def encode_frame(tokenizer, before: str, content: str, after: str) -> list[int]:
    """Ids of `before + content + after` where special-token strings in `before` / `after` (the template's
    structure) are the special tokens and `content` is plain text (`split_special_tokens=True`).

    Tokenisers cut text at special tokens before pre-tokenising, so this equals tokenising the whole
    string in one go whenever `content` holds no special-token string: the text between two
    structural special tokens (e.g. "tool\n" + content) is tokenised as one piece, as it is there."""
    head, tail = _special_split(tokenizer, before), _special_split(tokenizer, after)
    # the text around the content joins it: [..., special, text + content + text, special, ...]
    pieces = head[:-1] + [head[-1] + content + tail[0]] + tail[1:]
    ids: list[int] = []
    for k, piece in enumerate(pieces):
        if k % 2:  # re.split with one group: odd pieces are the separators (special tokens)
            ids.append(tokenizer.convert_tokens_to_ids(piece))
        else:
            ids.extend(tokenize_env_text(tokenizer, piece))
    return ids


def render_text(tokenizer, messages: list[dict]) -> str:
    """The chat template's rendering of `messages` with the generation prompt, as text: the processor's
    template for vision-language policies (image parts -> the model's image placeholder), else the
    tokenizer's. Image parts carry no image here: only their placeholders are rendered."""
    processor = processor_of(tokenizer)
    if processor is None:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    plain = [{**m, "content": [{k: v for k, v in p.items() if k != "image" and v is not None} for p in m["content"]]}
             if isinstance(m.get("content"), list) else m for m in messages]
    return processor.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)


def vision_inputs(tokenizer, where: str) -> VisionInputs:
    """The policy's `VisionInputs` (placeholder counts), from the processor attached to its tokenizer."""
    processor = processor_of(tokenizer)
    if processor is None:
        raise ValueError(f"{where}: image observations need a vision-language policy (the tokenizer has no processor)")
    return vision_inputs_of(processor)


def message_delta(tokenizer, conversation: list[dict], rendered: str, assistant_text: str, message: dict,
                  policy_closed: bool = False) -> tuple[list[int], str]:
    """The ids that end the assistant turn whose text so far is `assistant_text`, append `message` as a
    chat turn and open the next assistant turn: the chat template's rendering of
    `conversation + [assistant, message]` with the generation prompt, minus `rendered` (the rendering of
    `conversation` with the generation prompt, which the ids so far are) and `assistant_text`.
    Returns (ids, the new rendering). `policy_closed`: the policy's ids already end with the eos token,
    which the template's closing then starts with (it is not appended twice).

    Raises ValueError, naming the tokenizer, when the template renders the conversation so far
    differently once the message follows (templates that strip earlier thinking or trim content):
    the ids the policy saw would not be what the template renders, so nothing is appended silently.
    """
    convo = conversation + [{"role": "assistant", "content": assistant_text}]
    n_images = len(message.get("images") or ())
    message = {k: v for k, v in message.items() if k != "images"}

    def render(msg):
        if n_images:  # image placeholders before the text (TRL's rule), rendered by the processor's template
            msg = {**msg, "content": [{"type": "image"}] * n_images + [{"type": "text", "text": msg["content"]}]}
        return render_text(tokenizer, convo + [msg])

    full, frame = render(message), render({**message, "content": _CONTENT})
    head = rendered + assistant_text
    if not (full.startswith(head) and frame.startswith(head) and frame.count(_CONTENT) == 1):
        raise ValueError(
            f"chat template of tokenizer {_tokenizer_name(tokenizer)!r}: the rendering of the conversation so far "
            f"is not a prefix of its rendering with the environment's {message['role']!r} message (the template "
            "rewrites earlier turns, e.g. strips thinking or trims whitespace), so the message's ids cannot be "
            "appended token-exactly; return the observation as text (StepResult.observation) instead"
        )
    before, _, after = frame[len(head):].partition(_CONTENT)
    delta = full[len(head):]
    if not (delta.startswith(before) and delta.endswith(after) and len(delta) >= len(before) + len(after)):
        raise ValueError(
            f"chat template of tokenizer {_tokenizer_name(tokenizer)!r}: the {message['role']!r} turn's frame "
            "depends on its content, so its ids cannot be split into template tokens and content"
        )
    content = delta[len(before):len(delta) - len(after)]
    eos = tokenizer.eos_token
    if policy_closed and eos and before.startswith(eos):
        before = before[len(eos):]
    return encode_frame(tokenizer, before, content, after), full


class _Chat:
    """A sample's conversation as chat messages, for message observations: the closed turns, their
    rendering with the generation prompt, and where the open assistant turn starts in the response."""

    __slots__ = ("messages", "rendered", "start")

    def __init__(self, messages: list[dict], rendered: str):
        self.messages, self.rendered, self.start = messages, rendered, 0


class _State:
    __slots__ = ("ids", "mask", "logprobs", "segments", "info", "images")

    def __init__(self):
        self.images: list = []  # the environment's image observations, in order (vision-language policies)
        self.ids: list[int] = []
        self.mask: list[int] = []
        self.logprobs: list[float] = []
        self.segments: list[tuple[str, int, int]] = []
        self.info: dict[str, Any] = {
            "turns": 0,
            "actions": Counter(),
            "valid_actions": 0,
            "invalid_actions": 0,
            "termination": None,
            "finish_reason": None,
            "obs_truncated": 0,
            "model_tokens": 0,
            "env_tokens": 0,
        }

    def add(self, source: str, ids: Sequence[int], logprobs: Sequence[float] | None) -> None:
        if not ids:
            return
        start = len(self.ids)
        self.ids.extend(ids)
        if source == "model":
            self.mask.extend([1] * len(ids))
            self.logprobs.extend(float(x) for x in logprobs)
            self.info["model_tokens"] += len(ids)
        else:
            self.mask.extend([0] * len(ids))
            self.logprobs.extend([0.0] * len(ids))
            self.info["env_tokens"] += len(ids)
        self.segments.append((source, start, len(self.ids)))


def run_episodes(
    engine: RolloutEngine,
    tokenizer,
    prompts_ids: list[list[int]],
    env_steps: Callable[[list[Turn]], list[StepResult]],
    *,
    params: SamplingParams,
    max_turns: int,
    max_obs_tokens: int | None = None,
    final_turn_params: SamplingParams | None = None,
    final_message: str | Callable[[int], str | None] | None = None,
    max_response_tokens: int | None = None,
    stop_on_eos: bool = True,
    prompt_messages: Sequence[list[dict] | None] | None = None,
    prompt_images: Sequence[list] | None = None,
) -> list[Episode]:
    """Run all samples to termination; returns one `Episode` per prompt, in order.

    `env_steps(turns)` is called once per turn with the `Turn`s of every sample that
    generated in it (so tools can batch, e.g. one retrieval call per turn) and returns
    one `StepResult` per turn, in order. `max_obs_tokens` truncates each observation
    (not its suffix); `max_response_tokens` caps the whole response (model + env
    tokens): a turn is given at most the remaining budget and an environment reply
    that would fill it ends the episode (`length_cap`) without being appended.
    `stop_on_eos`: a turn that ends with the eos token and no terminal action ends the
    episode (`eos`) instead of receiving an environment reply. `prompt_messages[k]`: the chat
    messages prompt k was rendered from (`render_prompt`); a `StepResult.message` needs them,
    since its ids are a delta of the chat template's rendering of the conversation (`message_delta`).
    `prompt_images[k]`: prompt k's images (vision-language policies; its ids hold their expanded image
    tokens). A `StepResult.message` may bring `StepResult.images`: placed before the message's text and
    expanded as the processor does (`rl.multimodal.expand_image_tokens`); `Episode.images` lists them.
    """
    if max_turns < 1:
        raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    if max_response_tokens is not None and max_response_tokens < 1:
        raise ValueError(f"max_response_tokens must be >= 1, got {max_response_tokens}")
    states = [_State() for _ in prompts_ids]
    chats: dict[int, _Chat] = {}  # sample -> its conversation, made on its first message observation
    active = list(range(len(prompts_ids)))
    n_turns = max_turns + (1 if final_turn_params is not None else 0)

    def finish(i: int, reason: str) -> None:
        states[i].info["termination"] = reason

    # an engine that can keep the KV cache of one turn for the next (HFEngine.session) only
    # prefills what the environment appended; others (BaseEngine's no-op session) re-read it each turn
    with engine.session():
        for turn in range(n_turns):
            if not active:
                break
            final = turn == max_turns
            p = final_turn_params if final else params
            budget = {i: (max_response_tokens - len(states[i].ids)) if max_response_tokens else None for i in active}
            call_params = p
            if max_response_tokens:
                call_params = dataclasses.replace(p, max_new_tokens=min(p.max_new_tokens, max(budget.values())))
            gens = generate(engine, [prompts_ids[i] + states[i].ids for i in active], call_params,
                            [list(prompt_images[i]) + states[i].images for i in active] if prompt_images else None)
            if len(gens) != len(active):
                raise RuntimeError(f"engine returned {len(gens)} generations for {len(active)} prompts")

            turns: list[Turn] = []
            capped: dict[int, bool] = {}
            for i, gen in zip(active, gens):
                if len(gen.logprobs) != len(gen.token_ids):
                    raise ValueError(
                        f"engine generation has {len(gen.token_ids)} token ids but {len(gen.logprobs)} log-probs"
                    )
                ids, logprobs = list(gen.token_ids), list(gen.logprobs)
                b = budget[i]
                if b is not None and len(ids) >= b:  # this sample's share of a batch-wide max_new_tokens
                    if len(ids) > b:
                        ids, logprobs = ids[:b], logprobs[:b]
                        gen = Generation(ids, logprobs, "length", None)
                    capped[i] = True
                st = states[i]
                st.add("model", ids, logprobs)
                st.info["turns"] += 1
                st.info["finish_reason"] = gen.finish_reason
                last = (
                    final
                    or capped.get(i, False)
                    or (stop_on_eos and gen.finish_reason == "eos")
                    or (turn == max_turns - 1 and final_turn_params is None)
                )
                text = tokenizer.decode(ids, skip_special_tokens=True)
                turns.append(Turn(sample=i, turn=turn, text=text, generation=gen, last=last, final=final))

            results = env_steps(turns)
            if len(results) != len(turns):
                raise RuntimeError(f"env_steps returned {len(results)} results for {len(turns)} turns")
            for res in results:
                _check_step_result(res)

            next_active = []
            for t, res in zip(turns, results):
                i, st = t.sample, states[t.sample]
                if res.action is not None:
                    st.info["actions"][res.action] += 1
                st.info["valid_actions" if res.valid else "invalid_actions"] += 1
                if res.done:
                    finish(i, res.reason)
                    continue
                if t.last:
                    if capped.get(i, False):
                        finish(i, "length_cap")
                    elif stop_on_eos and t.generation.finish_reason == "eos":
                        finish(i, "eos")
                    else:
                        finish(i, "max_turns")
                    continue
                env_ids: list[int] = []
                chat_after: tuple[str, str, dict] | None = None  # (rendering, assistant text, message)
                if res.message is not None:
                    chat = chats.get(i)
                    if chat is None:
                        msgs = prompt_messages[i] if prompt_messages is not None else None
                        if msgs is None:
                            raise ValueError(
                                f"sample {i}: a StepResult.message needs the prompt as chat messages (Prompt.messages "
                                "or the recipe's prompt builder), not as prompt ids"
                            )
                        chat = chats[i] = _Chat(list(msgs), render_text(tokenizer, list(msgs)))
                    content = res.message["content"]
                    if max_obs_tokens is not None:
                        c_ids = tokenize_env_text(tokenizer, content)
                        if len(c_ids) > max_obs_tokens:  # the content is cut, the turn's frame never is
                            content = tokenizer.decode(c_ids[:max_obs_tokens])
                            st.info["obs_truncated"] += 1
                    own = st.ids[chat.start:]
                    closed = bool(own) and own[-1] == tokenizer.eos_token_id
                    assistant_text = tokenizer.decode(own[:-1] if closed else own, skip_special_tokens=False)
                    message = {**res.message, "content": content}
                    obs_images = []
                    if res.images:
                        obs_images = [load_image(im, f"sample {i} turn {turn}: StepResult.images[{q}]")
                                      for q, im in enumerate(res.images)]
                        message["images"] = obs_images
                    env_ids, rendered = message_delta(tokenizer, chat.messages, chat.rendered, assistant_text,
                                                      message, policy_closed=closed)
                    if obs_images:  # each image's placeholder repeated once per visual token, as the processor does
                        vision = vision_inputs(tokenizer, f"sample {i} turn {turn}: StepResult.images")
                        env_ids = expand_image_tokens(env_ids, vision.image_token_id,
                                                      [vision.num_tokens(im) for im in obs_images],
                                                      f"sample {i} turn {turn}")
                        message = {**message, "content": [{"type": "image"}] * len(obs_images)
                                   + [{"type": "text", "text": content}]}
                        message.pop("images")
                    chat_after = (rendered, assistant_text, message, obs_images)
                elif res.observation_ids is not None:  # structured: the environment's ids, as they are
                    obs = [int(x) for x in res.observation_ids]
                    if max_obs_tokens is not None and len(obs) > max_obs_tokens:
                        obs = obs[:max_obs_tokens]
                        st.info["obs_truncated"] += 1
                    env_ids = obs + tokenize_env_text(tokenizer, res.observation_suffix)
                elif res.observation:
                    obs = tokenize_env_text(tokenizer, res.observation)
                    if max_obs_tokens is not None and len(obs) > max_obs_tokens:
                        obs = obs[:max_obs_tokens]
                        st.info["obs_truncated"] += 1
                        env_ids = obs + tokenize_env_text(tokenizer, res.observation_suffix)
                    else:  # untruncated: tokenised as one piece of text
                        env_ids = tokenize_env_text(tokenizer, res.observation + res.observation_suffix)
                elif res.observation_suffix:
                    env_ids = tokenize_env_text(tokenizer, res.observation_suffix)
                pieces = [env_ids]
                if turn + 1 == max_turns and final_message is not None:  # the next turn is the final one
                    msg = final_message(i) if callable(final_message) else final_message
                    pieces.append(tokenize_env_text(tokenizer, msg or ""))
                if max_response_tokens and len(st.ids) + sum(map(len, pieces)) >= max_response_tokens:
                    finish(i, "length_cap")  # no room left for the policy to read it and reply
                    continue
                for piece in pieces:
                    st.add("env", piece, None)
                if chat_after is not None:  # the next assistant turn starts after the message (+ final text)
                    chat, (rendered, assistant_text, message, obs_images) = chats[i], chat_after
                    st.images.extend(obs_images)
                    chat.messages += [{"role": "assistant", "content": assistant_text}, message]
                    chat.rendered, chat.start = rendered, len(st.ids) - sum(map(len, pieces[1:]))
                next_active.append(i)
            active = next_active

    episodes = []
    for st in states:
        st.info["actions"] = dict(st.info["actions"])
        if st.info["termination"] is None:  # defensive: every path above sets it
            st.info["termination"] = "max_turns"
        episodes.append(Episode(st.ids, st.mask, st.logprobs, st.info, st.segments, st.images))
    return episodes


# ----------------------------------------------------------------------------- the generic agent

# The loop options of `multi_turn` and their defaults; an environment's `loop_defaults` override
# these, and a recipe's `rollout.agent_kwargs` override both.
LOOP_DEFAULTS: dict[str, Any] = {
    "max_turns": 4,  # model turns before the episode ends (or the final answer-only turn runs)
    "max_obs_tokens": None,  # truncate each observation to this many tokens (None: never)
    "final_answer_turn": False,  # after max_turns, one more generation after env.final_turn_message
    "final_turn_max_new_tokens": None,  # that turn's budget (None: rollout.max_new_tokens)
    "max_response_tokens": None,  # cap on the whole response, model + environment tokens (None: none)
    "stop_on_eos": True,  # a turn ending with eos and no terminal action ends the episode
}
_UNSET: Any = object()


def resolve_environment(env: Any) -> type:
    """The environment class for `env`: a name in `rl.registry.ENVIRONMENTS`, "module:Class", or a class."""
    from rl.registry import ENVIRONMENTS

    if isinstance(env, str) and env:
        cls = ENVIRONMENTS.get(env)
    elif isinstance(env, type):
        cls = env
    else:
        raise ValueError(
            f"multi_turn agent: set rollout.agent_kwargs.env to a registered environment {ENVIRONMENTS.names()} "
            f"or 'module:Class' (and name the module that registers it in the recipe's plugins:), got {env!r}"
        )
    from agents.environment import Environment

    if not (isinstance(cls, type) and issubclass(cls, Environment)):
        # the base class gives every optional part of the protocol its default: no probing here
        raise TypeError(f"environment {env!r} ({cls!r}) must subclass agents.environment.Environment "
                        "(see envs/README.md)")
    return cls


def loop_options(env_cls: type, given: dict[str, Any]) -> dict[str, Any]:
    """The loop options of one run: `LOOP_DEFAULTS` < the environment's `loop_defaults` < `given`."""
    env_defaults = dict(env_cls.loop_defaults)
    unknown = sorted(set(env_defaults) - set(LOOP_DEFAULTS))
    if unknown:
        raise ValueError(f"{env_cls.__name__}.loop_defaults: unknown loop option(s) {unknown}; "
                         f"the loop takes {sorted(LOOP_DEFAULTS)}")
    return {**LOOP_DEFAULTS, **env_defaults, **{k: v for k, v in given.items() if v is not _UNSET}}


def _as_prompt(obs: Any, sample: int, env_name: str) -> Prompt:
    if obs is None:
        return Prompt()
    if isinstance(obs, Prompt):
        return obs
    if isinstance(obs, list):  # chat messages
        return Prompt(messages=obs)
    raise TypeError(f"environment {env_name}: reset() gave sample {sample} a {type(obs).__name__}; expected "
                    "agents.environment.Prompt, a list of chat messages, or None (the recipe's prompt builder)")


def _with_stops(params: SamplingParams, stops: Sequence[str], max_new_tokens: int | None = None) -> SamplingParams:
    merged = list(params.stop) + [s for s in stops if s not in params.stop]
    return dataclasses.replace(params, stop=merged, max_new_tokens=max_new_tokens or params.max_new_tokens)


@register_agent("multi_turn")
def multi_turn(
    engine: RolloutEngine,
    tokenizer,
    rows: list[dict],
    *,
    prompt_builder: Callable[[dict], list[dict]] | None = None,
    params: SamplingParams,
    group_size: int = 1,
    first_group_id: int = 0,
    env: Any = None,
    env_kwargs: dict[str, Any] | None = None,
    max_turns: int = _UNSET,
    max_obs_tokens: int | None = _UNSET,
    final_answer_turn: bool = _UNSET,
    final_turn_max_new_tokens: int | None = _UNSET,
    max_response_tokens: int | None = _UNSET,
    stop_on_eos: bool = _UNSET,
) -> list:
    """`group_size` episodes per row of any environment, all advancing together; one `Trajectory` each.

    `env`: a registered environment name, "module:Class", or a class; `env_kwargs`: its constructor's
    keyword arguments. The loop options (see `LOOP_DEFAULTS`) default to the environment's `loop_defaults`.
    Trajectory k has row `rows[k // group_size]`, group id `first_group_id + k // group_size`, and
    info = the loop's keys (turns, actions, valid_actions, invalid_actions, termination, finish_reason,
    obs_truncated, model_tokens, env_tokens) updated with `env.info(k)`.
    """
    from agents.single_turn import assemble_trajectories  # noqa: F401  (kept local, as before)

    if getattr(params, "constraint", None) is not None:  # its trie restarts per turn and the trainer would not renormalise
        raise ValueError("constrained decoding (SamplingParams.constraint / rollout.constraint) is single-turn only")
    env_cls = resolve_environment(env)
    name = env if isinstance(env, str) else env_cls.__name__
    opts = loop_options(env_cls, dict(
        max_turns=max_turns, max_obs_tokens=max_obs_tokens, final_answer_turn=final_answer_turn,
        final_turn_max_new_tokens=final_turn_max_new_tokens, max_response_tokens=max_response_tokens,
        stop_on_eos=stop_on_eos,
    ))  # fmt: skip
    environment = env_cls(**(env_kwargs or {}))
    environment.tokenizer = tokenizer
    samples = [row for row in rows for _ in range(group_size)]
    first = environment.reset(samples)
    if len(first) != len(samples):
        raise RuntimeError(f"environment {name}: reset() returned {len(first)} observations for {len(samples)} samples")

    rendered: dict[str, list[int]] = {}  # the G copies of a row (and equal prompts) are rendered once
    prompts: list[list[int]] = []
    prompt_messages: list[list[dict] | None] = []  # what each prompt was rendered from (message observations)
    images: list[list] = []  # each prompt's images (vision-language policies)
    for k, (row, obs) in enumerate(zip(samples, first)):
        obs = _as_prompt(obs, k, name)
        if obs.prompt_ids is not None:  # structured: its image tokens are expanded already (checked by the engine)
            prompts.append([int(x) for x in obs.prompt_ids])
            prompt_messages.append(None)
            images.append([load_image(im, f"environment {name} sample {k}: Prompt.images")
                           for im in obs.images or ()])
            continue
        messages = obs.messages
        if messages is None:
            if prompt_builder is None:
                raise ValueError(f"environment {name} gave sample {k} no prompt and the agent got no prompt_builder")
            messages = prompt_builder(row)
        if obs.images:
            messages = attach_images(messages, list(obs.images), f"environment {name} sample {k}")
        key = json.dumps(messages, sort_keys=True, default=_image_json)
        if key not in rendered:
            rendered[key] = render_chat(tokenizer, messages, where=f"environment {name} sample {k}")
        prompts.append(rendered[key][0])
        images.append(rendered[key][1])
        prompt_messages.append(messages)

    stops = list(environment.stop)
    final = bool(opts["final_answer_turn"])
    final_message = environment.final_turn_message
    episodes = run_episodes(
        engine,
        tokenizer,
        prompts,
        environment.step,
        params=_with_stops(params, stops),
        max_turns=opts["max_turns"],
        max_obs_tokens=opts["max_obs_tokens"],
        final_turn_params=_with_stops(params, stops, opts["final_turn_max_new_tokens"]) if final else None,
        final_message=final_message if final else None,
        max_response_tokens=opts["max_response_tokens"],
        stop_on_eos=opts["stop_on_eos"],
        prompt_messages=prompt_messages,
        prompt_images=images if any(images) else None,
    )
    return assemble_trajectories(tokenizer, rows, group_size, first_group_id, [
        (prompts[k], ep.response_ids, ep.loss_mask, ep.logprobs, {**ep.info, **environment.info(k)})
        for k, ep in enumerate(episodes)
    ], images=[(images[k] + ep.images, len(images[k])) for k, ep in enumerate(episodes)])


def _image_json(x: Any) -> str:
    """JSON stand-in for an image in a prompt's cache key: its content hash (equal images, equal prompts)."""
    from PIL import Image

    return "image:" + image_key([x])[0] if isinstance(x, Image.Image) else str(x)


def _resolved_kwargs(agent_kwargs: dict[str, Any]) -> dict[str, Any]:
    """`agent_kwargs` with every loop option the run will use (defaults filled in): what reports show."""
    kw = dict(agent_kwargs)
    given = {k: kw.pop(k) for k in LOOP_DEFAULTS if k in kw}
    return {**kw, **loop_options(resolve_environment(kw.get("env")), given)}


multi_turn.resolved_kwargs = _resolved_kwargs  # read by `eval.run` (any agent may offer one)

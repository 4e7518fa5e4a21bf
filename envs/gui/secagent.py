"""The SecAgent step: what the policy reads (the step prompt) and what it writes (context, thought, action).

Each step the policy writes, in this order (SecAgent, arXiv 2603.08533):

    <context>the updated semantic context: a running summary of what has been done, this step included</context>
    <thought>a short thought on what to do next</thought>
    <action>one action in the text format of envs.gui.actions, e.g. click(element=7)</action>

`format_step_output` writes it (SFT targets), `parse_step` reads it back (never raises) and says whether
it is well formed: all three blocks, each exactly once, in this order, nothing but whitespace around
or between them, and a non-empty action. Context and thought may be empty (the first step of an
episode has little to summarise); the action may not. A response that is not well formed still gives
its `action_text` when an `<action>` block can be found, so the caller decides whether to run it.

The step prompt (`render_step_prompt`) is the system prompt (task, output format, action space) and ONE
user message holding the instruction, the history by mode and the current screen. The history modes are
the paper's ablation (SecAgent Table: no history / raw screens / semantic context + one screen):

    none      nothing but the instruction and the current screen;
    raw       the last `history_k` steps, oldest first: each one's screen and the action taken on it;
    semantic  the previous semantic context + exactly ONE previous screen and its action (`history_k`
              is ignored: the paper's point is that one screen + the summary replaces long histories).

The output format is the same in every mode (one parser, one reward): in `none` / `raw` the policy still
writes a context, which the next prompt does not show.

Screens are the element-list text of `envs.gui.observation.render_elements`. With `image=True` (VLM
policies) the current screen gets an image part, and so does every shown history step that carries a
"screenshot" key (its image, or None for a placeholder): the paper's setting is one history screenshot
(semantic mode with the previous step's screenshot); history steps without the key are shown as text
only. Image parts are ordered as the screens: shown history steps oldest first, then the current
one. All image parts come FIRST in the user message, before its single text part: that is the
order in which the multi-turn loop places an observation's images (`StepResult.images` before the
message text) and TRL's rule for rows without image parts, so an SFT row, a static prompt and a live
step render the same way. An image part carries the image when one is given (`screenshot=` for the
current screen, a history step's "screenshot"), else it is the placeholder `{"type": "image"}` that
`rl.multimodal.attach_images(messages, images)` fills, in order. The text then says which screenshot is
which.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

__all__ = [
    "HISTORY_MODES",
    "SYSTEM_PROMPT",
    "FORMAT_HINT",
    "StepParse",
    "format_step_output",
    "parse_step",
    "render_step_prompt",
    "count_image_parts",
    "secagent_prompt",
]

HISTORY_MODES = ("none", "raw", "semantic")

# one place for the expected layout: the system prompt shows it and the corrective message repeats it
FORMAT_HINT = "<context>...</context> <thought>...</thought> <action>...</action>"

# The action space in the canonical text of envs.gui.actions (format_action); tests check that every
# kind of actions.ACTION_KINDS is described here, so the prompt cannot drift from the parser.
ACTION_SPACE = """\
click(x=12, y=40)            click at a point: integer CSS pixels of the page, origin at the top-left corner
click(element=7)             click the element whose ref is 7 (the number in [brackets] in the screen list)
type(text="hello world")     type text into the focused field (click the field first)
key(key="Enter")             press a key: Enter, Tab, Backspace, Escape, ArrowUp, ArrowDown, ...
scroll(direction="down")     scroll the page up or down
wait()                       wait for the page to change
terminate(status="success")  stop: status "success" when the task is done, "failure" when it cannot be done"""

SYSTEM_PROMPT = f"""\
You are a GUI agent that completes tasks on a web page, one action per step.
Each step shows the task, what happened before, and the current screen as a list of elements, one per line:
[ref] tag "text" value="..." box=(left,top,width,height), in CSS pixels of the page (origin top-left).
Answer with exactly these three parts, in this order, and nothing else:
<context>the semantic context: a short running summary of everything done so far, including this step's action</context>
<thought>one short sentence on what to do now and why</thought>
<action>exactly one action</action>
Actions:
{ACTION_SPACE}"""


@dataclass
class StepParse:
    """The parts of one policy output; `error` is a one-line reason when not well formed (else None)."""

    context: str = ""
    thought: str = ""
    action_text: str | None = None  # the <action> block's content (stripped); None when there is none
    well_formed: bool = False
    error: str | None = None


def format_step_output(context: str, thought: str, action: str) -> str:
    """The policy's answer for one step (SFT targets): `parse_step` of it gives the three parts back."""
    return f"<context>{context.strip()}</context>\n<thought>{thought.strip()}</thought>\n<action>{action.strip()}</action>"


_TAGS = ("context", "thought", "action")
_TAG_RE = re.compile(r"</?(context|thought|action)>")
_SPLIT_RE = re.compile(r"</?(?:context|thought|action)>")


def _block(text: str, tag: str) -> str | None:
    """Content of the first <tag>...</tag>; for `action` also an unclosed last block (an output cut off
    right after the action, e.g. by a token cap), since the action is what the caller runs."""
    m = re.search(rf"<{tag}>(.*?)</{tag}>", text, re.DOTALL)
    if m:
        return m.group(1).strip()
    if tag == "action":
        start = text.rfind("<action>")
        if start >= 0:
            rest = text[start + len("<action>"):]
            if not _TAG_RE.search(rest):
                return rest.strip()
    return None


def parse_step(text: Any) -> StepParse:
    """Split a policy output into context, thought and action text; never raises.

    Well formed = `<context>..</context>`, `<thought>..</thought>`, `<action>..</action>` each exactly once,
    in this order, with only whitespace before, between and after them, and a non-empty action. The
    text may end with the end-of-turn token's text (the engine's stop string included in the output is
    `</action>` itself). Otherwise `error` says the first problem found, in one line.
    """
    if not isinstance(text, str):
        return StepParse(error=f"expected text, got {type(text).__name__}")
    out = StepParse()
    for tag in _TAGS:
        value = _block(text, tag)
        if tag == "action":
            out.action_text = value
        elif value is not None:
            setattr(out, tag, value)
    out.error = _format_error(text, out)
    out.well_formed = out.error is None
    return out


def _format_error(text: str, parsed: StepParse) -> str | None:
    body = re.sub(r"(?:<\|im_end\|>|<\|endoftext\|>|</s>|<\|eot_id\|>)\s*$", "", text.strip()).strip()
    tags = [m.group(0) for m in _TAG_RE.finditer(body)]
    for tag in _TAGS:
        for t in (f"<{tag}>", f"</{tag}>"):
            n = tags.count(t)
            if n == 0:
                return f"missing {t}: answer as {FORMAT_HINT}"
            if n > 1:
                return f"{t} appears {n} times: write each part exactly once"
    expected = [f"<{t}>" if i % 2 == 0 else f"</{t}>" for t in _TAGS for i in range(2)]
    if tags != expected:
        return f"the parts are out of order ({' '.join(tags)}): answer as {FORMAT_HINT}"
    # only whitespace outside the three blocks
    # 7 pieces: before, in context, between, in thought, between, in action, after
    pieces = _SPLIT_RE.split(body)
    for idx, where in ((0, "before <context>"), (2, "between </context> and <thought>"),
                       (4, "between </thought> and <action>"), (6, "after </action>")):
        if pieces[idx].strip():
            return f"text {where}: {pieces[idx].strip()[:40]!r}; write only the three parts"
    if not parsed.action_text:
        return "empty <action>: write exactly one action, e.g. click(element=3)"
    return None


# ----------------------------------------------------------------------------- the step prompt


def _image_part(image: Any) -> dict:
    return {"type": "image", "image": image} if image is not None else {"type": "image"}


def _screen(screen_text: str, image: bool) -> str:
    text = (screen_text or "").strip()
    if text:
        return text
    return "(see the screenshot)" if image else "(no elements)"


def render_step_prompt(
    instruction: str,
    screen_text: str,
    *,
    history: str,
    semantic_context: str = "",
    history_steps: Sequence[dict] = (),
    history_k: int = 1,
    image: bool = False,
    screenshot: Any = None,
    system: str | None = SYSTEM_PROMPT,
) -> list[dict]:
    """The chat messages of one step: [system, user] (no system message when `system` is None).

    `history_steps`: the earlier steps of the episode, oldest first, as `{"screen_text": str, "action": str}`
    (+ "screenshot": a path / PIL image / None, which gives the step an image part with `image=True`). `history` picks what of them is shown
    (module docstring): "none" | "raw" (the last `history_k`) | "semantic" (`semantic_context` + the last
    one). On the first step (no history steps) raw and semantic show no previous screen; semantic still
    shows its (empty) context line, so the policy always sees where the summary goes.
    `image=True`: image parts first (the shown history steps that have a "screenshot" key, oldest first,
    then the current screen's `screenshot`; placeholders for None), then one text part (module docstring).
    Raises ValueError on an unknown mode or a history step without its keys (a bug in the caller's
    data, named by index).
    """
    if history not in HISTORY_MODES:
        raise ValueError(f"unknown history mode {history!r}: expected one of {list(HISTORY_MODES)}")
    if history == "raw" and (not isinstance(history_k, int) or history_k < 1):
        raise ValueError(f"history_k must be a positive integer for history 'raw', got {history_k!r}")
    steps = list(history_steps or ())
    for i, s in enumerate(steps):
        if not isinstance(s, dict) or "action" not in s or "screen_text" not in s:
            raise ValueError(f"history_steps[{i}]: expected a dict with 'screen_text' and 'action', got {s!r:.80}")
    shown = [] if history == "none" else steps[-1:] if history == "semantic" else steps[-history_k:]

    lines = [f"Task: {instruction.strip()}", ""]
    if history == "semantic":
        lines += [f"Semantic context: {semantic_context.strip() or '(nothing done yet)'}", ""]
    n, pictured = len(shown), 0
    for j, s in enumerate(shown):
        ago = n - j
        label = "Previous screen" if ago == 1 else f"Screen {ago} steps ago"
        has_image = image and "screenshot" in s
        if has_image:
            pictured += 1
            label += f" (screenshot {pictured})"
        lines += [f"{label}:", _screen(s["screen_text"], has_image), f"Action taken: {str(s['action']).strip()}", ""]
    current = "Current screen" + (f" (screenshot {pictured + 1})" if image else "")
    lines += [f"{current}:", _screen(screen_text, image)]
    text = "\n".join(lines)

    if image:
        parts = [_image_part(s["screenshot"]) for s in shown if "screenshot" in s] + [_image_part(screenshot)]
        content: Any = parts + [{"type": "text", "text": text}]
    else:
        content = text
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": content}]


def count_image_parts(messages: Sequence[dict]) -> int:
    """How many image parts the messages have (the images a row must carry, in order)."""
    return sum(1 for m in messages if isinstance(m.get("content"), list)
               for p in m["content"] if isinstance(p, dict) and p.get("type") == "image")


def secagent_prompt(row: dict) -> list[dict]:
    """Prompt builder "secagent": the step prompt from a row's fields (static / SFT rows).

    Reads `instruction`, `screen_text`, and optionally `history` (default "semantic"), `semantic_context`
    (the context BEFORE this step), `history_steps`, `history_k`, `images` (with images the prompt has
    image parts, filled with them in order: the shown history steps' that have a "screenshot" key, then
    the current screen's; their number must equal the image parts').
    """
    from rl.data import DataError

    missing = [k for k in ("instruction", "screen_text") if k not in row]
    if missing:
        raise DataError(f"secagent prompt: row {row.get('episode_id', '?')} step {row.get('step', '?')} has no "
                        f"{missing[0]!r} (columns: {sorted(row)})")
    images = list(row.get("images") or ())
    messages = render_step_prompt(
        row["instruction"], row["screen_text"], history=row.get("history") or "semantic",
        semantic_context=row.get("semantic_context") or "", history_steps=row.get("history_steps") or (),
        history_k=int(row.get("history_k") or 1), image=bool(images),
    )
    if images:
        from rl.multimodal import attach_images

        messages = attach_images(messages, images, where=f"row {row.get('episode_id', '?')}")
    return messages


def _register() -> None:
    from rl.data import register_prompt_builder

    register_prompt_builder("secagent", secagent_prompt)


_register()

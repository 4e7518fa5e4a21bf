"""GUI episode files (`episodes.jsonl`), splits, and the rows built from them (SFT, grounding, static benchmark).

One JSON object per line, one episode each (the contract of docs and /tmp/briefs/gui_interfaces.md)::

    {"episode_id": "click-button/seed3", "source": "miniwob-oracle" | "androidcontrol" | "androidlens",
     "task": "click-button", "seed": 3, "instruction": str, "screen_size": [w, h],
     "steps": [{"screenshot": "screens/....png" (relative to the episodes file) | null,
                "elements": [{"ref", "tag", "text", "box": [left, top, width, height], "value"}],
                "action": "<canonical action text>",
                "valid_actions": ["<canonical action text>", ...],
                "semantic_context": "running summary AFTER this step",
                "step_instruction": str | null,
                "milestones": {"name": bool, ...}}],
     "success": bool}

Coordinates are integer pixels of the screen (MiniWoB: CSS pixels of the task area, the same pixels as its
screenshot), origin top-left; boxes are ``[left, top, width, height]``. A step's screen is the one the action
was taken on. Steps may carry extra keys (the oracle adds ``thought`` and ``valid_actions_source``); readers
ignore what they do not know. Elements may carry more than the five keys: oracle episodes store the
browser's whole snapshot of each element (`envs.gui.browser.Element.to_dict`: parent, id, classes, checked,
selected, focused, visible, is_leaf, scroll), which the screen text is rendered from
(`envs.gui.observation.render_elements`), so a prompt built from an episode shows what the live environment
showed. ``value`` is always a string (checkboxes keep their state in ``checked``).

Splits (`split_episodes`): an episode is TEST when its task type is held out (all its seeds) or its seed is
``>= test_seed_min`` (unseen seeds of the training task types); every other episode is TRAIN. So no
(task, seed) is on both sides and a held-out task type never reaches training. Defaults:
`DEFAULT_HELDOUT_TASKS` and ``test_seed_min = 30`` (record train task types with seeds 0..39 -> 30 train
and 10 test seeds each; held-out types with any seeds -> all test).

Rows (`build_rows`, the CLI ``python -m envs.gui build``), written next to each other in one folder:
* ``sft.jsonl``: TRAIN steps only, SFT ``messages`` rows: the step prompt of G's
  `envs.gui.secagent.render_step_prompt` (instruction, screen text, the previous step's oracle semantic
  context, history steps per the history mode) + the answer ``format_step_output(context, thought, action)``
  (clicks per ``click_format``, below); ``images`` when built with images: the step's screenshot, and with
  ``history_images`` also the shown history screens' (oldest first; SecAgent's one history screenshot), as
  the prompt's image parts order them. ``sft_<mode>.jsonl`` for the other history modes on request.
* ``sft_gr2nav.jsonl``: ``sft.jsonl`` (default history mode) + ``grounding.jsonl``, shuffled (seed 0): the
  Stage-1 SFT set of ``recipes/gui_sft.yaml``.
* ``grounding.jsonl``: TRAIN screens only, Gr2Nav rows: "Click the <element description>." on the same
  screen, answered in the same step format with the click written as the navigation rows write theirs:
  ``click(x=cx, y=cy)`` at the element's box centre (``click_format`` "point", the default with images: a
  policy reading screenshots cannot see refs) or ``click(element=ref)`` ("element", the default for text
  rows; text fragments, which have no ref, are then left out). Only
  elements whose description is unique on their screen (an ambiguous "Click the OK button" has no single
  answer) and whose centre lies on the screen.
* ``static_train.jsonl`` / ``static_test.jsonl`` (+ ``static_<split>_<mode>.jsonl`` for other history
  modes): one row per step: ``messages`` (the prompt only, with the ORACLE's previous context and history:
  the static benchmark scores each step on the recorded screen, as AndroidLens' static evaluation does)
  + ``valid_actions``, ``elements``, ``action`` (the recorded one), ``episode_id``, ``step``, ``n_steps``,
  ``task``, ``seed``, ``source``, ``history``, ``screen_size`` (+ ``images`` when built with images), and the
  prompt's pieces for the ``secagent`` prompt builder: ``instruction``, ``screen_text``, ``semantic_context``
  (the oracle's context BEFORE the step), ``history_steps`` (the shown ones), ``history_k``.
* ``stats.json``: counts per split and task, the split rule, the files written.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rl.common import atomic_write_lines, atomic_write_text, iter_jsonl
from rl.data import DataError

__all__ = [
    "DEFAULT_HELDOUT_TASKS",
    "DEFAULT_TEST_SEED_MIN",
    "EPISODE_SOURCES",
    "EpisodeError",
    "build_rows",
    "describe_element",
    "episode_id",
    "read_episodes",
    "screen_text",
    "split_episodes",
    "DEFAULT_ELEMENT_BUDGET",
    "validate_episode",
    "write_episodes",
]

EPISODE_SOURCES = ("miniwob-oracle", "androidcontrol", "androidlens")
# Held-out task types: each has a trained sibling that teaches its skills (click-dialog / click-button ->
# click-dialog-2; login-user -> enter-password; click-checkboxes -> click-option), so the test asks for
# transfer to unseen pages and instructions, not for skills the data never shows.
DEFAULT_HELDOUT_TASKS = ("click-dialog-2", "enter-password", "click-option")
DEFAULT_TEST_SEED_MIN = 30


class EpisodeError(DataError):
    """A bad episode; the message names the file (or source), the episode and the step."""


def episode_id(task: str, seed: int) -> str:
    return f"{task}/seed{seed}"


# ----------------------------------------------------------------------------- validation


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_step(step: Any, where: str) -> None:
    if not isinstance(step, dict):
        raise EpisodeError(f"{where}: a step must be a JSON object, got {type(step).__name__}")
    for key in ("elements", "action", "valid_actions", "semantic_context", "milestones"):
        if key not in step:
            raise EpisodeError(f"{where}: missing key {key!r}")
    shot = step.get("screenshot")
    if shot is not None and not isinstance(shot, str):
        raise EpisodeError(f"{where}: 'screenshot' must be a path string or null, got {type(shot).__name__}")
    if not isinstance(step["elements"], list):
        raise EpisodeError(f"{where}: 'elements' must be a list")
    for k, el in enumerate(step["elements"]):
        ew = f"{where} element {k}"
        if not isinstance(el, dict):
            raise EpisodeError(f"{ew}: must be a JSON object")
        for key in ("ref", "tag", "text", "box", "value"):
            if key not in el:
                raise EpisodeError(f"{ew}: missing key {key!r}")
        if not _is_int(el["ref"]):
            raise EpisodeError(f"{ew}: 'ref' must be an integer, got {el['ref']!r}")
        box = el["box"]
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            raise EpisodeError(f"{ew}: 'box' must be [left, top, width, height], got {box!r}")
        if not isinstance(el["value"], str) or not isinstance(el["text"], str) or not isinstance(el["tag"], str):
            raise EpisodeError(f"{ew}: 'tag', 'text' and 'value' must be strings")
    if not isinstance(step["action"], str) or not step["action"].strip():
        raise EpisodeError(f"{where}: 'action' must be a non-empty action text")
    va = step["valid_actions"]
    if not (isinstance(va, list) and va and all(isinstance(a, str) and a.strip() for a in va)):
        raise EpisodeError(f"{where}: 'valid_actions' must be a non-empty list of action texts")
    if not isinstance(step["semantic_context"], str):
        raise EpisodeError(f"{where}: 'semantic_context' must be a string")
    si = step.get("step_instruction")
    if si is not None and not isinstance(si, str):
        raise EpisodeError(f"{where}: 'step_instruction' must be a string or null")
    ms = step["milestones"]
    if not (isinstance(ms, dict) and all(isinstance(v, bool) for v in ms.values())):
        raise EpisodeError(f"{where}: 'milestones' must be an object of name -> bool")
    from envs.gui.actions import parse_action

    for text in [step["action"], *va]:
        parsed = parse_action(text)
        if parsed.action is None:
            raise EpisodeError(f"{where}: action {text!r} does not parse: {parsed.error}")


def validate_episode(ep: Any, where: str) -> dict:
    """`ep` if it follows the episode format, else one `EpisodeError` naming `where`, the episode and the step."""
    if not isinstance(ep, dict):
        raise EpisodeError(f"{where}: an episode must be a JSON object, got {type(ep).__name__}")
    eid = ep.get("episode_id")
    if not isinstance(eid, str) or not eid:
        raise EpisodeError(f"{where}: missing or empty 'episode_id'")
    where = f"{where} episode {eid!r}"
    for key in ("source", "task", "seed", "instruction", "screen_size", "steps", "success"):
        if key not in ep:
            raise EpisodeError(f"{where}: missing key {key!r}")
    if ep["source"] not in EPISODE_SOURCES:
        raise EpisodeError(f"{where}: unknown source {ep['source']!r} (known: {', '.join(EPISODE_SOURCES)})")
    if not isinstance(ep["task"], str) or not ep["task"]:
        raise EpisodeError(f"{where}: 'task' must be a non-empty string")
    if not _is_int(ep["seed"]):
        raise EpisodeError(f"{where}: 'seed' must be an integer, got {ep['seed']!r}")
    if not isinstance(ep["instruction"], str) or not ep["instruction"].strip():
        raise EpisodeError(f"{where}: 'instruction' must be a non-empty string")
    size = ep["screen_size"]
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) and v > 0 for v in size)):
        raise EpisodeError(f"{where}: 'screen_size' must be [width, height] in pixels, got {size!r}")
    if not isinstance(ep["success"], bool):
        raise EpisodeError(f"{where}: 'success' must be true or false")
    if not isinstance(ep["steps"], list) or not ep["steps"]:
        raise EpisodeError(f"{where}: 'steps' must be a non-empty list")
    for i, step in enumerate(ep["steps"]):
        _check_step(step, f"{where} step {i}")
    return ep


# ----------------------------------------------------------------------------- files


def write_episodes(path: str | os.PathLike, episodes: Iterable[dict]) -> Path:
    """Validate every episode, then write them all atomically (a reader never sees half a file).
    Two episodes with the same id are an error: one would shadow the other in every split and metric."""
    episodes = list(episodes)
    seen: set[str] = set()
    for k, ep in enumerate(episodes):
        validate_episode(ep, f"{path} (episode {k})")
        if ep["episode_id"] in seen:
            raise EpisodeError(f"{path}: episode id {ep['episode_id']!r} appears twice")
        seen.add(ep["episode_id"])
    return atomic_write_lines(path, (json.dumps(ep, ensure_ascii=False) for ep in episodes))


def read_episodes(path: str | os.PathLike) -> list[dict]:
    """Every episode of an ``episodes.jsonl``, validated; errors name the file, line, episode and step.
    Screenshot paths stay relative to the file (`resolve_screenshot` joins them)."""
    path = Path(path)
    if not path.is_file():
        raise EpisodeError(f"{path}: no such episodes file")
    out, seen = [], {}
    for lineno, ep in iter_jsonl(path):
        validate_episode(ep, f"{path}:{lineno}")
        if ep["episode_id"] in seen:
            raise EpisodeError(f"{path}:{lineno}: episode id {ep['episode_id']!r} already on line {seen[ep['episode_id']]}")
        seen[ep["episode_id"]] = lineno
        out.append(ep)
    return out


def resolve_screenshot(episodes_file: str | os.PathLike, rel: str | None) -> Path | None:
    return None if rel is None else Path(episodes_file).parent / rel


# ----------------------------------------------------------------------------- splits


def split_episodes(
    episodes: Sequence[dict],
    *,
    heldout_tasks: Sequence[str] = DEFAULT_HELDOUT_TASKS,
    test_seed_min: int = DEFAULT_TEST_SEED_MIN,
) -> tuple[list[dict], list[dict]]:
    """(train, test): test = every episode of a held-out task type + episodes of other types whose seed is
    ``>= test_seed_min``; train = the rest (module docstring)."""
    held = set(heldout_tasks)
    train, test = [], []
    for ep in episodes:
        (test if ep["task"] in held or ep["seed"] >= test_seed_min else train).append(ep)
    return train, test


# ----------------------------------------------------------------------------- screen text and descriptions


# what a static row keeps of each element: the contract's five keys + the state a matcher or reader may want
_STATIC_ELEMENT_KEYS = ("ref", "tag", "text", "box", "value", "checked", "focused", "visible")


def _centre(box: Sequence[float]) -> tuple[int, int]:
    left, top, width, height = box
    return int(math.floor(left + width / 2)), int(math.floor(top + height / 2))


DEFAULT_ELEMENT_BUDGET = 2000  # characters of a screen's element list: the live environment's default


def screen_text(elements: Sequence[dict], budget: int | None = None) -> str:
    """The element list as the policy reads it: `envs.gui.observation.render_elements` over the stored element
    dicts (the renderer the live environment uses, so SFT / static prompts and live steps show the same text),
    at most `budget` characters (default `DEFAULT_ELEMENT_BUDGET`)."""
    from envs.gui.observation import render_elements

    return render_elements(elements, DEFAULT_ELEMENT_BUDGET if budget is None else budget)


def describe_element(el: dict) -> str | None:
    """A natural-language name for a clickable element ('the "Submit" button', 'the link "eget"'), or None
    when it has no short text to name it by. Uses ``classes`` when the element carries it (MiniWoB links
    are ``span.alink``)."""
    text = " ".join((el.get("text") or "").split())
    tag, classes = el.get("tag", ""), el.get("classes") or ""
    ident = (el.get("id") or "").strip()
    if tag in ("input_text", "input_password", "textarea") and ident.isalpha():
        return f'the "{ident}" field'
    if not text or len(text) > 40:
        return None
    if tag == "button" or tag in ("input_button", "input_submit"):
        return f'the "{text}" button'
    if "ui-tabs-anchor" in classes:
        return f'the tab "{text}"'
    if tag == "a" or "alink" in classes:
        return f'the link "{text}"'
    if tag == "label":
        return f'the label "{text}"'
    return f'the text "{text}"'


# ----------------------------------------------------------------------------- rows


def _history_steps(ep: dict, i: int, elements_text: list[str], k: int, image: bool) -> list[dict]:
    """The earlier steps for `render_step_prompt`; with `image` (history_images) each carries a placeholder
    "screenshot" (None), so a shown history screen is pictured too (SecAgent: one history screenshot + its
    action), filled from the row's `images` in order."""
    lo = max(0, i - max(k, 1))
    return [{"screen_text": elements_text[j], "action": ep["steps"][j]["action"]} | ({"screenshot": None} if image else {})
            for j in range(lo, i)]


def _shown_steps(history: str, i: int, k: int) -> list[int]:
    """Indices of the earlier steps whose screens the prompt shows (`render_step_prompt`'s rule)."""
    if history == "none" or i == 0:
        return []
    return [i - 1] if history == "semantic" else list(range(max(0, i - k), i))


def _step_prompt(ep: dict, i: int, texts: list[str], *, history: str, history_k: int, image: bool,
                 history_images: bool = False) -> list[dict]:
    from envs.gui.secagent import render_step_prompt

    prev_context = ep["steps"][i - 1]["semantic_context"] if i > 0 else ""
    return render_step_prompt(
        ep["instruction"],
        texts[i],
        history=history,
        semantic_context=prev_context,
        history_steps=_history_steps(ep, i, texts, history_k, image and history_images),
        history_k=history_k,
        image=image,
    )


def _step_images(ep: dict, i: int, history: str, history_k: int, episodes_dir: Path, out_dir: Path,
                 messages: list[dict], history_images: bool) -> list[str]:
    """The screenshots a step prompt shows, in the order of its image parts (history screens, then the current)."""
    from envs.gui.secagent import count_image_parts

    paths = []
    for j in [*(_shown_steps(history, i, history_k) if history_images else []), i]:
        p = _image_path(ep["steps"][j], episodes_dir, out_dir)
        if p is None:
            raise EpisodeError(f"episode {ep['episode_id']!r} step {j}: no screenshot, but rows with images were asked for")
        paths.append(p)
    if count_image_parts(messages) != len(paths):
        raise EpisodeError(f"episode {ep['episode_id']!r} step {i}: the prompt has {count_image_parts(messages)} "
                           f"image parts for {len(paths)} screenshots")
    return paths


CLICK_FORMATS = ("auto", "element", "point")


def answer_action(action: str, elements: Sequence[dict], click_format: str) -> str:
    """The action as an SFT answer writes it: ``point`` turns ``click(element=r)`` into ``click(x=cx, y=cy)`` at
    the centre of r's box (what a policy reading screenshots can write: refs are not on the image);
    ``element`` keeps it. Other actions are unchanged."""
    if click_format == "element":
        return action
    from envs.gui.actions import Action, format_action, parse_action

    a = parse_action(action).action
    if a is None or a.kind != "click" or a.element is None:
        return action
    el = next((e for e in elements if e["ref"] == a.element), None)
    if el is None:
        raise EpisodeError(f"action {action!r}: element {a.element} is not among the step's elements")
    cx, cy = _centre(el["box"])
    return format_action(Action(kind="click", x=cx, y=cy))


def _default_thought(step: dict) -> str:
    return step.get("thought") or f"Next I do {step['action']}."


def _image_path(step: dict, episodes_dir: Path, out_dir: Path) -> str | None:
    if step.get("screenshot") is None:
        return None
    full = (episodes_dir / step["screenshot"]).resolve()
    try:
        return os.path.relpath(full, out_dir.resolve())
    except ValueError:  # another drive (Windows): an absolute path still resolves
        return str(full)


def build_rows(
    episodes: Sequence[dict],
    *,
    episodes_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    history_modes: Sequence[str] = ("semantic",),
    history_k: int = 1,
    images: bool = False,
    history_images: bool = False,
    click_format: str = "auto",
    heldout_tasks: Sequence[str] = DEFAULT_HELDOUT_TASKS,
    test_seed_min: int = DEFAULT_TEST_SEED_MIN,
    grounding_per_screen: int = 4,
    element_budget: int | None = None,
) -> dict:
    """Write the SFT / grounding / static rows and ``stats.json`` for `episodes` into `out_dir`; returns the stats.
    The first history mode is the default one (``sft.jsonl``, ``static_{train,test}.jsonl``); every other mode
    gets ``sft_<mode>.jsonl`` and ``static_<split>_<mode>.jsonl``."""
    from envs.gui.actions import Action, format_action
    from envs.gui.secagent import HISTORY_MODES, format_step_output, render_step_prompt

    if not history_modes:
        raise EpisodeError("build: no history mode given")
    if click_format not in CLICK_FORMATS:
        raise EpisodeError(f"build: click_format must be one of {', '.join(CLICK_FORMATS)}, got {click_format!r}")
    if click_format == "auto":
        click_format = "point" if images else "element"
    for mode in history_modes:
        if mode not in HISTORY_MODES:
            raise EpisodeError(f"build: unknown history mode {mode!r} (known: {', '.join(HISTORY_MODES)})")
    episodes_dir, out_dir = Path(episodes_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, test = split_episodes(episodes, heldout_tasks=heldout_tasks, test_seed_min=test_seed_min)
    texts = {ep["episode_id"]: [screen_text(s["elements"], element_budget) for s in ep["steps"]] for ep in episodes}
    files: dict[str, int] = {}

    def write(name: str, rows: list[dict]) -> None:
        atomic_write_lines(out_dir / name, (json.dumps(r, ensure_ascii=False) for r in rows))
        files[name] = len(rows)

    for m, mode in enumerate(history_modes):
        suffix = "" if m == 0 else f"_{mode}"
        sft_rows = []
        for ep in train:
            for i, step in enumerate(ep["steps"]):
                msgs = _step_prompt(ep, i, texts[ep["episode_id"]], history=mode, history_k=history_k, image=images,
                                    history_images=history_images)
                answer = format_step_output(step["semantic_context"], _default_thought(step),
                                            answer_action(step["action"], step["elements"], click_format))
                row = {"messages": [*msgs, {"role": "assistant", "content": answer}],
                       "id": f"{ep['episode_id']}/step{i}", "kind": "navigation", "task": ep["task"]}
                if images:
                    row["images"] = _step_images(ep, i, mode, history_k, episodes_dir, out_dir, msgs, history_images)
                sft_rows.append(row)
        write(f"sft{suffix}.jsonl", sft_rows)
        for split_name, split in (("train", train), ("test", test)):
            rows = []
            for ep in split:
                for i, step in enumerate(ep["steps"]):
                    msgs = _step_prompt(ep, i, texts[ep["episode_id"]], history=mode, history_k=history_k,
                                        image=images, history_images=history_images)
                    row = {
                        "messages": msgs,
                        "id": f"{ep['episode_id']}/step{i}",
                        "episode_id": ep["episode_id"], "step": i, "n_steps": len(ep["steps"]),
                        "task": ep["task"], "seed": ep["seed"], "source": ep["source"], "history": mode,
                        "instruction": ep["instruction"], "screen_size": ep["screen_size"],
                        # the pieces of the prompt, for the "secagent" prompt builder (envs.gui.secagent)
                        "screen_text": texts[ep["episode_id"]][i],
                        "semantic_context": ep["steps"][i - 1]["semantic_context"] if i > 0 else "",
                        "history_steps": [{"screen_text": texts[ep["episode_id"]][j], "action": ep["steps"][j]["action"]}
                                          | ({"screenshot": None} if images and history_images else {})
                                          for j in _shown_steps(mode, i, history_k)],
                        "history_k": history_k,
                        "action": step["action"], "valid_actions": step["valid_actions"],
                        "elements": [{k: el[k] for k in _STATIC_ELEMENT_KEYS if k in el} for el in step["elements"]],
                    }
                    if images:
                        row["images"] = _step_images(ep, i, mode, history_k, episodes_dir, out_dir, msgs,
                                                     history_images)
                    rows.append(row)
            write(f"static_{split_name}{suffix}.jsonl", rows)

    grounding = []
    for ep in train:
        w, h = ep["screen_size"]
        for i, step in enumerate(ep["steps"]):
            named = [(describe_element(el), el) for el in step["elements"]]
            counts = Counter(d for d, _ in named if d)
            kept = 0
            for desc, el in named:
                if kept >= grounding_per_screen:
                    break
                if not desc or counts[desc] != 1 or (click_format == "element" and el["ref"] < 0):
                    continue
                cx, cy = _centre(el["box"])
                if not (0 <= cx < w and 0 <= cy < h):
                    continue
                action = (format_action(Action(kind="click", x=cx, y=cy)) if click_format == "point"
                          else format_action(Action(kind="click", element=int(el["ref"]))))
                instruction = f"Click {desc}."
                img = _image_path(step, episodes_dir, out_dir) if images else None
                if images and img is None:
                    raise EpisodeError(f"episode {ep['episode_id']!r} step {i}: no screenshot, but rows with "
                                       "images were asked for")
                msgs = render_step_prompt(instruction, texts[ep["episode_id"]][i], history="none", image=images)
                answer = format_step_output(f"Clicked {desc}.", f"{desc[0].upper()}{desc[1:]} is at ({cx}, {cy}).",
                                            action)
                row = {"messages": [*msgs, {"role": "assistant", "content": answer}],
                       "id": f"{ep['episode_id']}/step{i}/ground{el['ref']}", "kind": "grounding", "task": ep["task"]}
                if img is not None:
                    row["images"] = [img]
                grounding.append(row)
                kept += 1
    write("grounding.jsonl", grounding)
    # SecAgent's Stage-1 mix (navigation steps + Gr2Nav grounding) as one SFT file, interleaved by a fixed
    # seed: an SFT recipe reads one `data.train`, and a run cut short still saw both kinds
    mix = [json.loads(line) for line in (out_dir / "sft.jsonl").read_text().splitlines()] + grounding
    random.Random(0).shuffle(mix)
    write("sft_gr2nav.jsonl", mix)

    def per_task(split: list[dict]) -> dict:
        c: dict[str, dict] = {}
        for ep in split:
            d = c.setdefault(ep["task"], {"episodes": 0, "steps": 0, "seeds": []})
            d["episodes"] += 1
            d["steps"] += len(ep["steps"])
            d["seeds"].append(ep["seed"])
        for d in c.values():
            d["seeds"] = [min(d["seeds"]), max(d["seeds"])]
        return dict(sorted(c.items()))

    n_valid = [len(s["valid_actions"]) for ep in episodes for s in ep["steps"]]
    stats = {
        "split_rule": {"heldout_tasks": list(heldout_tasks), "test_seed_min": test_seed_min,
                       "rule": "test = held-out task types (all seeds) + other types with seed >= test_seed_min"},
        "episodes": {"train": len(train), "test": len(test)},
        "steps": {"train": sum(len(e["steps"]) for e in train), "test": sum(len(e["steps"]) for e in test)},
        "tasks": {"train": per_task(train), "test": per_task(test)},
        "success_rate": (sum(e["success"] for e in episodes) / len(episodes)) if episodes else 0.0,
        "mean_valid_actions_per_step": (sum(n_valid) / len(n_valid)) if n_valid else 0.0,
        "history_modes": list(history_modes),
        "images": images,
        "history_images": history_images,
        "click_format": click_format,
        "files": files,
    }
    atomic_write_text(out_dir / "stats.json", json.dumps(stats, indent=2) + "\n")
    return stats

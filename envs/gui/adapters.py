"""Adapters: mobile GUI datasets a user has on disk -> the GUI episode format (`envs.gui.episodes`).

Both adapters write ``episodes.jsonl`` + screenshots under one output folder, so the static benchmark,
SFT rows and metrics run on them exactly as on MiniWoB oracle episodes. Bad input is ONE `EpisodeError`
naming the file, the episode and the step.

**Coordinates.** The GUI convention: integer pixels of the step's screenshot, origin top-left; boxes
``[left, top, width, height]``. Absolute pixel inputs are kept (rounded to the nearest integer, corner
boxes ``[x1, y1, x2, y2]`` become ``[x1, y1, x2 - x1, y2 - y1]``); normalised inputs are scaled by the
screenshot's width / height: ``normalized`` means [0, 1], ``normalized_1000`` means [0, 1000) (Qwen2-VL /
UI-TARS style). No image is resized, so points and the screenshot always agree.

**AndroidControl** (`load_androidcontrol`; google-research/android_control). The release is GZIP TFRecords;
decode them with its reader (TensorFlow + android_env's a11y protos) into JSON lines, one episode per line,
with the release's fields: ``episode_id``, ``goal``, ``screenshots`` (paths relative to the file, or base64
PNG strings), ``accessibility_trees`` (per screen: the forest as a dict, ``{"windows": [{"tree": {"nodes":
[...]}}]}``, or a flat node list; nodes carry ``bounds_in_screen`` {left, top, right, bottom}, ``text``,
``content_description``, ``class_name``, ``is_checked``... in snake or camel case), ``screenshot_widths``,
``screenshot_heights``, ``actions`` (JSON dicts or JSON strings; len(screenshots) - 1 of them),
``step_instructions`` (one per action). Mapped: ``click`` -> ``click(x, y)``; ``input_text`` ->
``type(text)``; ``scroll`` up/down -> ``scroll(direction)``; ``wait`` -> ``wait()``. The GUI action space has
no long_press, open_app, navigate_home / back, left/right scroll, and the compound ``type`` (click + text +
Enter): an episode with one is handled per ``unsupported``: "skip" (default: the episode is left out and
counted in the returned stats, with a warning), "truncate" (the steps before it are kept, ``success``
false) or "error". Each step has one valid action (the annotated one; a gold point matches any click in the
smallest element box around it, `envs.gui.matching`). The semantic context after step i is the step
instructions so far (consecutive repeats once): the summary a human annotator gave. ``task`` is the app
package of the first screen's a11y tree (the split's "task type"), ``seed`` the integer episode id.

**AndroidLens / CMGUI-style** (`load_multichoice`): JSON (a list of episodes, ``{"episodes": [...]}``) or
JSON lines. Per episode: ``episode_id`` (or ``id``), ``instruction`` (or ``goal``), optional ``task`` /
``task_type`` / ``app`` (the split's task type), ``coordinates`` ("absolute" | "normalized" |
"normalized_1000", default "absolute"), optional ``milestones``: ``[{"name": str, "step": k}]`` (reached
after step k: the steps' milestone states follow), optional ``success`` (default true), and ``steps``: each
with ``screenshot`` (path relative to the file), ``width``/``height`` (or the episode's ``screen_size``),
optional ``elements`` (``{"bbox": [x1, y1, x2, y2] | "box": [l, t, w, h], "text", "class"}``), optional
``step_instruction``, and the multi-choice annotation ``valid_actions`` (or ``actions``): a list of
alternatives, the first one the recorded action. An alternative is ``{"type": "click", "x", "y"}`` or
``{"type": "click", "bbox": [x1, y1, x2, y2]}`` (a valid REGION: it becomes an element of the step and the
alternative ``click(element=ref)``), ``{"type": "type", "text"}``, ``{"type": "scroll", "direction"}``,
``{"type": "key", "key"}``, ``{"type": "wait"}``, ``{"type": "terminate", "status"}`` (``finish`` /
``done`` are read as terminate); ``action_type`` is read as ``type``.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from envs.gui.actions import Action, format_action
from envs.gui.episodes import EpisodeError, validate_episode, write_episodes

log = logging.getLogger(__name__)

__all__ = ["COORDINATES", "load_androidcontrol", "load_multichoice", "convert"]

COORDINATES = ("absolute", "normalized", "normalized_1000")
UNSUPPORTED_POLICIES = ("skip", "truncate", "error")
_PNG = b"\x89PNG\r\n\x1a\n"


class _Unsupported(Exception):
    pass


# ----------------------------------------------------------------------------- shared helpers


def _read_records(path: Path) -> list[tuple[str, Any]]:
    """(where, record) for every episode record of a .json (list or {"episodes": [...]}) or .jsonl file."""
    if not path.is_file():
        raise EpisodeError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        out = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    out.append((f"{path}:{lineno}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise EpisodeError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise EpisodeError(f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("episodes"), list):
        data = data["episodes"]
    if not isinstance(data, list):
        raise EpisodeError(f"{path}: expected a list of episodes or {{\"episodes\": [...]}}")
    return [(f"{path} episode #{k}", rec) for k, rec in enumerate(data)]


def _num(v: Any, where: str, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise EpisodeError(f"{where}: {what} must be a number, got {v!r}")
    return float(v)


def _scale(v: float, size: int, coords: str) -> float:
    return v if coords == "absolute" else v * size if coords == "normalized" else v * size / 1000.0


def _point(x: Any, y: Any, w: int, h: int, coords: str, where: str) -> tuple[int, int]:
    px = _scale(_num(x, where, "x"), w, coords)
    py = _scale(_num(y, where, "y"), h, coords)
    if px < 0 or py < 0:
        raise EpisodeError(f"{where}: negative point ({px:g}, {py:g})")
    return int(round(px)), int(round(py))


def _corners_box(b: Any, w: int, h: int, coords: str, where: str) -> list[int]:
    if not (isinstance(b, (list, tuple)) and len(b) == 4):
        raise EpisodeError(f"{where}: a bbox must be [x1, y1, x2, y2], got {b!r}")
    x1, y1 = _point(b[0], b[1], w, h, coords, where)
    x2, y2 = _point(b[2], b[3], w, h, coords, where)
    if x2 < x1 or y2 < y1:
        raise EpisodeError(f"{where}: bbox corners out of order: {b!r}")
    return [x1, y1, x2 - x1, y2 - y1]


def _save_screenshot(src: Any, base: Path, out_dir: Path, rel: str, where: str) -> str:
    """Copy / decode one screenshot into ``out_dir/rel``; returns `rel`."""
    dest = out_dir / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not isinstance(src, str) or not src:
        raise EpisodeError(f"{where}: a screenshot must be a path or a base64 PNG string, got {type(src).__name__}")
    path = base / src
    if len(src) < 4096 and path.is_file():
        dest.write_bytes(path.read_bytes())
        return rel
    try:
        data = base64.b64decode(src, validate=True)
    except (binascii.Error, ValueError):
        data = b""
    if not data.startswith(_PNG):
        raise EpisodeError(f"{where}: screenshot {src[:80]!r} is neither a file (looked in {base}) nor a base64 PNG")
    dest.write_bytes(data)
    return rel


def _context(prev: str, instruction: str | None) -> str:
    if not instruction or prev.endswith(instruction.strip()):
        return prev
    return f"{prev} {instruction.strip()}".strip()


def _seed(raw_id: Any, index: int) -> int:
    try:
        return int(raw_id)
    except (TypeError, ValueError):
        return index


# ----------------------------------------------------------------------------- AndroidControl


def _get(node: dict, snake: str) -> Any:
    if snake in node:
        return node[snake]
    parts = snake.split("_")
    return node.get(parts[0] + "".join(p.title() for p in parts[1:]))


def _a11y_nodes(tree: Any, where: str) -> list[dict]:
    if isinstance(tree, str):
        try:
            tree = json.loads(tree)
        except json.JSONDecodeError:
            raise EpisodeError(f"{where}: accessibility tree is a string but not JSON") from None
    if isinstance(tree, list):
        return [n for n in tree if isinstance(n, dict)]
    if isinstance(tree, dict):
        nodes = []
        for window in tree.get("windows") or []:
            nodes += [n for n in ((window.get("tree") or {}).get("nodes") or []) if isinstance(n, dict)]
        return nodes
    raise EpisodeError(f"{where}: accessibility tree must be a forest dict or a node list, got {type(tree).__name__}")


def _a11y_elements(tree: Any, where: str) -> tuple[list[dict], str | None]:
    """The tree's nodes with a non-empty box as elements (ref = node order) + the app package (or None)."""
    elements, package = [], None
    for k, node in enumerate(_a11y_nodes(tree, where)):
        package = package or _get(node, "package_name")
        b = _get(node, "bounds_in_screen") or {}
        try:
            left, top = int(b.get("left", 0)), int(b.get("top", 0))
            right, bottom = int(b.get("right", 0)), int(b.get("bottom", 0))
        except (TypeError, ValueError, AttributeError):
            raise EpisodeError(f"{where} node {k}: bounds_in_screen must be {{left, top, right, bottom}}") from None
        if right <= left or bottom <= top:
            continue
        text = _get(node, "text") or _get(node, "content_description") or ""
        cls = str(_get(node, "class_name") or "node").rsplit(".", 1)[-1]
        checked = _get(node, "is_checked")
        elements.append({"ref": k, "tag": cls, "text": str(text), "box": [left, top, right - left, bottom - top],
                         "value": "" if checked is None or not _get(node, "is_checkable") else str(bool(checked)).lower()})
    return elements, package


def _androidcontrol_action(a: Any, w: int, h: int, where: str) -> Action:
    if isinstance(a, str):
        try:
            a = json.loads(a)
        except json.JSONDecodeError:
            raise EpisodeError(f"{where}: action is not JSON: {a[:80]!r}") from None
    if not isinstance(a, dict) or "action_type" not in a:
        raise EpisodeError(f"{where}: an action must be a JSON object with 'action_type', got {a!r:.80}")
    kind = a["action_type"]
    if kind == "click":
        x, y = _point(a.get("x"), a.get("y"), w, h, "absolute", where)
        return Action(kind="click", x=x, y=y)
    if kind == "input_text":
        text = a.get("text")
        if not isinstance(text, str) or not text:
            raise EpisodeError(f"{where}: input_text without text")
        return Action(kind="type", text=text)
    if kind == "scroll" and a.get("direction") in ("up", "down"):
        return Action(kind="scroll", direction=a["direction"])
    if kind == "wait":
        return Action(kind="wait")
    raise _Unsupported(f"{kind}" + (f" {a.get('direction')}" if kind == "scroll" else ""))


def load_androidcontrol(
    path: str | os.PathLike, out_dir: str | os.PathLike, *, unsupported: str = "skip"
) -> tuple[list[dict], dict]:
    """AndroidControl episodes (JSON lines, module docstring) -> (episodes, stats); screenshots are written
    under ``out_dir/screens/<episode>/``."""
    if unsupported not in UNSUPPORTED_POLICIES:
        raise ValueError(f"unsupported must be one of {UNSUPPORTED_POLICIES}, got {unsupported!r}")
    path, out_dir = Path(path), Path(out_dir)
    episodes, skipped, truncated = [], {}, 0
    for index, (where, rec) in enumerate(_read_records(path)):
        if not isinstance(rec, dict):
            raise EpisodeError(f"{where}: an episode must be a JSON object")
        raw_id = rec.get("episode_id", index)
        ew = f"{where} episode {raw_id!r}"
        for key in ("goal", "screenshots", "accessibility_trees", "screenshot_widths", "screenshot_heights",
                    "actions", "step_instructions"):
            if key not in rec:
                raise EpisodeError(f"{ew}: missing field {key!r}")
        shots, trees, actions = rec["screenshots"], rec["accessibility_trees"], rec["actions"]
        widths, heights, instr = rec["screenshot_widths"], rec["screenshot_heights"], rec["step_instructions"]
        if not all(isinstance(v, list) for v in (shots, trees, actions, widths, heights, instr)):
            raise EpisodeError(f"{ew}: screenshots, accessibility_trees, actions, widths, heights and "
                               "step_instructions must be lists")
        if not actions:
            raise EpisodeError(f"{ew}: no actions")
        if len(shots) != len(actions) + 1:
            raise EpisodeError(f"{ew}: {len(shots)} screenshots for {len(actions)} actions "
                               "(AndroidControl has one screenshot more than actions)")
        for name, lst in (("accessibility_trees", trees), ("screenshot_widths", widths), ("screenshot_heights", heights)):
            if len(lst) != len(shots):
                raise EpisodeError(f"{ew}: {len(lst)} {name} for {len(shots)} screenshots")
        if len(instr) != len(actions):
            raise EpisodeError(f"{ew}: {len(instr)} step_instructions for {len(actions)} actions")
        eid = f"androidcontrol/{raw_id}"
        # map every action first: an episode that is skipped leaves no screenshots behind
        mapped, cut = [], None
        for i, a in enumerate(actions):
            sw = f"{ew} step {i}"
            w, h = int(_num(widths[i], sw, "screenshot width")), int(_num(heights[i], sw, "screenshot height"))
            try:
                mapped.append((_androidcontrol_action(a, w, h, sw), w, h))
            except _Unsupported as e:
                if unsupported == "error":
                    raise EpisodeError(f"{sw}: action {e} has no GUI action (envs.gui.actions)") from None
                cut = str(e)
                break
        if cut is not None and (unsupported == "skip" or not mapped):
            skipped[cut] = skipped.get(cut, 0) + 1
            continue
        steps, context, package = [], "", None
        for i, (action, w, h) in enumerate(mapped):
            sw = f"{ew} step {i}"
            elements, pkg = _a11y_elements(trees[i], sw)
            package = package or pkg
            rel = _save_screenshot(shots[i], path.parent, out_dir, f"screens/{_safe(eid)}/step{i}.png", sw)
            si = instr[i] if isinstance(instr[i], str) else None
            context = _context(context, si)
            text = format_action(action)
            steps.append({"screenshot": rel, "elements": elements, "action": text, "valid_actions": [text],
                          "semantic_context": context, "step_instruction": si, "milestones": {}})
        truncated += cut is not None
        first_size = [int(widths[0]), int(heights[0])]
        ep = {"episode_id": eid, "source": "androidcontrol", "task": package or "androidcontrol",
              "seed": _seed(raw_id, index), "instruction": str(rec["goal"]), "screen_size": first_size,
              "steps": steps, "success": cut is None}
        episodes.append(validate_episode(ep, ew))
    if skipped:
        log.warning("%s: %d episodes skipped for actions the GUI action space lacks: %s", path,
                    sum(skipped.values()), ", ".join(f"{k} x{v}" for k, v in sorted(skipped.items())))
    return episodes, {"episodes": len(episodes), "skipped": skipped, "truncated": truncated}


def _safe(eid: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in eid)


# ----------------------------------------------------------------------------- AndroidLens / CMGUI-style


def _alternative(a: Any, w: int, h: int, coords: str, where: str, elements: list[dict]) -> Action:
    if not isinstance(a, dict):
        raise EpisodeError(f"{where}: an action must be a JSON object, got {a!r:.80}")
    kind = str(a.get("type", a.get("action_type", ""))).lower()
    kind = {"finish": "terminate", "done": "terminate", "input_text": "type", "tap": "click"}.get(kind, kind)
    if kind == "click":
        if "bbox" in a:
            box = _corners_box(a["bbox"], w, h, coords, where)
            ref = 1 + max((el["ref"] for el in elements), default=-1)
            elements.append({"ref": ref, "tag": "region", "text": str(a.get("text", "")), "box": box, "value": ""})
            return Action(kind="click", element=ref)
        if "point" in a:
            p = a["point"]
            if not (isinstance(p, (list, tuple)) and len(p) == 2):
                raise EpisodeError(f"{where}: 'point' must be [x, y], got {p!r}")
            x, y = _point(p[0], p[1], w, h, coords, where)
        else:
            x, y = _point(a.get("x"), a.get("y"), w, h, coords, where)
        return Action(kind="click", x=x, y=y)
    if kind == "type":
        if not isinstance(a.get("text"), str) or not a["text"]:
            raise EpisodeError(f"{where}: type without text")
        return Action(kind="type", text=a["text"])
    if kind == "scroll":
        if a.get("direction") not in ("up", "down"):
            raise EpisodeError(f"{where}: scroll direction must be up or down, got {a.get('direction')!r}")
        return Action(kind="scroll", direction=a["direction"])
    if kind == "key":
        from envs.gui.actions import normalize_key

        key = normalize_key(str(a.get("key", "")))
        if key is None:
            raise EpisodeError(f"{where}: unknown key {a.get('key')!r}")
        return Action(kind="key", key=key)
    if kind == "wait":
        return Action(kind="wait")
    if kind == "terminate":
        status = str(a.get("status", "success")).lower()
        if status not in ("success", "failure"):
            raise EpisodeError(f"{where}: terminate status must be success or failure, got {status!r}")
        return Action(kind="terminate", status=status)
    raise EpisodeError(f"{where}: unknown action type {kind!r} (click, type, scroll, key, wait, terminate)")


def load_multichoice(path: str | os.PathLike, out_dir: str | os.PathLike) -> tuple[list[dict], dict]:
    """AndroidLens / CMGUI-style episodes with several valid actions per step (module docstring) ->
    (episodes, stats); screenshots are copied under ``out_dir/screens/<episode>/``."""
    path, out_dir = Path(path), Path(out_dir)
    episodes = []
    for index, (where, rec) in enumerate(_read_records(path)):
        if not isinstance(rec, dict):
            raise EpisodeError(f"{where}: an episode must be a JSON object")
        raw_id = rec.get("episode_id", rec.get("id", index))
        ew = f"{where} episode {raw_id!r}"
        instruction = rec.get("instruction", rec.get("goal"))
        if not isinstance(instruction, str) or not instruction.strip():
            raise EpisodeError(f"{ew}: missing 'instruction' (or 'goal')")
        coords = rec.get("coordinates", "absolute")
        if coords not in COORDINATES:
            raise EpisodeError(f"{ew}: coordinates must be one of {', '.join(COORDINATES)}, got {coords!r}")
        raw_steps = rec.get("steps")
        if not isinstance(raw_steps, list) or not raw_steps:
            raise EpisodeError(f"{ew}: 'steps' must be a non-empty list")
        reached_at: dict[str, int] = {}
        for m in rec.get("milestones") or []:
            if not (isinstance(m, dict) and isinstance(m.get("name"), str) and isinstance(m.get("step"), int)):
                raise EpisodeError(f"{ew}: a milestone must be {{\"name\": str, \"step\": int}}, got {m!r:.80}")
            reached_at[m["name"]] = m["step"]
        eid = f"androidlens/{raw_id}"
        steps, context, size0 = [], "", None
        for i, st in enumerate(raw_steps):
            sw = f"{ew} step {i}"
            if not isinstance(st, dict):
                raise EpisodeError(f"{sw}: a step must be a JSON object")
            size = [st.get("width"), st.get("height")] if "width" in st else rec.get("screen_size")
            if not (isinstance(size, list) and len(size) == 2):
                raise EpisodeError(f"{sw}: no screen size (step 'width'/'height' or episode 'screen_size')")
            w, h = int(_num(size[0], sw, "width")), int(_num(size[1], sw, "height"))
            size0 = size0 or [w, h]
            elements = []
            for k, el in enumerate(st.get("elements") or []):
                ew2 = f"{sw} element {k}"
                if not isinstance(el, dict):
                    raise EpisodeError(f"{ew2}: must be a JSON object")
                if "bbox" in el:
                    box = _corners_box(el["bbox"], w, h, coords, ew2)
                elif "box" in el and isinstance(el["box"], list) and len(el["box"]) == 4:
                    left, top = _point(el["box"][0], el["box"][1], w, h, coords, ew2)
                    bw, bh = _point(el["box"][2], el["box"][3], w, h, coords, ew2)
                    box = [left, top, bw, bh]
                else:
                    raise EpisodeError(f"{ew2}: needs 'bbox' [x1, y1, x2, y2] or 'box' [left, top, width, height]")
                elements.append({"ref": k, "tag": str(el.get("class", el.get("tag", "node"))),
                                 "text": str(el.get("text", "")), "box": box, "value": str(el.get("value", ""))})
            alts = st.get("valid_actions", st.get("actions"))
            if not isinstance(alts, list) or not alts:
                raise EpisodeError(f"{sw}: 'valid_actions' (or 'actions') must be a non-empty list of alternatives")
            valid = []
            for k, a in enumerate(alts):
                text = format_action(_alternative(a, w, h, coords, f"{sw} action {k}", elements))
                if text not in valid:
                    valid.append(text)
            shot = st.get("screenshot", st.get("image"))
            rel = _save_screenshot(shot, path.parent, out_dir, f"screens/{_safe(eid)}/step{i}.png", sw) if shot else None
            si = st.get("step_instruction", st.get("instruction"))
            si = si if isinstance(si, str) else None
            context = _context(context, si)
            steps.append({"screenshot": rel, "elements": elements, "action": valid[0], "valid_actions": valid,
                          "semantic_context": context, "step_instruction": si,
                          "milestones": {name: at <= i for name, at in reached_at.items()}})
        task = rec.get("task", rec.get("task_type", rec.get("app", "androidlens")))
        ep = {"episode_id": eid, "source": "androidlens", "task": str(task), "seed": _seed(raw_id, index),
              "instruction": instruction, "screen_size": size0, "steps": steps,
              "success": bool(rec.get("success", True))}
        episodes.append(validate_episode(ep, ew))
    return episodes, {"episodes": len(episodes)}


def convert(kind: str, path: str | os.PathLike, out_dir: str | os.PathLike, **kwargs) -> dict:
    """Load with the adapter `kind` ("androidcontrol" | "androidlens") and write ``out_dir/episodes.jsonl``."""
    loaders = {"androidcontrol": load_androidcontrol, "androidlens": load_multichoice}
    if kind not in loaders:
        raise ValueError(f"unknown adapter {kind!r} (known: {', '.join(loaders)})")
    episodes, stats = loaders[kind](path, out_dir, **kwargs)
    if not episodes:
        raise EpisodeError(f"{path}: no episode could be converted ({stats})")
    write_episodes(Path(out_dir) / "episodes.jsonl", episodes)
    return stats

"""Step matching: is a predicted action one of a step's valid actions? (static SA / TA / AMS, the reward)

A step of the static benchmark has several valid actions (every action that leads to the same next
state, `envs.gui.episodes`), as canonical texts of `envs.gui.actions`, and the screen's elements with
their boxes `[left, top, width, height]` in the page's CSS pixels (the one coordinate convention of
envs/gui). `match_action(pred, valid_actions, elements)` is True when the prediction matches ANY of
them. Rules, per action kind (the kinds must be equal first):

click   A click is a point: `click(x, y)` is that point; `click(element=r)` is the centre of element r's
        box (what the browser clicks), and it also matches when r itself is a valid ref (an element
        absent from `elements` only matches by ref).
        A valid `click(element=v)` is the box of element v ENLARGED by `margin` (default 0.2): the box is
        scaled by (1 + margin) about its centre, i.e. margin/2 of its width (height) is added on each
        side, so the default is UI-S1's "1.2x box" rule. Borders are inclusive: a point exactly on the
        enlarged border matches. A zero-width (height) box stays zero-width (height) after scaling: only
        points on that line match.
        A valid `click(x=gx, y=gy)` (a gold point, e.g. from an adapter without boxes) matches the
        enlarged box of the smallest element whose box contains the gold point; when no element
        contains it, a prediction within `point_tolerance` CSS pixels (Euclidean, default 8 ~ UI-S1's
        0.04 of a 210-pixel MiniWoB screen) of the gold point.
        Predicting points inside boxes (never predicting boxes) keeps the reward unhackable by
        large boxes (GUI-G1).
type    text_match="equal" (default): equal after normalisation (Unicode casefold, whitespace runs
        collapsed to one space, stripped); "contains": UI-S1's lenient rule, either normalised text
        contains the other, both non-empty.
key     the canonical key names equal (the parser canonicalises: "enter" and "Return" are "Enter";
        "a" and "A" = shift+a stay different keys).
scroll  the directions equal (where the scroll happens, an element or a point, is not compared: the
        page scrolls the same).
wait    always (the kind is the whole action).
terminate  the statuses equal.

A prediction that could not be parsed (None) never matches. A valid action that cannot be parsed is
a bug in the data: ValueError naming it.
"""

from __future__ import annotations

import math
import re
import unicodedata
from functools import lru_cache
from typing import Any, Iterable, Sequence

__all__ = ["match_action", "normalize_text", "enlarge_box", "point_in_box", "element_boxes", "parse_valid_action",
           "action_kind"]

TEXT_MATCH = ("equal", "contains")


def normalize_text(text: str | None) -> str:
    """Casefolded, NFKC, whitespace runs collapsed to one space, stripped."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text or "")).casefold().strip()


def enlarge_box(box: Sequence[float], margin: float) -> tuple[float, float, float, float]:
    """`[l, t, w, h]` scaled by (1 + margin) about its centre -> (x0, y0, x1, y1)."""
    left, top, w, h = (float(v) for v in box)
    dx, dy = w * margin / 2, h * margin / 2
    return left - dx, top - dy, left + w + dx, top + h + dy


def point_in_box(x: float, y: float, box: Sequence[float], margin: float = 0.0) -> bool:
    """The point lies in the box enlarged by `margin` (borders inclusive)."""
    x0, y0, x1, y1 = enlarge_box(box, margin)
    return x0 <= x <= x1 and y0 <= y <= y1


def _box(el: Any, where: str) -> tuple[float, float, float, float]:
    box = el.get("box") if isinstance(el, dict) else getattr(el, "box", None)
    try:
        left, top, w, h = (float(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: element box must be [left, top, width, height], got {box!r}") from None
    if w < 0 or h < 0:
        raise ValueError(f"{where}: element box has a negative size: {box!r}")
    return left, top, w, h


def element_boxes(elements: Iterable[Any]) -> dict[int, tuple[float, float, float, float]]:
    """ref -> box of each element (dicts with "ref" and "box", or objects with those attributes)."""
    out = {}
    for i, el in enumerate(elements or ()):
        ref = el.get("ref") if isinstance(el, dict) else getattr(el, "ref", None)
        if ref is None:
            raise ValueError(f"elements[{i}] has no 'ref'")
        out[int(ref)] = _box(el, f"elements[{i}] (ref {ref})")
    return out


@lru_cache(maxsize=4096)
def parse_valid_action(text: str):
    """The Action of a valid action's canonical text; ValueError (naming it) when it does not parse."""
    from envs.gui.actions import parse_action

    parsed = parse_action(text)
    if parsed.action is None:
        raise ValueError(f"valid action {text!r} does not parse: {parsed.error}")
    return parsed.action


def action_kind(text: str | None) -> str | None:
    """The kind of an action text (None when it does not parse): per-type accuracy groups by it."""
    from envs.gui.actions import parse_action

    if not isinstance(text, str):
        return None
    parsed = parse_action(text)
    return parsed.action.kind if parsed.action is not None else None


def _target_point(boxes: dict, gx: float, gy: float) -> tuple[float, float, float, float] | None:
    """The box of the smallest element that contains the gold point (None when none does)."""
    hits = [b for b in boxes.values() if point_in_box(gx, gy, b)]
    return min(hits, key=lambda b: b[2] * b[3]) if hits else None


def _click_point(pred, boxes: dict) -> tuple[float, float] | None:
    if pred.x is not None and pred.y is not None:
        return float(pred.x), float(pred.y)
    if pred.element is not None and int(pred.element) in boxes:
        left, top, w, h = boxes[int(pred.element)]
        return left + w / 2, top + h / 2
    return None


def _click_matches(pred, gold, boxes: dict, margin: float, point_tolerance: float) -> bool:
    if pred.element is not None and gold.element is not None and int(pred.element) == int(gold.element):
        return True
    point = _click_point(pred, boxes)
    if point is None:
        return False
    x, y = point
    if gold.element is not None:
        box = boxes.get(int(gold.element))
        return box is not None and point_in_box(x, y, box, margin)
    if gold.x is None or gold.y is None:
        return False
    box = _target_point(boxes, float(gold.x), float(gold.y))
    if box is not None:
        return point_in_box(x, y, box, margin)
    return math.hypot(x - float(gold.x), y - float(gold.y)) <= point_tolerance


def _text_matches(pred: str | None, gold: str | None, text_match: str) -> bool:
    p, g = normalize_text(pred), normalize_text(gold)
    if text_match == "equal":
        return p == g
    return bool(p) and bool(g) and (g in p or p in g)


def _matches(pred, gold, boxes, margin, point_tolerance, text_match) -> bool:
    if pred.kind != gold.kind:
        return False
    kind = pred.kind
    if kind == "click":
        return _click_matches(pred, gold, boxes, margin, point_tolerance)
    if kind == "type":
        return _text_matches(pred.text, gold.text, text_match)
    if kind == "key":
        return (pred.key or "") == (gold.key or "")
    if kind == "scroll":
        return pred.direction == gold.direction
    if kind == "terminate":
        return pred.status == gold.status
    return True  # wait: nothing but the kind


def match_action(
    pred: Any,
    valid_actions: Sequence[str],
    elements: Sequence[Any],
    *,
    margin: float = 0.2,
    text_match: str = "equal",
    point_tolerance: float = 8.0,
) -> bool:
    """True when `pred` (an `envs.gui.actions.Action`, or None) matches any of `valid_actions` (rules above)."""
    if text_match not in TEXT_MATCH:
        raise ValueError(f"text_match must be one of {list(TEXT_MATCH)}, got {text_match!r}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if pred is None:
        return False
    if isinstance(valid_actions, str):  # one action given as text: a list of its characters is never meant
        valid_actions = [valid_actions]
    boxes = element_boxes(elements)
    return any(_matches(pred, parse_valid_action(v), boxes, margin, point_tolerance, text_match)
               for v in valid_actions)

"""The screen as text for text-only policies: one line per element, within a character budget.

    [ref] tag "text" value="..." box=(l,t,w,h)

followed, when they apply, by ` checked` / ` unchecked` (checkboxes, radios), ` selected` (options),
` focused`, and ` scroll=top/max` (a scrollable element: scrolled `top` of `max` CSS pixels). The box is
(left, top, width, height) in CSS pixels, the pixels of the screenshot and of `click(x=, y=)`. Text and
values are JSON-quoted (so quotes and newlines cannot break a line) and cut at `max_text` characters
with "...". Text fragments (MiniWoB refs < 0: text mixed with child elements, no element of their own)
show `[-]` instead of a ref: they cannot be clicked by ref, only by point.

Which elements get a line (in document order):
  - not invisible: elements hidden by CSS, scrolled out of a clipping parent, or off the screen
    (`Element.visible`) and zero-size ones are skipped;
  - leaves, and containers (non-leaf elements) only when they carry text of their own; MiniWoB gives
    a container's own text as "t" fragments, which get lines of their own, so in practice a line is a
    leaf element or a fragment: the page's `body`, `#wrap`, `#area` and layout `div`s are left out;
  - inputs, buttons, selects, textareas, links, labels and SVG shapes always (a blank input is still a
    target); such a container without text of its own shows the text of its fragments, which then
    get no line of their own (`<label><input type=checkbox>blue</label>` -> `[3] label "blue" ...` and
    `[4] input_checkbox "" ... unchecked`).
When the lines exceed `budget_chars`, the list is cut and ends with `... (N more elements)`; the whole
text, that line included, stays within the budget (a budget too small for even that line gives only it).
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Mapping

__all__ = ["render_elements", "element_line", "shown_elements"]

_ALWAYS = ("input", "button", "select", "textarea", "a", "option", "label", "svg", "circle", "rect", "polygon",
           "path", "canvas", "img")


def _get(e: Any, key: str, default: Any = None) -> Any:
    return e.get(key, default) if isinstance(e, Mapping) else getattr(e, key, default)


def _quote(text: str, max_text: int) -> str:
    text = " ".join(str(text).split())  # one line: newlines and runs of spaces become one space
    if len(text) > max_text:
        text = text[: max(max_text - 3, 0)] + "..."
    return json.dumps(text, ensure_ascii=False)


def _visible(e: Any) -> bool:
    box = _get(e, "box") or (0, 0, 0, 0)
    return bool(_get(e, "visible", True)) and len(box) == 4 and box[2] > 0 and box[3] > 0


def shown_elements(elements: Iterable[Any]) -> list[Any]:
    """The elements that get a line (module docstring), in order; a target container without text of its
    own (`<label><input>name</label>`) takes the text of its fragments, which then get no line."""
    elements = list(elements)
    fragments: dict[int, list[Any]] = {}
    for e in elements:
        if int(_get(e, "ref", 0) or 0) < 0 and _visible(e):
            fragments.setdefault(int(_get(e, "parent", 0) or 0), []).append(e)
    out, absorbed = [], set()
    for e in elements:
        if not _visible(e) or id(e) in absorbed:
            continue
        tag = str(_get(e, "tag", "")).lower()
        ref = int(_get(e, "ref", 0) or 0)
        own = str(_get(e, "text") or "").strip()
        if _get(e, "is_leaf", True) or own:
            out.append(e)
        elif tag.split("_")[0] in _ALWAYS:
            frags = fragments.get(ref, []) if ref > 0 else []
            if frags and not own:
                absorbed.update(id(f) for f in frags)
                e = _with_text(e, " ".join(str(_get(f, "text") or "") for f in frags))
            out.append(e)
    return out


def _with_text(e: Any, text: str) -> dict:
    d = dict(e) if isinstance(e, Mapping) else (e.to_dict() if hasattr(e, "to_dict") else dict(vars(e)))
    d["text"] = text
    return d


def element_line(e: Any, max_text: int = 80) -> str:
    """One element's line (module docstring); `e` is an `Element` or a dict with the same keys."""
    ref = int(_get(e, "ref", 0) or 0)
    tag = str(_get(e, "tag", "")).lower()
    parts = [f"[{ref}]" if ref > 0 else "[-]", tag or "?", _quote(_get(e, "text") or "", max_text)]
    value = _get(e, "value")
    # (a textarea's text is its initial content: its value is worth a second copy only once it differs)
    if value not in (None, "") and _get(e, "checked") is None and str(value) != str(_get(e, "text") or ""):
        parts.append(f"value={_quote(value, max_text)}")
    l, t, w, h = (int(v) for v in _get(e, "box"))
    parts.append(f"box=({l},{t},{w},{h})")
    checked = _get(e, "checked")
    if checked is not None:
        parts.append("checked" if checked else "unchecked")
    if _get(e, "selected"):
        parts.append("selected")
    if _get(e, "focused") and tag != "body":
        parts.append("focused")
    scroll = _get(e, "scroll")
    if scroll:
        parts.append(f"scroll={int(scroll[0])}/{int(scroll[1])}")
    return " ".join(parts)


def render_elements(elements: Iterable[Any], budget_chars: int = 2000, *, max_text: int = 80) -> str:
    """The element list as text, at most `budget_chars` characters (module docstring)."""
    lines = [element_line(e, max_text) for e in shown_elements(elements)]
    out: list[str] = []
    used = 0
    for i, line in enumerate(lines):
        cost = len(line) + (1 if out else 0)
        rest = len(lines) - i - 1
        # room for this line AND, if lines remain after it, the closing "... (N more elements)" line
        tail = 0 if rest == 0 else len(f"\n... ({rest} more elements)")
        if used + cost + tail > budget_chars:
            more = f"... ({len(lines) - i} more elements)"
            return "\n".join(out + [more]) if out else more
        out.append(line)
        used += cost
    return "\n".join(out)

"""GUI actions: one text format for the policy, a parser that never raises, and the canonical writer.

The format is close to Qwen2.5-VL's mobile-use / UI-TARS function style: one call per action.
Canonical text (what `format_action` writes and what SFT targets use):

    click(x=12, y=40)              click at a point: integer CSS pixels of the page, origin top-left
                                   (the same pixels as the screenshot and the element boxes)
    click(element=7)               click the element with MiniWoB ref 7 (the [7] of the element list)
    type(text="hello world")       type into the focused element (click it first)
    key(key="Enter")               press a key (list below)
    scroll(direction="down")       scroll up | down (optionally where: `, element=5` or `, x=80, y=100`)
    wait()                         let the page change (animations), then look again
    terminate(status="success")    end the episode: success | failure (no browser action)

What the parser also accepts (`parse_action`), so that a nearly right output is not thrown away:
  - names and keyword names in any case, spaces anywhere between tokens, a trailing `;`, the call
    wrapped in backticks or a ``` fence;
  - positional arguments: `click(12, 40)` (a point), `click(7)` (ONE number = an element ref),
    `type("hi")`, `key("Enter")`, `scroll("down")`, `terminate("success")`;
  - bare words where a word is expected: `key(Enter)`, `scroll(down)`, `terminate(failure)`; for
    `type` an unquoted argument is the whole text between the parentheses (`type(hello world)`);
  - single or double quotes, with backslash escapes \\\\ \\" \\' \\n \\t \\r (other backslashes stay);
  - Qwen-style points: `click(coordinate=[12, 40])` / `click(coordinate=(12, 40))`;
  - decimal coordinates (`click(x=12.6, y=40)`), rounded to the nearest integer.
Errors (`ParsedAction.error`, one line, shown to the policy in the corrective message): an unknown
action or argument, a missing or repeated argument, negative or over-long numbers (more than 7 digits),
an empty text, an unknown key / direction / status, more than one call, text outside the call.
Coordinates beyond the screen are NOT parse errors: the browser answers them as invalid
(`envs.gui.browser.MiniWobSession.step`), since only it knows the screen size.

Keys (`KEYS`, case-insensitive on input, canonical spelling on output): Enter, Tab, Backspace, Delete,
Escape, Space, ArrowUp, ArrowDown, ArrowLeft, ArrowRight, PageUp, PageDown, Home, End, or one printable
ASCII character ("a", "A" = shift+a, "7", "/"), optionally after modifiers joined by "+": Ctrl, Alt,
Shift, Meta (canonical order Ctrl+Alt+Shift+Meta, e.g. "Ctrl+a", "Shift+Tab"). Aliases: Return -> Enter,
Esc -> Escape, Del -> Delete, Up/Down/Left/Right -> Arrow*, Control -> Ctrl, Cmd/Command/Super -> Meta.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ACTION_KINDS",
    "KEYS",
    "MODIFIERS",
    "Action",
    "ParsedAction",
    "parse_action",
    "format_action",
    "normalize_key",
]

ACTION_KINDS = ("click", "type", "key", "scroll", "wait", "terminate")
KEYS = ("Enter", "Tab", "Backspace", "Delete", "Escape", "Space", "ArrowUp", "ArrowDown", "ArrowLeft",
        "ArrowRight", "PageUp", "PageDown", "Home", "End")
MODIFIERS = ("Ctrl", "Alt", "Shift", "Meta")
DIRECTIONS = ("up", "down")
STATUSES = ("success", "failure")

MAX_ACTION_CHARS = 4000  # longer outputs are not one action; never scan megabytes of junk
MAX_DIGITS = 7  # bigger numbers are junk (and int() of thousands of digits raises in Python >= 3.11)

_KEY_ALIASES = {k.lower(): k for k in KEYS} | {
    "return": "Enter", "esc": "Escape", "del": "Delete", "up": "ArrowUp", "down": "ArrowDown",
    "left": "ArrowLeft", "right": "ArrowRight", "pgup": "PageUp", "pgdn": "PageDown", "spacebar": "Space",
}
_MOD_ALIASES = {"ctrl": "Ctrl", "control": "Ctrl", "alt": "Alt", "option": "Alt", "shift": "Shift",
                "meta": "Meta", "cmd": "Meta", "command": "Meta", "super": "Meta"}


@dataclass(frozen=True)
class Action:
    """One GUI action (fields not used by `kind` stay None)."""

    kind: str  # one of ACTION_KINDS
    x: int | None = None  # click / scroll at a point
    y: int | None = None
    element: int | None = None  # click / scroll an element by its MiniWoB ref
    text: str | None = None  # type
    key: str | None = None  # key: canonical name (KEYS / a character, after modifiers)
    direction: str | None = None  # scroll: up | down
    status: str | None = None  # terminate: success | failure


@dataclass
class ParsedAction:
    """`action` when the text is one valid action, else None and `error` (one line for the policy)."""

    action: Action | None
    error: str | None = None


def normalize_key(name: str) -> str | None:
    """The canonical spelling of a key (see the module docstring), or None when it is not a key."""
    if not isinstance(name, str) or not name or len(name) > 40:
        return None
    if len(name) == 1:
        return name if 32 < ord(name) < 127 else ("Space" if name == " " else None)
    parts = name.split("+")
    if name.endswith("+") and len(parts) >= 2 and parts[-1] == "" and parts[-2] == "":  # "Ctrl++" = Ctrl and "+"
        parts = parts[:-2] + ["+"]
    *mods, base = [p.strip() if p != "+" else p for p in parts]
    canon_mods = []
    for m in mods:
        cm = _MOD_ALIASES.get(m.lower())
        if cm is None or cm in canon_mods:
            return None
        canon_mods.append(cm)
    if len(base) == 1:
        canon = base if 32 < ord(base) < 127 else None
    else:
        canon = _KEY_ALIASES.get(base.lower())
    if canon is None:
        return None
    return "+".join([m for m in MODIFIERS if m in canon_mods] + [canon])


def _escape(text: str) -> str:
    return (text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
            .replace("\r", "\\r"))


def format_action(a: Action) -> str:
    """The canonical text of an action: `parse_action(format_action(a)).action == a` for valid actions."""
    if a.kind == "click":
        if a.element is not None:
            return f"click(element={a.element})"
        return f"click(x={a.x}, y={a.y})"
    if a.kind == "type":
        return f'type(text="{_escape(a.text or "")}")'
    if a.kind == "key":
        return f'key(key="{_escape(a.key or "")}")'
    if a.kind == "scroll":
        where = f", element={a.element}" if a.element is not None else (
            f", x={a.x}, y={a.y}" if a.x is not None else "")
        return f'scroll(direction="{a.direction}"{where})'
    if a.kind == "wait":
        return "wait()"
    if a.kind == "terminate":
        return f'terminate(status="{a.status}")'
    raise ValueError(f"unknown action kind {a.kind!r}: expected one of {list(ACTION_KINDS)}")


# ----------------------------------------------------------------------------- parsing


class _Bad(Exception):
    """A parse error; its message is the one-line reason."""


_NAME_RE = re.compile(r"\s*([A-Za-z_]\w*)\s*\(")
_ESCAPES = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "t": "\t", "r": "\r"}


class _Lexer:
    """Tokens of the argument list: numbers, strings, words, `=`, `,`, and [..] / (..) lists of numbers."""

    def __init__(self, s: str):
        self.s, self.i = s, 0

    def ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i].isspace():
            self.i += 1

    def peek(self) -> str:
        self.ws()
        return self.s[self.i] if self.i < len(self.s) else ""

    def value(self) -> Any:
        c = self.peek()
        if c in "\"'":
            return self.string(c)
        if c in "[(":
            return self.number_list("]" if c == "[" else ")")
        if c == "-" or c == "+" or c.isdigit() or c == ".":
            return self.number()
        if c.isalpha() or c == "_":
            return ("word", self.word())
        raise _Bad(f"unexpected {c!r} in the arguments" if c else "an argument is missing after '=' or ','")

    def string(self, q: str) -> str:
        self.i += 1
        out = []
        while self.i < len(self.s):
            c = self.s[self.i]
            if c == "\\" and self.i + 1 < len(self.s):
                nxt = self.s[self.i + 1]
                out.append(_ESCAPES.get(nxt, "\\" + nxt))
                self.i += 2
                continue
            if c == q:
                self.i += 1
                return "".join(out)
            out.append(c)
            self.i += 1
        raise _Bad("unterminated string: close the quote")

    def word(self) -> str:
        j = self.i
        while self.i < len(self.s) and (self.s[self.i].isalnum() or self.s[self.i] in "_+-"):
            self.i += 1
        return self.s[j:self.i]

    def number(self) -> int:
        m = re.compile(r"[+-]?\d*\.?\d*").match(self.s, self.i)
        tok = m.group(0) if m else ""
        self.i += len(tok)
        digits = tok.lstrip("+-")
        if not digits or digits == ".":
            raise _Bad(f"not a number: {tok!r}")
        if tok.startswith("-"):
            raise _Bad(f"negative number {tok}: coordinates and refs are >= 0")
        if len(digits.replace(".", "")) > MAX_DIGITS:
            raise _Bad(f"number too long ({len(digits)} characters): coordinates and refs are small integers")
        return int(round(float(digits)))

    def number_list(self, close: str) -> tuple:
        self.i += 1
        items = []
        while True:
            if self.peek() == close:
                self.i += 1
                return tuple(items)
            if items:
                if self.peek() != ",":
                    raise _Bad(f"expected ',' or {close!r} in a list")
                self.i += 1
            v = self.value()
            if not isinstance(v, int):
                raise _Bad("a list may hold only numbers, e.g. coordinate=[12, 40]")
            items.append(v)
            if len(items) > 4:
                raise _Bad("a list of more than 2 numbers")


def _split_args(inner: str) -> tuple[list, dict]:
    lex, pos, kw = _Lexer(inner), [], {}
    if not lex.peek():
        return pos, kw
    while True:
        start = lex.i
        lex.ws()
        name_m = re.compile(r"([A-Za-z_]\w*)\s*=(?!=)").match(lex.s, lex.i)
        if name_m:
            lex.i = name_m.end()
            name = name_m.group(1).lower()
            if name in kw:
                raise _Bad(f"argument {name!r} given twice")
            kw[name] = lex.value()
        else:
            if kw:
                raise _Bad("a positional argument after a keyword argument")
            pos.append(lex.value())
        c = lex.peek()
        if not c:
            return pos, kw
        if c != ",":
            raise _Bad(f"unexpected {c!r} after {inner[start:lex.i].strip()[:30]!r}: separate arguments with ','")
        lex.i += 1
        if not lex.peek():  # a trailing comma
            return pos, kw


def _word(v: Any, what: str) -> str:
    if isinstance(v, tuple) and len(v) == 2 and v[0] == "word":
        return v[1]
    if isinstance(v, str):
        return v
    raise _Bad(f"{what} must be text, got {v!r}")


def _int(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _Bad(f"{what} must be a non-negative integer, got {v[1] if isinstance(v, tuple) and v and v[0] == 'word' else v!r}")
    return v


def _take(kind: str, pos: list, kw: dict, allowed: tuple[str, ...]) -> dict:
    unknown = [k for k in kw if k not in allowed]
    if unknown:
        raise _Bad(f"{kind}: unknown argument {unknown[0]!r} (allowed: {', '.join(allowed) or 'none'})")
    return kw


def _build(kind: str, pos: list, kw: dict) -> Action:
    if kind == "click":
        kw = _take(kind, pos, kw, ("x", "y", "element", "coordinate"))
        if "coordinate" in kw:
            if pos or set(kw) - {"coordinate"}:
                raise _Bad("click: give coordinate=[x, y] alone")
            c = kw["coordinate"]
            if not (isinstance(c, tuple) and len(c) == 2 and all(isinstance(v, int) for v in c)):
                raise _Bad("click: coordinate must be [x, y]")
            return Action("click", x=c[0], y=c[1])
        if "element" in kw:
            if pos or set(kw) - {"element"}:
                raise _Bad("click: give either element=<ref> or x=, y=, not both")
            return Action("click", element=_int(kw["element"], "element"))
        if len(pos) == 1 and not kw:
            if isinstance(pos[0], tuple) and len(pos[0]) == 2 and all(isinstance(v, int) for v in pos[0]):
                return Action("click", x=pos[0][0], y=pos[0][1])
            return Action("click", element=_int(pos[0], "the element ref"))
        vals = dict(zip(("x", "y"), pos))
        for k in ("x", "y"):
            if k in kw:
                if k in vals:
                    raise _Bad(f"click: {k} given twice")
                vals[k] = kw[k]
        if len(pos) > 2 or set(vals) != {"x", "y"}:
            raise _Bad("click needs x and y (click(x=12, y=40)) or an element (click(element=7))")
        return Action("click", x=_int(vals["x"], "x"), y=_int(vals["y"], "y"))
    if kind == "type":
        kw = _take(kind, pos, kw, ("text",))
        if "text" in kw and pos:
            raise _Bad("type: text given twice")
        if len(pos) > 1:
            raise _Bad('type takes one text: type(text="...") (quote text that contains commas)')
        v = kw["text"] if "text" in kw else (pos[0] if pos else None)
        if not isinstance(v, str):
            raise _Bad('type needs text: type(text="hello")')
        if not v:
            raise _Bad("type needs a non-empty text")
        return Action("type", text=v)
    if kind == "key":
        kw = _take(kind, pos, kw, ("key",))
        if len(pos) + len(kw) != 1:
            raise _Bad('key takes one key: key(key="Enter")')
        name = _word(kw.get("key", pos[0] if pos else None), "key")
        canon = normalize_key(name)
        if canon is None:
            raise _Bad(f"unknown key {name[:30]!r}: use one of {', '.join(KEYS)}, a character, or Ctrl+<key>")
        return Action("key", key=canon)
    if kind == "scroll":
        kw = _take(kind, pos, kw, ("direction", "element", "x", "y"))
        if len(pos) > 1 or ("direction" in kw and pos):
            raise _Bad('scroll takes one direction: scroll(direction="down")')
        if "direction" not in kw and not pos:
            raise _Bad('scroll needs a direction: scroll(direction="down") or "up"')
        d = _word(kw.get("direction", pos[0] if pos else None), "direction").lower()
        if d not in DIRECTIONS:
            raise _Bad(f"unknown scroll direction {d[:20]!r}: up or down")
        if "element" in kw:
            if "x" in kw or "y" in kw:
                raise _Bad("scroll: give either element=<ref> or x=, y=, not both")
            return Action("scroll", direction=d, element=_int(kw["element"], "element"))
        if ("x" in kw) != ("y" in kw):
            raise _Bad("scroll: give both x and y")
        if "x" in kw:
            return Action("scroll", direction=d, x=_int(kw["x"], "x"), y=_int(kw["y"], "y"))
        return Action("scroll", direction=d)
    if kind == "wait":
        if pos or kw:
            raise _Bad("wait takes no arguments: wait()")
        return Action("wait")
    if kind == "terminate":
        kw = _take(kind, pos, kw, ("status",))
        if len(pos) + len(kw) != 1:
            raise _Bad('terminate needs a status: terminate(status="success") or "failure"')
        s = _word(kw.get("status", pos[0] if pos else None), "status").lower()
        if s not in STATUSES:
            raise _Bad(f"unknown status {s[:20]!r}: success or failure")
        return Action("terminate", status=s)
    raise _Bad(f"unknown action {kind!r}: use one of {', '.join(ACTION_KINDS)}")


def _call_end(text: str, open_at: int) -> int:
    """Index of the ')' that closes the '(' at `open_at`, skipping quoted strings; -1 if none."""
    depth, i, q = 0, open_at, None
    while i < len(text):
        c = text[i]
        if q:
            if c == "\\":
                i += 2
                continue
            if c == q:
                q = None
        elif c in "\"'":
            q = c
        elif c in "([":
            depth += 1
        elif c in ")]":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1


def _parse(text: Any) -> Action:
    if not isinstance(text, str):
        raise _Bad(f"expected the action as text, got {type(text).__name__}")
    s = text.strip()
    if not s:
        raise _Bad('empty action: write one action, e.g. click(element=3)')
    if len(s) > MAX_ACTION_CHARS:
        raise _Bad(f"action text too long ({len(s)} characters): write exactly one action")
    if s.startswith("```"):  # a fenced block: its content
        s = re.sub(r"^```[A-Za-z]*\s*", "", s)
        s = re.sub(r"\s*```$", "", s).strip()
    if len(s) >= 2 and s[0] == "`" and s[-1] == "`":
        s = s.strip("`").strip()
    s = s.rstrip(";").rstrip()
    m = _NAME_RE.match(s)
    if not m:
        raise _Bad(f"not an action call: {s[:40]!r}; write e.g. click(element=3)")
    kind = m.group(1).lower()
    if kind not in ACTION_KINDS:
        raise _Bad(f"unknown action {m.group(1)[:30]!r}: use one of {', '.join(ACTION_KINDS)}")
    open_at = m.end() - 1
    end = _call_end(s, open_at)
    if end < 0:
        raise _Bad(f"{kind}(: unbalanced parentheses or quotes")
    rest = s[end + 1:].strip().rstrip(";").strip()
    if rest:
        if _NAME_RE.match(rest):
            raise _Bad("more than one action: write exactly one action per step")
        raise _Bad(f"unexpected text after the action: {rest[:30]!r}")
    inner = s[open_at + 1:end]
    if _NAME_RE.search(inner) and kind != "type" and not re.search(r"[\"']", inner):
        raise _Bad(f"nested call inside {kind}(...): write exactly one action")
    if kind == "type" and not re.search(r"[\"']", inner):  # unquoted: the whole argument text
        bare = re.sub(r"^\s*text\s*=", "", inner, flags=re.IGNORECASE).strip()
        if not bare:
            raise _Bad('type needs a non-empty text: type(text="hello")')
        return Action("type", text=bare)
    pos, kw = _split_args(inner)
    return _build(kind, pos, kw)


def parse_action(text: str) -> ParsedAction:
    """One action from the policy's action text; never raises (the reason is in `error`)."""
    try:
        return ParsedAction(_parse(text))
    except _Bad as e:
        return ParsedAction(None, str(e))
    except Exception as e:  # a parser bug must not kill a rollout: report it as an invalid action
        return ParsedAction(None, f"unparseable action ({type(e).__name__})")

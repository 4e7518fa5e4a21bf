"""The DOM oracle: scripted policies that solve MiniWoB++ task families, and every valid action by replay.

**Policies.** `POLICIES[task](screen, memory) -> Decision`: the next action from MiniWoB's utterance fields
and the element list alone (what a text policy sees), plus a small per-episode `memory` (tabs already
opened, buttons already pressed). Most are stateless over the DOM: a field that does not hold its text yet
is clicked (when not focused) or typed into (when focused), a checkbox whose state is wrong is clicked, then
the submit button. Each decision carries a short thought and a note for the running *semantic context*
("Typed "karrie" into the username field."), the SecAgent step's summary the SFT rows teach.

Supported families (`SUPPORTED_TASKS`): one screen: click-button, click-link, click-tab, click-dialog,
click-dialog-2, focus-text, focus-text-2, email-inbox-delete, email-inbox-important; several steps:
click-button-sequence (2), click-option (2), click-tab-2 (2-3: open tabs until the link shows),
click-checkboxes(-large) (one click per checkbox to change + Submit), enter-text, enter-text-2 (3),
login-user, enter-password (5), email-inbox-reply, email-inbox-forward (5: open, press, click the field,
type, send). Measured on this machine (2 shared cores, `nice`): the default record set (8 task types x 40
seeds + 3 held-out types x 20 seeds, 380 episodes, 847 steps) took 17 minutes with replay, 0 failures,
0 steps without a replay; about 1 s per single-screen episode, 5 s for login-user, 7 s for click-checkboxes
(every checkbox click changes the page, so each candidate pays a replay), 35-50 s for
click-checkboxes-large.

**Execution.** A click on an element is recorded as ``click(element=ref)`` but executed as a click at the
centre of the element's box (integer pixels, origin top-left): what a policy clicking by point does, and
what the static benchmark checks (a point inside a valid box). Text nodes (MiniWoB ``t`` pseudo-elements)
have negative refs, which the action format does not take; they are valid click targets by point (a
checkbox's label text toggles it) and are recorded as ``click(x=cx, y=cy)`` at their box centre (the
matcher takes the smallest box holding a gold point: the text node's own).

**Valid actions by replay** (`valid_actions_by_replay`). For each step, the page is brought back to the
step's screen (reset to the same task and seed, replay the recorded actions before it) and each candidate
click is tried: every leaf element whose box centre lies on the screen (text nodes included), in DOM order
with the oracle's own target first, at most `max_candidates` (default 40) per step. A candidate is valid
when the next state's digest (`state_digest`: every element's tag, text, value, checked/selected,
visibility and box, the focus of inputs, + MiniWoB's done flag and raw reward; only the raw reward once the
episode is over; refs are left out since text nodes get new refs every step) equals the oracle action's. Cost bound: after a candidate that left the digest unchanged (a click on plain
text), the next candidate is tried from the same page without a replay, so only state-changing candidates
pay for a reset + replay; the page is also replayed when the MiniWoB episode clock (10 s) gets near its end.
This assumes a click that changes nothing in the digest changed nothing the task reads (JS state that never
shows in the DOM); no supported family has such state. Steps whose action is not a click (type, key) have
only their own action: ``type`` writes into the focused field, so the target field is the previous click's
choice, not this step's. If replaying the oracle's own click does not reproduce its recorded next state, the step
is tried once more from freshly loaded pages (email-inbox keeps state across the episodes of one page
load, so the first episode after a load differs from later ones); if that does not reproduce it either,
the step keeps only the oracle action and says so (``valid_actions_source: "oracle"`` instead of
``"replay"``; `record` counts these steps).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from envs.gui.actions import Action, format_action
from envs.gui.episodes import episode_id

log = logging.getLogger(__name__)

__all__ = [
    "Decision",
    "OracleError",
    "POLICIES",
    "SUPPORTED_TASKS",
    "element_dict",
    "record_episode",
    "state_digest",
    "valid_actions_by_replay",
]

MAX_CANDIDATES = 40
MAX_STEPS = 15
# MiniWoB pages end an episode after 10 s unless the session sets its clock (`episode_seconds`): replays
# restart well before the page's clock runs out
_CLOCK_FRACTION = 0.6


class OracleError(RuntimeError):
    """The oracle cannot act on this screen (an unsupported task, a page it does not recognise)."""


@dataclass
class Decision:
    action: Action
    thought: str
    note: str  # what this step did, one sentence, appended to the semantic context
    target: Any = None  # the clicked Element (clicks), else None


# ----------------------------------------------------------------------------- element helpers


def _centre(box: Sequence[float]) -> tuple[int, int]:
    left, top, width, height = box
    return int(math.floor(left + width / 2)), int(math.floor(top + height / 2))


def _value_str(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def element_dict(el: Any) -> dict:
    """An `envs.gui.browser.Element` as the episode format stores it: the browser's whole snapshot
    (`Element.to_dict`), ``box`` as ``[left, top, width, height]`` ints and ``value`` a string."""
    d = el.to_dict() if hasattr(el, "to_dict") else {
        "ref": el.ref, "tag": el.tag, "text": el.text, "value": el.value, "classes": getattr(el, "classes", ""),
        "id": getattr(el, "id", ""), "focused": bool(getattr(el, "focused", False))}
    d["ref"] = int(el.ref)
    d["text"] = str(el.text or "")
    d["box"] = [int(round(v)) for v in el.box]
    d["value"] = _value_str(d.get("value"))
    return d


def _norm(text: str | None) -> str:
    return " ".join((text or "").split())


def _checked(el: Any) -> bool:
    checked = getattr(el, "checked", None)
    return bool(checked) if checked is not None else _value_str(el.value).lower() == "true"


def _visible(el: Any, size: tuple[int, int]) -> bool:
    cx, cy = _centre(el.box)
    return 0 <= cx < size[0] and 0 <= cy < size[1] and el.box[2] > 0 and el.box[3] > 0


def _screen_size(screen: Any) -> tuple[int, int]:
    size = getattr(screen, "size", None)
    if size is not None:
        return tuple(size)
    from envs.gui.browser import TASK_SIZE

    return TASK_SIZE


def _fields(screen: Any) -> dict:
    return dict(screen.fields or {})


def _click(el: Any, thought: str, note: str) -> Decision:
    return Decision(Action(kind="click", element=int(el.ref)), thought, note, target=el)


def _type(text: str, thought: str, note: str) -> Decision:
    return Decision(Action(kind="type", text=text), thought, note)


def _by_text(screen: Any, text: str, *, tags: Sequence[str] | None = None, exact: bool = True) -> list:
    want = _norm(text)
    out = []
    for el in screen.elements:
        if tags is not None and el.tag not in tags:
            continue
        have = _norm(el.text)
        if have == want if exact else have.lower() == want.lower():
            out.append(el)
    return out


def _one(found: list, what: str, screen: Any) -> Any:
    if not found:
        raise OracleError(f"{screen.task} seed {screen.seed}: no {what} on the screen")
    return found[0]


def _field_name(el: Any) -> str:
    """'the username field' from the element's id (MiniWoB's forms name their inputs), else 'the text field'."""
    ident = (getattr(el, "id", "") or "").strip()
    if ident and ident not in ("tt",) and not re.fullmatch(r"tt\d+", ident):
        return f"the {ident} field"
    return "the text field"


def _fill(el: Any, text: str, field_name: str) -> Decision | None:
    """Click the field when it is not focused, type `text` when it is; None once it holds `text`."""
    if _value_str(el.value) == text:
        return None
    if not getattr(el, "focused", False):
        return _click(el, f"{field_name[0].upper()}{field_name[1:]} must hold {text!r}; I select it first.",
                      f"Clicked {field_name}.")
    return _type(text, f"{field_name[0].upper()}{field_name[1:]} is focused; I type {text!r}.",
                 f'Typed "{text}" into {field_name}.')


def _submit(screen: Any, label: str = "Submit") -> Decision:
    btn = _one(_by_text(screen, label, tags=("button",), exact=False), f'"{label}" button', screen)
    return _click(btn, f"Everything is filled in; I press {_norm(btn.text)}.", f"Clicked {_norm(btn.text)}.")


def _label_of(screen: Any, box_el: Any) -> str:
    """The text to the right of a checkbox / radio on the same line (MiniWoB wraps them in a <label> whose text
    node follows the input; the element list has no parents, so pair them by geometry)."""
    left, top, width, height = box_el.box
    cy = top + height / 2
    best, best_dx = "", None
    for el in screen.elements:
        if el is box_el or not _norm(el.text) or el.tag.startswith("input"):
            continue
        l2, t2, w2, h2 = el.box
        if l2 < left + width - 1 or not (t2 <= cy <= t2 + h2):
            continue
        dx = l2 - (left + width)
        if best_dx is None or dx < best_dx:
            best, best_dx = _norm(el.text), dx
    return best


# ----------------------------------------------------------------------------- policies


def _click_by_label(kind: str) -> Callable:
    """click-button / click-link: click the (first) element whose text is the target."""

    def policy(screen, memory):
        target = _fields(screen).get("target", "")
        tags = ("button",) if kind == "button" else None
        found = [el for el in _by_text(screen, target, tags=tags)
                 if kind == "button" or "alink" in (el.classes or "") or el.tag == "a"]
        el = _one(found, f"{kind} {target!r}", screen)
        return _click(el, f'The {kind} "{target}" is on the screen; I click it.', f'Clicked the {kind} "{target}".')

    return policy


def _click_tab(screen, memory):
    target = _fields(screen).get("target", "")
    el = _one(_by_text(screen, f"Tab #{target}"), f"tab #{target}", screen)
    return _click(el, f"I need Tab #{target}; I click it.", f"Clicked Tab #{target}.")


def _click_tab_2(screen, memory):
    target = _fields(screen).get("target", "")
    links = [el for el in _by_text(screen, target) if "alink" in (el.classes or "")]
    if links:
        return _click(links[0], f'The link "{target}" is visible; I click it.', f'Clicked the link "{target}".')
    tabs = [el for el in screen.elements if "ui-tabs-anchor" in (el.classes or "")]
    seen = memory.setdefault("tabs", set())
    # the first tab is open at the start: count it as seen
    if tabs and not seen:
        seen.add(_norm(tabs[0].text))
    for tab in tabs:
        if _norm(tab.text) not in seen:
            seen.add(_norm(tab.text))
            return _click(tab, f'The link "{target}" is not on this tab; I open {_norm(tab.text)}.',
                          f'Opened {_norm(tab.text)} looking for the link "{target}".')
    raise OracleError(f"{screen.task} seed {screen.seed}: link {target!r} not found on any tab")


def _focus_text(screen, memory):
    inputs = [el for el in screen.elements if el.tag == "input_text"]
    el = _one(inputs, "text box", screen)
    return _click(el, "I click into the text box to focus it.", "Clicked into the text box.")


_ORDINAL = re.compile(r"(\d+)")


def _focus_text_2(screen, memory):
    n = int(_ORDINAL.search(_fields(screen).get("target", "1")).group(1))
    inputs = [el for el in screen.elements if el.tag == "input_text"]
    if len(inputs) < n:
        raise OracleError(f"{screen.task} seed {screen.seed}: no text box #{n}")
    el = inputs[n - 1]
    return _click(el, f"I click into text box number {n}.", f"Clicked into text box number {n}.")


def _enter_text(screen, memory):
    target = _fields(screen).get("target", "")
    el = _one([e for e in screen.elements if e.tag == "input_text"], "text field", screen)
    return _fill(el, target, "the text field") or _submit(screen)


def _enter_text_2(screen, memory):
    f = _fields(screen)
    text = f.get("text", "")
    text = text.upper() if f.get("case") == "upper" else text.lower()
    el = _one([e for e in screen.elements if e.tag == "input_text"], "text field", screen)
    return _fill(el, text, "the text field") or _submit(screen)


def _login_user(screen, memory):
    f = _fields(screen)
    user = _one([e for e in screen.elements if e.id == "username"], "username field", screen)
    pw = _one([e for e in screen.elements if e.id == "password"], "password field", screen)
    return (_fill(user, f.get("username", ""), "the username field")
            or _fill(pw, f.get("password", ""), "the password field") or _submit(screen, "Login"))


def _enter_password(screen, memory):
    target = _fields(screen).get("target", "")
    pw = _one([e for e in screen.elements if e.id == "password"], "password field", screen)
    verify = _one([e for e in screen.elements if e.id == "verify"], "verify field", screen)
    return _fill(pw, target, "the password field") or _fill(verify, target, "the verify field") or _submit(screen)


def _click_checkboxes(screen, memory):
    f = _fields(screen)
    wanted = {_norm(v) for k, v in f.items() if k.startswith("target")}
    for el in screen.elements:
        if el.tag != "input_checkbox":
            continue
        label = _label_of(screen, el)
        if (label in wanted) != _checked(el):
            verb = "check" if label in wanted else "uncheck"
            return _click(el, f'"{label}" must be {verb}ed; I click its checkbox.', f'{verb.capitalize()}ed "{label}".')
    return _submit(screen)


def _click_option(screen, memory):
    target = _norm(_fields(screen).get("target", ""))
    for el in screen.elements:
        if el.tag == "input_radio" and _label_of(screen, el) == target:
            if _checked(el):
                return _submit(screen)
            return _click(el, f'I select the option "{target}".', f'Selected "{target}".')
    raise OracleError(f"{screen.task} seed {screen.seed}: no option {target!r}")


def _click_dialog(screen, memory):
    x = _one([e for e in screen.elements if "ui-icon-closethick" in (e.classes or "")], 'dialog "x"', screen)
    return _click(x, 'The dialog has an "x" in its title bar; I click it.', "Closed the dialog with its x.")


def _click_dialog_2(screen, memory):
    target = _fields(screen).get("target", "")
    if target.lower() == "x":
        return _click_dialog(screen, memory)
    el = _one(_by_text(screen, target, tags=("button",)), f"dialog button {target!r}", screen)
    return _click(el, f'The dialog has a "{target}" button; I click it.', f'Clicked "{target}" in the dialog.')


def _click_button_sequence(screen, memory):
    pressed = memory.setdefault("pressed", [])
    label = "ONE" if not pressed else "TWO"
    el = _one(_by_text(screen, label, tags=("button",)), f"button {label}", screen)
    pressed.append(label)
    return _click(el, f"Button {label} comes {'first' if label == 'ONE' else 'next'}; I click it.",
                  f"Clicked button {label}.")


def _sender_rows_or_scroll(screen, memory, sender: str) -> tuple[list, Decision | None]:
    """The visible inbox rows of `sender`'s email, or (no rows) the scroll-down step that looks further; after
    6 scrolls the sender is not in the inbox: an OracleError."""
    rows = [e for e in screen.elements if "email-sender" in (e.classes or "") and _norm(e.text) == _norm(sender)
            and getattr(e, "visible", True)]
    if rows:
        return rows, None
    memory["scrolls"] = memory.get("scrolls", 0) + 1
    if memory["scrolls"] > 6:
        raise OracleError(f"{screen.task} seed {screen.seed}: no email by {sender!r}")
    return rows, Decision(Action(kind="scroll", direction="down"),
                          f"No email by {sender} on the screen; I scroll down.", "Scrolled down the inbox.")


def _email_icon(icon: str, verb: str) -> Callable:
    """email-inbox-delete / -important: the `icon` ("trash" / "star") in the row of the sender's email;
    scroll down when the sender is not on the screen yet."""

    def policy(screen, memory):
        sender = _fields(screen).get("by", "")
        rows, scroll = _sender_rows_or_scroll(screen, memory, sender)
        if scroll is not None:
            return scroll
        top = rows[0].box[1]
        icons = [e for e in screen.elements if icon in (e.classes or "").split() and getattr(e, "visible", True)
                 and top - 2 <= e.box[1] <= top + rows[0].box[3] + 6]
        el = _one(icons, f"{icon} icon of the email by {sender!r}", screen)
        return _click(el, f"The email by {sender} has a {icon} icon on its row; I click it.",
                      f"Clicked the {icon} icon of the email by {sender} to {verb}.")

    return policy


def _email_compose(kind: str) -> Callable:
    """email-inbox-reply / -forward: open the sender's email, press Reply / Forward, fill the reply text /
    the recipient, send. Stateless over the DOM: each screen shows which of these stages the page is in."""
    field_id, send_class, value_key = (("reply-text", "send-reply", "message") if kind == "reply"
                                       else ("forward-sender", "send-forward", "to"))

    def policy(screen, memory):
        f = _fields(screen)
        shown = [e for e in screen.elements if getattr(e, "visible", True)]
        field_el = next((e for e in shown if e.id == field_id or field_id in (e.classes or "").split()), None)
        if field_el is not None:  # the compose form
            name = "the reply text" if kind == "reply" else "the recipient field"
            step = _fill(field_el, f.get(value_key, ""), name)
            if step is not None:
                return step
            send = _one([e for e in shown if e.id == send_class or send_class in (e.classes or "").split()],
                        "send button", screen)
            return _click(send, "The message is ready; I press send.", "Clicked send.")
        label = [e for e in shown if _norm(e.text) == kind.capitalize()]
        if label and any("email-body" in (e.classes or "") for e in shown):  # the email is open
            # the button is the icon above its label (a click on the small label does not always reach it)
            lx = label[0].box[0] + label[0].box[2] / 2
            icons = [e for e in shown if "icon" in (e.classes or "").split() and e.box[1] < label[0].box[1]
                     and e.box[0] <= lx <= e.box[0] + e.box[2]]
            return _click(icons[0] if icons else label[0], f"The email is open; I press {kind.capitalize()}.",
                          f"Clicked {kind.capitalize()}.")
        sender = f.get("by", "")
        rows, scroll = _sender_rows_or_scroll(screen, memory, sender)
        if scroll is not None:
            return scroll
        return _click(rows[0], f"I open the email by {sender}.", f"Opened the email by {sender}.")

    return policy


POLICIES: dict[str, Callable[[Any, dict], Decision]] = {
    "click-button": _click_by_label("button"),
    "click-link": _click_by_label("link"),
    "click-tab": _click_tab,
    "click-tab-2": _click_tab_2,
    "focus-text": _focus_text,
    "focus-text-2": _focus_text_2,
    "enter-text": _enter_text,
    "enter-text-2": _enter_text_2,
    "login-user": _login_user,
    "enter-password": _enter_password,
    "click-checkboxes": _click_checkboxes,
    "click-checkboxes-large": _click_checkboxes,
    "click-option": _click_option,
    "click-dialog": _click_dialog,
    "click-dialog-2": _click_dialog_2,
    "click-button-sequence": _click_button_sequence,
    "email-inbox-delete": _email_icon("trash", "delete it"),
    "email-inbox-important": _email_icon("star", "mark it as important"),
    "email-inbox-reply": _email_compose("reply"),
    "email-inbox-forward": _email_compose("forward"),
}
SUPPORTED_TASKS = tuple(POLICIES)


# ----------------------------------------------------------------------------- state digest


_DOM_ELEMENT_KEYS = ("tag", "text", "value", "checked", "selected", "focused", "visible", "box")


def _takes_keys(tag: str) -> bool:
    return tag.startswith("input") or tag in ("textarea", "select")


def state_digest(screen: Any, *, done: bool, raw_reward: float) -> str:
    """A hash of the state a step leads to. A finished episode is its raw reward alone (what is left on the page
    after the end does not matter: clicking either of two equivalent buttons ends it the same). Otherwise each
    element's tag/text/value/checked/selected/visibility/box in DOM order, and focus where it decides where
    typing goes (inputs, textareas, selects; a clicked button's focus changes nothing). Refs are left out:
    text nodes are renumbered every step."""
    if done:
        items: list = []
    else:
        dom_elements = (getattr(screen, "dom", None) or {}).get("elements")
        if dom_elements:
            items = [[el.get(k) for k in _DOM_ELEMENT_KEYS] for el in dom_elements]
        else:
            items = [[el.tag, el.text, _value_str(el.value), getattr(el, "checked", None),
                      getattr(el, "selected", None), bool(getattr(el, "focused", False)),
                      getattr(el, "visible", True), list(el.box)] for el in screen.elements]
        for item in items:
            item[5] = bool(item[5]) and _takes_keys(str(item[0]))
            item[-1] = [int(round(v)) for v in item[-1]]  # sub-pixel layout noise is not a different state
    blob = json.dumps([bool(done), round(float(raw_reward), 4), items], sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()


def _exec_action(decision_action: Action, screen: Any) -> Action:
    """What is sent to the browser: a click on an element becomes a click at its box centre."""
    if decision_action.kind == "click" and decision_action.element is not None:
        el = next((e for e in screen.elements if e.ref == decision_action.element), None)
        if el is None:
            raise OracleError(f"{screen.task} seed {screen.seed}: element {decision_action.element} not on the screen")
        x, y = _centre(el.box)
        return Action(kind="click", x=x, y=y)
    return decision_action


def _raw_reward(reward: float, info: dict) -> float:
    return float(info.get("raw_reward", reward) if isinstance(info, dict) else reward)


# ----------------------------------------------------------------------------- recording


@dataclass
class _Recorded:
    screens: list = field(default_factory=list)  # the screen each step acted on
    decisions: list = field(default_factory=list)
    executed: list = field(default_factory=list)  # Actions sent to the browser
    pre: list = field(default_factory=list)  # digest before each step
    post: list = field(default_factory=list)  # digest after each step
    after: list = field(default_factory=list)  # the screen after each step
    done: bool = False
    raw_reward: float = 0.0


def _play(session: Any, task: str, seed: int, max_steps: int) -> _Recorded:
    policy = POLICIES.get(task)
    if policy is None:
        raise OracleError(f"no oracle for task {task!r} (supported: {', '.join(SUPPORTED_TASKS)})")
    rec = _Recorded()
    screen = session.reset(task, seed)
    memory: dict = {}
    for _ in range(max_steps):
        decision = policy(screen, memory)
        executed = _exec_action(decision.action, screen)
        rec.pre.append(state_digest(screen, done=False, raw_reward=0.0))
        nxt, reward, done, info = session.step(executed)
        raw = _raw_reward(reward, info)
        rec.screens.append(screen)
        rec.decisions.append(decision)
        rec.executed.append(executed)
        rec.post.append(state_digest(nxt, done=done, raw_reward=raw))
        rec.after.append(nxt)
        screen = nxt
        if done:
            rec.done, rec.raw_reward = True, raw
            break
    return rec


def _candidates(screen: Any, target: Any, size: tuple[int, int], limit: int) -> list:
    """Leaf elements with their centre on the screen, the oracle's target first, one per centre point."""
    out, points = [], set()
    ordered = ([target] if target is not None else []) + [e for e in screen.elements if e is not target]
    for el in ordered:
        if not getattr(el, "is_leaf", True) and el is not target:
            continue
        if not _visible(el, size) or not getattr(el, "visible", True):
            continue
        pt = _centre(el.box)
        if pt in points:
            continue
        points.add(pt)
        out.append(el)
        if len(out) >= limit:
            break
    return out


def _reload_page(session: Any) -> None:
    """Make the session's next reset load the task page afresh (`MiniWobSession` loads it only when the task
    changes, and remembers which one it has in `_loaded_task`)."""
    if hasattr(session, "_loaded_task"):
        session._loaded_task = None


def _try_candidates(session, task, seed, rec, i, size, max_candidates, clock_limit, counters, *, fresh: bool):
    """(valid action texts, whether the oracle's own click reproduced its recorded next state) for step i."""
    decision = rec.decisions[i]
    at_step, clock = False, 0.0
    valid, own_ok = [], False

    def goto() -> None:
        nonlocal at_step, clock
        if fresh:
            _reload_page(session)
        s = session.reset(task, seed)
        for a in rec.executed[:i]:
            s, _, _, _ = session.step(a)
        counters["replays"] += 1
        if state_digest(s, done=False, raw_reward=0.0) != rec.pre[i]:
            raise _NotReplayable()
        at_step, clock = True, time.monotonic()

    try:
        for el in _candidates(rec.screens[i], decision.target, size, max_candidates):
            if not at_step or time.monotonic() - clock > clock_limit:
                goto()
            x, y = _centre(el.box)
            nxt, reward, done, info = session.step(Action(kind="click", x=x, y=y))
            counters["candidates"] += 1
            d = state_digest(nxt, done=done, raw_reward=_raw_reward(reward, info))
            if d == rec.post[i]:
                # text nodes have negative refs, which the action format does not take: their valid
                # click is the point at their centre (matching takes the smallest box holding it)
                valid.append(format_action(Action(kind="click", element=int(el.ref)) if el.ref >= 0
                                           else Action(kind="click", x=x, y=y)))
                own_ok = own_ok or el is decision.target
            at_step = d == rec.pre[i]
    except _NotReplayable:
        return [], False
    return valid, own_ok


def valid_actions_by_replay(
    session: Any, task: str, seed: int, rec: _Recorded, *, max_candidates: int = MAX_CANDIDATES
) -> tuple[list[list[str]], list[str], dict]:
    """Per step: the canonical texts of every valid action and where they come from ("replay" | "oracle"),
    + counters (replays, candidates tried). See the module docstring for the rule and its cost bound."""
    valid_all, sources = [], []
    counters = {"replays": 0, "candidates": 0, "nondeterministic_steps": 0}
    clock_limit = _CLOCK_FRACTION * float(getattr(session, "episode_seconds", 10.0))
    for i, decision in enumerate(rec.decisions):
        own = format_action(decision.action)
        if decision.action.kind != "click" or decision.target is None:
            valid_all.append([own])
            sources.append("replay")
            continue
        screen = rec.screens[i]
        size = _screen_size(screen)
        valid, own_ok = _try_candidates(session, task, seed, rec, i, size, max_candidates, clock_limit, counters,
                                        fresh=False)
        if not own_ok:
            # pages that keep state across episodes (a reply box's text, an opened email) differ between the
            # first episode on a freshly loaded page and later ones: try once more from fresh page loads
            valid, own_ok = _try_candidates(session, task, seed, rec, i, size, max_candidates, clock_limit,
                                            counters, fresh=True)
        if own_ok:
            valid_all.append(valid)
            sources.append("replay")
        else:
            counters["nondeterministic_steps"] += 1
            log.warning("%s seed %d step %d: replay does not reproduce the oracle's next state; "
                        "keeping only the oracle action", task, seed, i)
            valid_all.append([own])
            sources.append("oracle")
    return valid_all, sources, counters


class _NotReplayable(Exception):
    pass


def record_episode(
    session: Any,
    task: str,
    seed: int,
    *,
    screens_dir: str | Path | None = None,
    screens_rel: str = "",
    max_steps: int = MAX_STEPS,
    max_candidates: int = MAX_CANDIDATES,
    replay: bool = True,
) -> tuple[dict, dict]:
    """Play the oracle on (task, seed) in `session` (an `envs.gui.browser.MiniWobSession`) and return
    (episode in the episode format, counters). Screenshots go to ``screens_dir/<task>/seed<seed>/step<i>.png``
    and are referenced as ``screens_rel/<task>/seed<seed>/step<i>.png`` (relative to the episodes file)."""
    from envs.gui.milestones import milestone_states

    t0 = time.monotonic()
    rec = _play(session, task, seed, max_steps)
    if replay:
        valid, sources, counters = valid_actions_by_replay(session, task, seed, rec, max_candidates=max_candidates)
    else:
        valid = [[format_action(d.action)] for d in rec.decisions]
        sources, counters = ["oracle"] * len(rec.decisions), {}
    first = rec.screens[0]
    fields = _fields(first)
    steps, context = [], ""
    for i, (screen, decision) in enumerate(zip(rec.screens, rec.decisions)):
        shot = None
        if screens_dir is not None and getattr(screen, "screenshot", None) is not None:
            rel = Path(task) / f"seed{seed}" / f"step{i}.png"
            path = Path(screens_dir) / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            screen.screenshot.save(path)
            shot = str(Path(screens_rel) / rel) if screens_rel else str(rel)
        context = f"{context} {decision.note}".strip()
        after = rec.after[i]
        dom = dict(getattr(after, "dom", None) or {})
        dom.setdefault("fields", fields)
        steps.append({
            "screenshot": shot,
            "elements": [element_dict(e) for e in screen.elements],
            "action": format_action(decision.action),
            "valid_actions": valid[i],
            "valid_actions_source": sources[i],
            "semantic_context": context,
            "thought": decision.thought,
            "step_instruction": None,
            "milestones": milestone_states(task, dom, fields),
        })
    w, h = _screen_size(first)
    episode = {
        "episode_id": episode_id(task, seed),
        "source": "miniwob-oracle",
        "task": task,
        "seed": seed,
        "instruction": first.utterance,
        "screen_size": [int(w), int(h)],
        "steps": steps,
        "success": bool(rec.done and rec.raw_reward > 0),
        "raw_reward": rec.raw_reward,
    }
    counters = {**counters, "seconds": time.monotonic() - t0}
    return episode, counters

"""Per-task milestones of MiniWoB++ tasks (AndroidLens-style dynamic evaluation) and Average Task Progress.

A milestone is a named predicate over the DOM snapshot of one screen (`envs.gui.browser.Screen.dom`).
The predicates read only this part of the snapshot:

    dom = {"elements": [{"ref": int, "tag": str, "text": str, "value": str, "id": str, "classes": str,
                         "checked": bool | None, "selected": bool | None, "focused": bool,
                         "parent": int (optional: the parent element's ref),
                         "box": [l, t, w, h] (optional: pairs a checkbox with its label without parents),
                         "visible": bool (optional: false = on the page but not seen)}, ...],
           "done": bool,            # the page ended the episode (MiniWoB's core.endEpisode ran)
           "reward": float,         # MiniWoB's raw reward once done ("raw_reward" is read too)
           "fields": {name: value}} # MiniWoB's utterance fields (or passed as `fields=`)

Tags are compared case-insensitively (MiniWoB lower-cases them: "input_text", "button", "span", "t" for
text pseudo-elements). A checkbox / radio is checked when `checked` is true, or, in a snapshot without
`checked`, when its `value` is "true" (MiniWoB puts `element.checked` in `value` for those inputs).

Progress is sticky: `MilestoneTracker` ORs each step's states, so a milestone reached once stays
reached (the page may reset after the final submit, and AndroidLens counts milestones reached during
the run). `task_progress(states, success)` = reached / total, and 1.0 for a successful episode (a solved
task has passed its milestones, whatever path it took). ATP = the mean of task_progress over episodes
(`envs.gui.metrics`).

The final milestone of every task ("submitted", "clicked", "link clicked", ...) is "the page ended the
episode with a positive reward": submitting a wrong form is not progress. Tasks without their own
list get one milestone, "completed" (the same predicate), so ATP is defined for every task and equals
the success rate there.

`MILESTONES[task]` is the list of (name, predicate) pairs, or, for tasks whose milestones depend on the
instance (one per checkbox target), a function of the fields giving that list; `milestones_for(task,
fields)` resolves both.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

__all__ = ["MILESTONES", "Predicate", "milestones_for", "milestone_names", "milestone_states", "MilestoneTracker",
           "task_progress", "succeeded"]

Predicate = Callable[[Mapping], bool]


# ----------------------------------------------------------------------------- snapshot readers


def _elements(dom: Mapping) -> list[Mapping]:
    return [e for e in (dom.get("elements") or ()) if isinstance(e, Mapping)]


def _tag(el: Mapping) -> str:
    return str(el.get("tag") or "").lower()


def _fields(dom: Mapping) -> Mapping:
    return dom.get("fields") or {}


def _field(dom: Mapping, key: str) -> str | None:
    value = _fields(dom).get(key)
    return None if value is None else str(value)


def _by_id(dom: Mapping, element_id: str) -> Mapping | None:
    return next((e for e in _elements(dom) if e.get("id") == element_id), None)


def _value(el: Mapping | None) -> str:
    return "" if el is None or el.get("value") is None else str(el.get("value"))


def _checked(el: Mapping) -> bool:
    if el.get("checked") is not None:
        return bool(el.get("checked"))
    return str(el.get("value")).strip().lower() == "true"


def succeeded(dom: Mapping) -> bool:
    """The page ended the episode with a positive reward."""
    reward = dom.get("reward", dom.get("raw_reward"))
    return bool(dom.get("done")) and reward is not None and float(reward) > 0


def _labelled(dom: Mapping, kind: str) -> list[tuple[Mapping, str]]:
    """(checkbox or radio input, its label text) pairs.

    MiniWoB renders `<label><input type=checkbox>name</label>`: the input and a text pseudo-element
    are children of the label. With `parent` refs in the snapshot the label is exact; without them the
    label is the text element nearest to the right of the input on the same line (same vertical centre
    within half the input's height), which is how the page lays them out.
    """
    els = _elements(dom)
    inputs = [e for e in els if _tag(e) == f"input_{kind}"]
    texts = [e for e in els if e.get("text") and _tag(e) not in (f"input_{kind}",)]
    out = []
    for inp in inputs:
        label = None
        if inp.get("parent") is not None:
            sibs = [e for e in texts if e.get("parent") == inp.get("parent")]
            label = " ".join(str(e["text"]) for e in sibs) if sibs else None
        if label is None and inp.get("box") is not None:
            il, it, iw, ih = (float(v) for v in inp["box"])
            cy = it + ih / 2
            right = [e for e in texts if e.get("box") is not None and float(e["box"][0]) >= il + iw - 1
                     and abs(float(e["box"][1]) + float(e["box"][3]) / 2 - cy) <= max(ih / 2, 1)]
            if right:
                label = str(min(right, key=lambda e: float(e["box"][0]))["text"])
        out.append((inp, (label or "").strip()))
    return out


# ----------------------------------------------------------------------------- predicates


def _field_equals(element_id: str, field: str, *, case: str | None = None) -> Predicate:
    """The input `#element_id` holds the field's value (exactly, as the task checks it)."""

    def pred(dom: Mapping) -> bool:
        target = _field(dom, field)
        if target is None:
            return False
        if case == "lower":
            target = target.lower()
        elif case == "upper":
            target = target.upper()
        return _value(_by_id(dom, element_id)) == target

    return pred


def _enter_text_2(dom: Mapping) -> bool:
    return _field_equals("tt", "text", case=(_field(dom, "case") or "").lower() or None)(dom)


def _focused(element_id: str) -> Predicate:
    def pred(dom: Mapping) -> bool:
        el = _by_id(dom, element_id)
        return bool(el is not None and el.get("focused")) or succeeded(dom)

    return pred


def _target_checked(index: int) -> Predicate:
    def pred(dom: Mapping) -> bool:
        target = _field(dom, f"target {index}")
        return target is not None and any(label == target and _checked(inp)
                                          for inp, label in _labelled(dom, "checkbox"))

    return pred


def _option_selected(dom: Mapping) -> bool:
    target = _field(dom, "target")
    return target is not None and any(label == target and _checked(inp) for inp, label in _labelled(dom, "radio"))


def _link_visible(dom: Mapping) -> bool:
    """click-tab-2: the tab holding the target link is open (a closed tab's links have no size, so MiniWoB
    leaves them out of the snapshot; an element the browser marks `visible: false` does not count either)."""
    target = _field(dom, "target")
    return target is not None and any("alink" in str(e.get("classes") or "").split() and str(e.get("text")) == target
                                      and e.get("visible", True) is not False for e in _elements(dom))


def _list_item_selected(dom: Mapping) -> bool:
    """choose-list: the <select> holds the target (needs the select's `value` or `selected` option)."""
    target = _field(dom, "target")
    if target is None:
        return False
    for e in _elements(dom):
        if _tag(e) == "select" and _value(e) == target:
            return True
        if _tag(e) == "option" and e.get("selected") and str(e.get("text")) == target:
            return True
    return False


def _checkbox_milestones(fields: Mapping) -> list[tuple[str, Predicate]]:
    n = sum(1 for k in fields if str(k).startswith("target "))
    return [(f"{fields[f'target {i}']} checked", _target_checked(i)) for i in range(n)] + [("submitted", succeeded)]


_CLICKED = [("clicked", succeeded)]

MILESTONES: dict[str, list[tuple[str, Predicate]] | Callable[[Mapping], list[tuple[str, Predicate]]]] = {
    "login-user": [("username filled", _field_equals("username", "username")),
                   ("password filled", _field_equals("password", "password")),
                   ("submitted", succeeded)],
    "enter-password": [("password filled", _field_equals("password", "target")),
                       ("verify filled", _field_equals("verify", "target")),
                       ("submitted", succeeded)],
    "enter-text": [("field filled", _field_equals("tt", "target")), ("submitted", succeeded)],
    "enter-text-dynamic": [("field filled", _field_equals("tt", "target")), ("submitted", succeeded)],
    "enter-text-2": [("field filled", _enter_text_2), ("submitted", succeeded)],
    "focus-text": [("focused", _focused("tt"))],
    "focus-text-2": [("focused", _focused("tt"))],
    "click-checkboxes": _checkbox_milestones,
    "click-checkboxes-large": _checkbox_milestones,
    "click-checkboxes-transfer": _checkbox_milestones,
    "click-option": [("option selected", _option_selected), ("submitted", succeeded)],
    "click-tab-2": [("tab opened", _link_visible), ("link clicked", succeeded)],
    "choose-list": [("item selected", _list_item_selected), ("submitted", succeeded)],
}
for _task in ("click-tab-2-easy", "click-tab-2-medium", "click-tab-2-hard"):
    MILESTONES[_task] = MILESTONES["click-tab-2"]
MILESTONES["login-user-popup"] = MILESTONES["login-user"]
# single-click tasks: the one click is the task
for _task in ("click-button", "click-link", "click-dialog", "click-dialog-2", "click-tab", "click-test",
              "click-test-2", "click-color", "click-widget", "click-button-sequence"):
    MILESTONES[_task] = _CLICKED

_FALLBACK = [("completed", succeeded)]


# ----------------------------------------------------------------------------- evaluation


def milestones_for(task: str, fields: Mapping | None = None) -> list[tuple[str, Predicate]]:
    """The (name, predicate) pairs of this task instance (tasks not listed: one "completed" milestone)."""
    spec = MILESTONES.get(task, _FALLBACK)
    return list(spec(dict(fields or {}))) if callable(spec) else list(spec)


def milestone_names(task: str, fields: Mapping | None = None) -> list[str]:
    return [name for name, _ in milestones_for(task, fields)]


def _with_fields(dom: Mapping, fields: Mapping | None) -> Mapping:
    if fields is None:
        return dom
    return {**dom, "fields": {**dict(fields), **dict(dom.get("fields") or {})}}


def milestone_states(task: str, dom: Mapping, fields: Mapping | None = None) -> dict[str, bool]:
    """{name: reached on this screen} (the episode file's per-step "milestones").

    `fields` (MiniWoB's utterance fields) are used when the snapshot carries none.
    """
    view = _with_fields(dom or {}, fields)
    return {name: bool(pred(view)) for name, pred in milestones_for(task, _fields(view))}


class MilestoneTracker:
    """The milestones reached so far in one episode (sticky: once reached, reached)."""

    def __init__(self, task: str, fields: Mapping | None = None):
        self.task = task
        self.fields = dict(fields or {})
        self._milestones = milestones_for(task, self.fields)
        self.reached = [False] * len(self._milestones)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self._milestones]

    def update(self, dom: Mapping) -> list[bool]:
        """OR this screen's states into `reached`; returns `reached`."""
        view = _with_fields(dom or {}, self.fields)
        self.reached = [r or bool(pred(view)) for r, (_, pred) in zip(self.reached, self._milestones)]
        return self.reached

    def progress(self, success: bool = False) -> float:
        return task_progress(self.reached, success=success)


def task_progress(states: Sequence[bool] | Mapping[str, bool] | Iterable[bool], success: bool = False) -> float:
    """Fraction of milestones reached; 1.0 when the episode succeeded; NaN when there are none."""
    values = list(states.values()) if isinstance(states, Mapping) else list(states or ())
    if success:
        return 1.0
    if not values:
        return float("nan")
    return sum(bool(v) for v in values) / len(values)

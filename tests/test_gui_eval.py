"""envs/gui evaluation pieces: the SecAgent step format and prompt, step matching, milestones, the
gui_static / gui_live metric sets and the secagent / miniwob_task rewards. Pure: no browser, no model."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import envs.gui.metrics  # noqa: F401  (registers the gui_static / gui_live metric sets)
import envs.gui.rewards  # noqa: F401  (registers the secagent / miniwob_task rewards)
from envs.gui.milestones import MILESTONES, MilestoneTracker, milestone_names, milestone_states, task_progress
from envs.gui.secagent import (
    HISTORY_MODES,
    SYSTEM_PROMPT,
    count_image_parts,
    format_step_output,
    parse_step,
    render_step_prompt,
    secagent_prompt,
)

# ----------------------------------------------------------------------------- step format


def test_format_parse_round_trip():
    text = format_step_output("Typed 'kanye' into the username field.", "Now the password.", "click(element=5)")
    p = parse_step(text)
    assert p.well_formed and p.error is None
    assert (p.context, p.thought, p.action_text) == ("Typed 'kanye' into the username field.", "Now the password.",
                                                    "click(element=5)")


_TAGLESS = st.text(alphabet=st.characters(blacklist_characters="<>"), max_size=40)


@settings(max_examples=200, deadline=None)
@given(_TAGLESS, _TAGLESS, _TAGLESS.filter(lambda s: s.strip()))
def test_round_trip_property(context, thought, action):
    p = parse_step(format_step_output(context, thought, action))
    assert p.well_formed, p.error
    assert (p.context, p.thought, p.action_text) == (context.strip(), thought.strip(), action.strip())


_PIECES = st.sampled_from(["<context>", "</context>", "<thought>", "</thought>", "<action>", "</action>",
                           "click(element=3)", " ", "\n", "x", "<", ">", "</", "<|im_end|>", "\x00", "é"])


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=200), st.lists(_PIECES, max_size=30).map("".join), st.none(), st.integers()))
def test_parse_step_never_raises(text):
    p = parse_step(text)
    assert isinstance(p.well_formed, bool)
    assert p.well_formed == (p.error is None)
    if p.error is not None:
        assert "\n" not in p.error  # one line, for the corrective observation
    if p.well_formed:
        assert p.action_text


@pytest.mark.parametrize("text,fragment", [
    ("<thought>t</thought><action>wait()</action>", "missing <context>"),
    ("<context>c</context><thought>t</thought>", "missing <action>"),
    ("<thought>t</thought><context>c</context><action>wait()</action>", "out of order"),
    ("<context>c</context><context>c</context><thought>t</thought><action>wait()</action>", "2 times"),
    ("Sure! <context>c</context><thought>t</thought><action>wait()</action>", "before <context>"),
    ("<context>c</context>and<thought>t</thought><action>wait()</action>", "between </context>"),
    ("<context>c</context><thought>t</thought><action>wait()</action> done", "after </action>"),
    ("<context>c</context><thought>t</thought><action>  </action>", "empty <action>"),
])
def test_parse_step_errors(text, fragment):
    p = parse_step(text)
    assert not p.well_formed and fragment in p.error


def test_parse_step_lenient_parts():
    # the end-of-turn token's text after the action is fine; empty context / thought are allowed
    p = parse_step("<context></context>\n<thought></thought>\n<action>wait()</action><|im_end|>\n")
    assert p.well_formed and p.action_text == "wait()"
    # an output cut right after the action still gives the action, but is not well formed
    p = parse_step("<context>c</context><thought>t</thought><action>click(element=2)")
    assert p.action_text == "click(element=2)" and not p.well_formed and "missing </action>" in p.error
    # no action block: nothing to run
    assert parse_step("click(element=2)").action_text is None


# ----------------------------------------------------------------------------- step prompt

_STEPS = [{"screen_text": f"[{i}] button \"B{i}\" box=(0,0,10,10)", "action": f"click(element={i})"} for i in (1, 2, 3)]


def _user_text(messages):
    content = messages[-1]["content"]
    return content if isinstance(content, str) else next(p["text"] for p in content if p.get("type") == "text")


def test_prompt_none_mode_has_no_history():
    msgs = render_step_prompt("Click OK.", "[9] button \"OK\"", history="none", semantic_context="Did X.",
                              history_steps=_STEPS, history_k=3)
    assert [m["role"] for m in msgs] == ["system", "user"]
    text = _user_text(msgs)
    assert "Click OK." in text and "[9] button" in text
    assert "Action taken" not in text and "Did X." not in text and "B3" not in text


def test_prompt_semantic_mode_has_exactly_one_history_screen():
    msgs = render_step_prompt("Log in.", "[9] button \"Login\"", history="semantic", semantic_context="Typed the name.",
                              history_steps=_STEPS, history_k=3)
    text = _user_text(msgs)
    assert "Semantic context: Typed the name." in text
    assert text.count("Action taken") == 1 and "B3" in text and "click(element=3)" in text
    assert "B1" not in text and "B2" not in text
    # the current screen comes last
    assert text.index("Previous screen") < text.index("Current screen") and text.rstrip().endswith('"Login"')
    # first step: an empty context is shown as such, no previous screen
    text = _user_text(render_step_prompt("Log in.", "[1] x", history="semantic"))
    assert "Semantic context: (nothing done yet)" in text and "Action taken" not in text


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_prompt_raw_mode_has_last_k(k):
    text = _user_text(render_step_prompt("Do.", "[9] t", history="raw", history_steps=_STEPS, history_k=k,
                                         semantic_context="not shown"))
    shown = min(k, len(_STEPS))
    assert text.count("Action taken") == shown and "not shown" not in text
    for i in (1, 2, 3):
        assert (f"B{i}" in text) == (i > len(_STEPS) - shown)
    if shown >= 2:  # oldest first
        assert text.index("B2") < text.index("B3") and f"Screen {shown} steps ago" in text


_SHOT_STEPS = [{**s, "screenshot": None} for s in _STEPS]


@pytest.mark.parametrize("mode,k,n_images", [("none", 3, 1), ("semantic", 3, 2), ("raw", 2, 3), ("raw", 3, 4)])
def test_prompt_image_parts(mode, k, n_images):
    msgs = render_step_prompt("Do.", "", history=mode, history_steps=_SHOT_STEPS, history_k=k, image=True)
    content = msgs[-1]["content"]
    assert count_image_parts(msgs) == n_images
    # all image parts first, then one text part (the loop's and TRL's order)
    assert [p["type"] for p in content] == ["image"] * n_images + ["text"]
    assert f"Current screen (screenshot {n_images})" in content[-1]["text"] and "(see the screenshot)" in content[-1]["text"]
    # history steps without a "screenshot" key are text only: one image, the current screen's
    msgs = render_step_prompt("Do.", "", history=mode, history_steps=_STEPS, history_k=k, image=True)
    assert count_image_parts(msgs) == 1 and "Current screen (screenshot 1)" in _user_text(msgs)


def test_prompt_images_attach_in_order():
    from PIL import Image

    from rl.multimodal import attach_images, images_in_messages

    ims = [Image.new("RGB", (4, 4), c) for c in ("red", "blue")]
    msgs = render_step_prompt("Do.", "[1] t", history="semantic", history_steps=_SHOT_STEPS, image=True)
    filled = attach_images(msgs, ims)
    _, loaded = images_in_messages(filled)
    assert [im.getpixel((0, 0)) for im in loaded] == [(255, 0, 0), (0, 0, 255)]
    # the row prompt builder does the same from the row's columns
    row = {"instruction": "Do.", "screen_text": "[1] t", "history_steps": _SHOT_STEPS, "semantic_context": "c",
           "images": ims}
    assert count_image_parts(secagent_prompt(row)) == 2
    with pytest.raises(Exception, match="image part"):  # 3 images for 2 parts: loud, never dropped
        secagent_prompt({**row, "images": ims + ims[:1]})


def test_prompt_errors():
    with pytest.raises(ValueError, match="unknown history mode"):
        render_step_prompt("x", "y", history="all")
    with pytest.raises(ValueError, match=r"history_steps\[0\]"):
        render_step_prompt("x", "y", history="raw", history_steps=[{"screen": "a"}])
    with pytest.raises(ValueError, match="history_k"):
        render_step_prompt("x", "y", history="raw", history_k=0)
    assert set(HISTORY_MODES) == {"none", "raw", "semantic"}


def test_system_prompt_lists_every_action_kind():
    from envs.gui.actions import ACTION_KINDS

    for kind in ACTION_KINDS:
        assert f"{kind}(" in SYSTEM_PROMPT


def test_system_prompt_examples_parse():
    """Every example in the system prompt's action list is an action the parser accepts."""
    from envs.gui.actions import format_action, parse_action
    from envs.gui.secagent import ACTION_SPACE

    for line in ACTION_SPACE.splitlines():
        example = re.split(r"\s{2,}", line)[0]
        parsed = parse_action(example)
        assert parsed.action is not None, (example, parsed.error)
        assert format_action(parsed.action) == example


# ----------------------------------------------------------------------------- milestones


def _el(ref, tag, text="", value="", **kw):
    return {"ref": ref, "tag": tag, "text": text, "value": value, **kw}


def test_login_user_milestones():
    fields = {"username": "kanye", "password": "x9"}
    empty = {"elements": [_el(4, "input_text", id="username"), _el(5, "input_password", id="password"),
                          _el(6, "button", "Login", id="subbtn")], "done": False, "reward": 0.0}
    assert milestone_names("login-user") == ["username filled", "password filled", "submitted"]
    assert milestone_states("login-user", empty, fields) == dict.fromkeys(milestone_names("login-user"), False)
    user = {**empty, "elements": [_el(4, "input_text", value="kanye", id="username")] + empty["elements"][1:]}
    wrong = {**empty, "elements": [_el(4, "input_text", value="Kanye", id="username")] + empty["elements"][1:]}
    assert milestone_states("login-user", user, fields)["username filled"]
    assert not milestone_states("login-user", wrong, fields)["username filled"]  # the task checks exactly
    done_bad = {"elements": [], "done": True, "reward": -1.0}
    done_ok = {"elements": [], "done": True, "raw_reward": 1.0}
    assert not milestone_states("login-user", done_bad, fields)["submitted"]
    assert milestone_states("login-user", done_ok, fields)["submitted"]
    # fields inside the snapshot work as well as passed separately
    assert milestone_states("login-user", {**user, "fields": fields})["username filled"]

    tracker = MilestoneTracker("login-user", fields)
    assert tracker.update(empty) == [False, False, False]
    assert tracker.update(user) == [True, False, False]
    assert tracker.update(empty) == [True, False, False]  # sticky: cleared later, still reached
    assert tracker.progress() == pytest.approx(1 / 3)
    assert tracker.progress(success=True) == 1.0


def _checkbox_dom(checked: dict[str, bool], with_parent: bool):
    els, y = [], 50
    for i, (name, on) in enumerate(checked.items()):
        label_ref = 10 + 3 * i
        inp = _el(label_ref + 1, "input_checkbox", value=str(on), id=f"ch{i}", box=[5, y, 13, 13])
        txt = _el(-(i + 1), "t", name, box=[20, y - 1, 30, 15])
        if with_parent:
            inp["parent"] = txt["parent"] = label_ref
            inp["checked"] = on
            inp["value"] = ""
        els += [_el(label_ref, "label", box=[5, y - 2, 60, 18], **({"parent": 3} if with_parent else {})), inp, txt]
        y += 20
    return {"elements": els, "done": False, "reward": 0.0}


@pytest.mark.parametrize("with_parent", [True, False])
def test_click_checkboxes_milestones(with_parent):
    fields = {"target 0": "ab", "target 1": "zz", "button": "submit"}
    dom = _checkbox_dom({"ab": True, "cd": True, "zz": False}, with_parent)
    states = milestone_states("click-checkboxes", dom, fields)
    assert states == {"ab checked": True, "zz checked": False, "submitted": False}
    dom = _checkbox_dom({"ab": False, "cd": False, "zz": True}, with_parent)
    assert milestone_states("click-checkboxes", dom, fields) == {"ab checked": False, "zz checked": True,
                                                                 "submitted": False}
    # "Select nothing": only the submit milestone
    assert milestone_names("click-checkboxes", {"button": "submit"}) == ["submitted"]


def test_click_tab_2_and_single_click_milestones():
    fields = {"target": "fauna"}
    closed = {"elements": [_el(3, "a", "Tab #2"), _el(7, "span", "other", classes="alink")], "done": False}
    opened = {"elements": [_el(3, "a", "Tab #2"), _el(9, "span", "fauna", classes="alink")], "done": False}
    assert milestone_states("click-tab-2", closed, fields) == {"tab opened": False, "link clicked": False}
    assert milestone_states("click-tab-2", opened, fields) == {"tab opened": True, "link clicked": False}
    hidden = {"elements": [_el(9, "span", "fauna", classes="alink", visible=False)], "done": False}
    assert not milestone_states("click-tab-2", hidden, fields)["tab opened"]
    assert milestone_states("click-tab-2-hard", {"elements": [], "done": True, "reward": 1.0}, fields)["link clicked"]
    assert milestone_names("click-button") == ["clicked"]
    assert milestone_names("some-unknown-task") == ["completed"]
    assert milestone_states("some-unknown-task", {"done": True, "reward": 0.5}) == {"completed": True}


def test_enter_text_and_focus_milestones():
    dom = {"elements": [_el(4, "input_text", value="Rex", id="tt")], "done": False}
    assert milestone_states("enter-text", dom, {"target": "Rex"}) == {"field filled": True, "submitted": False}
    assert not milestone_states("enter-text", dom, {"target": "Rex2"})["field filled"]
    assert milestone_states("enter-text-2", {"elements": [_el(4, "input_text", value="joye", id="tt")]},
                            {"text": "JOYE", "case": "lower"})["field filled"]
    assert milestone_states("enter-password", {"elements": [_el(4, "input_password", value="Q7", id="password"),
                                                            _el(5, "input_password", value="", id="verify")]},
                            {"target": "Q7"}) == {"password filled": True, "verify filled": False, "submitted": False}
    assert milestone_states("focus-text", {"elements": [_el(4, "input_text", id="tt", focused=True)]}) == {"focused": True}
    assert milestone_states("click-option", {"elements": [
        _el(5, "input_radio", checked=True, box=[5, 50, 13, 13]), _el(-1, "t", "yes", box=[20, 49, 20, 15])]},
        {"target": "yes"})["option selected"]


def test_task_progress():
    assert task_progress([True, False, False, True]) == 0.5
    assert task_progress({"a": True, "b": False}) == 0.5
    assert task_progress([False, False], success=True) == 1.0
    assert math.isnan(task_progress([]))
    assert all(isinstance(k, str) for k in MILESTONES)


# ----------------------------------------------------------------------------- matching

# button 5: x 10..50, y 20..40; enlarged by margin 0.2 (1.2x about the centre): x 6..54, y 18..42
_ELEMENTS = [
    {"ref": 1, "tag": "div", "text": "", "box": [0, 0, 160, 210]},
    {"ref": 5, "tag": "button", "text": "OK", "box": [10, 20, 40, 20]},
    {"ref": 8, "tag": "span", "text": "OK", "box": [20, 25, 10, 10]},  # the button's label, inside it
    {"ref": 6, "tag": "div", "text": "", "box": [100, 100, 0, 10]},  # zero width
    {"ref": 7, "tag": "button", "text": "Cancel", "box": [100, 150, 20, 20]},
]


def _act(text):
    from envs.gui.actions import parse_action

    parsed = parse_action(text)
    assert parsed.action is not None, parsed.error
    return parsed.action


def _match(pred, valid, **kw):
    from envs.gui.matching import match_action

    return match_action(_act(pred) if isinstance(pred, str) else pred, valid, _ELEMENTS, **kw)


@pytest.mark.parametrize("pred,margin,expected", [
    ("click(x=30, y=30)", 0.2, True),
    ("click(x=54, y=42)", 0.2, True),  # enlarged corner: borders inclusive
    ("click(x=6, y=18)", 0.2, True),
    ("click(x=55, y=30)", 0.2, False),
    ("click(x=30, y=43)", 0.2, False),
    ("click(x=50, y=40)", 0.0, True),  # the box's own corner
    ("click(x=51, y=30)", 0.0, False),
    ("click(x=53, y=30)", 0.2, True),
    ("click(x=53, y=30)", 0.1, False),  # 0.1: x 8..52
])
def test_click_point_in_enlarged_box(pred, margin, expected):
    assert _match(pred, ["click(element=5)"], margin=margin) is expected


def test_click_zero_size_and_several_boxes():
    assert _match("click(x=100, y=105)", ["click(element=6)"])
    assert not _match("click(x=101, y=105)", ["click(element=6)"], margin=0.5)  # zero width stays zero
    valid = ["click(element=5)", "click(element=7)"]
    assert _match("click(x=110, y=160)", valid) and _match("click(x=30, y=30)", valid)
    assert not _match("click(x=80, y=80)", valid)


def test_click_by_element():
    assert _match("click(element=5)", ["click(element=5)"])
    assert _match("click(element=8)", ["click(element=5)"])  # the label inside the button: its centre is in the box
    assert not _match("click(element=7)", ["click(element=5)"])
    assert not _match("click(element=99)", ["click(element=5)"])  # not on the screen
    assert _match("click(element=99)", ["click(element=99)"])  # ...unless it is a valid ref itself
    assert _match("click(element=5)", ["click(x=30, y=30)"])


def test_click_against_gold_point():
    # the gold point's target is the smallest element containing it (button 5, not the page div 1)
    assert _match("click(x=12, y=22)", ["click(x=45, y=22)"])
    assert not _match("click(x=100, y=60)", ["click(x=45, y=22)"])
    # a gold point on the button's label: the label (the smallest element there) is the target
    assert _match("click(x=25, y=30)", ["click(x=30, y=30)"]) and not _match("click(x=12, y=22)", ["click(x=30, y=30)"])
    # a gold point outside every element: within point_tolerance pixels
    assert _match("click(x=205, y=205)", ["click(x=200, y=200)"])  # 7.07 px (x 200 is right of the page div)
    assert not _match("click(x=206, y=206)", ["click(x=200, y=200)"])  # 8.49 px
    assert _match("click(x=165, y=205)", ["click(x=170, y=200)"])  # 7.07 px
    assert not _match("click(x=165, y=205)", ["click(x=170, y=200)"], point_tolerance=5)


def test_type_key_scroll_terminate_wait():
    assert _match('type(text="Hello   World ")', ['type(text="hello world")'])
    assert not _match('type(text="hello")', ['type(text="hello world")'])
    assert _match('type(text="hello")', ['type(text="hello world")'], text_match="contains")
    assert _match('type(text="ÉCOLE\tx")', ['type(text="école x")'])
    assert _match('key(key="enter")', ['key(key="Enter")']) and _match("key(key=Return)", ['key(key="Enter")'])
    assert not _match('key(key="Tab")', ['key(key="Enter")'])
    assert not _match('key(key="a")', ['key(key="A")'])  # A is shift+a
    assert _match('scroll(direction="down")', ['scroll(direction="down")'])
    assert not _match('scroll(direction="up")', ['scroll(direction="down")'])
    assert _match('terminate(status="success")', ['terminate(status="success")'])
    assert not _match('terminate(status="failure")', ['terminate(status="success")'])
    assert _match("wait()", ["wait()"])


def test_wrong_type_none_and_bad_inputs():
    assert not _match("click(element=5)", ['type(text="OK")', "wait()"])
    assert not _match('type(text="OK")', ["click(element=5)"])
    assert not _match(None, ["click(element=5)"])
    with pytest.raises(ValueError, match="does not parse"):
        _match("wait()", ["jump(3)"])
    with pytest.raises(ValueError, match="text_match"):
        _match("wait()", ["wait()"], text_match="fuzzy")


def _actions():
    from envs.gui.actions import Action

    n = st.integers(0, 10**6)
    return st.one_of(
        st.builds(lambda x, y: Action("click", x=x, y=y), n, n),
        st.builds(lambda r: Action("click", element=r), n),
        st.builds(lambda t: Action("type", text=t), st.text(min_size=1, max_size=20).filter(str.strip)),
        st.builds(lambda k: Action("key", key=k), st.sampled_from(["Enter", "Tab", "a", "A", "Ctrl+a"])),
        st.builds(lambda d: Action("scroll", direction=d), st.sampled_from(["up", "down"])),
        st.just(Action("wait")),
        st.builds(lambda s: Action("terminate", status=s), st.sampled_from(["success", "failure"])),
    )


_BOXES = st.lists(st.tuples(st.integers(-5, 300), st.integers(-5, 300), st.integers(0, 200), st.integers(0, 200)),
                  max_size=6)


@settings(max_examples=200, deadline=None)
@given(_actions(), st.lists(_actions(), min_size=1, max_size=4), _BOXES)
def test_match_action_is_total_and_reflexive(pred, valid, boxes):
    """Any parsed prediction against any canonical valid set gives a bool (no exception), and an action
    always matches itself (a click by element when its ref is valid, a click by point when it lies in a
    box or near its own gold point)."""
    from envs.gui.actions import format_action
    from envs.gui.matching import match_action

    elements = [{"ref": i + 1, "tag": "div", "text": "", "box": list(b)} for i, b in enumerate(boxes)]
    texts = [format_action(v) for v in valid]
    assert isinstance(match_action(pred, texts, elements), bool)
    assert match_action(valid[0], texts, elements, margin=0.0)


# ----------------------------------------------------------------------------- rewards

_VALID = ["click(element=5)", "click(element=8)"]


def _traj(response, row=None, info=None, prompt_tokens=10):
    row = row if row is not None else {"episode_id": "t/seed0", "step": 0, "action": "click(element=5)",
                                        "valid_actions": _VALID, "elements": _ELEMENTS}
    return SimpleNamespace(row=row, response_text=response, info=info or {}, prompt_ids=list(range(prompt_tokens)))


@pytest.mark.parametrize("response,score,well_formed,correct", [
    (format_step_output("c", "t", "click(x=30, y=30)"), 1.5, 1.0, 1.0),
    (format_step_output("c", "t", "click(element=7)"), 0.5, 1.0, 0.0),
    (format_step_output("c", "t", "fly()"), 0.5, 1.0, 0.0),  # well formed, action unparseable
    ("<thought>t</thought><action>click(element=5)</action>", 1.0, 0.0, 1.0),  # no context
    ("click(element=5)", 0.0, 0.0, 0.0),  # no action block: nothing is run
])
def test_secagent_reward(response, score, well_formed, correct):
    from rl.rewards import REWARDS

    out = REWARDS.get("secagent")(_traj(response).row, _traj(response))
    assert out["score"] == pytest.approx(score)
    assert (out["well_formed"], out["correct"]) == (well_formed, correct)
    assert out["click_steps"] == 1.0 and out["click_correct"] == correct


def test_secagent_reward_weights_and_bad_rows():
    from envs.gui.rewards import secagent_reward

    t = _traj(format_step_output("c", "t", "click(element=5)"))
    assert secagent_reward(t.row, t, format_weight=0.0, action_weight=2.0)["score"] == 2.0
    with pytest.raises(ValueError, match=r"row t/seed0 step 0: 'valid_actions'"):
        secagent_reward({**t.row, "valid_actions": []}, t)


def test_miniwob_task_reward():
    from envs.gui.rewards import miniwob_task

    ok = _traj("", info={"success": True, "raw_reward": 0.8, "steps": 3})
    bad = _traj("", info={"success": False, "raw_reward": -1.0, "steps": 5})
    assert miniwob_task(ok.row, ok)["score"] == 1.0 and miniwob_task(bad.row, bad)["score"] == 0.0
    assert miniwob_task(ok.row, ok, raw=True)["score"] == 0.8 and miniwob_task(bad.row, bad, raw=True)["score"] == -1.0
    with pytest.raises(KeyError, match="'miniwob' environment"):
        miniwob_task(ok.row, _traj("", info={"turns": 2}))


# ----------------------------------------------------------------------------- metric sets


def _static_row(ep, step, action, valid, num_steps=None):
    row = {"episode_id": ep, "step": step, "action": action, "valid_actions": valid, "elements": _ELEMENTS}
    return row if num_steps is None else {**row, "n_steps": num_steps}


def test_gui_static_aggregate():
    from rl.registry import METRICS

    ms = METRICS.get("gui_static")
    ok = lambda a: format_step_output("c", "t", a)  # noqa: E731
    trajs = [
        # episode A: 2 steps, both right
        _traj(ok("click(x=30, y=30)"), _static_row("A", 0, "click(element=5)", ["click(element=5)"], 2), 12),
        _traj(ok('type(text="Hi")'), _static_row("A", 1, 'type(text="hi")', ['type(text="hi")'], 2), 14),
        # episode B: 3 steps, 1 right; one malformed output
        _traj(ok("click(element=7)"), _static_row("B", 0, "click(element=5)", ["click(element=5)"], 3), 10),
        _traj("<action>wait()</action>", _static_row("B", 1, "wait()", ["wait()"], 3), 10),
        _traj(ok('type(text="no")'), _static_row("B", 2, 'key(key="Enter")', ['key(key="Enter")'], 3), 10),
        # episode C: 3 steps, only 1 evaluated (a --limit cut it): not in TA
        _traj(ok("click(element=5)"), _static_row("C", 0, "click(element=5)", ["click(element=5)"], 3), 4),
    ]
    records = [ms(t) for t in trajs]
    assert [r["correct"] for r in records] == [True, True, False, True, False, True]
    m = ms.aggregate(records)
    assert m["n"] == 6 and m["episodes"] == 3 and m["partial_episodes"] == 1
    assert m["sa"] == pytest.approx(4 / 6)
    assert m["ta"] == pytest.approx(1 / 2)  # A yes, B no, C partial
    assert m["ams"] == pytest.approx((1 + 1 / 3 + 1) / 3)
    assert m["acc_click"] == pytest.approx(2 / 3) and m["acc_type"] == 1.0 and m["acc_key"] == 0.0
    assert m["acc_wait"] == 1.0 and m["acc_scroll"] is None
    assert m["type_acc"] == pytest.approx(5 / 6)  # the Enter step predicted a type action
    assert m["well_formed"] == pytest.approx(5 / 6)
    assert m["input_tokens"] == pytest.approx((12 + 14 + 10 + 10 + 10 + 4) / 6)
    assert set(ms.columns) <= set(m)
    # rows without an episode id are rejected by name
    with pytest.raises(Exception, match="row 1: missing field 'episode_id'"):
        ms.check_rows([trajs[0].row, {**trajs[1].row, "episode_id": None}], "static_test")


def test_gui_kinds_agree_with_actions():
    from envs.gui.actions import ACTION_KINDS
    from envs.gui.metrics import KINDS

    assert tuple(KINDS) == tuple(ACTION_KINDS)


def test_gui_live_aggregate():
    from rl.registry import METRICS

    ms = METRICS.get("gui_live")
    trajs = [
        _traj("", {"task": "login-user", "seed": 1}, {"success": True, "raw_reward": 1.0, "steps": 4, "invalid": 0,
                                                      "milestones": [True, True, True], "input_tokens": [100, 110, 120, 130],
                                                      "step_seconds": [0.5, 0.5, 0.5, 0.5]}),
        _traj("", {"task": "login-user", "seed": 2}, {"success": False, "raw_reward": -1.0, "steps": 3, "invalid": 1,
                                                      "milestones": [True, False, False], "input_tokens": [100, 100],
                                                      "step_seconds": [1.0, 2.0]}),
        _traj("", {"task": "click-button", "seed": 1}, {"success": False, "raw_reward": 0.0, "steps": 3, "invalid": 2,
                                                        "milestones": [False], "input_tokens": [60, 60, 60],
                                                        "step_seconds": [0.25, 0.25, 0.25]}),
    ]
    m = ms.aggregate([ms(t) for t in trajs])
    assert m["n"] == 3 and m["success"] == pytest.approx(1 / 3)
    assert m["atp"] == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert m["avg_steps"] == pytest.approx(10 / 3) and m["invalid_rate"] == pytest.approx(3 / 10)
    assert m["input_tokens_per_step"] == pytest.approx((460 + 200 + 180) / 9)
    assert m["step_latency"] == pytest.approx((2.0 + 3.0 + 0.75) / 9)
    assert m["success/login-user"] == 0.5 and m["success/click-button"] == 0.0
    with pytest.raises(KeyError, match="'miniwob' environment"):
        ms(_traj("", {}, {"turns": 1}))


def test_gui_static_through_eval_run(tiny_tokenizer):
    """The generic leaderboard runner with the secagent prompt builder and the gui_static set: the records'
    correctness is the secagent reward's, the prompts' token counts are the rendered prompts'."""
    from agents.single_turn import render_prompt
    from test_multi_turn import R, ScriptedEngine

    from eval.run import evaluate
    from rl.rewards import REWARDS

    tok = tiny_tokenizer
    base = {"instruction": "Click OK.", "screen_text": '[5] button "OK" box=(10,20,40,20)', "elements": _ELEMENTS}
    rows = [{**base, "episode_id": "e1", "step": 0, "n_steps": 2, "action": "click(element=5)",
             "valid_actions": ["click(element=5)"], "history": "semantic"},
            {**base, "episode_id": "e1", "step": 1, "n_steps": 2, "action": 'terminate(status="success")',
             "valid_actions": ['terminate(status="success")'], "semantic_context": "Clicked OK.",
             "history_steps": [{"screen_text": base["screen_text"], "action": "click(element=5)"}]}]
    replies = [format_step_output("Clicked OK.", "OK is the target.", "click(x=30, y=30)"),
               "<action>terminate(status=\"failure\")</action>"]
    prompts = [render_prompt(tok, secagent_prompt(r)) for r in rows]
    engine = ScriptedEngine(tok, prompts, [[R(t)] for t in replies])
    res = evaluate("scripted", {"static": rows}, metrics="gui_static", prompt_builder="secagent", engine=engine,
                   tokenizer=tok, max_new_tokens=200, progress=False)
    preds, m = res["datasets"]["static"]["predictions"], res["datasets"]["static"]["metrics"]
    assert [p["correct"] for p in preds] == [True, False] and [p["well_formed"] for p in preds] == [True, False]
    reward = REWARDS.get("secagent")
    assert [reward(r, SimpleNamespace(response_text=t))["correct"] for r, t in zip(rows, replies)] == [1.0, 0.0]
    assert [p["input_tokens"] for p in preds] == [len(p) for p in prompts]
    assert m["sa"] == 0.5 and m["ta"] == 0.0 and m["ams"] == 0.5 and m["acc_terminate"] == 0.0


# ----------------------------------------------------------------------------- milestones in the live browser


@pytest.mark.slow
def test_milestones_on_live_episodes():
    """The predicates on real MiniWoB snapshots: login-user and click-checkboxes solved step by step, each
    milestone reached when its step is done (and not before)."""
    from envs.gui.browser import MiniWobSession, browser_missing

    if browser_missing():
        pytest.skip(browser_missing())

    with MiniWobSession(screenshots=False) as s:
        sc = s.reset("login-user", 0)
        tracker = MilestoneTracker("login-user", sc.fields)
        assert tracker.update(sc.dom) == [False, False, False]
        ref = {e.id: e.ref for e in sc.elements if e.id}
        script = [(f"click(element={ref['username']})", [False, False, False]),
                  (f'type(text="{sc.fields["username"]}")', [True, False, False]),
                  (f"click(element={ref['password']})", [True, False, False]),
                  (f'type(text="{sc.fields["password"]}")', [True, True, False]),
                  (f"click(element={ref['subbtn']})", [True, True, True])]
        for action, expected in script:
            sc, reward, done, info = s.step(_act(action))
            assert tracker.update(sc.dom) == expected, (action, sc.dom.get("done"), sc.dom.get("reward"))
        assert done and reward > 0 and tracker.progress() == 1.0

        sc = s.reset("click-checkboxes", 3)
        targets = [v for k, v in sc.fields.items() if k.startswith("target ")]
        tracker = MilestoneTracker("click-checkboxes", sc.fields)
        assert tracker.names == [f"{t} checked" for t in targets] + ["submitted"]
        assert not any(tracker.update(sc.dom))
        for i, name in enumerate(targets):
            box = next(e for e in sc.elements if e.tag == "input_checkbox"
                       and any(x.parent == e.parent and x.text == name for x in sc.elements if x.ref != e.ref))
            sc, *_ = s.step(_act(f"click(element={box.ref})"))
            assert tracker.update(sc.dom) == [j <= i for j in range(len(targets))] + [False]
        sc, reward, done, _ = s.step(_act(f"click(element={next(e.ref for e in sc.elements if e.id == 'subbtn')})"))
        assert done and reward > 0 and all(tracker.update(sc.dom))

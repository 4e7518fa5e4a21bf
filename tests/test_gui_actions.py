"""envs.gui.actions: the parser never raises (fuzzed), the canonical text round-trips, variants and errors."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from envs.gui.actions import (
    ACTION_KINDS,
    KEYS,
    MODIFIERS,
    Action,
    ParsedAction,
    format_action,
    normalize_key,
    parse_action,
)

coords = st.integers(min_value=0, max_value=9_999_999)
printable = st.characters(min_codepoint=33, max_codepoint=126)


@st.composite
def keys(draw) -> str:
    base = draw(st.one_of(st.sampled_from(KEYS), printable))
    mods = draw(st.lists(st.sampled_from(MODIFIERS), unique=True, max_size=3))
    return "+".join([m for m in MODIFIERS if m in mods] + [base])


def actions() -> st.SearchStrategy[Action]:
    return st.one_of(
        st.builds(lambda x, y: Action("click", x=x, y=y), coords, coords),
        st.builds(lambda e: Action("click", element=e), coords),
        st.builds(lambda t: Action("type", text=t), st.text(min_size=1, max_size=60)),
        st.builds(lambda k: Action("key", key=k), keys()),
        st.builds(lambda d: Action("scroll", direction=d), st.sampled_from(["up", "down"])),
        st.builds(lambda d, e: Action("scroll", direction=d, element=e), st.sampled_from(["up", "down"]), coords),
        st.builds(lambda d, x, y: Action("scroll", direction=d, x=x, y=y), st.sampled_from(["up", "down"]), coords, coords),
        st.just(Action("wait")),
        st.builds(lambda s: Action("terminate", status=s), st.sampled_from(["success", "failure"])),
    )


@settings(max_examples=400, deadline=None)
@given(actions())
def test_round_trip(a):
    text = format_action(a)
    parsed = parse_action(text)
    assert parsed.error is None, (text, parsed.error)
    assert parsed.action == a


def _check(p):
    assert isinstance(p, ParsedAction)
    assert (p.action is None) != (p.error is None)
    if p.error is not None:
        assert isinstance(p.error, str) and "\n" not in p.error and len(p.error) < 300
    else:
        assert p.action.kind in ACTION_KINDS


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=200))
def test_fuzz_random_unicode_never_raises(text):
    _check(parse_action(text))


@settings(max_examples=300, deadline=None)
@given(actions(), st.data())
def test_fuzz_truncated_and_garbled_actions(a, data):
    text = format_action(a)
    cut = data.draw(st.integers(0, len(text)))
    _check(parse_action(text[:cut]))
    junk = data.draw(st.text(alphabet='()[]"\'=,;\\ -.0123456789xyelementtextkey', max_size=20))
    at = data.draw(st.integers(0, len(text)))
    _check(parse_action(text[:at] + junk + text[at:]))


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.sampled_from(["1", "x=2", "'a'", "[3, 4]", "click"]),
                    lambda inner: st.builds(lambda name, a, b: f"{name}({a}, {b})",
                                            st.sampled_from(list(ACTION_KINDS) + ["f", ""]), inner, inner),
                    max_leaves=12))
def test_fuzz_nested_parentheses(text):
    _check(parse_action(text))


@pytest.mark.parametrize("text", [
    "click(" + "9" * 5000 + ", 1)", "click(x=1e999999, y=2)", "click(" * 500 + ")" * 500, "type(" + "'" * 3001 + ")",
    "x" * 100_000, None, 12, b"click(1,2)", "click(x=" + "1" * 8 + ", y=1)", "\x00click(1,2)", "click(1,2)\x00",
])
def test_pathological_inputs(text):
    p = parse_action(text)
    _check(p)
    assert p.action is None


@pytest.mark.parametrize("text,expected", [
    ("click(x=12, y=40)", Action("click", x=12, y=40)),
    ("click(12, 40)", Action("click", x=12, y=40)),
    ("click(x=12,y=40)", Action("click", x=12, y=40)),
    ("  Click( X = 12 , Y = 40 ) ; ", Action("click", x=12, y=40)),
    ("click(12.4, 39.6)", Action("click", x=12, y=40)),
    ("click(coordinate=[12, 40])", Action("click", x=12, y=40)),
    ("click((12, 40))", Action("click", x=12, y=40)),
    ("click(element=7)", Action("click", element=7)),
    ("click(7)", Action("click", element=7)),  # documented: one number is an element ref
    ("click(5000, 5000)", Action("click", x=5000, y=5000)),  # out of the screen: the browser says invalid
    ('type(text="hello world")', Action("type", text="hello world")),
    ("type(text='hello world')", Action("type", text="hello world")),
    ('type("say \\"hi\\"")', Action("type", text='say "hi"')),
    ("type(hello, world)", Action("type", text="hello, world")),
    ('type(text="a, b=c)")', Action("type", text="a, b=c)")),
    ('key(key="Enter")', Action("key", key="Enter")),
    ("key(enter)", Action("key", key="Enter")),
    ("key('return')", Action("key", key="Enter")),
    ('key("control+shift+tab")', Action("key", key="Ctrl+Shift+Tab")),
    ('key("a")', Action("key", key="a")),
    ('key("Ctrl++")', Action("key", key="Ctrl++")),
    ('scroll(direction="down")', Action("scroll", direction="down")),
    ("scroll(UP)", Action("scroll", direction="up")),
    ('scroll(direction="down", element=4)', Action("scroll", direction="down", element=4)),
    ("wait()", Action("wait")),
    ("wait( )", Action("wait")),
    ('terminate(status="success")', Action("terminate", status="success")),
    ("terminate(failure)", Action("terminate", status="failure")),
    ("`click(1, 2)`", Action("click", x=1, y=2)),
    ("```\nclick(element=3)\n```", Action("click", element=3)),
])
def test_accepted_variants(text, expected):
    p = parse_action(text)
    assert p.error is None, p.error
    assert p.action == expected


@pytest.mark.parametrize("text,fragment", [
    ("", "empty"),
    ("click(-5, 10)", "negative"),
    ("click(x=5, y=-1)", "negative"),
    ("click(element=-3)", "negative"),
    ("click(x=1)", "needs x and y"),
    ("click(1, 2, 3)", "needs x and y"),
    ("click(element=1, x=2, y=3)", "not both"),
    ("click(x=1, x=2, y=3)", "twice"),
    ("click(z=1)", "unknown argument"),
    ("click(1, 2) type('a')", "more than one action"),
    ("click(click(1, 2))", "nested"),
    ("click(1, 2", "unbalanced"),
    ("tap(1, 2)", "unknown action"),
    ("I will click the button", "not an action"),
    ("click(1, 2) because", "unexpected text"),
    ("type()", "non-empty"),
    ('type(text="")', "non-empty"),
    ("key(Hyper)", "unknown key"),
    ('key("Ctrl+Ctrl+a")', "unknown key"),
    ("scroll(sideways)", "direction"),
    ("scroll()", "direction"),
    ("wait(3)", "no arguments"),
    ("terminate()", "status"),
    ("terminate(maybe)", "status"),
    ("click(99999999, 1)", "too long"),
])
def test_errors_are_one_line_reasons(text, fragment):
    p = parse_action(text)
    assert p.action is None
    assert fragment in p.error


def test_normalize_key():
    assert normalize_key("esc") == "Escape"
    assert normalize_key("cmd+c") == "Meta+c"
    assert normalize_key("shift+ctrl+x") == "Ctrl+Shift+x"  # canonical modifier order
    assert normalize_key(" ") == "Space"
    assert normalize_key("é") is None and normalize_key("") is None and normalize_key("F13") is None


def test_format_action_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown action kind"):
        format_action(Action("swipe"))

"""envs.gui: MiniWoB++ in headless Chromium (browser.py), the element list (observation.py) and the
`miniwob` environment (env.py): every action kind in the live browser, coordinates, no network, no
leaked browser processes (normal close, an exception, a SIGKILLed owner), crashes, the protocol."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from envs.gui.actions import Action, parse_action
from envs.gui.browser import (
    TASK_SIZE,
    BrowserCrashed,
    BrowserPool,
    Element,
    browser_missing,
    session_pids,
    to_css_pixels,
)
from envs.gui.observation import render_elements

MISSING = browser_missing() or next((f"{m} is not installed (pip install -e '.[gui]')" for m in ("miniwob", "selenium")
                                     if importlib.util.find_spec(m) is None), None)
live = pytest.mark.skipif(MISSING is not None, reason=f"no browser: {MISSING}")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def act(text: str) -> Action:
    p = parse_action(text)
    assert p.action is not None, p.error
    return p.action


def wait_gone(pgid: int, marker: str, timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        left = session_pids(pgid, marker)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


# ----------------------------------------------------------------------------- no browser needed


def _el(ref, tag, text="", box=(0, 0, 10, 10), **kw):
    return Element(ref=ref, tag=tag, text=text, box=box, **kw)


def test_render_elements_lines_and_filters():
    els = [
        _el(1, "body", box=(0, 0, 600, 210), is_leaf=False, focused=True),
        _el(2, "div", box=(0, 50, 160, 80), is_leaf=False),  # layout container: skipped
        _el(3, "button", 'say "hi"\nnow', box=(2, 52, 31, 21)),
        _el(4, "input_text", "", box=(33, 52, 117, 21), value="Jerald", focused=True),
        _el(5, "input_checkbox", "", box=(5, 60, 12, 12), checked=True),
        _el(6, "div", "hidden", box=(5, 80, 50, 10), visible=False),  # invisible: skipped
        _el(7, "span", "zero", box=(5, 90, 0, 10)),  # zero-size: skipped
        _el(-3, "t", "fragment", box=(20, 100, 30, 10)),
        _el(8, "div", "", box=(0, 0, 50, 50), is_leaf=True, scroll=(40, 300)),
        _el(9, "select", "", box=(0, 0, 50, 20), is_leaf=False, value="b"),  # non-leaf but a target
    ]
    text = render_elements(els, 10_000)
    assert text.splitlines() == [
        '[3] button "say \\"hi\\" now" box=(2,52,31,21)',
        '[4] input_text "" value="Jerald" box=(33,52,117,21) focused',
        '[5] input_checkbox "" box=(5,60,12,12) checked',
        '[-] t "fragment" box=(20,100,30,10)',
        '[8] div "" box=(0,0,50,50) scroll=40/300',
        '[9] select "" value="b" box=(0,0,50,20)',
    ]
    # dicts (episode files' elements) render the same
    assert render_elements([e.to_dict() for e in els], 10_000) == text


def test_render_elements_label_takes_its_fragments_text():
    els = [
        _el(3, "label", "", box=(2, 59, 51, 11), is_leaf=False),
        _el(4, "input_checkbox", "", box=(6, 55, 20, 13), parent=3, checked=False),
        _el(-1, "t", "blue", box=(30, 59, 20, 11), parent=3),
        _el(5, "div", "", box=(0, 80, 160, 30), is_leaf=False),
        _el(-2, "t", "plain text", box=(2, 80, 50, 11), parent=5),  # a layout div's fragment keeps its line
    ]
    assert render_elements(els).splitlines() == [
        '[3] label "blue" box=(2,59,51,11)',
        '[4] input_checkbox "" box=(6,55,20,13) unchecked',
        '[-] t "plain text" box=(2,80,50,11)',
    ]


def test_render_elements_budget():
    els = [_el(i, "button", f"button number {i}", box=(0, i, 50, 10)) for i in range(1, 41)]
    full = render_elements(els, 100_000)
    assert len(full.splitlines()) == 40
    for budget in (60, 200, 777, len(full) - 1):
        text = render_elements(els, budget)
        assert len(text) <= budget
        lines = text.splitlines()
        n_shown = len(lines) - 1
        assert lines[-1] == f"... ({40 - n_shown} more elements)"
        assert lines[:-1] == full.splitlines()[:n_shown]
    assert render_elements(els, len(full)) == full
    assert render_elements(els, 5) == "... (40 more elements)"  # smaller than the closing line: only it
    long = render_elements([_el(1, "div", "x" * 500)], 10_000)
    assert '"' + "x" * 77 + '..."' in long


def test_to_css_pixels():
    assert to_css_pixels(80, 105, TASK_SIZE) == (80, 105)  # the screenshot is in CSS pixels already
    assert to_css_pixels(320, 420, (640, 840)) == (80, 105)  # a 4x resized copy
    assert to_css_pixels(33, 33, (320, 420)) == (16, 16)  # rounded to the nearest CSS pixel


def test_check_names_the_missing_browser(tmp_path):
    from envs.gui.env import MiniWobEnv

    if importlib.util.find_spec("miniwob") is None or importlib.util.find_spec("selenium") is None:
        pytest.skip("the gui extra is not installed (check() names it first)")

    with pytest.raises(FileNotFoundError, match=r"apt-get install chromium chromium-driver \(as root\)"):
        MiniWobEnv.check(chromium=str(tmp_path / "no-chromium"))
    if MISSING is None:
        with pytest.raises(ValueError, match="unknown history"):
            MiniWobEnv.check(history="everything")


def test_registered():
    import envs.gui.env  # noqa: F401
    from rl.registry import ENVIRONMENTS

    assert ENVIRONMENTS.get("miniwob").__name__ == "MiniWobEnv"


# ----------------------------------------------------------------------------- live browser


@pytest.fixture(scope="module")
def pool():
    if MISSING:
        pytest.skip(f"no browser: {MISSING}")
    with BrowserPool(1, screenshots=True, wait_seconds=0.2) as p:
        yield p


@pytest.fixture
def session(pool):
    return pool.session(0)


def target_button(screen):
    return next(e for e in screen.elements if e.tag == "button" and e.text == screen.fields["target"])


@live
def test_click_button_by_element_and_by_point(session):
    screen = session.reset("click-button", 3)
    assert screen.utterance.startswith("Click on") and screen.fields["target"]
    assert screen.screenshot.size == TASK_SIZE
    b = target_button(screen)
    _, reward, done, info = session.step(act(f"click(element={b.ref})"))
    assert (reward, done, info["valid"]) == (1.0, True, True)

    screen = session.reset("click-button", 4)
    b = target_button(screen)
    l, t, w, h = b.box
    _, reward, done, info = session.step(act(f"click(x={l + w // 2}, y={t + h // 2})"))
    assert (reward, done, info["valid"]) == (1.0, True, True)
    assert info["raw_reward"] == 1.0 and screen.dom["task"] == "click-button"

    screen = session.reset("click-button", 4)  # the wrong button: MiniWoB's -1
    other = next(e for e in screen.elements if e.tag == "button" and e.text != screen.fields["target"])
    _, reward, done, _ = session.step(act(f"click(element={other.ref})"))
    assert (reward, done) == (-1.0, True)


@live
def test_same_seed_same_instance_and_refs(session):
    """A (task, seed) gives the same page and the same refs whatever the browser ran before."""
    a = session.reset("click-button", 11)
    b = session.reset("click-button", 11)  # after an unfinished episode
    b_ = target_button(b)
    final, _, done, _ = session.step(act(f"click(element={b_.ref})"))
    assert done and final.element(b_.ref) is not None and final.element(b_.ref).text == b_.text  # refs kept at the end
    session.reset("enter-text", 2)  # another task in between
    c = session.reset("click-button", 11)  # after a finished episode
    dump = [e.to_dict() for e in a.elements]
    assert a.utterance == b.utterance == c.utterance
    assert dump == [e.to_dict() for e in b.elements] == [e.to_dict() for e in c.elements]
    assert [e.ref for e in a.elements if e.ref > 0] == list(range(1, len([e for e in a.elements if e.ref > 0]) + 1))


@live
def test_screenshot_pixels_are_css_pixels(session):
    session.reset("click-button", 5)
    session.driver.execute_script(
        "var d = document.createElement('div'); d.id = 'probe';"
        "d.style.cssText = 'position:absolute;left:30px;top:60px;width:20px;height:10px;background:rgb(255,0,0)';"
        "document.getElementById('area').appendChild(d);")
    screen = session.observe()
    probe = next(e for e in screen.elements if e.id == "probe")
    assert probe.box == (30, 60, 20, 10)
    img = screen.screenshot.convert("RGB")
    assert img.getpixel((31, 61))[0] > 200 and img.getpixel((31, 61))[1] < 60  # inside: red
    assert img.getpixel((48, 68))[0] > 200 and img.getpixel((48, 68))[1] < 60
    for x, y in ((28, 65), (52, 65), (40, 58), (40, 71)):  # 2 px outside each edge: not red
        r, g, _ = img.getpixel((x, y))
        assert not (r > 200 and g < 60), (x, y)


@live
def test_enter_text_type_keys_and_submit(session):
    screen = session.reset("enter-text", 1)
    field = next(e for e in screen.elements if e.tag == "input_text")
    target = screen.fields["target"]
    session.driver.execute_script("window.__keys = []; document.addEventListener('keydown', "
                                  "function (e) { window.__keys.push(e.key); });")
    screen, _, done, info = session.step(act(f"click(element={field.ref})"))
    assert info["valid"] and not done and screen.element(field.ref).focused
    screen, _, _, info = session.step(act(f'type(text="{target}xy")'))
    assert info["valid"] and screen.element(field.ref).value == target + "xy"
    screen, _, _, _ = session.step(act('key(key="Backspace")'))
    screen, _, _, _ = session.step(act("key(Backspace)"))
    assert screen.element(field.ref).value == target
    session.step(act('key(key="Ctrl+a")'))  # modifiers: select all, then typing replaces it
    screen, _, _, _ = session.step(act('type(text="zz")'))
    assert screen.element(field.ref).value == "zz"
    session.step(act('key("Ctrl+a")'))
    screen, _, _, _ = session.step(act(f'type(text="{target}")'))
    assert screen.element(field.ref).value == target
    assert json.loads(json.dumps(screen.dom)) == screen.dom  # the snapshot is JSON-safe
    session.step(act('key(key="Enter")'))
    assert session.driver.execute_script("return window.__keys;")[-1] == "Enter"
    submit = next(e for e in screen.elements if e.tag == "button")
    _, reward, done, _ = session.step(act(f"click(element={submit.ref})"))
    assert (reward, done) == (1.0, True)


@live
def test_click_checkboxes(session):
    screen = session.reset("click-checkboxes", 2)
    boxes = [e for e in screen.elements if e.tag == "input_checkbox"]
    assert boxes and all(b.checked is False for b in boxes)
    wanted = {v for k, v in screen.fields.items() if k.startswith("target")}

    def label(b):
        return next(e.text for e in screen.elements if e.parent == b.parent and e.ref != b.ref and e.text)

    picks = [b for b in boxes if label(b) in wanted]
    assert len(picks) == len(wanted)
    for b in picks:
        screen, _, _, info = session.step(act(f"click(element={b.ref})"))
        assert info["valid"] and screen.element(b.ref).checked is True
        assert next(e for e in screen.dom["elements"] if e["ref"] == b.ref)["checked"] is True
    submit = next(e for e in screen.elements if e.tag == "button")
    _, reward, done, _ = session.step(act(f"click(element={submit.ref})"))
    assert (reward, done) == (1.0, True)


@live
def test_scroll_textarea_to_the_end(session):
    for seed in range(20):  # find both directions among the seeds
        screen = session.reset("scroll-text-2", seed)
        down = "bottom" in screen.utterance
        area = next(e for e in screen.elements if e.scroll is not None)
        start = area.scroll[0]
        assert 0 < start < area.scroll[1]
        for _ in range(30):
            screen, _, _, info = session.step(act(f'scroll(direction="{"down" if down else "up"}")'))
            assert info["valid"]
            top, most = screen.element(area.ref).scroll
            if top == (most if down else 0):
                break
        assert top == (most if down else 0), (seed, top, most)
        submit = next(e for e in screen.elements if e.tag == "button")
        _, reward, done, _ = session.step(act(f"click(element={submit.ref})"))
        assert (reward, done) == (1.0, True)
        if seed >= 1 and down:
            break


@live
def test_scroll_is_seen_in_the_next_screen(session):
    """The wheel is handled a frame later: the step waits for it (a textarea of scroll-text, a select list)."""
    for task in ("scroll-text", "click-scroll-list"):
        screen = session.reset(task, 1)
        area = next(e for e in screen.elements if e.scroll is not None)
        assert area.scroll[0] == 0 and area.scroll[1] > 0
        screen, _, _, info = session.step(act("scroll(down)"))
        top = screen.element(area.ref).scroll[0]
        assert info["valid"] and 0 < top <= area.scroll[1], (task, top)
        screen, _, _, _ = session.step(act(f'scroll(direction="up", element={area.ref})'))
        assert screen.element(area.ref).scroll[0] < top


@live
def test_wait_terminate_and_invalid_actions(session):
    screen = session.reset("click-button", 6)
    n = len(screen.elements)
    screen, reward, done, info = session.step(act("wait()"))
    assert (reward, done, info["valid"]) == (0.0, False, True) and len(screen.elements) == n
    for text, why in (("click(element=999)", "no element 999"), ("click(x=170, y=5)", "outside the 160x210"),
                      ("click(x=5, y=400)", "outside"), ('type(text="\U0001F600")', "Basic Multilingual"),
                      ('scroll(direction="down", element=999)', "no element")):
        _, reward, done, info = session.step(act(text))
        assert not info["valid"] and why in info["error"] and not done and reward == 0.0
    _, reward, done, info = session.step(act('terminate(status="success")'))
    assert (reward, done, info["valid"]) == (0.0, True, True)  # the page had not ended: MiniWoB's reward is 0
    b = target_button(session.reset("click-button", 6))
    session.step(act(f"click(element={b.ref})"))
    _, reward, done, info = session.step(act('terminate(status="success")'))
    assert done and not info["valid"] and info["error"] == "the episode is over"


@live
def test_no_network(session):
    from selenium.common.exceptions import WebDriverException

    session.reset("click-button", 1)
    with pytest.raises(WebDriverException, match="ERR_PROXY_CONNECTION_FAILED|ERR_NAME_NOT_RESOLVED"):
        session.driver.get("http://93.184.216.34/")
    assert session.reset("click-button", 1).utterance  # the task page loads again


@live
def test_unknown_task_is_one_line(session):
    from rl.common import UserError

    with pytest.raises(UserError, match="unknown MiniWoB task 'no-such-task'"):
        session.reset("no-such-task", 0)


# ----------------------------------------------------------------------------- process hygiene


@live
def test_close_leaves_no_process():
    pool = BrowserPool(1, screenshots=False)
    s = pool.session(0)
    s.reset("click-button", 0)
    pgid, profile = s.pgid, s.profile
    pids = s.pids()
    assert len(pids) >= 3  # chromedriver, chromium, its zygotes / renderers
    names = {open(f"/proc/{p}/comm").read().strip() for p in pids}
    assert "chromedriver" in names and any(n.startswith("chrom") for n in names - {"chromedriver"})
    pool.close()
    assert session_pids(pgid, profile) == [] and not os.path.exists(profile)
    pool.close()  # twice is fine


@live
def test_exception_inside_with_leaves_no_process():
    with pytest.raises(RuntimeError, match="boom"):
        with BrowserPool(1, screenshots=False) as pool:
            s = pool.session(0)
            s.reset("click-button", 0)
            pgid, profile = s.pgid, s.profile
            assert s.pids()
            raise RuntimeError("boom")
    assert session_pids(pgid, profile) == []


@live
def test_sigkilled_owner_leaves_no_process():
    code = textwrap.dedent("""
        import json, sys, time
        from envs.gui.browser import BrowserPool
        pool = BrowserPool(1, screenshots=False)
        s = pool.session(0)
        s.reset("click-button", 0)
        print(json.dumps({"pgid": s.pgid, "profile": s.profile, "pids": s.pids()}), flush=True)
        time.sleep(120)
    """)
    child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        got = json.loads(child.stdout.readline())
        assert got["pids"] and session_pids(got["pgid"], got["profile"])
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        assert wait_gone(got["pgid"], got["profile"]) == []
        deadline = time.monotonic() + 5
        while os.path.exists(got["profile"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not os.path.exists(got["profile"])
    finally:
        if child.poll() is None:
            child.kill()


@live
def test_crashed_browser_is_reported_and_restarted():
    with BrowserPool(1, screenshots=False) as pool:
        s = pool.session(0)
        s.reset("click-button", 0)
        old = s.pgid
        os.killpg(old, signal.SIGKILL)
        with pytest.raises(BrowserCrashed, match="MiniWoB browser 0 failed"):
            s.step(act("click(x=5, y=60)"))
        assert not s.alive and session_pids(old, None) == []
        screen = s.reset("click-button", 0)  # a fresh browser
        assert s.pgid != old and s.starts == 2 and screen.utterance


# ----------------------------------------------------------------------------- the environment


class _T:
    """A stand-in Turn (the environment reads sample, text and last)."""

    def __init__(self, sample, text, last=False):
        self.sample, self.text, self.last, self.turn, self.final, self.generation = sample, text, last, 0, False, None


def out(action: str, context: str = "did things") -> str:
    from envs.gui.secagent import format_step_output

    return format_step_output(context, "next", action)


@pytest.fixture(scope="module")
def env_pools():
    if MISSING:
        pytest.skip(f"no browser: {MISSING}")
    yield
    from envs.gui.env import close_pools

    close_pools()


def ref_of(prompt_text: str, label: str) -> int:
    line = next(ln for ln in prompt_text.splitlines() if f'"{label}"' in ln and ln.startswith("["))
    return int(line[1:line.index("]")])


@live
def test_env_episode_success_and_corrective_message(env_pools):
    from envs.gui.env import MiniWobEnv

    env = MiniWobEnv(pool_size=2, max_steps=5, history="semantic")
    prompts = env.reset([{"task": "click-button", "seed": 3}, {"task": "click-button", "seed": 4}])
    assert [m["role"] for m in prompts[0].messages] == ["system", "user"]
    user = prompts[0].messages[1]["content"]
    target = env.samples[0].screen.fields["target"]
    assert "Click on" in user and f'"{target}"' in user and prompts[0].images is None
    res = env.step([_T(0, out(f"click(element={ref_of(user, target)})")), _T(1, "I think I should click")])
    assert res[0].done and res[0].reason == "task_done" and res[0].valid
    assert not res[1].done and not res[1].valid and res[1].action == "invalid"
    assert res[1].message["role"] == "user" and "not a valid step" in res[1].message["content"]
    assert "Current screen" in res[1].message["content"]
    res = env.step([_T(1, out("click(element=999)"))])  # parses, but the browser cannot do it
    assert not res[0].valid and "no element 999" in res[0].message["content"]
    info0, info1 = env.info(0), env.info(1)
    assert info0["success"] and info0["raw_reward"] == 1.0 and info0["steps"] == 1 and info0["invalid"] == 0
    assert info0["milestones"] == [True] and info0["progress"] == 1.0
    assert info1["invalid"] == 2 and not info1["success"] and len(info1["step_seconds"]) == 1
    assert len(info0["input_chars"]) == 1 and len(info1["input_chars"]) == 3


@live
def test_env_terminate_max_steps_and_last(env_pools):
    from envs.gui.env import MiniWobEnv

    env = MiniWobEnv(pool_size=2, max_steps=2)
    env.reset([{"task": "click-button", "seed": 1}] * 2)
    res = env.step([_T(0, out('terminate(status="failure")')), _T(1, out("wait()"))])
    assert res[0].done and res[0].reason == "terminate" and not res[1].done
    assert env.info(0)["terminate_status"] == "failure" and not env.info(0)["success"]
    res = env.step([_T(1, out("wait()"))])
    assert res[0].done and res[0].reason == "max_steps"
    with pytest.raises(ValueError, match="row 0 .* needs an integer 'seed'"):
        env.reset([{"task": "click-button", "seed": "3"}])


@live
def test_env_multiplexes_more_samples_than_browsers(env_pools):
    """pool_size 1, 3 samples: each step restores a sample's page by replay; the episodes still succeed."""
    from envs.gui.env import MiniWobEnv

    env = MiniWobEnv(pool_size=1, max_steps=6)
    rows = [{"task": "click-checkboxes", "seed": s} for s in (2, 2, 5)]
    prompts = env.reset(rows)
    plans = []
    for k, p in enumerate(prompts):
        screen = env.samples[k].screen
        wanted = {v for key, v in screen.fields.items() if key.startswith("target")}
        boxes = [e for e in screen.elements if e.tag == "input_checkbox"]
        label = {b.ref: next(e.text for e in screen.elements if e.parent == b.parent and e.ref != b.ref and e.text)
                 for b in boxes}
        clicks = [f"click(element={r})" for r, name in label.items() if name in wanted]
        plans.append(clicks + [f"click(element={next(e.ref for e in screen.elements if e.tag == 'button')})"])
    running = {0, 1, 2}
    for step in range(6):
        turns = [_T(k, out(plans[k][step])) for k in sorted(running)]
        for t, r in zip(turns, env.step(turns)):
            assert r.valid, r
            if r.done:
                assert r.reason == "task_done"
                running.discard(t.sample)
        if not running:
            break
    assert not running
    for k in range(3):
        info = env.info(k)
        assert info["success"] and info["replay_mismatch"] == 0 and info["browser_errors"] == 0
    assert sum(env.info(k)["replays"] for k in range(3)) > 0


@live
def test_env_screenshots_for_vlm_policies(env_pools):
    from envs.gui.env import MiniWobEnv

    env = MiniWobEnv(pool_size=1, screenshots=True, history="raw", history_k=2)
    prompts = env.reset([{"task": "click-button", "seed": 3}])
    assert len(prompts[0].images) == 1 and prompts[0].images[0].size == TASK_SIZE
    parts = prompts[0].messages[-1]["content"]
    assert parts[0] == {"type": "image"} and parts[-1]["type"] == "text"
    res = env.step([_T(0, out("wait()"))])
    assert len(res[0].images) == 2  # the previous screen's + the current one
    assert isinstance(res[0].message["content"], str) and "Previous screen" in res[0].message["content"]


class _ClickTargetEngine:
    """A rollout engine that reads the screen in the prompt and clicks the button the task names
    (turn 0 of odd samples writes garbage first, to go through the corrective message)."""

    def __init__(self, tokenizer):
        self.tok, self.calls = tokenizer, 0

    def generate(self, prompts, params, images=None):
        import re

        from rl.engines import Generation

        self.calls += 1
        out = []
        for k, seq in enumerate(prompts):
            text = self.tok.decode(seq)
            if self.calls == 1 and k % 2 == 1:
                reply = "I am not sure what to do</action>"
            else:
                target = re.findall(r'Click on the "([^"]*)" button', text)[-1]
                screen = text[text.rindex("Current screen:"):]
                ref = re.search(r'\[(\d+)\] button ' + re.escape(json.dumps(target)), screen).group(1)
                reply = f"<context>clicking {target}</context>\n<thought>the task names it</thought>\n" \
                        f"<action>click(element={ref})</action>"
            assert reply.endswith(tuple(params.stop))  # the environment's stop string reached the engine
            ids = self.tok(reply, add_special_tokens=False)["input_ids"]
            out.append(Generation(ids, [-0.1] * len(ids), "stop", "</action>"))
        return out

    def session(self):
        import contextlib

        return contextlib.nullcontext()


@live
def test_env_through_the_multi_turn_loop(env_pools, tiny_tokenizer):
    import envs.gui.env  # noqa: F401  (registers "miniwob")
    from agents.multi_turn import multi_turn
    from rl.engines import SamplingParams

    rows = [{"task": "click-button", "seed": 21}, {"task": "click-button", "seed": 22}]
    engine = _ClickTargetEngine(tiny_tokenizer)
    trajs = multi_turn(engine, tiny_tokenizer, rows, params=SamplingParams(max_new_tokens=200), group_size=2,
                       env="miniwob", env_kwargs={"pool_size": 2, "max_steps": 4})
    assert len(trajs) == 4
    for k, tr in enumerate(trajs):
        info = tr.info
        assert info["success"] and info["termination"] == "task_done", info
        assert info["invalid"] == k % 2 and info["steps"] == 1 + k % 2 and info["turns"] == 1 + k % 2
        assert len(info["input_tokens"]) == 1 + k % 2 and all(n > 50 for n in info["input_tokens"])
    text = tiny_tokenizer.decode(trajs[1].response_ids)
    assert "not a valid step" in text and "<|im_start|>user" in text  # the corrective message is a user turn


@live
def test_env_screenshots_through_the_loop_on_a_tiny_vlm(env_pools, tmp_path):
    """Screens as images in the first prompt and in every step message, on the tiny Qwen2-VL (random policy:
    every output is invalid, so each corrective message carries the current screenshot)."""
    import torch
    from tiny_vlm import save_tiny_qwen2_vl

    import envs.gui.env  # noqa: F401
    from agents.multi_turn import multi_turn
    from rl.engines import HFEngine, SamplingParams
    from rl.multimodal import load_pretrained_model, load_tokenizer_and_processor

    path = save_tiny_qwen2_vl(tmp_path / "qwen2_vl")
    tok, _ = load_tokenizer_and_processor(path)
    model = load_pretrained_model(path, torch.float32, "sdpa").eval()
    torch.manual_seed(0)
    trajs = multi_turn(HFEngine(model, tok), tok, [{"task": "click-button", "seed": 2}],
                       params=SamplingParams(max_new_tokens=6, temperature=1.0), group_size=1, env="miniwob",
                       env_kwargs={"pool_size": 1, "max_steps": 2, "screenshots": True})
    (tr,) = trajs
    assert tr.info["termination"] == "max_steps" and tr.info["invalid"] == 2 and tr.info["turns"] == 2
    assert len(tr.images) == 2 and tr.prompt_images == 1  # the first screen + the corrective message's screen
    assert all(im.size == TASK_SIZE for im in tr.images)

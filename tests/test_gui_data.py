"""envs/gui data: the DOM oracle, valid actions by replay, episode files, splits, rows, adapters, the CLI.

Fast tests run the oracle / replay logic on a toy page (`ToyPage`, a session with the MiniWobSession
interface); the live-browser tests (slow: they start headless Chromium) run the oracle on real MiniWoB
pages and skip with a reason when Chromium is missing.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass

import pytest
from PIL import Image

from envs.gui.actions import Action, parse_action
from envs.gui.adapters import convert, load_androidcontrol, load_multichoice
from envs.gui.episodes import (
    EpisodeError,
    build_rows,
    read_episodes,
    split_episodes,
    validate_episode,
    write_episodes,
)
from envs.gui.oracle import POLICIES, record_episode, state_digest
from rl.common import read_jsonl

# ----------------------------------------------------------------------------- a toy page


@dataclass
class El:
    ref: int
    tag: str
    text: str
    box: tuple
    value: str = ""
    classes: str = ""
    id: str = ""
    focused: bool = False
    is_leaf: bool = True
    checked: bool | None = None
    selected: bool | None = None
    visible: bool = True


@dataclass
class Scr:
    task: str
    seed: int
    utterance: str
    elements: list
    screenshot: object
    fields: dict
    dom: dict

    @property
    def size(self):
        return (160, 210)


class ToyPage:
    """click-button-like page: two "OK" buttons (both solve it), "Cancel" (fails), plain text (a no-op).
    Counts resets so tests can check the replay cost bound."""

    def __init__(self, target: str = "OK"):
        self.resets = 0
        self.state = None
        self.target = target

    def _screen(self):
        st = self.state
        els = [El(1, "div", "", (0, 0, 160, 210), is_leaf=False),
               El(-1, "t", "some words", (2, 52, 60, 11)),
               El(2, "button", "OK", (2, 70, 40, 20)),
               El(3, "button", "OK", (50, 70, 40, 20)),
               El(4, "button", "Cancel", (100, 70, 50, 20))]
        dom = {"done": st["done"], "reward": st["reward"], "fields": {"target": self.target}}
        return Scr("click-button", self.seed, f'Click on the "{self.target}" button.', els,
                   Image.new("RGB", (160, 210), "white"), {"target": self.target}, dom)

    def reset(self, task, seed):
        self.resets += 1
        self.seed = seed
        self.state = {"done": False, "reward": 0.0}
        return self._screen()

    def step(self, a: Action):
        assert a.kind == "click" and a.x is not None, "the oracle clicks by point"
        hit = [e for e in self._screen().elements if e.is_leaf and e.box[0] <= a.x < e.box[0] + e.box[2]
               and e.box[1] <= a.y < e.box[1] + e.box[3]]
        if hit and hit[0].tag == "button" and not self.state["done"]:
            self.state = {"done": True, "reward": 1.0 if hit[0].text == "OK" else -1.0}
        s = self._screen()
        return s, self.state["reward"], self.state["done"], {"raw_reward": self.state["reward"]}


# ----------------------------------------------------------------------------- oracle + replay on the toy page


def test_replay_finds_both_equivalent_targets_and_skips_noops(tmp_path):
    page = ToyPage()
    ep, counters = record_episode(page, "click-button", 0, screens_dir=tmp_path / "screens", screens_rel="screens")
    assert ep["success"] and len(ep["steps"]) == 1
    step = ep["steps"][0]
    assert step["action"] == "click(element=2)"
    # both OK buttons lead to the same next state; Cancel and the text do not
    assert sorted(step["valid_actions"]) == ["click(element=2)", "click(element=3)"]
    assert step["valid_actions_source"] == "replay"
    assert (tmp_path / step["screenshot"]).is_file()
    # 1 recording reset + one replay before the first candidate + one after each state-changing candidate
    # (OK #1, OK #2): the no-op text click costs no replay, the last candidate (Cancel) needs none after it
    assert counters["candidates"] == 4
    assert counters["replays"] == 3 and page.resets == 4
    validate_episode(ep, "toy")


def test_state_digest_ignores_refs_but_not_values():
    page = ToyPage()
    s = page.reset("click-button", 0)
    d0 = state_digest(s, done=False, raw_reward=0.0)
    s.elements[2].ref = 99  # text nodes are renumbered every step: not a different state
    assert state_digest(s, done=False, raw_reward=0.0) == d0
    s.elements[2].focused = True  # a focused button: typing would not go there, the same state
    assert state_digest(s, done=False, raw_reward=0.0) == d0
    s.elements[2].tag = "input_text"
    d1 = state_digest(s, done=False, raw_reward=0.0)
    s.elements[2].focused = False  # a focused input decides where typing goes: a different state
    assert state_digest(s, done=False, raw_reward=0.0) != d1
    s.elements[2].value = "x"
    d_done = state_digest(s, done=True, raw_reward=1.0)
    assert d_done != d0 and d_done == state_digest(page.reset("click-button", 0), done=True, raw_reward=1.0)
    assert d_done != state_digest(s, done=True, raw_reward=-1.0)


def _form(values: dict, focused: str | None = None) -> Scr:
    els = [El(7, "input_text", "", (7, 78, 128, 21), value=values.get("username", ""), id="username",
              focused=focused == "username"),
           El(10, "input_password", "", (7, 130, 108, 21), value=values.get("password", ""), id="password",
              focused=focused == "password"),
           El(11, "button", "Login", (2, 166, 86, 31))]
    f = {"username": "kanye", "password": "pw1"}
    return Scr("login-user", 0, "...", els, None, f, {})


def test_login_policy_is_a_function_of_the_dom():
    policy = POLICIES["login-user"]
    assert policy(_form({}), {}).action == Action(kind="click", element=7)
    d = policy(_form({}, focused="username"), {})
    assert d.action == Action(kind="type", text="kanye") and "username" in d.note
    assert policy(_form({"username": "kanye"}, focused="username"), {}).action == Action(kind="click", element=10)
    assert policy(_form({"username": "kanye"}, focused="password"), {}).action == Action(kind="type", text="pw1")
    assert policy(_form({"username": "kanye", "password": "pw1"}), {}).action == Action(kind="click", element=11)


def test_checkbox_policy_pairs_labels_by_geometry():
    els = [El(6, "input_checkbox", "", (6, 55, 20, 13), checked=False, value=""),
           El(-1, "t", "AU", (29, 59, 13, 11)),
           El(8, "input_checkbox", "", (6, 74, 20, 13), value="true"),  # checked (MiniWoB's bool in value)
           El(-2, "t", "HF2", (29, 78, 18, 11)),
           El(9, "button", "Submit", (2, 101, 95, 31))]
    s = Scr("click-checkboxes", 0, "Select AU and click Submit.", els, None, {"target 0": "AU"}, {})
    d = POLICIES["click-checkboxes"](s, {})
    assert d.action == Action(kind="click", element=6) and d.note == 'Checked "AU".'
    els[0].checked = True
    d = POLICIES["click-checkboxes"](s, {})
    assert d.action == Action(kind="click", element=8) and d.note == 'Unchecked "HF2".'


# ----------------------------------------------------------------------------- episode files and splits


def _episode(task="click-button", seed=0, n_steps=2, shot=None):
    steps = []
    for i in range(n_steps):
        steps.append({
            "screenshot": shot,
            "elements": [{"ref": 2, "tag": "button", "text": "OK", "box": [2, 70, 40, 20], "value": ""},
                         {"ref": 3, "tag": "button", "text": "Submit", "box": [50, 70, 40, 20], "value": ""}],
            "action": "click(element=2)" if i == 0 else 'type(text="hi")',
            "valid_actions": ["click(element=2)"] if i == 0 else ['type(text="hi")'],
            "semantic_context": "Clicked OK." if i == 0 else 'Clicked OK. Typed "hi".',
            "thought": "go",
            "step_instruction": None,
            "milestones": {"clicked": i == n_steps - 1},
        })
    return {"episode_id": f"{task}/seed{seed}", "source": "miniwob-oracle", "task": task, "seed": seed,
            "instruction": "Click OK.", "screen_size": [160, 210], "steps": steps, "success": True}


def test_episode_round_trip(tmp_path):
    eps = [_episode(seed=0), _episode("login-user", 3, n_steps=3)]
    path = write_episodes(tmp_path / "episodes.jsonl", eps)
    assert read_episodes(path) == eps


def test_episode_errors_name_file_episode_and_step(tmp_path):
    bad = _episode()
    bad["steps"][1]["valid_actions"] = ["click(element=-3)"]
    with pytest.raises(EpisodeError, match=r"episodes.jsonl:2 episode 'click-button/seed0' step 1: action .* does not parse"):
        (tmp_path / "episodes.jsonl").write_text(json.dumps(_episode(seed=5)) + "\n" + json.dumps(bad) + "\n")
        read_episodes(tmp_path / "episodes.jsonl")
    bad = _episode()
    del bad["steps"][0]["elements"][1]["box"]
    with pytest.raises(EpisodeError, match=r"step 0 element 1: missing key 'box'"):
        write_episodes(tmp_path / "x.jsonl", [bad])
    assert not (tmp_path / "x.jsonl").exists()
    with pytest.raises(EpisodeError, match="appears twice"):
        write_episodes(tmp_path / "x.jsonl", [_episode(), _episode()])


def test_splits_hold_out_task_types_and_seeds():
    eps = [_episode(t, s) for t in ("click-button", "login-user", "enter-password") for s in range(0, 40, 3)]
    train, test = split_episodes(eps, heldout_tasks=["enter-password"], test_seed_min=30)
    key = lambda e: (e["task"], e["seed"])  # noqa: E731
    assert not {key(e) for e in train} & {key(e) for e in test}
    assert len(train) + len(test) == len(eps)
    assert all(e["task"] != "enter-password" and e["seed"] < 30 for e in train)
    assert {e["task"] for e in test if e["seed"] < 30} == {"enter-password"}
    assert {e["seed"] for e in test if e["task"] == "click-button"} == {30, 33, 36, 39}


def test_build_rows(tmp_path):
    ep_dir = tmp_path / "episodes"
    (ep_dir / "screens").mkdir(parents=True)
    Image.new("RGB", (160, 210)).save(ep_dir / "screens" / "a.png")
    eps = [_episode("click-button", 1, shot="screens/a.png"), _episode("click-button", 35, shot="screens/a.png"),
           _episode("click-option", 2, shot="screens/a.png")]
    write_episodes(ep_dir / "episodes.jsonl", eps)
    out = tmp_path / "rows"
    stats = build_rows(read_episodes(ep_dir / "episodes.jsonl"), episodes_dir=ep_dir, out_dir=out,
                       history_modes=["semantic", "none", "raw"], history_k=2, images=True, history_images=True,
                       heldout_tasks=["click-option"], test_seed_min=30)
    assert stats["episodes"] == {"train": 1, "test": 2}
    sft = read_jsonl(out / "sft.jsonl")
    assert len(sft) == 2 and {r["id"] for r in sft} == {"click-button/seed1/step0", "click-button/seed1/step1"}
    # the answer: the oracle's context, thought and action in the SecAgent format
    assert sft[1]["messages"][-1]["content"].startswith('<context>Clicked OK. Typed "hi".</context>')
    assert sft[1]["messages"][-1]["content"].rstrip().endswith('<action>type(text="hi")</action>')
    # with images, clicks are written as points at the box centre (refs are not on a screenshot)
    assert sft[0]["messages"][-1]["content"].rstrip().endswith("<action>click(x=22, y=80)</action>")
    # semantic history: the previous step's context is in the prompt, with one previous screen (+ its image)
    prompt_text = sft[1]["messages"][1]["content"][-1]["text"]
    assert "Clicked OK." in prompt_text and "click(element=2)" in prompt_text
    assert len(sft[1]["images"]) == 2 and (out / sft[1]["images"][0]).resolve().is_file()
    test_rows = read_jsonl(out / "static_test.jsonl")
    assert {r["episode_id"] for r in test_rows} == {"click-button/seed35", "click-option/seed2"}
    r0 = test_rows[0]
    assert r0["valid_actions"] == ["click(element=2)"] and r0["step"] == 0 and r0["elements"][0]["box"] == [2, 70, 40, 20]
    assert r0["messages"][-1]["role"] == "user"  # the prompt only
    # the "secagent" prompt builder renders the same prompt from the row's pieces
    from envs.gui.secagent import secagent_prompt

    r1 = next(r for r in read_jsonl(out / "static_train.jsonl") if r["step"] == 1)
    rebuilt = secagent_prompt(r1)
    assert rebuilt[1]["content"][-1] == r1["messages"][1]["content"][-1]
    assert r1["semantic_context"] == "Clicked OK." and r1["history_steps"][0]["action"] == "click(element=2)"
    assert len(read_jsonl(out / "static_test_none.jsonl")) == len(test_rows)
    assert all(len(r["images"]) == 1 for r in read_jsonl(out / "sft_none.jsonl"))
    # grounding: "Click the "OK" button." -> a click at the centre of its box, in the same step format
    g = read_jsonl(out / "grounding.jsonl")
    ok = [r for r in g if 'the "OK" button' in r["messages"][1]["content"][-1]["text"]]
    assert ok and ok[0]["messages"][-1]["content"].rstrip().endswith("<action>click(x=22, y=80)</action>")
    assert json.loads((out / "stats.json").read_text())["files"]["grounding.jsonl"] == len(g)
    # by default only the current screen is pictured
    build_rows(read_episodes(ep_dir / "episodes.jsonl"), episodes_dir=ep_dir, out_dir=tmp_path / "rows1", images=True)
    assert all(len(r["images"]) == 1 for r in read_jsonl(tmp_path / "rows1" / "sft.jsonl"))
    # text rows: clicks by ref, in navigation and grounding rows alike
    build_rows(read_episodes(ep_dir / "episodes.jsonl"), episodes_dir=ep_dir, out_dir=tmp_path / "rows2")
    assert read_jsonl(tmp_path / "rows2" / "sft.jsonl")[0]["messages"][-1]["content"].rstrip().endswith(
        "<action>click(element=2)</action>")
    g2 = read_jsonl(tmp_path / "rows2" / "grounding.jsonl")
    assert any(r["messages"][-1]["content"].rstrip().endswith("<action>click(element=2)</action>") for r in g2)


# ----------------------------------------------------------------------------- adapters


def _png_b64(color="red", size=(40, 80)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _ac_episode(eid=7, actions=None):
    actions = actions if actions is not None else [
        {"action_type": "click", "x": 20, "y": 30},
        json.dumps({"action_type": "input_text", "text": "pizza"}),
    ]
    n = len(actions) + 1
    node = {"bounds_in_screen": {"left": 10, "top": 20, "right": 30, "bottom": 40}, "text": "Search",
            "class_name": "android.widget.EditText", "package_name": "com.example.food"}
    forest = {"windows": [{"tree": {"nodes": [node, {"boundsInScreen": {"left": 0, "top": 0, "right": 0, "bottom": 0}}]}}]}
    return {"episode_id": eid, "goal": "Order a pizza", "screenshots": [_png_b64() for _ in range(n)],
            "accessibility_trees": [forest] * n, "screenshot_widths": [40] * n, "screenshot_heights": [80] * n,
            "actions": actions, "step_instructions": ["Tap the search box", "Type pizza"][: len(actions)]}


def test_androidcontrol_adapter(tmp_path):
    src = tmp_path / "ac.jsonl"
    unsupported = _ac_episode(8, [{"action_type": "click", "x": 1, "y": 2}, {"action_type": "navigate_back"}])
    src.write_text(json.dumps(_ac_episode()) + "\n" + json.dumps(unsupported) + "\n")
    out = tmp_path / "out"
    eps, stats = load_androidcontrol(src, out)
    assert stats["skipped"] == {"navigate_back": 1} and len(eps) == 1
    ep = eps[0]
    assert ep["episode_id"] == "androidcontrol/7" and ep["task"] == "com.example.food" and ep["seed"] == 7
    assert ep["screen_size"] == [40, 80] and len(ep["steps"]) == 2
    s0, s1 = ep["steps"]
    assert s0["action"] == "click(x=20, y=30)" and s0["valid_actions"] == ["click(x=20, y=30)"]
    assert s0["elements"] == [{"ref": 0, "tag": "EditText", "text": "Search", "box": [10, 20, 20, 20], "value": ""}]
    assert s1["action"] == 'type(text="pizza")' and s1["semantic_context"] == "Tap the search box Type pizza"
    assert Image.open(out / s0["screenshot"]).size == (40, 80)
    assert not (out / "screens" / "androidcontrol_8").exists()  # a skipped episode leaves nothing behind
    eps, stats = load_androidcontrol(src, tmp_path / "out2", unsupported="truncate")
    assert stats["truncated"] == 1 and [len(e["steps"]) for e in eps] == [2, 1] and not eps[1]["success"]
    with pytest.raises(EpisodeError, match=r"ac.jsonl:2 episode 8 step 1: action navigate_back"):
        load_androidcontrol(src, tmp_path / "out3", unsupported="error")
    bad = _ac_episode(9)
    bad["screenshots"] = bad["screenshots"][:2] + bad["screenshots"][:1]
    bad["actions"] = bad["actions"][:1]
    src.write_text(json.dumps(bad) + "\n")
    with pytest.raises(EpisodeError, match=r"episode 9: 3 screenshots for 1 actions"):
        load_androidcontrol(src, tmp_path / "out4")


def test_multichoice_adapter(tmp_path):
    Image.new("RGB", (1080, 2400)).save(tmp_path / "s0.png")
    data = {"episodes": [{
        "id": "lens-1", "instruction": "Turn on wifi", "app": "settings", "coordinates": "normalized_1000",
        "milestones": [{"name": "wifi page", "step": 0}, {"name": "wifi on", "step": 1}],
        "steps": [
            {"screenshot": "s0.png", "width": 1080, "height": 2400, "step_instruction": "Open Wi-Fi",
             "elements": [{"bbox": [0, 100, 1000, 150], "text": "Wi-Fi"}],
             "valid_actions": [{"type": "click", "x": 500, "y": 125},
                               {"type": "click", "bbox": [0, 100, 1000, 150], "text": "Wi-Fi row"}]},
            {"screenshot": "s0.png", "width": 1080, "height": 2400,
             "actions": [{"action_type": "click", "point": [900, 125]}, {"type": "finish"}]},
        ]}]}
    (tmp_path / "lens.json").write_text(json.dumps(data))
    eps, _ = load_multichoice(tmp_path / "lens.json", tmp_path / "out")
    ep = eps[0]
    assert ep["task"] == "settings" and ep["screen_size"] == [1080, 2400]
    s0, s1 = ep["steps"]
    # normalised [0, 1000) -> pixels of the 1080x2400 screenshot
    assert s0["elements"][0]["box"] == [0, 240, 1080, 120]
    assert s0["valid_actions"] == ["click(x=540, y=300)", "click(element=1)"]
    assert s0["elements"][1] == {"ref": 1, "tag": "region", "text": "Wi-Fi row", "box": [0, 240, 1080, 120], "value": ""}
    assert s1["valid_actions"] == ["click(x=972, y=300)", 'terminate(status="success")']
    assert s0["milestones"] == {"wifi page": True, "wifi on": False} and s1["milestones"]["wifi on"]
    assert all(parse_action(a).action is not None for s in ep["steps"] for a in s["valid_actions"])
    stats = convert("androidlens", tmp_path / "lens.json", tmp_path / "conv")
    assert stats["episodes"] == 1 and read_episodes(tmp_path / "conv" / "episodes.jsonl")[0]["episode_id"] == "androidlens/lens-1"
    data["episodes"][0]["steps"][1]["actions"] = [{"type": "swipe", "direction": "left"}]
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(EpisodeError, match=r"bad.json episode #0 episode 'lens-1' step 1 action 0: unknown action type 'swipe'"):
        load_multichoice(tmp_path / "bad.json", tmp_path / "out5")


def test_record_resumes_and_lists_failures(tmp_path):
    from envs.gui.__main__ import record

    out = tmp_path / "eps"
    stats = record([("click-button", [0, 1])], out, session=ToyPage())
    assert stats["episodes"] == 2 and stats["tasks"]["click-button"]["valid_actions"] == 4
    page = ToyPage()
    stats = record([("click-button", [0, 1, 2])], out, session=page)
    assert stats["resumed"] == 2 and stats["tasks"]["click-button"]["recorded"] == 1
    assert page.resets == 4  # only seed 2 was played (1 recording reset + 3 replays)
    stats = record([("click-button", [5])], out, session=ToyPage(target="Nope"))
    assert stats["failures"] == [{"task": "click-button", "seed": 5,
                                  "reason": "OracleError: click-button seed 5: no button 'Nope' on the screen"}]
    assert [e["seed"] for e in read_episodes(out / "episodes.jsonl")] == [0, 1, 2]
    assert json.loads((out / "record_stats.json").read_text())["failures"][0]["seed"] == 5


def test_convert_cli(tmp_path, capsys):
    from envs.gui.__main__ import main

    (tmp_path / "lens.json").write_text(json.dumps([{"id": 1, "goal": "Go", "screen_size": [100, 200],
                                                     "steps": [{"actions": [{"type": "wait"}]}]}]))
    assert main(["convert", "androidlens", str(tmp_path / "lens.json"), "--out", str(tmp_path / "o")]) == 0
    assert read_episodes(tmp_path / "o" / "episodes.jsonl")[0]["steps"][0]["valid_actions"] == ["wait()"]
    (tmp_path / "bad.json").write_text(json.dumps([{"id": 1, "goal": "Go", "steps": [{"actions": [{"type": "wait"}]}]}]))
    assert main(["convert", "androidlens", str(tmp_path / "bad.json"), "--out", str(tmp_path / "o2")]) == 1
    assert "bad.json episode #0 episode 1 step 0: no screen size" in capsys.readouterr().err


def test_parse_seeds():
    from envs.gui.__main__ import parse_seeds

    assert parse_seeds("0-3,7,2") == [0, 1, 2, 3, 7]
    with pytest.raises(SystemExit, match="bad seed range"):
        parse_seeds("5-2")


# ----------------------------------------------------------------------------- the live browser


def _browser_missing() -> str | None:
    from envs.gui.browser import browser_missing

    return browser_missing()


@pytest.fixture(scope="module")
def session():
    missing = _browser_missing()
    if missing:
        pytest.skip(f"no headless browser: {missing}")
    from envs.gui.browser import MiniWobSession

    s = MiniWobSession()
    yield s
    s.close()


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(POLICIES))
def test_oracle_solves_each_family(session, task, tmp_path):
    for seed in (0, 1):
        ep, _ = record_episode(session, task, seed, screens_dir=tmp_path, replay=False)
        assert ep["success"] and ep["raw_reward"] > 0, (task, seed, [s["action"] for s in ep["steps"]])
        validate_episode(ep, task)


@pytest.mark.slow
def test_live_valid_actions_two_equivalent_buttons(session, tmp_path):
    # click-button seed 0 has two "okay" buttons: MiniWoB rewards either (click-button.html binds the
    # success handler to every button with the target text)
    ep, _ = record_episode(session, "click-button", 0, screens_dir=tmp_path)
    step = ep["steps"][0]
    okay = sorted(f"click(element={el['ref']})" for el in step["elements"] if el["tag"] == "button" and el["text"] == "okay")
    assert len(okay) == 2 and sorted(step["valid_actions"]) == okay
    assert step["action"] in step["valid_actions"] and step["valid_actions_source"] == "replay"
    # a checkbox is toggled by its box and by its label's text: both are valid, the text by point
    ep, _ = record_episode(session, "click-checkboxes", 0, screens_dir=tmp_path)
    first = ep["steps"][0]
    assert first["action"] in first["valid_actions"]
    assert any(a.startswith("click(x=") for a in first["valid_actions"])
    assert ep["steps"][-1]["milestones"] and all(ep["steps"][-1]["milestones"].values())


@pytest.mark.slow
def test_record_and_build_cli(tmp_path):
    if _browser_missing():
        pytest.skip(f"no headless browser: {_browser_missing()}")
    from envs.gui.__main__ import main

    out = tmp_path / "episodes"
    assert main(["record", "--tasks", "click-button,enter-text", "--seeds", "0,31", "--out", str(out)]) == 0
    eps = read_episodes(out / "episodes.jsonl")
    assert sorted(e["episode_id"] for e in eps) == ["click-button/seed0", "click-button/seed31",
                                                    "enter-text/seed0", "enter-text/seed31"]
    assert all((out / s["screenshot"]).is_file() for e in eps for s in e["steps"])
    # resumable: a second run records nothing new
    assert main(["record", "--tasks", "click-button", "--seeds", "0", "--out", str(out)]) == 0
    assert json.loads((out / "record_stats.json").read_text())["resumed"] == 4
    rows = tmp_path / "rows"
    assert main(["build", "--episodes", str(out / "episodes.jsonl"), "--out", str(rows)]) == 0
    assert {r["episode_id"] for r in read_jsonl(rows / "static_test.jsonl")} == {"click-button/seed31", "enter-text/seed31"}
    assert len(read_jsonl(rows / "sft.jsonl")) == 1 + 3  # click-button seed 0: 1 step; enter-text seed 0: 3

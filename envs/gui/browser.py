"""MiniWoB++ in headless Chromium: sessions, a pool, process hygiene, and the `Screen` the agent sees.

One `MiniWobSession` = one chromedriver + one headless Chromium that loads MiniWoB's own HTML from the
`miniwob` package (file:// URLs only) and serves any task: `reset(task, seed)` loads the task page when
the task changes (~0.1 s) and starts a seeded episode (`Math.seedrandom(seed)` + `core.startEpisodeReal()`,
exactly what `miniwob`'s gymnasium env does, so a (task, seed) pair is the same instance there and here).
The pieces of `miniwob` that already do the work are reused (`get_screenshot`, the Selenium action
executors, the field extractors); what is ours is the process management and the snapshot.

Coordinates: ONE convention, integer CSS pixels of the page, origin top-left. Element boxes come from
`getBoundingClientRect` (CSS pixels); clicks go through WebDriver pointer actions in the same CSS pixels;
the screenshot is `miniwob.screenshot.get_screenshot`, which crops the task area (160x210) and resizes the
device-pixel PNG to CSS size, and we force device scale factor 1, so the screenshot's pixel (x, y) IS CSS
pixel (x, y). A consumer that resized the image (a VLM processor) converts with `to_css_pixels` (the one
conversion function, tested). A box is `(left, top, width, height)`, each edge rounded to the nearest pixel.

No network: only file:// pages are loaded, Chromium's proxy is a dead loopback port (every non-loopback
http(s) request fails with ERR_PROXY_CONNECTION_FAILED; loopback is bypassed by Chrome's implicit rules,
so a 127.0.0.1 server would still work), WebRTC may not use non-proxied UDP, and background networking,
component updates, sync and extensions are off.

Process hygiene (nothing survives close, an exception, or the death of the owning Python process):
  - chromedriver starts in a NEW SESSION (`start_new_session=True`), so it and every Chromium process it
    starts (browser, zygotes, renderers, GPU and utility processes) share one process group;
    Chromium's crash handler (crashpad) daemonises into a session of its own, outside the group: its
    database is pointed into the session's temporary profile, so the profile path is on its command line
    and `close()` and the watchdog find and kill it there (`--disable-crashpad-for-testing` would keep it
    from starting, but with it this Chromium's renderers hang);
  - `close()` asks chromedriver to quit, then SIGKILLs the whole group (quit alone leaves the zygotes
    alive for seconds), reaps chromedriver and removes the session's temporary profile directory;
  - a watchdog process (one per Python process, started with the first browser) holds the read end of
    a pipe whose write end only this process holds: when this process dies in any way (SIGKILL
    included) the pipe closes and the watchdog SIGKILLs every group still registered, removes the
    profiles and exits. Not PR_SET_PDEATHSIG: it fires when the *thread* that forked the child exits,
    and sessions are started from worker threads. Caveat: a child forked without exec (multiprocessing
    "fork") inherits the write end, so the watchdog then waits for that child too.
  - `BrowserPool` closes its sessions on `close()`, on `with` exit (exceptions included) and at
    interpreter exit (atexit).
A session whose browser crashed or hung (a WebDriver call failed or timed out) is closed at once
(`BrowserCrashed` is raised from `step`) and restarted by the next `reset`.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from envs.gui.actions import KEYS, Action

__all__ = [
    "TASK_SIZE",
    "Element",
    "Screen",
    "BrowserCrashed",
    "MiniWobSession",
    "BrowserPool",
    "browser_missing",
    "to_css_pixels",
    "task_names",
    "session_pids",
]

logger = logging.getLogger(__name__)

TASK_SIZE = (160, 210)  # MiniWoB's task area (miniwob.constants.TASK_WIDTH / TASK_HEIGHT): the screen
WINDOW_SIZE = (600, 500)  # the headless window; its viewport (600x357) holds the task area with room to spare
INSTALL_HINT = "apt-get install chromium chromium-driver (as root)"

_CHROME_ARGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--force-device-scale-factor=1", f"--window-size={WINDOW_SIZE[0]},{WINDOW_SIZE[1]}",
    "--disable-breakpad", "--disable-smooth-scrolling",
    "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-default-apps", "--disable-extensions",
    "--mute-audio", "--proxy-server=http://127.0.0.1:9", "--force-webrtc-ip-handling-policy=disable_non_proxied_udp",
)


class BrowserCrashed(RuntimeError):
    """The browser of a session died or stopped answering; the session is closed (the next reset restarts it)."""


def browser_missing(chromium: str = "/usr/bin/chromium", chromedriver: str = "/usr/bin/chromedriver") -> str | None:
    """None when both executables are there, else one line saying what is missing and how to install it."""
    missing = [p for p in (chromium, chromedriver) if not (os.path.isfile(p) and os.access(p, os.X_OK))]
    if not missing:
        return None
    return f"MiniWoB needs Chromium and chromedriver, missing: {', '.join(missing)}: {INSTALL_HINT}"


def _html_dir() -> Path:
    import miniwob

    return Path(miniwob.__file__).parent / "html" / "miniwob"


def task_names() -> list[str]:
    """The MiniWoB++ tasks this module serves (the package's html/miniwob/*.html)."""
    return sorted(p.stem for p in _html_dir().glob("*.html"))


def to_css_pixels(x: float, y: float, image_size: tuple[int, int], css_size: tuple[int, int] = TASK_SIZE) -> tuple[int, int]:
    """A point on an image of `image_size` (w, h) that shows the `css_size` screen -> CSS pixels (rounded).

    The `Screen.screenshot` is already in CSS pixels (identity); this is for resized copies of it.
    """
    return (int(round(x * css_size[0] / image_size[0])), int(round(y * css_size[1] / image_size[1])))


# ----------------------------------------------------------------------------- screens


@dataclass
class Element:
    """One DOM element of the screen (MiniWoB's `getDOMInfo`), boxes in CSS pixels.

    `ref` > 0: a real element (stable within an episode, clickable with click(element=ref)); ref < 0: a
    text fragment of an element that mixes text and children (no element of its own: click it by point).
    """

    ref: int
    tag: str  # lower case; inputs carry their type ("input_text", "input_checkbox"); "t" = text fragment
    text: str
    box: tuple[int, int, int, int]  # (left, top, width, height)
    value: str = ""  # inputs, textareas, selects (checkboxes / radios: "" and `checked`)
    classes: str = ""
    id: str = ""
    focused: bool = False
    is_leaf: bool = True
    parent: int = 0  # the parent element's ref (0: the root)
    checked: bool | None = None  # checkboxes and radios
    selected: bool | None = None  # <option>s
    visible: bool = True  # some of it is on the screen, not hidden, not clipped away by a scrolling parent
    scroll: tuple[int, int] | None = None  # scrollable: (scrollTop, max scrollTop) in CSS pixels

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("ref", "parent", "tag", "text", "value", "id", "classes", "checked",
                                          "selected", "focused", "visible", "is_leaf")}
        d["box"] = list(self.box)
        d["scroll"] = list(self.scroll) if self.scroll is not None else None
        return d


@dataclass
class Screen:
    """What a step shows: the task instruction, the elements, the screenshot, and a JSON-safe snapshot."""

    task: str
    seed: int
    utterance: str
    elements: list[Element]
    screenshot: Any  # PIL.Image.Image (TASK_SIZE, CSS pixels) or None (screenshots off)
    fields: dict[str, str] = field(default_factory=dict)  # MiniWoB's parsed utterance fields
    # {"task", "seed", "utterance", "fields", "done", "reward" (raw), "raw_reward", "env_reward", "reason",
    #  "elements": [Element.to_dict()]}: what milestones read, what episode files store
    dom: dict = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        return TASK_SIZE

    def element(self, ref: int) -> Element | None:
        return next((e for e in self.elements if e.ref == ref), None)


# One round trip per observation: utterance, DOM tree, the page's reward state, and the per-element
# facts getDOMInfo leaves out (checked / selected / select values / visibility / scroll state).
_OBSERVE_JS = """
var W = arguments[0], H = arguments[1];
// core.endEpisode bumps WOB_EPISODE_ID, and getDOMInfo gives every element of an older episode a new ref:
// the screen after the end keeps the refs of the episode it ends
var eid = WOB_EPISODE_ID;
if (WOB_DONE_GLOBAL) WOB_EPISODE_ID = eid - 1;
var dominfo;
try { dominfo = core.getDOMInfo(); } finally { WOB_EPISODE_ID = eid; }
var out = {utterance: core.getUtterance(), dom: dominfo,
           meta: {done: WOB_DONE_GLOBAL, env_reward: WOB_REWARD_GLOBAL, raw_reward: WOB_RAW_REWARD_GLOBAL,
                  reason: WOB_REWARD_REASON}, extra: {}};
for (var ref in core.previousDOMInfo) {
  var el = core.previousDOMInfo[ref], e = {};
  if (el instanceof HTMLInputElement && (el.type === 'checkbox' || el.type === 'radio')) e.checked = el.checked;
  if (el instanceof HTMLOptionElement) e.selected = el.selected;
  if (el instanceof HTMLSelectElement) e.value = el.value;
  var r = el.getBoundingClientRect(), st = window.getComputedStyle(el);
  var vis = st.visibility !== 'hidden' && parseFloat(st.opacity || '1') > 0;
  var l = Math.max(r.left, 0), t = Math.max(r.top, 0), ri = Math.min(r.right, W), b = Math.min(r.bottom, H);
  for (var a = el.parentElement; a && vis && a !== document.body; a = a.parentElement) {
    var s = window.getComputedStyle(a), ar;
    if (s.overflowX !== 'visible' || s.overflowY !== 'visible') ar = a.getBoundingClientRect();
    if (s.overflowX !== 'visible') { l = Math.max(l, ar.left); ri = Math.min(ri, ar.right); }
    if (s.overflowY !== 'visible') { t = Math.max(t, ar.top); b = Math.min(b, ar.bottom); }
    if (s.visibility === 'hidden' || parseFloat(s.opacity || '1') === 0) vis = false;
  }
  e.visible = vis && ri > l && b > t;
  var oy = st.overflowY;
  if (el.scrollHeight > el.clientHeight + 1 && (oy === 'auto' || oy === 'scroll' || el instanceof HTMLTextAreaElement))
    e.scroll = [Math.round(el.scrollTop), el.scrollHeight - el.clientHeight];
  out.extra[ref] = e;
}
return out;
"""


# how far everything under a point is scrolled (the element there, its ancestors and the page)
_SCROLLED_JS = """
var s = window.scrollY;
for (var el = document.elementFromPoint(arguments[0], arguments[1]); el; el = el.parentElement) s += el.scrollTop;
return s;
"""


def _box(raw: dict) -> tuple[int, int, int, int]:
    left, top = float(raw.get("left") or 0), float(raw.get("top") or 0)
    right, bottom = left + float(raw.get("width") or 0), top + float(raw.get("height") or 0)
    l, t = int(round(left)), int(round(top))
    return (l, t, int(round(right)) - l, int(round(bottom)) - t)


def _intersects(box: tuple[int, int, int, int], size: tuple[int, int]) -> bool:
    l, t, w, h = box
    return w > 0 and h > 0 and l < size[0] and t < size[1] and l + w > 0 and t + h > 0


def _flatten(raw: dict, extra: dict, parent: int, parent_visible: bool, out: list[Element]) -> None:
    """Pre-order elements of getDOMInfo's tree (text-only children merged into the parent's text, as
    miniwob.dom.DOMElement does: MiniWoB sometimes splits a text-only element into text children)."""
    children = list(raw.get("children") or ())
    text = raw.get("text")
    if children and all(str(c.get("tag", "")).lower() == "t" for c in children):
        text = " ".join(str(c.get("text") or "") for c in children)
        children = []
    ref = int(raw.get("ref") or 0)
    tag = str(raw.get("tag") or "").lower()
    ex = extra.get(str(ref), {}) if ref > 0 else {}
    box = _box(raw)
    if ref > 0:
        visible = bool(ex.get("visible", True))
    else:  # a text fragment: on the screen and inside a visible parent
        visible = parent_visible and _intersects(box, TASK_SIZE)
    value = raw.get("value")
    checked = ex.get("checked")
    if isinstance(value, bool):  # MiniWoB puts `checked` in `value` for checkboxes and radios
        checked, value = value if checked is None else checked, ""
    if "value" in ex:
        value = ex["value"]
    classes = raw.get("classes")
    scroll = ex.get("scroll")
    out.append(Element(
        ref=ref, tag=tag, text="" if text is None else str(text), box=box,
        value="" if value is None else str(value), classes=classes if isinstance(classes, str) else "",
        id=str(raw.get("id") or ""), focused=bool(raw.get("focused", False)), is_leaf=not children,
        parent=parent, checked=checked, selected=ex.get("selected"), visible=visible,
        scroll=(int(scroll[0]), int(scroll[1])) if scroll else None,
    ))
    for c in children:
        _flatten(c, extra, ref, visible, out)


# ----------------------------------------------------------------------------- the watchdog

_WATCHDOG_SRC = r"""
import os, signal, shutil, sys
groups = {}
for line in sys.stdin:
    parts = line.split(" ", 2)
    if parts[0] == "add" and len(parts) == 3:
        groups[int(parts[1])] = parts[2].rstrip("\n")
    elif parts[0] == "del" and len(parts) >= 2:
        groups.pop(int(parts[1]), None)
for pgid in groups:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
markers = [p.encode() for p in groups.values() if p]
for name in os.listdir("/proc") if markers else ():
    try:
        with open("/proc/%s/cmdline" % name, "rb") as f:
            cmd = f.read()
        if any(m in cmd for m in markers):
            os.kill(int(name), signal.SIGKILL)
    except (OSError, ValueError):
        pass
for profile in groups.values():
    if profile:
        shutil.rmtree(profile, ignore_errors=True)
"""


class _Watchdog:
    """One per Python process: kills the registered browser process groups when this process dies."""

    _lock = threading.Lock()
    _proc: subprocess.Popen | None = None
    _pid: int | None = None

    @classmethod
    def _send(cls, line: str) -> None:
        with cls._lock:
            if cls._proc is None or cls._pid != os.getpid() or cls._proc.poll() is not None:
                # -S: no site packages (starts in ~20 ms); a session of its own: a terminal's Ctrl-C,
                # or a kill of our process group, must not take the watchdog down before it acts
                cls._proc = subprocess.Popen([sys.executable, "-S", "-c", _WATCHDOG_SRC], stdin=subprocess.PIPE,
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                             start_new_session=True, close_fds=True, text=True)
                cls._pid = os.getpid()
            try:
                cls._proc.stdin.write(line + "\n")
                cls._proc.stdin.flush()
            except (BrokenPipeError, OSError, ValueError):
                logger.warning("browser watchdog is gone: browsers of this process may outlive a crash of it")

    @classmethod
    def add(cls, pgid: int, profile: str) -> None:
        cls._send(f"add {pgid} {profile}")

    @classmethod
    def remove(cls, pgid: int) -> None:
        cls._send(f"del {pgid}")

    @classmethod
    def pid(cls) -> int | None:
        return cls._proc.pid if cls._proc is not None else None


def session_pids(pgid: int | None, marker: str | None = None) -> list[int]:
    """Live (non-zombie) processes in process group `pgid` or whose command line contains `marker`."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            fields_ = stat[stat.rfind(")") + 2:].split()
            state, pg = fields_[0], int(fields_[2])
            if state in ("Z", "X"):
                continue
            hit = pgid is not None and pg == pgid
            if not hit and marker:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    hit = marker.encode() in f.read()
            if hit:
                out.append(int(name))
        except (OSError, ValueError, IndexError):
            continue
    return out


# ----------------------------------------------------------------------------- sessions


def _browser_errors() -> tuple[type[BaseException], ...]:
    """What a dead or hung browser raises: WebDriver errors, and connection errors to chromedriver."""
    from selenium.common.exceptions import WebDriverException
    from urllib3.exceptions import HTTPError

    return (WebDriverException, HTTPError, OSError)


def _split_key(key: str) -> tuple[list[str], str]:
    """("Ctrl+Shift+a") -> (["Ctrl", "Shift"], "a"); "+" and "Ctrl++" keep their "+" key."""
    if len(key) == 1:
        return [], key
    if key.endswith("++"):
        return key[:-2].split("+"), "+"
    *mods, base = key.split("+")
    return mods, base


class MiniWobSession:
    """One headless Chromium + chromedriver serving MiniWoB tasks; a context manager.

    Started by the first `reset` (or `start()`); `close()` kills every process it started.
    `step` returns (screen, reward, done, info) with info {"valid", "error", "raw_reward", "env_reward",
    "reason", "seconds"}; reward is MiniWoB's raw reward once the page ended the episode (no time decay:
    the wall time of a CPU policy says nothing about it), else 0.
    """

    def __init__(self, *, screenshots: bool = True, chromium: str = "/usr/bin/chromium",
                 chromedriver: str = "/usr/bin/chromedriver", wait_seconds: float = 0.5,
                 command_timeout: float = 30.0, episode_seconds: float = 3600.0, max_type_chars: int = 200,
                 scroll_settle: float = 0.5, data_mode: str = "train", index: int = 0):
        self.screenshots = screenshots
        self.chromium, self.chromedriver = chromium, chromedriver
        self.wait_seconds = wait_seconds
        self.command_timeout = command_timeout
        # MiniWoB's pages end an episode after 10 s (core.EPISODE_MAX_TIME) with reward -1: far less than one
        # CPU policy step. The page timer is set to this instead; environments bound episodes themselves.
        self.episode_seconds = episode_seconds
        self.max_type_chars = max_type_chars
        self.scroll_settle = scroll_settle
        self.data_mode = data_mode
        self.index = index
        self.driver = None
        self.pgid: int | None = None
        self.profile: str | None = None
        self.task: str | None = None
        self.seed: int | None = None
        self.last: Screen | None = None
        self.start_seconds: float | None = None  # wall time of the last browser start
        self.starts = 0
        self._loaded_task: str | None = None
        self._fields: dict[str, str] = {}
        self._viewport = TASK_SIZE

    # -- life cycle

    @property
    def alive(self) -> bool:
        return self.driver is not None

    def start(self) -> None:
        if self.driver is not None:
            return
        missing = browser_missing(self.chromium, self.chromedriver)
        if missing:
            raise FileNotFoundError(missing)
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        t0 = time.perf_counter()
        self.profile = tempfile.mkdtemp(prefix="agentrl-miniwob-")
        opts = webdriver.ChromeOptions()
        for a in _CHROME_ARGS:
            opts.add_argument(a)
        opts.add_argument(f"--user-data-dir={self.profile}")
        opts.binary_location = self.chromium
        # Chromium's crash handler (crashpad) daemonises into a session of its own, outside the group;
        # its database goes under the default config dir, so pointing that into the profile puts the
        # profile path on its command line too: close() and the watchdog find it there.
        # (--disable-crashpad-for-testing would avoid it, but with it this Chromium's renderers hang.)
        env = {**os.environ, "CHROME_CONFIG_HOME": self.profile, "XDG_CONFIG_HOME": self.profile}
        service = Service(executable_path=self.chromedriver, env=env, popen_kw={"start_new_session": True})
        try:
            self.driver = webdriver.Chrome(service=service, options=opts)
        except BaseException:
            proc = getattr(service, "process", None)
            if proc is not None:
                self._kill_group(proc.pid)
            shutil.rmtree(self.profile, ignore_errors=True)
            self.driver = None
            raise
        self.pgid = service.process.pid  # a new session: its pid is the group id of everything it starts
        _Watchdog.add(self.pgid, self.profile)
        self.driver.command_executor.client_config.timeout = self.command_timeout
        self.driver.set_page_load_timeout(self.command_timeout)
        self.driver.set_script_timeout(self.command_timeout)
        self._loaded_task = None
        self.starts += 1
        self.start_seconds = time.perf_counter() - t0

    @staticmethod
    def _kill_group(pgid: int) -> None:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass

    def close(self) -> None:
        """Quit the browser and kill its whole process group; safe to call twice."""
        driver, self.driver = self.driver, None
        if driver is None:
            return
        proc = getattr(driver.service, "process", None)
        if proc is None or proc.poll() is None:  # (a dead chromedriver would only cost HTTP retries)
            try:
                driver.quit()  # a graceful quit first (~0.1 s): Chromium flushes nothing we need, but it is polite
            except Exception:
                pass
        if self.pgid is not None:
            self._kill_group(self.pgid)
            if proc is not None:
                try:
                    proc.wait(timeout=5)
                except Exception:
                    pass
            deadline = time.monotonic() + 5
            while True:  # the crash handler (outside the group) and anything slow to die
                left = session_pids(self.pgid, self.profile)
                if not left or time.monotonic() > deadline:
                    break
                for pid in left:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
                time.sleep(0.02)
            if left:
                logger.warning("MiniWoB browser %d: processes %s survived SIGKILL for 5 s", self.index, left)
            _Watchdog.remove(self.pgid)
        if self.profile:
            shutil.rmtree(self.profile, ignore_errors=True)
        self._loaded_task = None

    def pids(self) -> list[int]:
        """This session's live processes (chromedriver and every Chromium process it started)."""
        return session_pids(self.pgid, self.profile) if self.pgid is not None else []

    def __enter__(self) -> "MiniWobSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # a session dropped without close(): its browsers must not outlive it
        try:
            self.close()
        except Exception:
            pass

    # -- episodes

    def _crashed(self, what: str, err: BaseException) -> BrowserCrashed:
        self.close()
        return BrowserCrashed(f"MiniWoB browser {self.index} failed during {what}: {type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}")

    def reset(self, task: str, seed: int) -> Screen:
        """Start a seeded episode of `task`; a dead browser is restarted first (one retry on failure)."""
        if task.startswith("flight.") or not (_html_dir() / f"{task}.html").is_file():
            from rl.common import UserError

            raise UserError(f"unknown MiniWoB task {task!r} (not in {_html_dir()}; flight.* tasks are not "
                            f"supported), e.g. click-button, enter-text, click-checkboxes")
        missing = browser_missing(self.chromium, self.chromedriver)
        if missing:
            raise FileNotFoundError(missing)
        for attempt in (0, 1):  # a browser that died between episodes: start a fresh one, once
            try:
                self.start()
                return self._reset(task, int(seed))
            except (*_browser_errors(), RuntimeError) as e:
                self.close()
                if attempt == 1:
                    raise BrowserCrashed(f"MiniWoB browser {self.index} failed twice on reset({task}, {seed}): "
                                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
                logger.warning("MiniWoB browser %d failed on reset (%s: %s); restarting it", self.index,
                               type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        raise AssertionError("unreachable")

    def _reset(self, task: str, seed: int) -> Screen:
        d = self.driver
        if self._loaded_task != task:
            d.get((_html_dir() / f"{task}.html").as_uri())
            self._loaded_task = task
            self._viewport = tuple(d.execute_script("return [window.innerWidth, window.innerHeight];"))
        else:
            d.execute_script("return core.endEpisode(0);")  # force-stop a running episode (miniwob's reset)
        # Refs: getDOMInfo numbers elements in document order from 1, but elements that outlive an episode
        # (body, #wrap, #area) keep refs from the last observation. Forgetting them makes a (task, seed)
        # give the same refs whatever ran before in this browser (as on a fresh page): recorded episodes
        # and replays rely on it.
        d.execute_script(
            "document.querySelectorAll('[data-wob_ref]').forEach(function (e) {"
            "  delete e.dataset.wob_ref; delete e.dataset.wob_eps; });"
            # the focus survives endEpisode on pages that keep their inputs: blur so that it does not leak in
            "if (document.activeElement) document.activeElement.blur();"
            "core.EPISODE_MAX_TIME = arguments[0]; Math.seedrandom(arguments[1]); core.setDataMode(arguments[2]);"
            "core.startEpisodeReal();", int(self.episode_seconds * 1000), seed, self.data_mode)
        for _ in range(40):  # tasks that load assets flag readiness (miniwob waits up to 1 s)
            if d.execute_script("return WOB_TASK_READY;"):
                break
            time.sleep(0.05)
        else:
            raise RuntimeError(f"MiniWoB task {task} did not become ready")
        self.task, self.seed = task, seed
        self._fields = {}
        screen = self.observe(new_episode=True)
        return screen

    def observe(self, new_episode: bool = False) -> Screen:
        """The current screen (one WebDriver round trip + a screenshot when enabled)."""
        d = self.driver
        if d is None:
            raise BrowserCrashed(f"MiniWoB browser {self.index} is closed")
        raw = d.execute_script(_OBSERVE_JS, TASK_SIZE[0], TASK_SIZE[1])
        utterance = raw.get("utterance")
        if isinstance(utterance, dict):  # some tasks give {"utterance", "fields"}
            fields = {str(k): str(v) for k, v in (utterance.get("fields") or {}).items()}
            utterance = str(utterance.get("utterance") or "")
        else:
            utterance, fields = str(utterance or ""), None
        if new_episode:
            if fields is None:
                try:
                    from miniwob.fields import get_field_extractor

                    fields = {str(k): str(v) for k, v in get_field_extractor(self.task)(utterance)}
                except Exception:  # a task without an extractor, or an utterance it does not match
                    fields = {}
            self._fields = fields
        elements: list[Element] = []
        if raw.get("dom"):
            _flatten(raw["dom"], raw.get("extra") or {}, 0, True, elements)
        shot = None
        if self.screenshots:
            from miniwob.screenshot import get_screenshot

            shot = get_screenshot(d, self._viewport[0], self._viewport[1], TASK_SIZE[0], TASK_SIZE[1])
        meta = raw.get("meta") or {}
        raw_reward = float(meta.get("raw_reward") or 0.0)
        dom = {
            "task": self.task, "seed": self.seed, "utterance": utterance, "fields": dict(self._fields),
            "done": bool(meta.get("done")), "reward": raw_reward, "raw_reward": raw_reward,
            "env_reward": float(meta.get("env_reward") or 0.0),
            "reason": None if meta.get("reason") is None else str(meta.get("reason")),
            "elements": [e.to_dict() for e in elements],
        }
        self.last = Screen(task=self.task or "", seed=self.seed if self.seed is not None else -1, utterance=utterance,
                           elements=elements, screenshot=shot, fields=dict(self._fields), dom=dom)
        return self.last

    # -- actions

    def _check_point(self, x: int, y: int) -> str | None:
        w, h = TASK_SIZE
        if not (0 <= x < w and 0 <= y < h):
            return f"({x}, {y}) is outside the {w}x{h} screen"
        return None

    def _scroll_target(self, a: Action, screen: Screen) -> tuple[tuple[int, int], int] | str:
        """(point to scroll at, visible height of what scrolls there) or an error."""
        if a.element is not None:
            el = screen.element(a.element)
            if el is None or a.element <= 0:
                return f"no element {a.element} on the screen"
            box = el.box
        elif a.x is not None:
            err = self._check_point(a.x, a.y)
            if err:
                return err
            return (a.x, a.y), TASK_SIZE[1]
        else:  # the focused scrollable element, else the largest visible one, else the page
            cands = [e for e in screen.elements if e.scroll is not None and e.visible and e.ref > 0]
            focused = [e for e in cands if e.focused]
            pick = focused[0] if focused else max(cands, key=lambda e: e.box[2] * e.box[3], default=None)
            if pick is None:
                return (TASK_SIZE[0] // 2, TASK_SIZE[1] // 2), TASK_SIZE[1]
            box = pick.box
        l, t = max(box[0], 0), max(box[1], 0)
        r, b = min(box[0] + box[2], TASK_SIZE[0]), min(box[1] + box[3], TASK_SIZE[1])
        if r <= l or b <= t:
            return f"element {a.element} is not on the screen"
        return ((l + r) // 2, (t + b) // 2), b - t

    def _perform(self, a: Action, screen: Screen) -> str | None:
        """Run one action in the browser; an error string when the action cannot be done (invalid)."""
        from miniwob import selenium_actions as sa

        d = self.driver
        if a.kind == "click":
            if a.element is not None:
                el = screen.element(a.element)
                if el is None or a.element <= 0:
                    return f"no element {a.element} on the screen (click text fragments by point)"
                result = d.execute_script("return core.elementClick(arguments[0]);", a.element)
                return None if result is True else f"clicking element {a.element} failed: {str(result)[:80]}"
            err = self._check_point(a.x, a.y)
            if err:
                return err
            sa.execute_click_coords(a.x, a.y, d)
            return None
        if a.kind == "type":
            text = a.text or ""
            if len(text) > self.max_type_chars:
                return f"text too long ({len(text)} characters, at most {self.max_type_chars})"
            if any(ord(c) > 0xFFFF for c in text):  # WebDriver types only Basic Multilingual Plane characters
                return "cannot type characters outside the Basic Multilingual Plane (emoji, ...)"
            sa.execute_type_text(text, d)
            return None
        if a.kind == "key":
            mods, base = _split_key(a.key or "")
            prefix = "".join({"Ctrl": "C-", "Alt": "A-", "Shift": "S-", "Meta": "M-"}[m] for m in mods if m)
            sa.execute_press_key(prefix + (f"<{base}>" if base in KEYS else base), d)
            return None
        if a.kind == "scroll":
            target = self._scroll_target(a, screen)
            if isinstance(target, str):
                return target
            (x, y), height = target
            amount = max(50, int(0.8 * height)) * (1 if a.direction == "down" else -1)
            before = d.execute_script(_SCROLLED_JS, x, y)
            sa.execute_scroll_coords(x, y, amount, 0, d)
            # the wheel is handled asynchronously (a frame or more later): wait until the scroll position
            # under the point moves and settles, at most `scroll_settle` seconds (an element at its end never moves)
            deadline, last = time.monotonic() + self.scroll_settle, before
            while time.monotonic() < deadline:
                time.sleep(0.025)
                now = d.execute_script(_SCROLLED_JS, x, y)
                if now != before and now == last:
                    break
                last = now
            return None
        if a.kind == "wait":
            time.sleep(self.wait_seconds)
            return None
        return f"unknown action kind {a.kind!r}"

    def step(self, action: Action) -> tuple[Screen, float, bool, dict]:
        """Apply one action; (screen, reward, done, info). Invalid actions change nothing and are reported
        in info ("valid": False, "error": one line). `terminate` does nothing in the browser and ends the
        episode with the page's current reward. Raises BrowserCrashed when the browser fails."""
        t0 = time.perf_counter()
        screen = self.last
        if self.driver is None or screen is None:
            raise BrowserCrashed(f"MiniWoB browser {self.index} has no episode: reset it first")
        proc = getattr(self.driver.service, "process", None)
        if proc is not None and proc.poll() is not None:  # chromedriver is dead: fail now, not after HTTP retries
            self.close()
            raise BrowserCrashed(f"MiniWoB browser {self.index} failed: chromedriver exited ({proc.returncode})")
        info = {"valid": True, "error": None}
        if screen.dom.get("done"):
            info.update(valid=False, error="the episode is over")
        elif action.kind != "terminate":
            from selenium.common.exceptions import MoveTargetOutOfBoundsException

            try:
                err = self._perform(action, screen)
            except MoveTargetOutOfBoundsException as e:
                err = f"cannot reach that point: {str(e).splitlines()[0][:80]}"
            except _browser_errors() as e:
                raise self._crashed(f"step {action.kind}", e) from e
            if err:
                info.update(valid=False, error=err)
            try:
                screen = self.observe()
            except _browser_errors() as e:
                raise self._crashed("observe", e) from e
        dom = screen.dom
        done = bool(dom.get("done")) or action.kind == "terminate"
        reward = float(dom["raw_reward"]) if dom.get("done") else 0.0
        info.update(raw_reward=reward, env_reward=float(dom.get("env_reward") or 0.0), reason=dom.get("reason"),
                    seconds=time.perf_counter() - t0)
        return screen, reward, done, info


# ----------------------------------------------------------------------------- the pool

_POOLS: "weakref.WeakSet[BrowserPool]" = weakref.WeakSet()


@atexit.register
def _close_all_pools() -> None:
    for pool in list(_POOLS):
        try:
            pool.close()
        except Exception:
            pass


class BrowserPool:
    """`size` sessions, started lazily (on their first reset) and reused across resets; a context manager.

    `close()` (also on `with` exit and at interpreter exit) leaves no chromium / chromedriver process.
    """

    def __init__(self, size: int = 2, *, screenshots: bool = True, chromium: str = "/usr/bin/chromium",
                 chromedriver: str = "/usr/bin/chromedriver", **session_kwargs: Any):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"BrowserPool size must be a positive integer, got {size!r}")
        self.size = size
        self.screenshots = screenshots
        self.chromium, self.chromedriver = chromium, chromedriver
        self.session_kwargs = session_kwargs
        self._sessions: list[MiniWobSession | None] = [None] * size
        _POOLS.add(self)

    def session(self, i: int) -> MiniWobSession:
        if not 0 <= i < self.size:
            raise IndexError(f"session {i} of a pool of {self.size}")
        s = self._sessions[i]
        if s is None:
            s = self._sessions[i] = MiniWobSession(screenshots=self.screenshots, chromium=self.chromium,
                                                   chromedriver=self.chromedriver, index=i, **self.session_kwargs)
        return s

    def grow(self, size: int) -> None:
        """At least `size` sessions (new ones start lazily)."""
        if size > self.size:
            self._sessions += [None] * (size - self.size)
            self.size = size

    @property
    def sessions(self) -> list[MiniWobSession]:
        return [s for s in self._sessions if s is not None]

    def pids(self) -> list[int]:
        return [p for s in self.sessions for p in s.pids()]

    def close(self) -> None:
        errors = []
        for s in self.sessions:
            try:
                s.close()
            except Exception as e:  # close the others whatever happens to one
                errors.append(e)
        if errors:
            raise errors[0]

    def __enter__(self) -> "BrowserPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


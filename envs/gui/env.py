"""The MiniWoB++ environment (`env: miniwob` of the generic `multi_turn` agent): live episodes in Chromium.

Rows: `{"task": "click-button", "seed": 3, ...}` (other columns are ignored here). Each sample is one
seeded MiniWoB episode in a headless browser of a per-process `BrowserPool` (`envs.gui.browser`).

Each step the policy writes SecAgent's step (`envs.gui.secagent`): `<context>..</context>
<thought>..</thought><action>..</action>`; generation stops at `</action>` (the stop string).
`secagent.parse_step` splits it, `envs.gui.actions.parse_action` parses the action, the browser runs it.
What the policy reads:
  first prompt  `secagent.render_step_prompt` (system prompt + one user message: the task instruction =
                MiniWoB's utterance, the history by mode, the current screen);
  after a step  a chat message (role user) with the next screen, rendered the same way without the
                system prompt: the step prompt of the next step;
  invalid step  (no parseable action, or one the browser cannot do: an element not on the screen, a
                point off the 160x210 screen) a corrective user message: the reason in one line, then the
                SAME screen again; counted in info["invalid"] and the loop's invalid_actions.
The screen is the element list of `envs.gui.observation.render_elements` (at most `element_budget`
characters); with `screenshots: true` (VLM policies) every screen shown also carries its screenshot
(the first prompt's through `Prompt.images`, later ones through `StepResult.images`).

History modes (`history`: none | raw | semantic, `history_k`): what each step message restates, as in
SecAgent's ablation (`render_step_prompt`). In the live loop the conversation itself also keeps every
earlier turn (the loop owns it), so the modes change what each step message adds and its size
(info["input_tokens"]), not what is reachable in the context. The static benchmark (F's rows, G's
metrics) is where the modes alone decide what the policy sees.

A malformed output whose <action> still parses is run (the format is the reward's business) and
counted in info["malformed"]. The semantic context kept for the next step is the latest non-empty
<context> the policy wrote.

Episode end (StepResult.reason -> info["termination"]): "terminate" (the policy's terminate(status),
which runs nothing and keeps MiniWoB's current reward), "task_done" (the page ended the episode),
"max_steps" (steps, valid or not), "max_seconds" (wall time since reset, generation included),
"browser_error" (the browser crashed; it restarts on the next reset). Loop defaults: max_turns 10
(= max_steps; a recipe raising max_steps raises `rollout.agent_kwargs.max_turns` too), no final turn.

Browsers: `pool_size` (recipe key) is the number of Chromium instances, shared by every environment of
the process with the same settings and started lazily. With at most `pool_size` samples per rollout
call, each sample has its own browser. With more, browsers are multiplexed: a sample whose browser was
taken by another one is restored on a free browser by resetting its (task, seed) and replaying its
executed actions (MiniWoB instances are seeded, so the replay reaches the same page; info["replays"]
counts restorations, info["replay_mismatch"] the ones whose page differed from the recorded one, e.g.
a task with timers). Browsers work in parallel (one thread each).

`info(k)`: success (MiniWoB's raw reward > 0 when the page ended the episode), raw_reward, steps,
invalid, malformed, milestones ([bool] per milestone of `envs.gui.milestones`, sticky), milestone_names,
progress (task_progress), input_tokens (tokens of each step's prompt as `render_step_prompt` builds it,
system prompt included: what a stateless SecAgent agent reads per step; empty without a tokenizer),
input_chars, step_seconds (browser time per step), task, seed, terminate_status, replays,
replay_mismatch, browser_errors.
"""

from __future__ import annotations

import atexit
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from agents.environment import Environment, Prompt, StepResult, Turn
from envs.gui.actions import Action, format_action, parse_action
from envs.gui.browser import BrowserCrashed, BrowserPool, Screen, browser_missing
from envs.gui.observation import render_elements

__all__ = ["MiniWobEnv", "get_pool", "close_pools", "STOP"]

STOP = ("</action>",)
_CORRECTIVE = "Your last output was not a valid step: {error}. Write <context>, <thought> and one valid <action>."

# ----------------------------------------------------------------------------- per-process pools

_POOLS: dict[tuple, tuple[BrowserPool, ThreadPoolExecutor]] = {}
_POOLS_LOCK = threading.Lock()


def get_pool(size: int, *, screenshots: bool, chromium: str, chromedriver: str, **session_kwargs: Any
             ) -> tuple[BrowserPool, ThreadPoolExecutor]:
    """The process's pool for these settings (created on first use, grown to `size`) and its worker threads."""
    key = (screenshots, chromium, chromedriver, tuple(sorted(session_kwargs.items())))
    with _POOLS_LOCK:
        entry = _POOLS.get(key)
        if entry is None or entry[0].size < size:
            if entry is None:
                pool = BrowserPool(size, screenshots=screenshots, chromium=chromium, chromedriver=chromedriver,
                                   **session_kwargs)
            else:
                pool = entry[0]
                pool.grow(size)
                entry[1].shutdown(wait=True)
            entry = _POOLS[key] = (pool, ThreadPoolExecutor(max_workers=pool.size, thread_name_prefix="miniwob"))
        return entry


@atexit.register
def close_pools() -> None:
    """Close every browser of this process's pools (also at interpreter exit)."""
    with _POOLS_LOCK:
        entries = list(_POOLS.values())
        _POOLS.clear()
    for pool, ex in entries:
        ex.shutdown(wait=True)
        pool.close()


# ----------------------------------------------------------------------------- per-sample state


def _signature(screen: Screen) -> tuple:
    return tuple((e.ref, e.tag, e.text, e.value, e.checked, e.selected) for e in screen.elements if e.ref > 0)


@dataclass
class _Sample:
    task: str
    seed: int
    screen: Screen | None = None
    actions: tuple = ()  # executed browser actions (replayed to restore the page on another browser)
    history: list = field(default_factory=list)  # [{"screen_text", "action", "screenshot"?}] of executed steps
    context: str = ""
    done: bool = False
    steps: int = 0
    invalid: int = 0
    malformed: int = 0
    raw_reward: float = 0.0
    page_done: bool = False
    terminate_status: str | None = None
    tracker: Any = None
    input_tokens: list = field(default_factory=list)
    input_chars: list = field(default_factory=list)
    step_seconds: list = field(default_factory=list)
    replays: int = 0
    replay_mismatch: int = 0
    browser_errors: int = 0
    t0: float = 0.0

    @property
    def key(self) -> tuple:
        return (self.task, self.seed, self.actions)


def _tracker(task: str, fields: dict):
    from envs.gui.milestones import MilestoneTracker

    return MilestoneTracker(task, fields)


class MiniWobEnv(Environment):
    """MiniWoB++ tasks in headless Chromium behind the environment protocol (module docstring)."""

    stop = STOP
    loop_defaults = {"max_turns": 10, "final_answer_turn": False}
    metrics = "gui_live"

    def __init__(self, pool_size: int = 2, max_steps: int = 10, max_seconds: float = 300.0, history: str = "semantic",
                 history_k: int = 1, screenshots: bool = False, element_budget: int = 2000, *,
                 wait_seconds: float = 0.5, chromium: str = "/usr/bin/chromium",
                 chromedriver: str = "/usr/bin/chromedriver", system_prompt: bool = True):
        from envs.gui.secagent import HISTORY_MODES

        if history not in HISTORY_MODES:
            raise ValueError(f"miniwob environment: unknown history {history!r}; choose from {list(HISTORY_MODES)}")
        for name, v in (("pool_size", pool_size), ("max_steps", max_steps), ("history_k", history_k),
                        ("element_budget", element_budget)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"miniwob environment: {name} must be a positive integer, got {v!r}")
        self.pool_size, self.max_steps, self.max_seconds = pool_size, max_steps, float(max_seconds)
        self.history, self.history_k = history, history_k
        self.screenshots, self.element_budget = bool(screenshots), element_budget
        self.system_prompt = system_prompt
        self._pool_args = dict(screenshots=self.screenshots, chromium=chromium, chromedriver=chromedriver,
                               wait_seconds=wait_seconds)
        self.pool, self.executor = get_pool(pool_size, **self._pool_args)
        self.samples: list[_Sample] = []
        self.holding: dict[int, tuple | None] = {}  # browser -> the sample state (key) its page shows

    @classmethod
    def check(cls, chromium: str = "/usr/bin/chromium", chromedriver: str = "/usr/bin/chromedriver",
              history: str = "semantic", **_: Any) -> None:
        """MiniWoB++ / Chromium / chromedriver missing, or a bad history mode: one line, before any model loads."""
        from rl.plugins import require

        require("miniwob", "selenium", extra="gui", plugin="envs.gui")
        missing = browser_missing(chromium, chromedriver)
        if missing:
            raise FileNotFoundError(missing)
        from envs.gui.secagent import HISTORY_MODES

        if history not in HISTORY_MODES:
            raise ValueError(f"miniwob environment: unknown history {history!r}; choose from {list(HISTORY_MODES)}")

    # -- prompts

    def _screen_text(self, screen: Screen) -> str:
        return render_elements(screen.elements, self.element_budget)

    def _step_messages(self, s: _Sample, system: bool) -> tuple[list[dict], list]:
        """(messages of this step's prompt with image placeholders, their images in order)."""
        from envs.gui.secagent import SYSTEM_PROMPT, render_step_prompt

        shot = self.screenshots
        msgs = render_step_prompt(
            s.screen.utterance, self._screen_text(s.screen), history=self.history, semantic_context=s.context,
            history_steps=[{"screen_text": h["screen_text"], "action": h["action"],
                            **({"screenshot": h["screenshot"]} if shot else {})} for h in s.history],
            history_k=self.history_k, image=shot, screenshot=s.screen.screenshot if shot else None,
            system=(SYSTEM_PROMPT if self.system_prompt else None) if system else None,
        )
        images: list = []
        if shot:  # the images out of the parts, in order; placeholders stay (Prompt.images / StepResult.images fill them)
            content = msgs[-1]["content"]
            images = [p["image"] for p in content if isinstance(p, dict) and p.get("type") == "image"]
            msgs[-1] = {**msgs[-1], "content": [{"type": "image"} if isinstance(p, dict) and p.get("type") == "image"
                                                else p for p in content]}
        return msgs, images

    def _count(self, s: _Sample, messages: list[dict]) -> None:
        from envs.gui.secagent import SYSTEM_PROMPT

        text = "".join(_text_of(m) for m in messages)
        if messages[0].get("role") != "system" and self.system_prompt:
            text = SYSTEM_PROMPT + text  # the per-step prompt a stateless agent reads includes the system prompt
        s.input_chars.append(len(text))
        if self.tokenizer is not None:
            s.input_tokens.append(len(self.tokenizer(text, add_special_tokens=False)["input_ids"]))

    def _observation(self, s: _Sample, error: str | None = None) -> StepResult:
        msgs, images = self._step_messages(s, system=False)
        self._count(s, msgs)
        content = _text_of(msgs[-1])
        if error:
            content = _CORRECTIVE.format(error=error.rstrip(".")) + "\n\n" + content
        return StepResult(message={"role": "user", "content": content}, images=images or None)

    # -- browsers

    def _assign(self, wanted: list[int]) -> dict[int, list[int]]:
        """browser -> the samples it serves this round: a sample whose page a browser shows keeps it."""
        n = self.pool.size
        plan: dict[int, list[int]] = {j: [] for j in range(n)}
        if len(self.samples) <= n:  # one browser per sample
            for k in wanted:
                plan[k].append(k)
            return plan
        rest = []
        taken = set()
        for k in wanted:
            j = next((j for j, key in self.holding.items() if key == self.samples[k].key and j not in taken), None)
            if j is None:
                rest.append(k)
            else:
                taken.add(j)
                plan[j].append(k)
        for k in rest:
            j = min(range(n), key=lambda j: (len(plan[j]), j in taken))
            plan[j].append(k)
        return plan

    def _restore(self, j: int, s: _Sample) -> None:
        """Make browser j show sample s's page: reset its (task, seed) and replay its actions."""
        session = self.pool.session(j)
        if self.holding.get(j) == s.key and session.alive:
            return
        self.holding[j] = None
        screen = session.reset(s.task, s.seed)
        for a in s.actions:
            screen, _, _, _ = session.step(a)
        if s.actions:
            s.replays += 1
            if s.screen is not None and _signature(screen) != _signature(s.screen):
                s.replay_mismatch += 1
        self.holding[j] = s.key

    def _run(self, plan: dict[int, list[int]], work) -> dict[int, Any]:
        """Run `work(j, k)` for every planned (browser, sample), browsers in parallel; {k: result or exception}."""
        def serve(j: int, ks: list[int]) -> dict[int, Any]:
            out = {}
            for k in ks:
                try:
                    out[k] = work(j, k)
                except BrowserCrashed as e:
                    self.holding[j] = None
                    out[k] = e
            return out

        futures = [self.executor.submit(serve, j, ks) for j, ks in plan.items() if ks]
        results: dict[int, Any] = {}
        for f in futures:
            results.update(f.result())
        return results

    # -- protocol

    def reset(self, rows: list[dict]) -> list[Prompt]:
        samples = []
        for i, row in enumerate(rows):
            task, seed = row.get("task"), row.get("seed")
            if not isinstance(task, str) or not task:
                raise ValueError(f"miniwob environment: row {i} has no 'task' (a MiniWoB task name), got {task!r}")
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise ValueError(f"miniwob environment: row {i} ({task}) needs an integer 'seed', got {seed!r}")
            samples.append(_Sample(task=task, seed=seed))
        self.samples = samples
        self.pool, self.executor = get_pool(self.pool_size, **self._pool_args)  # another env may have grown it
        self.holding = {j: None for j in range(self.pool.size)}
        # one reset per distinct (task, seed) (the G copies of a row share their first screen), plus one per
        # extra sample that has a browser of its own
        first: dict[tuple, int] = {}
        for k, s in enumerate(samples):
            first.setdefault((s.task, s.seed), k)
        wanted = list(range(len(samples))) if len(samples) <= self.pool.size else sorted(first.values())

        def start(j: int, k: int) -> Screen:
            s = self.samples[k]
            screen = self.pool.session(j).reset(s.task, s.seed)
            self.holding[j] = s.key
            return screen

        if len(samples) <= self.pool.size:
            plan = {j: ([j] if j < len(samples) else []) for j in range(self.pool.size)}
        else:
            plan = {j: [] for j in range(self.pool.size)}
            for q, k in enumerate(wanted):
                plan[q % self.pool.size].append(k)
        screens = self._run(plan, start)
        for k, s in enumerate(samples):
            got = screens.get(k, screens.get(first[(s.task, s.seed)]))
            if isinstance(got, BaseException):
                raise got
            s.screen = got
            s.tracker = _tracker(s.task, got.fields)
            s.tracker.update(got.dom)
            s.t0 = time.monotonic()
        prompts = []
        for s in samples:
            msgs, images = self._step_messages(s, system=True)
            self._count(s, msgs)
            prompts.append(Prompt(messages=msgs, images=images or None))
        return prompts

    def step(self, turns: list[Turn]) -> list[StepResult]:
        from envs.gui.secagent import parse_step

        results: dict[int, StepResult] = {}
        browser: dict[int, Action] = {}
        for t in turns:
            s = self.samples[t.sample]
            s.steps += 1
            parsed = parse_step(t.text)
            if parsed.context:
                s.context = parsed.context
            pa = parse_action(parsed.action_text) if parsed.action_text else None
            if pa is None or pa.action is None:
                s.invalid += 1
                error = (pa.error if pa is not None else None) or parsed.error or "no <action>"
                results[t.sample] = self._finish(s, t, "invalid", error)
                continue
            if not parsed.well_formed:
                s.malformed += 1
            if pa.action.kind == "terminate":
                s.terminate_status = pa.action.status
                s.done = True
                results[t.sample] = StepResult(done=True, reason="terminate", action="terminate")
                continue
            browser[t.sample] = pa.action

        def act(j: int, k: int):
            s = self.samples[k]
            self._restore(j, s)
            out = self.pool.session(j).step(browser[k])
            if out[3]["valid"]:
                self.holding[j] = (s.task, s.seed, s.actions + (browser[k],))
            return out

        outcomes = self._run(self._assign(sorted(browser)), act) if browser else {}
        for t in turns:
            if t.sample not in browser:
                continue
            s, a = self.samples[t.sample], browser[t.sample]
            got = outcomes[t.sample]
            if isinstance(got, BaseException):
                s.browser_errors += 1
                s.done = True
                results[t.sample] = StepResult(done=True, reason="browser_error", action=a.kind, valid=False)
                continue
            screen, reward, done, info = got
            s.step_seconds.append(info["seconds"])
            if not info["valid"]:
                s.invalid += 1
                results[t.sample] = self._finish(s, t, a.kind, info["error"])
                continue
            s.history.append({"screen_text": self._screen_text(s.screen), "action": format_action(a),
                              "screenshot": s.screen.screenshot})
            s.actions += (a,)
            s.screen = screen
            s.tracker.update(screen.dom)
            if done:
                s.raw_reward, s.page_done, s.done = float(info["raw_reward"]), True, True
                results[t.sample] = StepResult(done=True, reason="task_done", action=a.kind)
                continue
            results[t.sample] = self._finish(s, t, a.kind)
        return [results[t.sample] for t in turns]

    def _finish(self, s: _Sample, t: Turn, action: str, error: str | None = None) -> StepResult:
        """The reply to a step that did not end the episode by itself: the end on the step or time budget,
        nothing when the loop ends the episode anyway (`t.last`), else the next screen (corrective on error)."""
        valid = error is None
        reason = ("max_steps" if s.steps >= self.max_steps else
                  "max_seconds" if time.monotonic() - s.t0 >= self.max_seconds else None)
        if reason is not None:
            s.done = True
            return StepResult(done=True, reason=reason, action=action, valid=valid)
        if t.last:
            return StepResult(action=action, valid=valid)
        res = self._observation(s, error)
        res.action, res.valid = action, valid
        return res

    def info(self, sample: int) -> dict[str, Any]:
        s = self.samples[sample]
        success = s.page_done and s.raw_reward > 0
        from envs.gui.milestones import task_progress

        reached = list(s.tracker.reached)
        return {
            "success": success, "raw_reward": s.raw_reward, "steps": s.steps, "invalid": s.invalid,
            "malformed": s.malformed, "milestones": reached, "milestone_names": list(s.tracker.names),
            "progress": task_progress(reached, success=success), "input_tokens": list(s.input_tokens),
            "input_chars": list(s.input_chars), "step_seconds": list(s.step_seconds), "task": s.task,
            "seed": s.seed, "terminate_status": s.terminate_status, "replays": s.replays,
            "replay_mismatch": s.replay_mismatch, "browser_errors": s.browser_errors,
        }


def _text_of(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return str(content or "")


def _register() -> None:
    from rl.registry import ENVIRONMENTS

    if "miniwob" not in ENVIRONMENTS:  # envs/gui/__init__.py may register it too: once is enough
        ENVIRONMENTS.register("miniwob", MiniWobEnv)


_register()

"""Prompts of the next-query agent: the user message for one example row, the adaptive template choice,
and the registered prompt builders (`rl.data.PROMPT_BUILDERS`).

A row (envs/nextquery contract) carries `time` (the query's "now", unix seconds) and `history` (events,
oldest first, each with the item's text inlined: title, category, brand, tags, action, time). A prompt
needs nothing else: no catalogue.

Templates (`render_prompt(row, template)`):
  full     every event (the last `max_events`): relative time, action, title, category, brand
  compact  the last COMPACT_EVENTS events only: relative time, action, title (fewer tokens; the recent
           session is what a focused shopper's next query is about)
  summary  counts of the whole history per category and per action, then the last SUMMARY_EVENTS
           events (a long, spread-out history in a fixed number of lines)

Adaptive choice (`pick_template`, the paper's "template from features of the sequence within a token
budget") -- the rule, in order:
  1. features over the shown history (at most `max_events`): n events, `focus` = share of the last
     min(5, n) events in the most common category among them, `recency` = seconds from the last event
     to now, `diversity` = distinct categories / n, `strong` = share of cart/favorite/purchase actions.
  2. preference order:
       focused session (focus >= 0.8 and recency <= 30 min, n >= 3)   compact, full, summary
       long and spread (diversity >= 0.5 and n >= 8)                  summary, full, compact
       strong-intent history (strong >= 0.5)                          full, summary, compact
       otherwise                                                      full, compact, summary
     (a purchase-heavy history keeps every event's action, hence "full" before the lossy summary)
  3. the first template in that order whose rendering fits `budget_tokens` (counted with `tokenizer`
     when given, else estimated as ceil(characters / 3): SmolLM2's tokenizer measured ~3.1 characters
     per token on synthetic prompts (product names, numbers) and ~2.6 on MovieLens ones (years, genres)
     -- the estimate errs short; pass the tokenizer where it matters); when none fits, the shortest.
"""

from __future__ import annotations

import math
import time as _time
from collections import Counter

# DataError: a UserError (one-line message) that is also a ValueError, so rl.setup's row-0 check names it
from rl.data import DataError, register_prompt_builder

__all__ = [
    "SYSTEM_PROMPT",
    "REASONING_SYSTEM_PROMPT",
    "TEMPLATES",
    "COMPACT_EVENTS",
    "SUMMARY_EVENTS",
    "render_prompt",
    "pick_template",
    "template_features",
    "count_tokens",
    "build_messages",
]

SYSTEM_PROMPT = ("Predict the user's next search query from their recent shopping behaviour. "
                 "Answer with the query only.")
# The V2 variant: a short reasoning block, then the query in tags (quality.extract_query reads both forms).
REASONING_SYSTEM_PROMPT = ("Predict the user's next search query from their recent shopping behaviour. "
                           "Think briefly inside <think></think>, then give the query inside <query></query>.")

TEMPLATES = ("full", "compact", "summary")
COMPACT_EVENTS = 6
SUMMARY_EVENTS = 3
_STRONG = ("cart", "favorite", "purchase")
_QUESTION = "What will the user search for next?"


def _ago(seconds: float) -> str:
    """A short relative time; an event after "now" (clock skew in users' logs) reads as "just now"."""
    s = max(0, int(seconds))
    if s < 60:
        return "just now"
    if s < 3600:
        return f"{s // 60} min ago"
    if s < 86400:
        return f"{s // 3600} h ago"
    return f"{s // 86400} d ago"


def _now_line(now: int) -> str:
    return "Now: " + _time.strftime("%A %Y-%m-%d %H:%M UTC", _time.gmtime(int(now)))


def _history(row: dict, max_events: int) -> tuple[int, list[dict]]:
    try:
        now, history = int(row["time"]), list(row["history"])
    except KeyError as e:
        raise DataError(f"nextquery prompt: row {row.get('id', '?')!r} has no {e.args[0]!r} key "
                        "(a row needs 'time' and 'history')") from None
    if max_events < 1:
        raise DataError(f"nextquery prompt: max_events must be >= 1, got {max_events}")
    return now, history[-max_events:]


def _full(now: int, events: list[dict]) -> list[str]:
    lines = ["Recent behaviour (oldest first):"]
    for i, e in enumerate(events, 1):
        brand = f", brand {e['brand']}" if e.get("brand") else ""
        lines.append(f"{i}. [{_ago(now - int(e['time']))}] {e['action']}: {e['title']} "
                     f"(category {e['category']}{brand})")
    return lines


def _compact(now: int, events: list[dict]) -> list[str]:
    lines = ["Latest actions:"]
    for e in events[-COMPACT_EVENTS:]:
        lines.append(f"- {_ago(now - int(e['time']))} {e['action']}: {e['title']}")
    return lines


def _summary(now: int, events: list[dict]) -> list[str]:
    cats = Counter(e["category"] for e in events)
    acts = Counter(e["action"] for e in events)
    lines = [f"Behaviour summary ({len(events)} events):",
             "Categories: " + ", ".join(f"{c} x{n}" for c, n in cats.most_common()),
             "Actions: " + ", ".join(f"{a} x{n}" for a, n in acts.most_common()),
             "Last events:"]
    for e in events[-SUMMARY_EVENTS:]:
        lines.append(f"- {_ago(now - int(e['time']))} {e['action']}: {e['title']}")
    return lines


_RENDER = {"full": _full, "compact": _compact, "summary": _summary}


def render_prompt(row: dict, template: str = "full", max_events: int = 20) -> str:
    """The user-message text for one row (module docstring: the templates). An empty history still
    renders (the model then predicts from the time alone)."""
    if template not in _RENDER:
        raise DataError(f"nextquery prompt: unknown template {template!r} (one of {list(TEMPLATES)})")
    now, events = _history(row, max_events)
    try:
        body = _RENDER[template](now, events) if events else ["No recent behaviour."]
    except KeyError as e:
        raise DataError(f"nextquery prompt: row {row.get('id', '?')!r}: an event has no {e.args[0]!r} key") from None
    return "\n".join([_now_line(now), *body, _QUESTION])


def count_tokens(text: str, tokenizer=None) -> int:
    """Tokens of `text` with `tokenizer` (no special tokens), else ceil(len / 3) (module docstring)."""
    if tokenizer is None:
        return math.ceil(len(text) / 3)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def template_features(row: dict, max_events: int = 20) -> dict:
    """The features `pick_template` decides on (module docstring, step 1)."""
    now, events = _history(row, max_events)
    n = len(events)
    if n == 0:
        return {"n": 0, "focus": 0.0, "recency": math.inf, "diversity": 0.0, "strong": 0.0}
    last = events[-min(5, n):]
    focus = Counter(e["category"] for e in last).most_common(1)[0][1] / len(last)
    return {"n": n, "focus": focus, "recency": float(now - int(events[-1]["time"])),
            "diversity": len({e["category"] for e in events}) / n,
            "strong": sum(e["action"] in _STRONG for e in events) / n}


def pick_template(row: dict, tokenizer=None, budget_tokens: int = 256, max_events: int = 20) -> str:
    """The adaptive template for `row` within `budget_tokens` (module docstring: the rule)."""
    f = template_features(row, max_events)
    if f["n"] >= 3 and f["focus"] >= 0.8 and f["recency"] <= 1800:
        order = ("compact", "full", "summary")
    elif f["n"] >= 8 and f["diversity"] >= 0.5:
        order = ("summary", "full", "compact")
    elif f["strong"] >= 0.5:
        order = ("full", "summary", "compact")
    else:
        order = ("full", "compact", "summary")
    sizes = {t: count_tokens(render_prompt(row, t, max_events), tokenizer) for t in order}
    for t in order:
        if sizes[t] <= budget_tokens:
            return t
    return min(order, key=lambda t: sizes[t])


def build_messages(row: dict, template: str = "full", max_events: int = 20, reasoning: bool = False) -> list[dict]:
    """System + user chat messages for one row; `template="adaptive"` picks it per row (`pick_template`)."""
    if template == "adaptive":
        template = pick_template(row, max_events=max_events)
    return [{"role": "system", "content": REASONING_SYSTEM_PROMPT if reasoning else SYSTEM_PROMPT},
            {"role": "user", "content": render_prompt(row, template, max_events)}]


# Prompt builders take the row only (rl.data); a row may carry its own `template` column (e.g. a data
# set rendered with mixed templates), otherwise "full".
@register_prompt_builder("nextquery")
def nextquery(row: dict) -> list[dict]:
    """The fixed template: row["template"] if the row names one, else "full"; answer-only system prompt."""
    return build_messages(row, row.get("template") or "full")


@register_prompt_builder("nextquery_adaptive")
def nextquery_adaptive(row: dict) -> list[dict]:
    """`pick_template` per row (estimated token count, budget 256); answer-only system prompt."""
    return build_messages(row, "adaptive")


@register_prompt_builder("nextquery_adaptive_think")
def nextquery_adaptive_think(row: dict) -> list[dict]:
    """As nextquery_adaptive, with the reasoning system prompt (<think> then <query>), V2's format."""
    return build_messages(row, "adaptive", reasoning=True)

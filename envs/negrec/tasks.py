"""CoNRec prompts and Stage-1 SFT rows: one wording for SFT, RL and eval.

Items appear in prompts as semantic IDs only (the paper): an item's SID is its level tokens written
with no separator (`<a_5><b_2><c_9>`), and a list of items is their SIDs separated by one space. Every
recommendation prompt is one user message (no system message of ours: the chat template adds its
default) ending in ``Next disliked item:``; the answer is exactly one SID (then the end of turn).

`render_context` is the one function that writes the behaviour context; the SFT next-negative task,
the RL stage prompt builders (`envs.negrec.rl`) and evaluation all go through it::

    Disliked: <a_1><b_2><c_3> <a_4><b_0><c_7>
    Liked: <a_2><b_2><c_1> ...
    Next disliked item:

Context variants (the Progressive GRPO stages, `context_items`):
- ``recent``: the negatives of the last `recent_days` days before the anchor (day >= anchor_day -
  recent_days), at most the last `recent_max_items`. Adaptation to MovieLens-100k: about half of its
  users rate everything on one day, so "the last 3 days" is often the whole sequence; the cap keeps
  stage (i) a short context as the paper intends. A row with no negative in the window keeps its
  `recent_min_items` most recent negatives (default 1): an empty context carries no signal at all.
- ``negatives``: the whole negative sequence, at most the last `max_items` (prompt length on CPU).
- ``negatives_positives``: the negatives as above plus the positives, at most the last `max_positives`.
Only the row's history (`negatives`, `positives`: strictly before the anchor, `envs.negrec.data`) is
ever shown, so no future item reaches a prompt.

`sft_rows` builds Stage 1 (context understanding), rows ``{"messages": [user, assistant], "task"}``
that `sft.train` reads as ``data.format: messages`` (loss on the answer only):
- ``sid2title``: "Title of <a_..><b_..><c_..>?" -> "Toy Story (1995)"; one row per item.
- ``title2sid``: "Item ID of "Toy Story (1995)"?" -> its SID; one row per item.
- ``alignment``: the paper's item-level 4-way multiple choice, adapted to MovieLens. The paper's
  positive is an item seen more than 3 times in the user's negative history; a MovieLens user rates a
  movie once, so that set is empty. Here, per train example: the prompt shows one disliked item (a
  random earlier negative) and liked items (the user's most recent earlier positives), then 4
  candidate SIDs labelled A-D; the answer is the example's anchor (a train negative of the user that
  the prompt does not show), the 3 distractors are 3 of the user's earlier positives that the prompt
  does not show either. The answer is written as the SID, not the letter: every Stage-1 answer is then
  an SID in the same place, and the model learns to emit the disliked item's tokens (which the RL stage
  and the constrained top-K decode), not a letter. Examples with fewer than 4 earlier positives cannot
  give 3 unshown distractors plus a liked item and are skipped (counted in a log line).
- ``next_negative`` (optional, the LC-Rec-style baseline): the stage-(ii) prompt -> the anchor's SID.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from typing import Iterable, Sequence

from rl.data import DataError

__all__ = [
    "CONTEXTS",
    "SFT_TASKS",
    "alignment_prompt",
    "context_items",
    "item_title",
    "render_context",
    "render_prompt",
    "sft_rows",
]

logger = logging.getLogger("envs.negrec.tasks")

CONTEXTS = ("recent", "negatives", "negatives_positives")
SFT_TASKS = ("sid2title", "title2sid", "alignment", "next_negative")
QUESTION = "Next disliked item:"


def _sids(entries: Sequence[dict], row: dict, what: str) -> list[str]:
    """The SIDs of history entries; an entry without one is an error naming the row (the examples were
    built without `sid_of`, so they cannot be written as SIDs)."""
    out = []
    for e in entries:
        sid = e.get("sid") or ""
        if not sid:
            raise DataError(f"negrec example (user {row.get('user')!r}, anchor_pos {row.get('anchor_pos')}): "
                            f"{what} item {e.get('item')!r} has no 'sid' (build the examples with sid_of)")
        out.append(sid)
    return out


def context_items(row: dict, context: str = "negatives", *, recent_days: int = 3, recent_max_items: int = 10,
                  recent_min_items: int = 1, max_items: int = 30, max_positives: int = 30) -> tuple[list[str], list[str]]:
    """(negative SIDs, positive SIDs) shown for `row` under `context` (see the module docstring), oldest first."""
    negatives = list(row.get("negatives") or [])
    if context == "recent":
        recent = [e for e in negatives if e["day"] >= row["anchor_day"] - recent_days]
        if len(recent) < recent_min_items:  # nothing (or too little) in the window: the most recent ones
            recent = negatives[-recent_min_items:] if recent_min_items > 0 else []
        shown = recent[-recent_max_items:] if recent_max_items > 0 else []
        return _sids(shown, row, "negative"), []
    if context not in CONTEXTS:
        raise ValueError(f"negrec context {context!r}: expected one of {list(CONTEXTS)}")
    shown = negatives[-max_items:] if max_items > 0 else []
    neg = _sids(shown, row, "negative")
    if context == "negatives":
        return neg, []
    positives = list(row.get("positives") or [])
    pos = positives[-max_positives:] if max_positives > 0 else []
    return neg, _sids(pos, row, "positive")


def render_context(negatives: Sequence[str], positives: Sequence[str] | None = None) -> str:
    """The behaviour context lines: ``Disliked: ...`` and, when `positives` is not None, ``Liked: ...``
    (``(none)`` for an empty list)."""
    lines = [f"Disliked: {' '.join(negatives) or '(none)'}"]
    if positives is not None:
        lines.append(f"Liked: {' '.join(positives) or '(none)'}")
    return "\n".join(lines)


def render_prompt(row: dict, context: str = "negatives", **limits) -> list[dict]:
    """The chat prompt of a recommendation: the context of `row` and the question (one user message)."""
    neg, pos = context_items(row, context, **limits)
    text = render_context(neg, pos if context == "negatives_positives" else None)
    return [{"role": "user", "content": f"{text}\n{QUESTION}"}]


def item_title(item: dict) -> str:
    """"Toy Story (1995)": the title with the year when known."""
    title, year = str(item.get("title") or "").strip(), str(item.get("year") or "").strip()
    return f"{title} ({year})" if year else title


def alignment_prompt(disliked: str, liked: Sequence[str], candidates: Sequence[str]) -> str:
    """The alignment task's user message: the context, then 4 candidates labelled A-D."""
    options = "\n".join(f"{chr(ord('A') + i)}. {sid}" for i, sid in enumerate(candidates))
    return (f"{render_context([disliked], liked)}\nWhich item will the user dislike?\n{options}\n"
            "Answer with the item:")


def _chat(prompt: str, answer: str, task: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], "task": task}


def _sample(rows: list, n: int | None, rng: random.Random) -> list:
    """`n` of `rows` drawn with `rng` (in their original order), or all when `n` is None."""
    if n is None or n >= len(rows):
        return list(rows)
    keep = sorted(rng.sample(range(len(rows)), n))
    return [rows[i] for i in keep]


def sft_rows(items: list[dict], examples: list[dict], *, tasks: Iterable[str] = ("sid2title", "title2sid", "alignment"),
             seed: int = 0, max_alignment_rows: int | None = None, max_next_negative_rows: int | None = None,
             alignment_max_liked: int = 5, max_items: int = 30) -> list[dict]:
    """Stage-1 SFT rows (see the module docstring) from items.jsonl rows and TRAIN example rows.

    `max_alignment_rows` / `max_next_negative_rows`: a seeded subsample of the examples for those tasks
    (None = one row per usable example). `alignment_max_liked`: liked items shown in an alignment prompt.
    `max_items`: the negatives cap of the next-negative prompt (as the `negrec_negatives` builder)."""
    tasks = list(tasks)
    unknown = [t for t in tasks if t not in SFT_TASKS]
    if unknown:
        raise ValueError(f"sft_rows: unknown task(s) {unknown}; expected some of {list(SFT_TASKS)}")
    sid_of: dict[str, str] = {}
    for i, item in enumerate(items):
        if not item.get("sid") or not item.get("item"):
            raise DataError(f"items row {i + 1}: missing 'item' or 'sid'")
        sid_of[str(item["item"])] = item["sid"]
    rng = random.Random(seed)
    out: list[dict] = []
    if "sid2title" in tasks:
        out += [_chat(f"Title of {it['sid']}?", item_title(it), "sid2title") for it in items]
    if "title2sid" in tasks:
        out += [_chat(f'Item ID of "{item_title(it)}"?', it["sid"], "title2sid") for it in items]
    if "alignment" in tasks:
        skipped: Counter = Counter()
        for ex in _sample(examples, max_alignment_rows, rng):
            row = _alignment_row(ex, sid_of, rng, alignment_max_liked, skipped)
            if row is not None:
                out.append(row)
        if skipped:
            logger.info("alignment: skipped %s", ", ".join(f"{n} examples ({why})" for why, n in skipped.items()))
    if "next_negative" in tasks:
        for ex in _sample(examples, max_next_negative_rows, rng):
            prompt = render_prompt(ex, "negatives", max_items=max_items)[0]["content"]
            out.append(_chat(prompt, _sid_of_item(ex["next_negative"], sid_of, ex), "next_negative"))
    return out


def _sid_of_item(item: str, sid_of: dict[str, str], ex: dict) -> str:
    try:
        return sid_of[item]
    except KeyError:
        raise DataError(f"negrec example (user {ex.get('user')!r}, anchor_pos {ex.get('anchor_pos')}): "
                        f"item {item!r} is not in items.jsonl") from None


def _alignment_row(ex: dict, sid_of: dict[str, str], rng: random.Random, max_liked: int, skipped: Counter) -> dict | None:
    """One alignment row of a train example, or None (counted in `skipped`) when it has too little history."""
    negatives, positives = list(ex.get("negatives") or []), list(ex.get("positives") or [])
    if not negatives:
        skipped["no earlier negative"] += 1
        return None
    if len(positives) < 4:
        skipped["fewer than 4 earlier positives"] += 1
        return None
    disliked = _sids([rng.choice(negatives)], ex, "negative")[0]
    pos = _sids(positives, ex, "positive")
    distractors = rng.sample(range(len(pos)), 3)
    rest = [s for i, s in enumerate(pos) if i not in distractors]
    liked = rest[-max_liked:] if max_liked > 0 else []  # the most recent positives that are not candidates
    answer = _sid_of_item(ex["next_negative"], sid_of, ex)
    candidates = [answer, *(pos[i] for i in distractors)]
    rng.shuffle(candidates)
    return _chat(alignment_prompt(disliked, liked, candidates), answer, "alignment")

"""Search-R1 / Search-R1++ rewards: answer extraction, F1+, the format-aware reward, and their
registered reward functions (`rl.rewards.REWARDS`).

Registered (gold answers from the `golden_answers` column; the prediction is the answer action's
content, `traj.info["answer"]`, or for trajectories of other agents the last `<answer>` tag of the
response):
  search_em        exact match (SQuAD normalisation); `substring: true` for sub-string EM
  search_f1        token F1
  search_f1_plus   Search-R1++ F1+ = F1 - alpha*[no search] - beta*[no answer] (`alpha`, `beta`)
  search_format    Search-R1 v0.3 format-aware EM (`require_think` defaults to False for the fast template)

The generic answer metrics (normalisation, EM, F1) are `eval.qa_metrics`: one implementation for
the reward a policy is trained on and the number the leaderboard reports.
"""

from __future__ import annotations

import re
from typing import Iterable

from eval.qa_metrics import Golds, as_golds, exact_match, normalize_answer, substring_exact_match, token_f1
from rl.rewards import register_reward
from rl.trajectory import Trajectory

__all__ = [
    "f1_plus",
    "extract_answer",
    "extract_information_blocks",
    "is_valid_search_r1_sequence",
    "validate_search_r1_sequence",
    "format_aware_reward",
    "prediction",
    "search_em",
    "search_f1",
    "search_f1_plus",
    "search_format",
]


def _is_empty_answer(pred: str | None) -> bool:
    return pred is None or not str(pred).strip()


def f1_plus(
    pred: str | None,
    golds: Golds,
    *,
    searched: bool,
    answered: bool,
    alpha: float = 0.1,
    beta: float = 0.1,
) -> float:
    """Search-R1++ F1+ reward: ``F1 - alpha*[not searched] - beta*[not answered]``.

    ``answered`` is the caller's "the episode ended with an answer action";
    a ``None``/blank ``pred`` also counts as not answered.  Range:
    ``[-alpha-beta, 1]``.
    """
    answered = bool(answered) and not _is_empty_answer(pred)
    return token_f1(pred, golds) - alpha * (not searched) - beta * (not answered)


# ---------------------------------------------------------------------------
# Search-R1 format-aware reward
# ---------------------------------------------------------------------------

_TAGS = ("think", "search", "information", "answer")
_TAG_SPLIT_RE = re.compile(r"(</?(?:think|search|information|answer)>)")
_TAG_RE = re.compile(r"^</?(?:think|search|information|answer)>$")
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_INFO_RE = re.compile(r"<information>(.*?)</information>", re.DOTALL)
_ASSISTANT_MARKER_RE = re.compile(r"<\|im_start\|>assistant\s*")
# End-of-turn tokens that a decode with special tokens kept may leave at the end.
_TRAILING_SPECIAL_RE = re.compile(r"(?:\s*(?:<\|im_end\|>|<\|endoftext\|>|</s>|<\|eot_id\|>))+\s*$")


def extract_answer(response_text: str | None) -> str | None:
    """Content of the last ``<answer>...</answer>`` in the *generated* text, stripped.

    Pass only the policy's generated part: the prompt contains an example
    ``<answer> Beijing </answer>`` that must not be taken as the answer.
    Returns ``None`` when there is no complete answer tag.
    """
    if not response_text:
        return None
    matches = _ANSWER_RE.findall(response_text)
    if not matches:
        return None
    return matches[-1].strip()


def extract_information_blocks(text: str) -> list[str]:
    return [m.strip() for m in _INFO_RE.findall(text or "")]


def validate_search_r1_sequence(text: str, *, require_think: bool = True) -> tuple[bool, str]:
    """Validate the tag order of a generated Search-R1 response; returns ``(ok, reason)``.

    Grammar (Search-R1 v0.3 ``is_valid_sequence``)::

        think (search information think)* answer

    with only whitespace allowed between tags, every tag balanced, and nothing
    but whitespace (or end-of-turn special tokens) after ``</answer>``.
    ``text`` is the generated response including the environment's
    ``<information>`` blocks.  If it still contains a ChatML
    ``<|im_start|>assistant`` marker, only what follows the first marker is
    checked (as in the original).  ``require_think=False`` accepts the Fast
    Thinking variant where every ``<think>`` block is optional.
    """
    if text is None:
        return False, "empty response"
    m = _ASSISTANT_MARKER_RE.search(text)
    content = text[m.end():] if m else text
    content = _TRAILING_SPECIAL_RE.sub("", content)

    for tag in _TAGS:
        n_open = content.count(f"<{tag}>")
        n_close = content.count(f"</{tag}>")
        if n_open != n_close:
            return False, f"mismatch in {tag} tags: {n_open} opening vs {n_close} closing"

    # states: start, in_think, after_think, in_search, after_search,
    #         in_information, information, in_answer, end
    can_act = {"after_think"} if require_think else {"start", "after_think", "information"}
    state = "start"
    for part in _TAG_SPLIT_RE.split(content):
        if not part.strip():
            continue
        if _TAG_RE.match(part):
            if part == "<think>" and state in ("start", "information"):
                state = "in_think"
            elif part == "</think>" and state == "in_think":
                state = "after_think"
            elif part == "<search>" and state in can_act:
                state = "in_search"
            elif part == "</search>" and state == "in_search":
                state = "after_search"
            elif part == "<information>" and state == "after_search":
                state = "in_information"
            elif part == "</information>" and state == "in_information":
                state = "information"
            elif part == "<answer>" and state in can_act:
                state = "in_answer"
            elif part == "</answer>" and state == "in_answer":
                state = "end"
            else:
                return False, f"unexpected tag {part} in state {state}"
        elif state in ("in_think", "in_search", "in_information", "in_answer"):
            continue
        else:
            return False, f"unexpected content {part.strip()[:40]!r} in state {state}"
    if state != "end":
        return False, "incomplete sequence: must end with </answer>"
    return True, "valid"


def is_valid_search_r1_sequence(text: str, *, require_think: bool = True) -> bool:
    """``True`` iff ``text`` follows think -> (search -> information -> think)* -> answer."""
    return validate_search_r1_sequence(text, require_think=require_think)[0]


def _retrieval_hit(text: str, golds: Iterable[str]) -> bool:
    blocks = [normalize_answer(b) for b in extract_information_blocks(text)]
    for g in golds:
        ng = normalize_answer(g)
        if ng and any(ng in b for b in blocks):
            return True
    return False


def format_aware_reward(
    pred: str | None,
    golds: Golds,
    response_text: str,
    *,
    structure_format_score: float = 0.2,
    final_format_score: float = 0.1,
    retrieval_score: float = 0.0,
    score: float = 1.0,
    require_think: bool = True,
) -> float:
    """Search-R1 v0.3 format-aware EM reward (``compute_score_em``).

    =====================  ==================================
    correct, valid format  ``score`` (1)
    correct, invalid       ``score - structure_format_score``
    wrong, valid           ``structure_format_score`` (+ ``retrieval_score`` if a gold
                           answer occurs in an ``<information>`` block)
    wrong, invalid         ``final_format_score``
    no answer, invalid     ``0``  (as in the original: ``final_format_score``
                           rewards having produced a final answer at all)
    =====================  ==================================

    ``pred`` is the extracted answer (see :func:`extract_answer`) and
    ``response_text`` the generated response the format is checked on.
    """
    valid = is_valid_search_r1_sequence(response_text, require_think=require_think)
    gold_list = as_golds(golds)
    bonus = retrieval_score if (valid and retrieval_score and _retrieval_hit(response_text, gold_list)) else 0.0
    if pred is None:
        return structure_format_score + bonus if valid else 0.0
    if exact_match(pred, gold_list):
        return score if valid else score - structure_format_score
    if valid:
        return structure_format_score + bonus
    return final_format_score


# ---------------------------------------------------------------------------
# registered rewards
# ---------------------------------------------------------------------------


def _golds(row: dict, answer_column: str):
    if answer_column not in row:
        raise KeyError(f"no gold answers: the row has no '{answer_column}' column (columns: {sorted(row)})")
    return row[answer_column]


def prediction(traj: Trajectory) -> str | None:
    """The answer action's content; for trajectories of other agents, the last answer tag of the response."""
    if "answered" in traj.info:
        return traj.info.get("answer")
    return extract_answer(traj.response_text)


@register_reward("search_em")
def search_em(row: dict, traj: Trajectory, answer_column: str = "golden_answers", substring: bool = False) -> float:
    """Exact match of the answer with any gold answer (SQuAD normalisation); `substring`: gold inside answer."""
    fn = substring_exact_match if substring else exact_match
    return fn(prediction(traj), _golds(row, answer_column))


@register_reward("search_f1")
def search_f1(row: dict, traj: Trajectory, answer_column: str = "golden_answers") -> float:
    return token_f1(prediction(traj), _golds(row, answer_column))


@register_reward("search_f1_plus")
def search_f1_plus(
    row: dict, traj: Trajectory, alpha: float = 0.1, beta: float = 0.1, answer_column: str = "golden_answers"
) -> float:
    """Search-R1++ F1+: F1 - alpha*[no search in the episode] - beta*[no answer action]."""
    pred = prediction(traj)
    return f1_plus(
        pred,
        _golds(row, answer_column),
        searched=traj.info.get("searches", 0) > 0,
        answered=bool(traj.info.get("answered", pred is not None)),
        alpha=alpha,
        beta=beta,
    )


@register_reward("search_format")
def search_format(
    row: dict,
    traj: Trajectory,
    structure_format_score: float = 0.2,
    final_format_score: float = 0.1,
    retrieval_score: float = 0.0,
    score: float = 1.0,
    require_think: bool | None = None,
    answer_column: str = "golden_answers",
) -> float:
    """Search-R1 v0.3 format-aware EM on the whole response (with its `<information>` blocks).

    `require_think=None`: required unless the trajectory used the fast template.
    """
    if require_think is None:
        require_think = traj.info.get("template") != "fast"
    return format_aware_reward(
        prediction(traj),
        _golds(row, answer_column),
        traj.response_text,
        structure_format_score=structure_format_score,
        final_format_score=final_format_score,
        retrieval_score=retrieval_score,
        score=score,
        require_think=require_think,
    )

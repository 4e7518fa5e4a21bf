"""QA answer metrics shared by RL rewards and evaluation (stdlib only).

One implementation of each metric, so that the reward a policy is trained on
and the number reported at evaluation can never drift apart.

Normalisation follows the SQuAD convention used by Search-R1 (lowercase,
remove punctuation, remove the articles a/an/the, collapse whitespace), made
unicode-safe:

* the text is NFKC-normalised first, so composed/decomposed accents and
  compatibility forms (full-width letters, ligatures) compare equal;
* case folding uses ``str.casefold`` (a superset of ``lower`` on ASCII);
* "punctuation" is every character whose unicode category starts with ``P``
  (curly quotes, dashes, guillemets, CJK punctuation, ...) plus ASCII
  ``string.punctuation`` (which also lists some ASCII symbols such as ``$`` or
  ``+`` that SQuAD strips).  Punctuation is deleted, not replaced by a space,
  exactly as in SQuAD (``"U.S."`` -> ``"us"``).

Accents are kept (``"café" != "cafe"``), as in SQuAD.

Rewards:

* :func:`exact_match`, :func:`substring_exact_match`, :func:`token_f1`
  return floats in ``[0, 1]`` (max over gold answers);
* :func:`f1_plus` is Search-R1++'s F1+ (F1 minus penalties for not searching
  and not answering);
* :func:`format_aware_reward` is the Search-R1 v0.3 format-aware EM reward,
  using :func:`is_valid_search_r1_sequence` on the generated response.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from typing import Iterable, Sequence, Union

__all__ = [
    "Golds",
    "normalize_answer",
    "exact_match",
    "substring_exact_match",
    "token_f1",
    "f1_plus",
    "extract_answer",
    "extract_information_blocks",
    "is_valid_search_r1_sequence",
    "validate_search_r1_sequence",
    "format_aware_reward",
]

Golds = Union[str, Sequence[str]]

_ASCII_PUNCT = frozenset(string.punctuation)
_ARTICLES_RE = re.compile(r"\b(?:a|an|the)\b", re.UNICODE)
_PUNCT_CACHE: dict[str, bool] = {}


def _is_punct(ch: str) -> bool:
    r = _PUNCT_CACHE.get(ch)
    if r is None:
        r = ch in _ASCII_PUNCT or unicodedata.category(ch).startswith("P")
        if len(_PUNCT_CACHE) < 100_000:
            _PUNCT_CACHE[ch] = r
    return r


def normalize_answer(s: str | None) -> str:
    """SQuAD-style normalisation (unicode-safe). ``None`` -> ``""``."""
    if s is None:
        return ""
    s = unicodedata.normalize("NFKC", str(s)).casefold()
    s = "".join(ch for ch in s if not _is_punct(ch))
    s = _ARTICLES_RE.sub(" ", s)
    return " ".join(s.split())


def _as_golds(golds: Golds | None) -> list[str]:
    if golds is None:
        return []
    if isinstance(golds, str):
        return [golds]
    # lists, tuples, numpy arrays (parquet rows) ...
    return [str(g) for g in golds if g is not None]


def exact_match(pred: str | None, golds: Golds) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer."""
    if pred is None:
        return 0.0
    p = normalize_answer(pred)
    return float(any(p == normalize_answer(g) for g in _as_golds(golds)))


def substring_exact_match(pred: str | None, golds: Golds) -> float:
    """1.0 if any (non-empty) normalised gold occurs inside the normalised prediction.

    Plain substring test on the normalised strings, as in Search-R1's
    ``subem_check``.  Empty golds (e.g. a gold that is only an article) never
    match, otherwise every prediction would.
    """
    if pred is None:
        return 0.0
    p = normalize_answer(pred)
    for g in _as_golds(golds):
        ng = normalize_answer(g)
        if ng and ng in p:
            return 1.0
    return 0.0


def _f1_tokens(pred_toks: list[str], gold_toks: list[str]) -> float:
    if not pred_toks or not gold_toks:
        return 0.0
    common = Counter(pred_toks) & Counter(gold_toks)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_toks)
    recall = same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def token_f1(pred: str | None, golds: Golds) -> float:
    """SQuAD token-level F1, max over gold answers; 0.0 for an empty prediction."""
    if pred is None:
        return 0.0
    pred_toks = normalize_answer(pred).split()
    if not pred_toks:
        return 0.0
    return max((_f1_tokens(pred_toks, normalize_answer(g).split()) for g in _as_golds(golds)), default=0.0)


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
    gold_list = _as_golds(golds)
    bonus = retrieval_score if (valid and retrieval_score and _retrieval_hit(response_text, gold_list)) else 0.0
    if pred is None:
        return structure_format_score + bonus if valid else 0.0
    if exact_match(pred, gold_list):
        return score if valid else score - structure_format_score
    if valid:
        return structure_format_score + bonus
    return final_format_score

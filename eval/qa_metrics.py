"""QA answer metrics shared by RL rewards, evaluation and data tools (stdlib only).

One implementation of each metric, so that the reward a policy is trained on
and the number reported at evaluation can never drift apart. Paper-specific
scores built on them (Search-R1's answer extraction, F1+, format-aware reward)
live with their paper (`envs/search/rewards.py`).

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

Metrics: :func:`exact_match`, :func:`substring_exact_match`, :func:`token_f1`
return floats in ``[0, 1]`` (max over gold answers).
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from typing import Sequence, Union

__all__ = [
    "Golds",
    "as_golds",
    "normalize_answer",
    "exact_match",
    "substring_exact_match",
    "token_f1",
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


def as_golds(golds: Golds | None) -> list[str]:
    """Gold answers as a list of strings (a single string, lists, tuples, numpy arrays of parquet rows)."""
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
    return float(any(p == normalize_answer(g) for g in as_golds(golds)))


def substring_exact_match(pred: str | None, golds: Golds) -> float:
    """1.0 if any (non-empty) normalised gold occurs inside the normalised prediction.

    Plain substring test on the normalised strings, as in Search-R1's
    ``subem_check``.  Empty golds (e.g. a gold that is only an article) never
    match, otherwise every prediction would.
    """
    if pred is None:
        return 0.0
    p = normalize_answer(pred)
    for g in as_golds(golds):
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
    return max((_f1_tokens(pred_toks, normalize_answer(g).split()) for g in as_golds(golds)), default=0.0)

"""Quality of a predicted query against the user's real next query: one definition for the metric set
(envs/nextquery/metrics.py), the rewards (envs/nextquery/rewards.py) and the replay.

- `normalize_query`, `exact_match`, `token_f1`: the SQuAD normalisation and metrics of `eval.qa_metrics`
  (lowercase, punctuation deleted, articles a/an/the dropped, whitespace collapsed), so the query
  numbers and the QA numbers of the toolkit mean the same thing.
- `EmbeddingSimilarity`: cosine of all-MiniLM-L6-v2 sentence embeddings (the bundled model,
  `rl.models.load_sentence_model`), loaded once per instance on first use, batched. An empty
  prediction scores 0.0 (not the cosine of an empty string's embedding, which is > 0 and would pay a
  model for saying nothing).
- `extract_query(completion)`: the query in a model's answer. Accepted format, in order:
    1. a reasoning block `<think> ... </think>` is dropped (everything up to the last `</think>`);
       an unclosed `<think>` means the answer never came: "".
    2. the content of the last `<query> ... </query>` if there is one (an unclosed `<query>` takes the
       rest of the text);
    3. otherwise the first non-empty line;
    4. then a leading label ("Query:", "Search query:", "Next query:", "Answer:", case-insensitive),
       surrounding quotes / backticks, a trailing full stop and ChatML end tokens are stripped and the
       whitespace collapsed.
  "" when nothing is left (unparseable): every metric scores "" as 0.
"""

from __future__ import annotations

import re

from eval import qa_metrics

__all__ = ["normalize_query", "exact_match", "token_f1", "EmbeddingSimilarity", "extract_query",
           "default_similarity"]


def normalize_query(s: str | None) -> str:
    """Lowercase (casefold), punctuation deleted, articles dropped, whitespace collapsed; None -> ""."""
    return qa_metrics.normalize_answer(s)


def exact_match(pred: str | None, ref: str) -> float:
    """1.0 if the normalised strings are equal (an empty prediction never matches a non-empty query)."""
    if not normalize_query(pred) and normalize_query(ref):
        return 0.0
    return qa_metrics.exact_match(pred, ref)


def token_f1(pred: str | None, ref: str) -> float:
    """SQuAD token F1 of the normalised strings; 0.0 for an empty prediction."""
    return qa_metrics.token_f1(pred, ref)


class EmbeddingSimilarity:
    """`sim(preds, refs) -> list[float]`: cosine of sentence embeddings, in [-1, 1], pairwise.

    `model`: None = the bundled all-MiniLM-L6-v2, or a local sentence-transformers directory. Each
    distinct string is embedded once per call (references repeat across a group of samples)."""

    def __init__(self, model: str | None = None, device: str = "cpu", batch_size: int = 64):
        self.model_name, self.device, self.batch_size = model, device, batch_size
        self._model = None

    @property
    def model(self):
        if self._model is None:
            from rl.models import load_sentence_model

            self._model = load_sentence_model(self.model_name, self.device)
        return self._model

    def __call__(self, preds: list[str], refs: list[str]) -> list[float]:
        if len(preds) != len(refs):
            raise ValueError(f"EmbeddingSimilarity: {len(preds)} predictions but {len(refs)} references")
        preds = [(p or "").strip() for p in preds]
        refs = [(r or "").strip() for r in refs]
        texts = list(dict.fromkeys(t for t in preds + refs if t))
        if not texts:
            return [0.0] * len(preds)
        emb = self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                convert_to_numpy=True, show_progress_bar=False)
        index = {t: i for i, t in enumerate(texts)}
        out = []
        for p, r in zip(preds, refs):
            if not p or not r:
                out.append(0.0)
            else:
                cos = float(emb[index[p]] @ emb[index[r]])
                out.append(max(-1.0, min(1.0, cos)))  # float rounding may step just past +-1
        return out


_DEFAULT: dict[tuple, EmbeddingSimilarity] = {}


def default_similarity(model: str | None = None, device: str = "cpu") -> EmbeddingSimilarity:
    """One shared `EmbeddingSimilarity` per (model, device) in this process (rewards call it per sample:
    the model must load once)."""
    key = (model, device)
    if key not in _DEFAULT:
        _DEFAULT[key] = EmbeddingSimilarity(model, device)
    return _DEFAULT[key]


_THINK_CLOSE = re.compile(r"</think\s*>", re.IGNORECASE)
_THINK_OPEN = re.compile(r"<think\s*>", re.IGNORECASE)
_QUERY = re.compile(r"<query\s*>(.*?)(?:</query\s*>|$)", re.IGNORECASE | re.DOTALL)
_SPECIAL = re.compile(r"<\|im_end\|>|<\|endoftext\|>|<\|im_start\|>(?:assistant)?|</s>|<\|eot_id\|>")
_LABEL = re.compile(r"^\s*(?:(?:next\s+)?(?:search\s+)?query|answer)\s*[:：\-]\s*", re.IGNORECASE)
_QUOTES = "\"'`“”‘’«»"


def extract_query(completion: str | None) -> str:
    """The query in `completion` (module docstring: the format); "" when there is none."""
    if not completion:
        return ""
    text = _SPECIAL.sub("\n", str(completion))
    closes = list(_THINK_CLOSE.finditer(text))
    if closes:
        text = text[closes[-1].end():]
    elif _THINK_OPEN.search(text):
        return ""  # reasoning started and never ended: no answer
    queries = _QUERY.findall(text)
    if queries:
        text = queries[-1]
    else:
        text = next((line for line in text.splitlines() if line.strip()), "")
    text = _LABEL.sub("", text.strip())
    text = text.strip().strip(_QUOTES).strip()
    text = text.rstrip(".").strip().strip(_QUOTES)
    return " ".join(text.split())

"""The Search-R1 / Search-R1++ environment (`env: search` of the generic `multi_turn` agent).

Each turn the policy writes text ending in one action (generation stops at the first
`</search>` or `</answer>`: the environment's stop strings):
  `<search> query </search>`  -> top-k passages, appended as
                                 `\\n\\n<information>Doc 1(Title: ..) text ...</information>\\n\\n`
                                 (passages truncated to `max_obs_tokens`; the closing tag is kept);
  `<answer> text </answer>`   -> the episode ends;
  anything else               -> `INVALID_ACTION_TEXT` is appended and the loop goes on.
After `max_turns` turns, `final_answer_turn` appends `FINAL_TURN_TEXT` and allows one
more generation in which no search runs. The loop itself (batching, masks, limits, G-fold
copies, group ids, `Trajectory` assembly) is `agents.multi_turn`; the protocol is
`agents/environment.py`. Loop defaults of this environment: `max_turns: 4`,
`max_obs_tokens: 500`, `final_answer_turn: true` (the paper's).

Prompts: Slow Thinking (Search-R1) and Fast Thinking (Search-R1++) are
`envs.search.qa_data.PROMPT_TEMPLATES`; with `template: fast|slow` the environment builds the
user message from the row's `question` column, with `template: null` the recipe's prompt
builder builds it (e.g. Search-R1 parquet rows whose `prompt` already holds it).

Retrieval: `retriever` is a corpus path (in-process BM25, or `retriever_kind: dense`),
an `http(s)://` URL of a Search-R1 retrieval server (`RetrievalClient`), or any object
with `search(queries, topk)`. Built once per process and cached. A failed retrieval
(server down, or an in-process exception) becomes the "retrieval unavailable"
observation and is counted in `info["retrieval_unavailable"]`; it never raises. The first one
of each retriever in a process is logged as a warning with its reason (`eval.run` then
reports the count per model x dataset and fails when all of them were unavailable).

`env.info(k)` (merged into `traj.info`) carries `answer` (content of the answer action, from
generated text only: never the prompt's `<answer> Beijing </answer>` example), `answered`,
`searches` (retrievals run), `queries`, `retrieval_unavailable`, `template`; the loop adds
`turns`, `valid_actions`, `invalid_actions`, `termination`, `obs_truncated`, ...
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import weakref
from typing import Any

from agents.environment import Environment, Prompt, StepResult, Turn

# corpus / qa_data / retrievers are imported where used: `import envs.search` (a recipe plugin) must
# not import the modules that run as CLIs (`python -m envs.search.corpus`, `... .qa_data`), or runpy
# would execute them twice

__all__ = [
    "SEARCH_STOPS",
    "INVALID_ACTION_TEXT",
    "FINAL_TURN_TEXT",
    "parse_action",
    "get_cached_retriever",
    "default_retriever",
    "SearchEnvironment",
    "search_messages",
    "search_prompt_ids",
    "search_agent_kwargs",
    "load_search_recipe",
]

logger = logging.getLogger(__name__)

SEARCH_STOPS = ("</search>", "</answer>")
# Search-R1's corrective message, verbatim.
INVALID_ACTION_TEXT = (
    "\nMy previous action is invalid. "
    "If I want to search, I should put the query between <search> and </search>. "
    "If I want to give the final answer, I should put the answer between <answer> and </answer>. "
    "Let me try again.\n"
)
# Wording assumed (the paper only says that searching is no longer possible in the final turn).
FINAL_TURN_TEXT = (
    "\nI cannot search any more. I should now give the final answer between <answer> and </answer>.\n"
)

_CLOSE_RE = re.compile(r"</(search|answer)>")


def parse_action(text: Any) -> tuple[str, str]:
    """`(kind, content)` of the action that ends a turn; kind is search | answer | invalid.

    The action is closed by the first `</search>` or `</answer>` in the text (where the
    engine's stop strings end a turn) and opened by the last matching opening tag before
    it; content is stripped. No closing tag, no opening tag, or an empty query is
    invalid. An empty answer is a (bad) answer. Never raises.
    """
    if not isinstance(text, str):
        return "invalid", ""
    m = _CLOSE_RE.search(text)
    if m is None:
        return "invalid", ""
    kind = m.group(1)
    start = text.rfind(f"<{kind}>", 0, m.start())
    if start < 0:
        return "invalid", ""
    content = text[start + len(kind) + 2 : m.start()].strip()
    if kind == "search" and not content:
        return "invalid", ""
    return kind, content


# ----------------------------------------------------------------------------- retrieval

_RETRIEVERS: dict[str, Any] = {}
_RETRIEVERS_LOCK = threading.Lock()
# the retrievers whose unavailability was logged: once per retriever and process, not once per rollout
# batch (an environment lives for one agent call); weak, so a new retriever never inherits an old one's id
_WARNED_UNAVAILABLE: "weakref.WeakSet[Any]" = weakref.WeakSet()


def default_retriever() -> str:
    """The wiki10k corpus in the agentrl cache (`$AGENTRL_CACHE` or ~/.cache/agentrl)."""
    from envs.search.corpus import corpus_filename, wiki_dir

    return str(wiki_dir() / corpus_filename(None))


def get_cached_retriever(spec: Any, kind: str = "bm25", **kwargs: Any):
    """A retriever for `spec` (corpus path or http(s) URL), built once per process.

    An object with a `search` method is returned as is.
    """
    if hasattr(spec, "search"):
        return spec
    if not isinstance(spec, (str, os.PathLike)) or not str(spec):
        raise ValueError(
            "search environment: set rollout.agent_kwargs.env_kwargs.retriever to a corpus path or a retrieval "
            f"server URL, got {spec!r}"
        )
    spec = str(spec)
    if not spec.startswith(("http://", "https://")):
        spec = os.path.abspath(os.path.expanduser(spec))
        if not os.path.exists(spec):
            raise FileNotFoundError(f"search environment: retriever corpus not found: {spec}")
    key = json.dumps([spec, kind, kwargs], sort_keys=True, default=str)
    with _RETRIEVERS_LOCK:
        if key not in _RETRIEVERS:
            from envs.search.client import get_retriever

            if not spec.startswith(("http://", "https://")):
                kwargs = {"show_progress": False, **kwargs} if kind == "bm25" else kwargs
            _RETRIEVERS[key] = get_retriever(spec, kind=kind, **kwargs)
        return _RETRIEVERS[key]


# ----------------------------------------------------------------------------- prompts


def search_messages(row: dict, template: str, question_column: str = "question") -> list[dict]:
    """The template's user message for one row."""
    from envs.search.qa_data import make_prompt

    if question_column not in row:
        raise KeyError(
            f"search environment: template {template!r} builds the prompt from column '{question_column}', "
            f"which the row lacks (columns: {sorted(row)}); set template: null to use the prompt builder"
        )
    return [{"role": "user", "content": make_prompt(row[question_column], template)}]


def search_prompt_ids(tokenizer, row: dict, template: str | None, prompt_builder=None, question_column="question"):
    """The rendered prompt of one row, exactly as the agent renders it: the template's user message,
    or the recipe's prompt builder (`template=None`)."""
    from agents.single_turn import render_prompt

    messages = prompt_builder(row) if template is None else search_messages(row, template, question_column)
    return render_prompt(tokenizer, messages)


# ----------------------------------------------------------------------------- environment


class SearchEnvironment(Environment):
    """Search-R1: `<search>` runs one batched retrieval per turn, `<answer>` ends the episode."""

    stop = SEARCH_STOPS
    final_turn_text = FINAL_TURN_TEXT
    loop_defaults = {"max_turns": 4, "max_obs_tokens": 500, "final_answer_turn": True}
    metrics = "search"

    def __init__(
        self,
        retriever: Any = None,
        *,
        retriever_kind: str = "bm25",
        retriever_kwargs: dict | None = None,
        topk: int = 3,
        template: str | None = "fast",
        question_column: str = "question",
        final_turn_text: str | None = FINAL_TURN_TEXT,
        invalid_action_text: str = INVALID_ACTION_TEXT,
    ):
        from envs.search.qa_data import PROMPT_TEMPLATES

        if template is not None and template not in PROMPT_TEMPLATES:
            raise ValueError(
                f"search environment: unknown template {template!r}; choose from {sorted(PROMPT_TEMPLATES)} or null"
            )
        self.retriever = get_cached_retriever(retriever, retriever_kind, **(retriever_kwargs or {}))
        self.topk = topk
        self.template = template
        self.question_column = question_column
        self.final_turn_text = final_turn_text
        self.invalid_action_text = invalid_action_text
        self.state: list[dict[str, Any]] = []

    @classmethod
    def check(cls, retriever: Any = None, **_: Any) -> None:
        """A missing corpus fails before any model loads (and says how to get the default one)."""
        if hasattr(retriever, "search"):
            return
        spec = str(retriever) if retriever else default_retriever()
        if not spec.startswith(("http://", "https://")) and not os.path.exists(os.path.expanduser(spec)):
            hint = "" if retriever else " (fetch it with `python -m envs.search.corpus fetch-wiki`, or set the retriever)"
            raise FileNotFoundError(f"retriever corpus not found: {spec}{hint}")

    def reset(self, rows: list[dict]) -> list[Prompt | None]:
        self.state = [
            {"answer": None, "answered": False, "searches": 0, "queries": [], "retrieval_unavailable": 0}
            for _ in rows
        ]
        if self.template is None:  # the recipe's prompt builder
            return [None] * len(rows)
        return [Prompt(messages=search_messages(row, self.template, self.question_column)) for row in rows]

    def _retrieve(self, queries: list[str]) -> list[list[dict]]:
        from envs.search.retrievers import UnavailableHits

        try:
            results = self.retriever.search(queries, self.topk)
            if len(results) != len(queries):
                raise RuntimeError(f"retriever returned {len(results)} result lists for {len(queries)} queries")
            return results
        except Exception as e:  # an in-process retriever failing must not kill the rollout
            return [UnavailableHits(f"{type(e).__name__}: {e}") for _ in queries]

    def _warn_unavailable(self, hits) -> None:
        try:
            if self.retriever in _WARNED_UNAVAILABLE:
                return
            _WARNED_UNAVAILABLE.add(self.retriever)
        except TypeError:  # a retriever without weak references: once per environment
            if getattr(self, "_warned", False):
                return
            self._warned = True
        where = getattr(self.retriever, "retrieve_url", None) or type(self.retriever).__name__
        logger.warning("retrieval unavailable (%s; retriever %s): the policy sees 'retrieval unavailable' and "
                       "info['retrieval_unavailable'] counts it", getattr(hits, "reason", "?"), where)  # fmt: skip

    def step(self, turns: list[Turn]) -> list[StepResult]:
        from envs.search.corpus import format_docs
        from envs.search.retrievers import is_unavailable

        results: list[StepResult | None] = [None] * len(turns)
        to_search: list[tuple[int, str]] = []
        for k, t in enumerate(turns):
            kind, content = parse_action(t.text)
            st = self.state[t.sample]
            if kind == "answer":
                st["answer"], st["answered"] = content, True
                results[k] = StepResult(done=True, reason="answered", action="answer")
            elif kind == "search" and not t.last:
                to_search.append((k, content))
            elif kind == "search":  # final turn (searching no longer possible) or nothing can follow
                results[k] = StepResult(action="search", valid=False)
            else:
                results[k] = StepResult(observation=self.invalid_action_text, action="invalid", valid=False)
        if to_search:
            hits_lists = self._retrieve([q for _, q in to_search])
            for (k, query), hits in zip(to_search, hits_lists):
                st = self.state[turns[k].sample]
                st["searches"] += 1
                st["queries"].append(query)
                if is_unavailable(hits):
                    st["retrieval_unavailable"] += 1
                    self._warn_unavailable(hits)
                results[k] = StepResult(
                    observation="\n\n<information>" + format_docs(hits).strip(),
                    observation_suffix="</information>\n\n",
                    action="search",
                )
        return results  # type: ignore[return-value]

    def info(self, sample: int) -> dict[str, Any]:
        return {**self.state[sample], "template": self.template}


# ----------------------------------------------------------------------------- recipes


def search_agent_kwargs(agent_kwargs: dict[str, Any]) -> dict[str, Any]:
    """`multi_turn` kwargs (a recipe's `rollout.agent_kwargs`) whose environment is the search environment."""
    from agents.multi_turn import resolve_environment

    kw = dict(agent_kwargs)
    kw.setdefault("env", "search")
    env_cls = resolve_environment(kw["env"])
    if not issubclass(env_cls, SearchEnvironment):
        raise ValueError(f"expected the search environment (env: search), but the agent's env is {kw['env']!r}")
    return kw


def load_search_recipe(path: str):
    """An RL recipe whose agent is `multi_turn` over the search environment (plugins loaded)."""
    from rl.config import load_config
    from rl.plugins import load_plugins

    cfg = load_config(path, check_files=False)  # settings only: the caller brings its own data
    load_plugins(cfg.plugins, source=str(path))
    if cfg.rollout.agent != "multi_turn":
        raise ValueError(f"{path}: rollout.agent is {cfg.rollout.agent!r}, not 'multi_turn' (with env: search)")
    try:
        search_agent_kwargs(cfg.rollout.agent_kwargs)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return cfg

"""Search-R1 / Search-R1++ search agent (`rollout.agent: search`) and its rewards.

Each turn the policy writes text ending in one action (generation stops at the first
`</search>` or `</answer>`):
  `<search> query </search>`  -> top-k passages, appended as
                                 `\\n\\n<information>Doc 1(Title: ..) text ...</information>\\n\\n`
                                 (passages truncated to `max_obs_tokens`; the closing tag is kept);
  `<answer> text </answer>`   -> the episode ends;
  anything else               -> `INVALID_ACTION_TEXT` is appended and the loop goes on.
After `max_turns` turns, `final_answer_turn` appends `FINAL_TURN_TEXT` and allows one
more generation in which no search runs. The loop itself (batching, masks, limits)
is `agents.multi_turn.run_episodes`.

Prompts: Slow Thinking (Search-R1) and Fast Thinking (Search-R1++) are
`envs.search.qa_data.PROMPT_TEMPLATES`; with `template: fast|slow` the agent builds the
user message from the row's `question` column, with `template: null` it uses the
recipe's prompt builder (e.g. Search-R1 parquet rows whose `prompt` already holds it).

Retrieval: `retriever` is a corpus path (in-process BM25, or `retriever_kind: dense`),
an `http(s)://` URL of a Search-R1 retrieval server (`RetrievalClient`), or any object
with `search(queries, topk)`. Built once per process and cached. A failed retrieval
(server down, or an in-process exception) becomes the "retrieval unavailable"
observation and is counted in `info["retrieval_unavailable"]`; it never raises.

`traj.info` carries `answer` (content of the answer action, from generated text only:
never the prompt's `<answer> Beijing </answer>` example), `answered`, `searches`
(retrievals run), `queries`, `turns`, `valid_actions`, `invalid_actions`,
`termination`, `retrieval_unavailable`, `obs_truncated`, `template`.

Rewards (registered here, all computed by `eval.qa_metrics`; gold answers from the
`golden_answers` column): `search_em` (`substring: true` for sub-string EM),
`search_f1`, `search_f1_plus` (`alpha`, `beta`), `search_format` (Search-R1 v0.3
format-aware EM; `require_think` defaults to False for the fast template).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import threading
from typing import Any

from agents import register_agent
from agents.multi_turn import StepResult, Turn, run_episodes
from agents.single_turn import render_prompt
from envs.search.corpus import format_docs
from envs.search.qa_data import PROMPT_TEMPLATES, make_prompt
from envs.search.retrievers import UnavailableHits, is_unavailable
from eval import qa_metrics
from rl.engines import RolloutEngine, SamplingParams
from rl.rewards import register_reward
from rl.trajectory import Trajectory

__all__ = [
    "SEARCH_STOPS",
    "INVALID_ACTION_TEXT",
    "FINAL_TURN_TEXT",
    "parse_action",
    "get_cached_retriever",
    "SearchEnv",
    "search_agent",
    "search_prompt_ids",
    "load_search_recipe",
    "search_em",
    "search_f1",
    "search_f1_plus",
    "search_format",
]

logger = logging.getLogger(__name__)

SEARCH_STOPS = ["</search>", "</answer>"]
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


def get_cached_retriever(spec: Any, kind: str = "bm25", **kwargs: Any):
    """A retriever for `spec` (corpus path or http(s) URL), built once per process.

    An object with a `search` method is returned as is.
    """
    if hasattr(spec, "search"):
        return spec
    if not isinstance(spec, (str, os.PathLike)) or not str(spec):
        raise ValueError(
            "search agent: set rollout.agent_kwargs.retriever to a corpus path or a retrieval server URL, "
            f"got {spec!r}"
        )
    spec = str(spec)
    if not spec.startswith(("http://", "https://")):
        spec = os.path.abspath(os.path.expanduser(spec))
        if not os.path.exists(spec):
            raise FileNotFoundError(f"search agent: retriever corpus not found: {spec}")
    key = json.dumps([spec, kind, kwargs], sort_keys=True, default=str)
    with _RETRIEVERS_LOCK:
        if key not in _RETRIEVERS:
            from envs.search.client import get_retriever

            if not spec.startswith(("http://", "https://")):
                kwargs = {"show_progress": False, **kwargs} if kind == "bm25" else kwargs
            _RETRIEVERS[key] = get_retriever(spec, kind=kind, **kwargs)
        return _RETRIEVERS[key]


# ----------------------------------------------------------------------------- environment


class SearchEnv:
    """The Search-R1 environment for `run_episodes`: one batched retrieval per turn."""

    def __init__(
        self,
        retriever,
        n_samples: int,
        *,
        topk: int = 3,
        invalid_action_text: str = INVALID_ACTION_TEXT,
    ):
        self.retriever = retriever
        self.topk = topk
        self.invalid_action_text = invalid_action_text
        self.state = [
            {"answer": None, "answered": False, "searches": 0, "queries": [], "retrieval_unavailable": 0}
            for _ in range(n_samples)
        ]
        self._warned = False

    def _retrieve(self, queries: list[str]) -> list[list[dict]]:
        try:
            results = self.retriever.search(queries, self.topk)
            if len(results) != len(queries):
                raise RuntimeError(f"retriever returned {len(results)} result lists for {len(queries)} queries")
            return results
        except Exception as e:  # an in-process retriever failing must not kill the rollout
            if not self._warned:
                logger.warning("retrieval failed (%s: %s); showing 'retrieval unavailable'", type(e).__name__, e)
                self._warned = True
            return [UnavailableHits(f"{type(e).__name__}: {e}") for _ in queries]

    def __call__(self, turns: list[Turn]) -> list[StepResult]:
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
                results[k] = StepResult(
                    observation="\n\n<information>" + format_docs(hits).strip(),
                    observation_suffix="</information>\n\n",
                    action="search",
                )
        return results  # type: ignore[return-value]


# ----------------------------------------------------------------------------- the agent


def _with_stops(params: SamplingParams, max_new_tokens: int | None = None) -> SamplingParams:
    stops = list(params.stop) + [s for s in SEARCH_STOPS if s not in params.stop]
    return dataclasses.replace(params, stop=stops, max_new_tokens=max_new_tokens or params.max_new_tokens)


def search_prompt_ids(tokenizer, row: dict, template: str | None, prompt_builder=None, question_column="question"):
    """The rendered prompt of one row: the template's user message, or the recipe's prompt builder."""
    if template is None:
        messages = prompt_builder(row)
    else:
        if question_column not in row:
            raise KeyError(
                f"search agent: template {template!r} builds the prompt from column '{question_column}', "
                f"which the row lacks (columns: {sorted(row)}); set template: null to use the prompt builder"
            )
        messages = [{"role": "user", "content": make_prompt(row[question_column], template)}]
    return render_prompt(tokenizer, messages)


@register_agent("search")
def search_agent(
    engine: RolloutEngine,
    tokenizer,
    rows: list[dict],
    *,
    prompt_builder,
    params: SamplingParams,
    group_size: int,
    first_group_id: int = 0,
    retriever: Any = None,
    retriever_kind: str = "bm25",
    retriever_kwargs: dict | None = None,
    topk: int = 3,
    max_turns: int = 4,
    max_obs_tokens: int | None = 500,
    template: str | None = "fast",
    question_column: str = "question",
    final_answer_turn: bool = True,
    final_turn_max_new_tokens: int | None = None,
    final_turn_text: str | None = FINAL_TURN_TEXT,
    invalid_action_text: str = INVALID_ACTION_TEXT,
    max_response_tokens: int | None = None,
) -> list[Trajectory]:
    """Search-R1 rollouts: `group_size` episodes per row, all advancing together."""
    if template is not None and template not in PROMPT_TEMPLATES:
        raise ValueError(f"search agent: unknown template {template!r}; choose from {sorted(PROMPT_TEMPLATES)} or null")
    ret = get_cached_retriever(retriever, retriever_kind, **(retriever_kwargs or {}))
    prompts = [search_prompt_ids(tokenizer, row, template, prompt_builder, question_column) for row in rows]
    flat = [p for p in prompts for _ in range(group_size)]
    env = SearchEnv(ret, len(flat), topk=topk, invalid_action_text=invalid_action_text)
    episodes = run_episodes(
        engine,
        tokenizer,
        flat,
        env,
        params=_with_stops(params),
        max_turns=max_turns,
        max_obs_tokens=max_obs_tokens,
        final_turn_params=_with_stops(params, final_turn_max_new_tokens) if final_answer_turn else None,
        final_message=final_turn_text if final_answer_turn else None,
        max_response_tokens=max_response_tokens,
    )
    trajs = []
    for k, ep in enumerate(episodes):
        i = k // group_size
        info = {**ep.info, **env.state[k], "template": template}
        trajs.append(
            Trajectory(
                prompt_ids=prompts[i],
                response_ids=ep.response_ids,
                loss_mask=ep.loss_mask,
                rollout_logprobs=ep.logprobs,
                group_id=first_group_id + i,
                row=rows[i],
                response_text=tokenizer.decode(ep.response_ids, skip_special_tokens=True),
                info=info,
            )
        )
    return trajs


def load_search_recipe(path: str):
    """An RL recipe whose agent is `search` (its `rollout.agent_kwargs` are the agent's settings)."""
    from rl.config import load_config

    cfg = load_config(path)
    if cfg.rollout.agent != "search":
        raise ValueError(f"{path}: rollout.agent is {cfg.rollout.agent!r}, not 'search'")
    return cfg


# ----------------------------------------------------------------------------- rewards


def _golds(row: dict, answer_column: str):
    if answer_column not in row:
        raise KeyError(f"no gold answers: the row has no '{answer_column}' column (columns: {sorted(row)})")
    return row[answer_column]


def _prediction(traj: Trajectory) -> str | None:
    """The answer action's content; for trajectories of other agents, the last answer tag of the response."""
    if "answered" in traj.info:
        return traj.info.get("answer")
    return qa_metrics.extract_answer(traj.response_text)


@register_reward("search_em")
def search_em(row: dict, traj: Trajectory, answer_column: str = "golden_answers", substring: bool = False) -> float:
    """Exact match of the answer with any gold answer (SQuAD normalisation); `substring`: gold inside answer."""
    fn = qa_metrics.substring_exact_match if substring else qa_metrics.exact_match
    return fn(_prediction(traj), _golds(row, answer_column))


@register_reward("search_f1")
def search_f1(row: dict, traj: Trajectory, answer_column: str = "golden_answers") -> float:
    return qa_metrics.token_f1(_prediction(traj), _golds(row, answer_column))


@register_reward("search_f1_plus")
def search_f1_plus(
    row: dict, traj: Trajectory, alpha: float = 0.1, beta: float = 0.1, answer_column: str = "golden_answers"
) -> float:
    """Search-R1++ F1+: F1 - alpha*[no search in the episode] - beta*[no answer action]."""
    pred = _prediction(traj)
    return qa_metrics.f1_plus(
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
    return qa_metrics.format_aware_reward(
        _prediction(traj),
        _golds(row, answer_column),
        traj.response_text,
        structure_format_score=structure_format_score,
        final_format_score=final_format_score,
        retrieval_score=retrieval_score,
        score=score,
        require_think=require_think,
    )

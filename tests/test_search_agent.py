"""envs/search: the Search-R1 environment driven by the generic `multi_turn` agent (scripted engine +
in-process BM25), its rewards, and 2-step trainer runs on the tiny model with each search recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import envs.search  # noqa: F401  (the plugin: registers the environment, rewards and metric set)
from agents.multi_turn import multi_turn
from envs.search.corpus import RETRIEVAL_UNAVAILABLE_TEXT
from envs.search.env import (
    FINAL_TURN_TEXT,
    INVALID_ACTION_TEXT,
    SearchEnvironment,
    get_cached_retriever,
    parse_action,
)
from envs.search.qa_data import make_prompt
from rl.engines import SamplingParams
from rl.registry import AGENTS, ENVIRONMENTS, METRICS
from rl.rewards import REWARDS
from rl.trajectory import Trajectory
from test_multi_turn import R, ScriptedEngine, check_structure, chat

REPO = Path(__file__).resolve().parents[1]

DOCS = [
    ("Paris", "Paris is the capital and most populous city of France."),
    ("Berlin", "Berlin is the capital and largest city of Germany."),
    ("Mount Everest", "Mount Everest is the highest mountain above sea level."),
    ("Jupiter", "Jupiter is the largest planet in the Solar System."),
]
ROWS = [
    {"question": "What is the capital of France?", "golden_answers": ["Paris"]},
    {"question": "What is the capital of Germany?", "golden_answers": ["Berlin", "Berlin, Germany"]},
]
PARAMS = SamplingParams(max_new_tokens=64)
# the search environment's constructor arguments; every other keyword is a loop option of multi_turn
ENV_KEYS = ("retriever", "retriever_kind", "retriever_kwargs", "topk", "template", "question_column",
            "final_turn_text", "invalid_action_text")


def search_kwargs(**flat) -> dict:
    """`rollout.agent_kwargs` of the multi_turn agent over the search environment, from flat settings."""
    env_kwargs = {k: flat.pop(k) for k in ENV_KEYS if k in flat}
    return {"env": "search", "env_kwargs": env_kwargs, **flat}


def search_agent(engine, tok, rows, **kw):
    """The registered multi_turn agent over the search environment (flat settings split as a recipe has them)."""
    base = {k: kw.pop(k) for k in ("prompt_builder", "params", "group_size", "first_group_id") if k in kw}
    return AGENTS.get("multi_turn")(engine, tok, rows, **base, **search_kwargs(**kw))


def write_corpus(path: Path) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i, (t, x) in enumerate(DOCS):
            f.write(json.dumps({"id": str(i), "contents": f'"{t}"\n{x}'}) + "\n")
    return path


@pytest.fixture(scope="module")
def corpus_path(tmp_path_factory) -> str:
    return str(write_corpus(tmp_path_factory.mktemp("search_corpus") / "tiny.jsonl"))


class CountingRetriever:
    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def search(self, queries, topk):
        self.calls.append(list(queries))
        return self.inner.search(queries, topk)


def run_agent(tok, corpus_path, scripts, rows=ROWS, group_size=1, retriever=None, **kw):
    prompts = [chat(tok, make_prompt(r["question"], kw.get("template", "fast"))) for r in rows]
    flat = [p for p in prompts for _ in range(group_size)]
    eng = ScriptedEngine(tok, flat, scripts)
    trajs = search_agent(
        eng, tok, rows, prompt_builder=None, params=PARAMS, group_size=group_size, first_group_id=10,
        retriever=retriever or corpus_path, **kw,
    )
    return eng, trajs


def env_pieces(tok, traj: Trajectory) -> list[str]:
    """Decoded runs of environment (mask 0) tokens, in order."""
    out, cur = [], []
    for t, m in zip(traj.response_ids, traj.loss_mask):
        if m == 0:
            cur.append(t)
        elif cur:
            out.append(tok.decode(cur))
            cur = []
    if cur:
        out.append(tok.decode(cur))
    return out


# ----------------------------------------------------------------------------- parser


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), st.text(alphabet="<>/searchanwr tq\n"), st.none(), st.integers(), st.binary()))
def test_parse_action_never_raises(text):
    kind, content = parse_action(text)
    assert kind in ("search", "answer", "invalid") and isinstance(content, str)
    if kind == "search":
        assert content and content == content.strip()


@settings(max_examples=100, deadline=None)
@given(
    pre=st.text(alphabet=st.characters(blacklist_characters="<>")),
    q=st.text(alphabet=st.characters(blacklist_characters="<>"), min_size=1).filter(lambda s: s.strip()),
    kind=st.sampled_from(["search", "answer"]),
    post=st.text(),
)
def test_parse_action_finds_the_closing_action(pre, q, kind, post):
    assert parse_action(f"{pre}<{kind}>{q}</{kind}>{post}") == (kind, q.strip())


def test_parse_action_cases():
    assert parse_action("<think> hmm </think>\n<search> capital of France </search>") == ("search", "capital of France")
    assert parse_action("<answer> Paris </answer>") == ("answer", "Paris")
    assert parse_action("<answer></answer>") == ("answer", "")
    assert parse_action("<search>   </search>") == ("invalid", "")
    assert parse_action("I think the answer is Paris") == ("invalid", "")
    assert parse_action("Paris </answer>") == ("invalid", "")
    assert parse_action("<search> a <answer> b </answer> c </search>") == ("answer", "b")  # first closing tag
    assert parse_action("<search> a <search> b </search>") == ("search", "b")  # last opener before it


# ----------------------------------------------------------------------------- agent episodes


def test_search_then_answer(tiny_tokenizer, corpus_path):
    tok = tiny_tokenizer
    scripts = [[R("<search> capital of France </search>"), R("<answer> Paris </answer>")],
               [R("<answer> Berlin </answer>")]]
    eng, trajs = run_agent(tok, corpus_path, scripts)
    a, b = trajs
    assert a.info["answer"] == "Paris" and a.info["answered"] and a.info["searches"] == 1
    assert a.info["queries"] == ["capital of France"] and a.info["termination"] == "answered"
    assert a.info["turns"] == 2 and a.info["valid_actions"] == 2 and a.info["invalid_actions"] == 0
    assert b.info["searches"] == 0 and b.info["answer"] == "Berlin" and b.info["turns"] == 1
    assert [t.group_id for t in trajs] == [10, 11] and a.row is ROWS[0]
    (info,) = env_pieces(tok, a)
    assert info.startswith("\n\n<information>Doc 1(Title: Paris) Paris is the capital") and info.endswith(
        "</information>\n\n"
    )
    assert "\n\n<information>Doc 1(Title: Paris)" in a.response_text
    for k, t in enumerate(trajs):
        check_structure(_as_episode(t), eng, k, tok)
    # prompt is the fast template, rendered with the chat template
    assert a.prompt_ids == chat(tok, make_prompt(ROWS[0]["question"], "fast"))
    # every turn stops at the action's closing tag
    assert all(set(c[1].stop) >= {"</search>", "</answer>"} for c in eng.calls)
    assert REWARDS.get("search_em")(a.row, a) == 1.0 and REWARDS.get("search_f1_plus")(a.row, a) == 1.0
    assert REWARDS.get("search_f1_plus")(b.row, b) == pytest.approx(0.9)  # answered without searching


def _as_episode(t: Trajectory):
    from agents.multi_turn import Episode

    segs, start = [], 0
    for k in range(1, len(t.loss_mask) + 1):
        if k == len(t.loss_mask) or t.loss_mask[k] != t.loss_mask[start]:
            segs.append(("model" if t.loss_mask[start] else "env", start, k))
            start = k
    return Episode(t.response_ids, t.loss_mask, t.rollout_logprobs, t.info, segs)


def test_invalid_action_gets_corrective_message_and_continues(tiny_tokenizer, corpus_path):
    tok = tiny_tokenizer
    scripts = [[R("I am not sure what to do", finish="length"), R("<search> </search>"), R("<answer> Paris </answer>")]]
    _, (t,) = run_agent(tok, corpus_path, scripts, rows=ROWS[:1])
    assert env_pieces(tok, t) == [INVALID_ACTION_TEXT, INVALID_ACTION_TEXT]
    assert t.info["invalid_actions"] == 2 and t.info["valid_actions"] == 1 and t.info["termination"] == "answered"
    assert t.info["searches"] == 0 and t.info["answer"] == "Paris"


def test_max_turns_and_final_answer_turn(tiny_tokenizer, corpus_path):
    tok = tiny_tokenizer
    searching = [R("<search> capital of France </search>")] * 3
    retr = CountingRetriever(get_cached_retriever(corpus_path))
    eng, (t,) = run_agent(tok, corpus_path, [searching], rows=ROWS[:1], max_turns=2, retriever=retr)
    assert [c[0] for c in eng.calls] == [1, 1, 1]  # 2 turns + the final answer-only turn
    pieces = env_pieces(tok, t)
    assert len(pieces) == 2 and pieces[1].endswith("</information>\n\n" + FINAL_TURN_TEXT)
    assert t.info["searches"] == 2 and len(retr.calls) == 2  # no search runs in the final turn
    assert t.info["termination"] == "max_turns" and not t.info["answered"] and t.info["answer"] is None
    assert t.info["invalid_actions"] == 1  # searching in the final turn
    # the prompt's example `<answer> Beijing </answer>` is never taken as the answer
    assert "<answer> Beijing </answer>" in tok.decode(t.prompt_ids)
    assert REWARDS.get("search_em")(t.row, t) == 0.0
    assert REWARDS.get("search_f1_plus")(t.row, t) == pytest.approx(-0.1)

    eng, (t,) = run_agent(tok, corpus_path, [searching], rows=ROWS[:1], max_turns=2, final_answer_turn=False)
    assert [c[0] for c in eng.calls] == [1, 1] and t.info["searches"] == 1  # the last turn's search is not run
    assert FINAL_TURN_TEXT not in t.response_text and t.info["termination"] == "max_turns"

    eng, (t,) = run_agent(tok, corpus_path, [searching[:2] + [R("<answer> Paris </answer>")]], rows=ROWS[:1],
                          max_turns=2)
    assert t.info["termination"] == "answered" and t.info["answer"] == "Paris" and t.info["searches"] == 2


def test_one_retrieval_and_one_engine_call_per_turn(tiny_tokenizer, corpus_path):
    tok = tiny_tokenizer
    retr = CountingRetriever(get_cached_retriever(corpus_path))
    s = R("<search> capital </search>")
    scripts = [[R("<answer> Paris </answer>")], [s, R("<answer> x </answer>")], [s, s, R("<answer> y </answer>")],
               [s, s, R("bad")] + [R("<answer> z </answer>")]]
    eng, trajs = run_agent(tok, corpus_path, scripts, group_size=2, retriever=retr)
    assert [c[0] for c in eng.calls] == [4, 3, 2, 1]
    assert [len(q) for q in retr.calls] == [3, 2]  # one batched retrieval per turn
    assert [t.group_id for t in trajs] == [10, 10, 11, 11]
    assert [t.info["searches"] for t in trajs] == [0, 1, 2, 2]
    assert [t.info["turns"] for t in trajs] == [1, 2, 3, 4]


def test_retrieval_failure_is_an_observation(tiny_tokenizer, corpus_path):
    tok = tiny_tokenizer

    class Broken:
        def search(self, queries, topk):
            raise ConnectionError("index server gone")

    scripts = [[R("<search> capital of France </search>"), R("<answer> Paris </answer>")]]
    _, (t,) = run_agent(tok, corpus_path, scripts, rows=ROWS[:1], retriever=Broken())
    (piece,) = env_pieces(tok, t)
    assert piece == f"\n\n<information>{RETRIEVAL_UNAVAILABLE_TEXT.strip()}</information>\n\n"
    assert t.info["retrieval_unavailable"] == 1 and t.info["searches"] == 1 and t.info["answer"] == "Paris"

    # the HTTP client against a dead server: UnavailableHits, counted, no exception
    _, (t,) = run_agent(tok, corpus_path, scripts, rows=ROWS[:1], retriever="http://127.0.0.1:9",
                        retriever_kwargs={"max_retries": 0, "timeout": 2.0})
    assert t.info["retrieval_unavailable"] == 1 and RETRIEVAL_UNAVAILABLE_TEXT.strip() in t.response_text


def test_observation_truncated_closing_tag_kept(tiny_tokenizer, corpus_path):
    tok = tiny_tokenizer
    scripts = [[R("<search> capital city largest </search>"), R("<answer> Paris </answer>")]]
    _, (t,) = run_agent(tok, corpus_path, scripts, rows=ROWS[:1], max_obs_tokens=10)
    (piece,) = env_pieces(tok, t)
    assert piece.endswith("</information>\n\n") and t.info["obs_truncated"] == 1
    assert len(tok(piece, add_special_tokens=False)["input_ids"]) <= 10 + len(tok("</information>\n\n")["input_ids"])


def test_retriever_cached_per_process(corpus_path):
    assert get_cached_retriever(corpus_path) is get_cached_retriever(corpus_path)
    r = CountingRetriever(None)
    assert get_cached_retriever(r) is r
    with pytest.raises(ValueError, match="retriever"):
        get_cached_retriever(None)
    with pytest.raises(FileNotFoundError):
        get_cached_retriever("/nonexistent/corpus.jsonl")


def test_template_choice_and_prompt_builder(tiny_tokenizer, corpus_path):
    tok = tiny_tokenizer
    eng, (t,) = run_agent(tok, corpus_path, [[R("<answer> Paris </answer>")]], rows=ROWS[:1], template="slow")
    assert "<think>" in tok.decode(t.prompt_ids) and t.info["template"] == "slow"
    built = [{"role": "user", "content": "custom prompt"}]
    trajs = search_agent(
        ScriptedEngine(tok, [chat(tok, "custom prompt")], [[R("<answer> Paris </answer>")]]), tok, ROWS[:1],
        prompt_builder=lambda row: built, params=PARAMS, group_size=1, retriever=corpus_path, template=None,
    )
    assert trajs[0].prompt_ids == chat(tok, "custom prompt")
    with pytest.raises(ValueError, match="template"):
        search_agent(None, tok, ROWS[:1], prompt_builder=None, params=PARAMS, group_size=1, retriever=corpus_path,
                     template="medium")
    assert AGENTS.get("multi_turn") is multi_turn and ENVIRONMENTS.get("search") is SearchEnvironment
    assert METRICS.get("search").title == "Search agent leaderboard"


# ----------------------------------------------------------------------------- rewards


def make_traj(response: str, answer=None, searches=0, answered=None, template="fast"):
    answered = answer is not None if answered is None else answered
    return Trajectory(
        prompt_ids=[1], response_ids=[5], loss_mask=[1], rollout_logprobs=[0.0], group_id=0,
        row={"golden_answers": ["Paris", "City of Paris"]}, response_text=response,
        info={"answer": answer, "answered": answered, "searches": searches, "template": template},
    )


def test_rewards():
    em, f1, f1p, fmt = (REWARDS.get(n) for n in ("search_em", "search_f1", "search_f1_plus", "search_format"))
    good = (
        "<search> q </search>\n\n<information>Doc 1(Title: Paris) Paris.</information>\n\n"
        "<answer> the Paris </answer>"
    )
    t = make_traj(good, answer="the Paris", searches=1)
    assert em(t.row, t) == 1.0 and f1(t.row, t) == 1.0 and f1p(t.row, t) == 1.0
    assert fmt(t.row, t) == 1.0  # fast template: think optional
    assert fmt(t.row, t, require_think=True) == pytest.approx(0.8)  # correct, invalid format
    t = make_traj(good.replace("the Paris", "Paris France"), answer="Paris France", searches=1)
    assert em(t.row, t) == 0.0 and em(t.row, t, substring=True) == 1.0
    assert f1(t.row, t) == pytest.approx(2 / 3) and f1p(t.row, t) == pytest.approx(2 / 3)
    assert fmt(t.row, t) == pytest.approx(0.2)  # wrong, valid format
    t = make_traj("I don't know", answer=None, searches=0)
    assert f1p(t.row, t) == pytest.approx(-0.2) and f1p(t.row, t, alpha=0.5, beta=0.25) == pytest.approx(-0.75)
    assert em(t.row, t) == 0.0 and fmt(t.row, t) == 0.0
    t = make_traj("<answer> Paris </answer>", answer="Paris", searches=0, template="slow")
    assert f1p(t.row, t) == pytest.approx(0.9) and fmt(t.row, t) == pytest.approx(0.8)
    # trajectories of other agents: the last answer tag of the response
    other = Trajectory([1], [5], [1], [0.0], 0, {"golden_answers": ["Paris"]}, response_text="<answer> Paris </answer>")
    assert em(other.row, other) == 1.0
    with pytest.raises(KeyError, match="golden_answers"):
        em({}, other)


# ----------------------------------------------------------------------------- trainer


@pytest.mark.parametrize(
    "recipe, algorithm, first_reward, extra",
    [("search_r1pp_cpu", "reinforce", "search_f1_plus", []),
     ("search_r1_cpu", "ppo", "search_em", ["algorithm.critic_layers=1"]),  # the tiny model has 2 layers
     ("search_grpo_cpu", "grpo", "search_f1_plus", [])],
)
def test_two_trainer_steps_with_each_search_recipe(tiny_model_dir, corpus_path, tmp_path, recorded_trajectories, recipe,
                                                   algorithm, first_reward, extra):
    from rl.config import load_config
    from rl.trainer import train

    seen: list[Trajectory] = recorded_trajectories

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "run"
    cfg = load_config(
        REPO / "recipes" / f"{recipe}.yaml",
        [
            f"model.name_or_path={tiny_model_dir}",
            f"data.train={data}",
            "data.eval=''",
            f"rollout.agent_kwargs.env_kwargs.retriever={corpus_path}",
            "rollout.agent_kwargs.max_turns=2",
            "rollout.agent_kwargs.max_obs_tokens=32",
            "rollout.group_size=2",
            "rollout.max_new_tokens=8",
            "prompts_per_step=2",
            "steps=2",
            "eval_before_training=false",
            "save_steps=0",
            f"output_dir={out}",
            *extra,
        ],
    )
    assert cfg.rollout.agent == "multi_turn" and cfg.rollout.agent_kwargs["env"] == "search"
    assert cfg.plugins == ["envs.search"] and cfg.rewards[0].name == first_reward
    assert cfg.algorithm.name == algorithm
    result = train(cfg)
    steps = [h for h in result["history"] if "reward/mean" in h]
    assert [h["step"] for h in steps] == [1, 2]
    for m in steps:
        assert m["tokens/generated"] > 0 and f"reward/{first_reward}" in m
        assert all(m[f"reward_errors/{r.name}"] == 0 for r in cfg.rewards)
        assert m["nan_skipped_steps"] == 0
    assert len(seen) == 8 and len({t.group_id for t in seen}) == 4
    assert [m["tokens/generated"] for m in steps] == [sum(sum(t.loss_mask) for t in seen[i:i + 4]) for i in (0, 4)]
    # the random tiny model writes no valid action: corrective messages (mask 0), then the final turn
    assert all(t.info["turns"] >= 1 and t.info["termination"] in ("answered", "eos", "max_turns") for t in seen)
    assert any(0 in t.loss_mask for t in seen)
    assert all(len(t.response_ids) <= 3 * 8 + sum(1 - x for x in t.loss_mask) for t in seen)

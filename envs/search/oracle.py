"""Oracle trajectories for the search agent: warm-start (SFT) data that the RL loop could have produced.

A scripted policy plays the search agent: it searches with a query derived from the
question (the quoted description or the article title; two hops for
bridge questions; the subject, then the bridge entity, for natural/two-hop rows, whose
`metadata.queries` say what to search), reads what came back, and answers with the gold answer. It plays
through the very same code path as RL rollouts — the `multi_turn` agent driving the search
environment, with an `OracleEngine` in place of the model — so the prompt, the `<information>` blocks, the
corrective/final messages, truncation and token ids are rendered exactly as in
training, and the loss mask marks environment tokens 0 exactly as there.

Each output row is in the `tokenized` SFT format (`sft.data`): `input_ids` (prompt +
response) and `completion_mask` (0 on the prompt and on environment tokens, 1 on the
oracle's actions), plus `id`, `question`, `golden_answers`, `grounded` (the gold
answer appeared in a retrieved passage before the oracle answered), `searches` and
`text` (the decoded conversation, for reading). Ungrounded episodes are dropped by
default (`--keep-ungrounded` keeps them): a warm-start should teach answering from
the evidence, not from memory the model does not have.

    python -m envs.search.oracle --recipe recipes/search_r1pp_cpu.yaml --tokenizer smollm2-135m \
        --data data/wiki10k_qa/train.jsonl --out data/wiki10k_qa/oracle_sft.jsonl --n 128

`--recipe` takes the agent settings (the environment's template, topk, retriever, ... and the
loop's max_turns, max_obs_tokens, ...) from an RL recipe's `rollout.agent_kwargs`, so the
warm-start data matches the RL run.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from envs.search.env import FINAL_TURN_TEXT, load_search_recipe, search_agent_kwargs, search_prompt_ids
from envs.search.qa_data import row_metadata
from envs.search.rewards import extract_information_blocks
from eval.qa_metrics import normalize_answer
from rl.common import atomic_write_text
from rl.engines import BaseEngine, Generation, SamplingParams

__all__ = ["oracle_queries", "OracleEngine", "generate_oracle_trajectories", "main"]

_QUOTED = re.compile(r'"(.+)"')
THINK_BEFORE_SEARCH = "<think> I need to look this up. </think>\n"
THINK_BEFORE_ANSWER = "<think> The information contains the answer. </think>\n"
THINK_WITHOUT_EVIDENCE = "<think> The information does not contain it; my best answer: </think>\n"


def oracle_queries(row: dict) -> list[str]:
    """The queries a careful searcher would issue for a wiki10k_qa row, in order.

    Rows without `metadata.qtype` (e.g. NQ/HotpotQA files) fall back to the question.
    """
    meta = row_metadata(row)
    if meta.get("queries"):  # natural/two-hop rows (envs.search.natural_qa) carry their searches, one per hop
        return [str(q) for q in meta["queries"]]
    qtype, titles, question = meta.get("qtype"), list(meta.get("titles") or []), row["question"]
    quoted = [m.group(1) for m in _QUOTED.finditer(question)]
    if qtype == "desc2title" and quoted:
        return [quoted[-1]]
    if qtype == "title2desc" and titles:
        return [titles[0]]
    if qtype == "cloze" and titles:
        # the article's title: short, and BM25 ranks the article first on it
        return [titles[0]]
    if qtype == "bridge" and titles and quoted:
        return [titles[0], quoted[-1]]
    return [question]


def _contains(haystack: str, needle: str) -> bool:
    n = normalize_answer(needle)
    return bool(n) and f" {n} " in f" {normalize_answer(haystack)} "


class OracleEngine(BaseEngine):
    """A `RolloutEngine` that plays the oracle: next query, or the answer once the evidence is in.

    It recognises each sample by its prompt ids (a prefix of the context it is asked to
    continue) and reads the response so far to know which step it is at. Its action
    text is tokenised canonically; log-probs are 0 (there is no sampling distribution).
    """

    def __init__(self, tokenizer, prompts: list[list[int]], rows: list[dict], answer_column: str = "golden_answers",
                 think: bool = False):
        self.tokenizer = tokenizer
        # the Slow (Search-R1) template asks for reasoning in <think> before every action; a short
        # fixed thought keeps the warm-start's turns well inside the RL recipe's per-turn budget
        self.think = think
        self.by_prompt = {tuple(p): r for p, r in zip(prompts, rows)}
        self.lengths = sorted({len(p) for p in prompts})
        self.answer_column = answer_column
        self.grounded: dict[str, bool] = {}

    def _row(self, context: list[int]) -> tuple[dict, list[int]]:
        for n in self.lengths:
            row = self.by_prompt.get(tuple(context[:n]))
            if row is not None:
                return row, context[n:]
        raise KeyError("OracleEngine: a context does not start with any known prompt")

    def next_action(self, row: dict, response_text: str) -> str:
        golds = row[self.answer_column]
        queries = oracle_queries(row)
        done = response_text.count("</search>")
        evidence = " ".join(extract_information_blocks(response_text))  # never the oracle's own queries
        found = any(_contains(evidence, g) for g in golds)
        final = FINAL_TURN_TEXT.strip() in response_text
        # a two-hop question searches every hop, even when an early search happened to show the answer:
        # the warm-start should teach the second search, not luck
        hops = len(queries) if row_metadata(row).get("qtype") == "twohop" else 0
        if (found and done >= hops) or done >= len(queries) or final:
            self.grounded[row.get("id", row["question"])] = found
            thought = THINK_BEFORE_ANSWER if found else THINK_WITHOUT_EVIDENCE
            return (thought if self.think else "") + f"<answer> {golds[0]} </answer>"
        return (THINK_BEFORE_SEARCH if self.think else "") + f"<search> {queries[done]} </search>"

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        out = []
        for context in prompts:
            row, response = self._row(context)
            text = self.next_action(row, self.tokenizer.decode(response, skip_special_tokens=True))
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: params.max_new_tokens]
            stop = "</answer>" if "<answer>" in text else "</search>"
            out.append(Generation(list(ids), [0.0] * len(ids), "stop", stop))
        return out

    def update_weights(self, model) -> None:  # nothing to sync: the oracle has no weights
        pass

    def sleep(self) -> None:
        pass

    def wake(self) -> None:
        pass


def generate_oracle_trajectories(
    tokenizer,
    rows: list[dict],
    agent_kwargs: dict[str, Any],
    *,
    max_new_tokens: int = 128,
    keep_ungrounded: bool = False,
    batch_size: int = 64,
    progress: bool = True,
) -> tuple[list[dict], dict[str, int]]:
    """Oracle episodes for `rows` through the `multi_turn` agent; returns (SFT rows, counts).

    `agent_kwargs`: the agent's kwargs as in a recipe (`env: search` by default, `env_kwargs`, loop options).
    """
    from rl.registry import AGENTS

    kw = search_agent_kwargs(agent_kwargs)
    env_kwargs = dict(kw.get("env_kwargs") or {})
    template = env_kwargs.get("template", "fast")
    if template is None:
        raise ValueError("the oracle builds prompts from the question column: set env_kwargs.template (fast|slow)")
    question_column = env_kwargs.get("question_column", "question")
    agent = AGENTS.get("multi_turn")
    out, counts = [], {"episodes": 0, "grounded": 0, "answered": 0, "kept": 0}
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    for batch in tqdm(batches, desc="oracle episodes", disable=not progress):
        # what the agent will render: the engine recognises each sample by its prompt
        prompts = [search_prompt_ids(tokenizer, r, template, question_column=question_column) for r in batch]
        engine = OracleEngine(tokenizer, prompts, batch, think=template == "slow")
        trajs = agent(
            engine,
            tokenizer,
            batch,
            prompt_builder=None,
            params=SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0),
            group_size=1,
            **kw,
        )
        for row, tr in zip(batch, trajs):
            grounded = engine.grounded.get(row.get("id", row["question"]), False)
            counts["episodes"] += 1
            counts["grounded"] += grounded
            counts["answered"] += bool(tr.info.get("answered"))
            if not tr.info.get("answered") or not (grounded or keep_ungrounded):
                continue
            counts["kept"] += 1
            out.append(
                {
                    "id": row.get("id"),
                    "question": row["question"],
                    "golden_answers": list(row["golden_answers"]),
                    "input_ids": list(tr.prompt_ids) + list(tr.response_ids),
                    "completion_mask": [0] * len(tr.prompt_ids) + list(tr.loss_mask),
                    "grounded": grounded,
                    "searches": tr.info["searches"],
                    "text": tokenizer.decode(list(tr.prompt_ids) + list(tr.response_ids)),
                }
            )
    return out, counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m envs.search.oracle", description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", required=True, help="RL recipe whose rollout.agent_kwargs and model to match")
    ap.add_argument("--data", required=True, help="QA file (FlashRAG jsonl or Search-R1 parquet)")
    ap.add_argument("--out", required=True, help="output jsonl (tokenized SFT rows)")
    ap.add_argument("--n", type=int, default=None, help="number of questions to play (default: all)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the question subsample")
    ap.add_argument("--tokenizer", default=None, help="model whose tokenizer renders the episodes (default: the "
                    "recipe's model; give the warm-start's base model when the recipe starts from the SFT output)")
    ap.add_argument("--keep-ungrounded", action="store_true", help="keep episodes whose evidence lacked the answer")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from envs.search.qa_data import load_qa
    from rl.models import resolve_model

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        print(f"error: {out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    cfg = load_search_recipe(args.recipe)
    agent_kwargs, max_new_tokens = dict(cfg.rollout.agent_kwargs), cfg.rollout.max_new_tokens
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.tokenizer or cfg.model.name_or_path))
    rows = list(load_qa(args.data))  # validates every row (errors name the file and line)
    if args.n is not None and args.n < len(rows):
        rows = random.Random(args.seed).sample(rows, args.n)
    sft_rows, counts = generate_oracle_trajectories(
        tokenizer, rows, agent_kwargs, max_new_tokens=max_new_tokens, keep_ungrounded=args.keep_ungrounded
    )
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sft_rows))
    print(json.dumps({**counts, "out": str(out)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The `negrec_topk` agent: top-K recommendation and candidate choice by constrained beam search.

The paper evaluates by generating the top-20 SIDs with beam search constrained to valid SIDs
(HR@20, FHR@20, LUF@20, LIF@20) and by choosing the disliked item among the row's candidates
(Cand.Acc). Per row, this agent:

1. renders the prompt exactly as the single-turn agent does (the recipe's prompt builder, then the
   chat template: `rl.multimodal.render_chat`), so the model sees what it was trained on;
2. `engine.beam_search(prompts, trie, k)` over ONE `TokenTrie` of every item's SID (from
   `items`, the build's items.jsonl; built once per (file, tokenizer) and cached): the top-K beams,
   best first, each decoded back to its item — a beam that decodes to no item is an invalid slot
   (None in `topk`; it cannot happen under the constraint, which counting it checks);
3. with `pick=True`, a second beam search over a trie of just the row's candidates with
   k = the number of candidates: that enumerates every candidate exactly (beam search is exact when
   k is at least the number of distinct prefixes at every depth), and the best is the pick.

It returns one `Trajectory` per row (group_size 1: it is deterministic, for evaluation): the prompt
ids, the best beam as the response (its SID tokens and eos), info `{"topk", "pick", "invalid",
"scores", "k", "candidates_unknown", "turns", "finish_reason"}` for the `negrec` metric set.
The beam search returns sequence scores only (summed log-probs under the constrained
distribution, `info["scores"]`), so `rollout_logprobs` are zeros: the trajectories are for
scoring, not for training.

    python -m eval.run --recipe recipes/negrec_...yaml --model M --data test=data/negrec/ml-100k/examples/test.jsonl \
        --agent negrec_topk --agent-kwarg items=data/negrec/ml-100k/items.jsonl [--agent-kwarg k=20]

The metric set defaults to `negrec` for this agent (its `metrics` attribute, read by eval.run). The engine
must implement `beam_search` (the HF engine does; `rollout.engine: hf`, eval.run's default).
"""

from __future__ import annotations

import os
import re
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agents import register_agent
from agents.single_turn import assemble_trajectories
from envs.negrec.metrics import DEFAULT_K
from rl.common import UserError, iter_jsonl
from rl.constraints import TokenTrie
from rl.multimodal import render_chat

__all__ = ["SidCatalog", "load_catalog", "negrec_topk"]

_SID_TOKEN = re.compile(r"<[^<>]+>")


class NegrecAgentError(UserError, ValueError):
    """A bad items file or agent setting: one line naming the file and line or the key."""


@dataclass
class SidCatalog:
    """The items of items.jsonl with their SIDs as token ids, and the trie of all of them."""

    path: str
    items: list[str]
    sids: list[str]
    ids: list[list[int]]  # each item's SID tokens (no eos)
    eos_ids: list[int]
    trie: TokenTrie
    item_of_ids: dict[tuple[int, ...], str] = field(default_factory=dict)
    item_of_sid: dict[str, str] = field(default_factory=dict)
    ids_of_item: dict[str, list[int]] = field(default_factory=dict)

    def decode(self, tokenizer, beam: list[int]) -> str | None:
        """The item a beam (SID tokens, then eos) stands for, via its SID string; None if none."""
        body = list(beam)
        if body and body[-1] in self.eos_ids:
            body = body[:-1]
        item = self.item_of_ids.get(tuple(body))
        if item is None:  # not the exact ids of a SID: try the text (another tokenization of it)
            item = self.item_of_sid.get(tokenizer.decode(body, skip_special_tokens=True).strip())
        return item

    def candidate_trie(self, candidates: list[str], name: str) -> tuple[TokenTrie | None, int]:
        """(trie of the candidates that have a SID, how many had none)."""
        seqs = [self.ids_of_item[c] for c in candidates if c in self.ids_of_item]
        unknown = len(candidates) - len(seqs)
        return (TokenTrie(seqs, self.eos_ids, name=name, unit="candidate") if seqs else None), unknown


# (tokenizer) -> {(path, mtime_ns, size, eos ids): catalog}: the trie of ~1.7k SIDs is built once per
# eval, not per batch; weak keys so a tokenizer that is gone frees its tries
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def load_catalog(path: str | os.PathLike, tokenizer, eos_ids: list[int]) -> SidCatalog:
    """items.jsonl -> `SidCatalog` (cached per file version and tokenizer). Errors name the file and line:
    a row without `item` / `sid`, a duplicate item or SID, a SID whose tokens are not single tokens of
    the tokenizer (the SID tokens were not added: `model.added_tokens: sid_tokens.jsonl`)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise NegrecAgentError(f"negrec_topk: agent_kwargs.items: file not found: {path} (the build's items.jsonl)")
    st = p.stat()
    key = (str(p.resolve()), st.st_mtime_ns, st.st_size, tuple(sorted(eos_ids)), len(tokenizer))  # + tokens added later
    try:
        per_tok = _CACHE.setdefault(tokenizer, {})
    except TypeError:  # a tokenizer that cannot be weakly referenced: no caching
        per_tok = {}
    if key in per_tok:
        return per_tok[key]
    items, sids, ids = [], [], []
    item_of_sid: dict[str, str] = {}
    seen_items: dict[str, int] = {}
    for line, row in iter_jsonl(p):
        where = f"{p}: line {line}"
        if not isinstance(row, dict) or "item" not in row or not row.get("sid"):
            raise NegrecAgentError(f"{where}: expected an object with 'item' and a non-empty 'sid'")
        item, sid = str(row["item"]), str(row["sid"]).strip()
        if item in seen_items:
            raise NegrecAgentError(f"{where}: item {item!r} again (first on line {seen_items[item]})")
        if sid in item_of_sid:
            raise NegrecAgentError(f"{where}: SID {sid} of item {item!r} is also item {item_of_sid[sid]!r}'s: "
                                   "SIDs must be unique (resolve collisions when building them)")
        tok_ids = tokenizer(sid, add_special_tokens=False)["input_ids"]
        n_tokens = len(_SID_TOKEN.findall(sid))
        if len(tok_ids) != n_tokens or n_tokens == 0:
            raise NegrecAgentError(f"{where}: SID {sid} tokenizes to {len(tok_ids)} ids, not its {n_tokens} SID "
                                   "tokens: add the SID tokens to the tokenizer (recipe model.added_tokens: "
                                   "sid_tokens.jsonl) and evaluate the model trained with them")
        seen_items[item] = line
        item_of_sid[sid] = item
        items.append(item)
        sids.append(sid)
        ids.append(tok_ids)
    if not items:
        raise NegrecAgentError(f"{p}: no items")
    cat = SidCatalog(
        path=str(p), items=items, sids=sids, ids=ids, eos_ids=sorted(eos_ids),
        trie=TokenTrie(ids, eos_ids, name=f"SIDs of {p}", unit="item"),
        item_of_ids={tuple(t): i for t, i in zip(ids, items)}, item_of_sid=item_of_sid,
        ids_of_item=dict(zip(items, ids)),
    )  # fmt: skip
    per_tok[key] = cat
    return cat


def _eos_ids(engine, tokenizer) -> list[int]:
    ids = getattr(engine, "eos_ids", None)
    if ids:
        return sorted(int(i) for i in ids)
    from rl.engines.base import eos_ids

    return eos_ids(getattr(engine, "model", None), tokenizer)


@register_agent("negrec_topk")
def negrec_topk(
    engine,
    tokenizer,
    rows: list[dict],
    *,
    prompt_builder,
    params=None,
    group_size: int = 1,
    first_group_id: int = 0,
    items: str | None = None,
    k: int = DEFAULT_K,
    pick: bool = True,
) -> list:
    """Top-`k` items (and a candidate pick) per row by constrained beam search; see the module docstring.
    `params` (sampling) is unused: beam search is deterministic."""
    if items is None:
        raise NegrecAgentError("negrec_topk: agent_kwargs.items is required (the build's items.jsonl, e.g. "
                               "--agent-kwarg items=data/negrec/ml-100k/items.jsonl)")
    if group_size != 1:
        raise NegrecAgentError(f"negrec_topk: group_size={group_size}, but beam search is deterministic: it is an "
                               "evaluation agent (group_size 1)")
    if not callable(getattr(engine, "beam_search", None)):
        raise NegrecAgentError(f"negrec_topk: the engine {type(engine).__name__} has no beam_search (constrained "
                               "beam search is the HF engine's: rollout.engine: hf)")
    cat = load_catalog(items, tokenizer, _eos_ids(engine, tokenizer))
    if not 1 <= int(k) <= len(cat.items):
        raise NegrecAgentError(f"negrec_topk: agent_kwargs.k={k} must be in [1, {len(cat.items)}] (the items of "
                               f"{cat.path})")
    k = int(k)
    prompts = []
    for i, row in enumerate(rows):
        ids, images = render_chat(tokenizer, prompt_builder(row), where=f"prompt of row {first_group_id + i}")
        if images:
            raise NegrecAgentError(f"negrec_topk: row {first_group_id + i}: the prompt has images; this agent is "
                                   "text-only")
        prompts.append(ids)
    # the candidates' tries first (they name the row in their errors), then the searches: one prefill per
    # prompt for the top-K and the pick when the engine can share it (HFEngine.beam_searches)
    cand_tries: list = []
    for i, row in enumerate(rows):
        cands = [str(c) for c in row.get("candidates") or ()]
        cand_tries.append(cat.candidate_trie(cands, name=f"candidates of row {first_group_id + i}") if pick
                          else (None, 0))
    shared = callable(getattr(engine, "beam_searches", None))
    if shared:
        results = [engine.beam_searches(p, [(cat.trie, k)] + ([(t, t.num_sequences)] if t is not None else []))
                   for p, (t, _) in zip(prompts, cand_tries)]
    else:
        results = [[b] for b in engine.beam_search(prompts, cat.trie, k)]
    samples = []
    for i, (row, prompt, res) in enumerate(zip(rows, prompts, results)):
        row_beams = res[0]
        topk = [cat.decode(tokenizer, seq) for seq, _ in row_beams]
        info: dict[str, Any] = {
            "topk": topk, "k": k, "invalid": sum(t is None for t in topk) + max(0, k - len(topk)),
            "scores": [float(s) for _, s in row_beams], "pick": None, "candidates_unknown": 0,
            "turns": 1, "finish_reason": "beam",
        }  # fmt: skip
        if pick:
            trie, unknown = cand_tries[i]
            info["candidates_unknown"] = unknown
            if trie is not None:
                best = res[1] if shared else engine.beam_search([prompt], trie, trie.num_sequences)[0]
                info["pick"] = cat.decode(tokenizer, best[0][0])
                info["pick_score"] = float(best[0][1])
        response = list(row_beams[0][0]) if row_beams else []
        samples.append((prompt, response, [1] * len(response), [0.0] * len(response), info))
    trajs = assemble_trajectories(tokenizer, rows, 1, first_group_id, samples)
    for t in trajs:  # the best beam follows the all-SID trie
        t.constraint = cat.trie
    return trajs


negrec_topk.resolved_kwargs = lambda kw: {"k": DEFAULT_K, "pick": True, **kw}
negrec_topk.metrics = "negrec"  # eval.run's default metric set for this agent (eval.run.default_metrics)

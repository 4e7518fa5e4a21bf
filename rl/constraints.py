"""Constrained decoding: a trie of allowed token sequences, applied identically by the engines
and the trainer.

A `TokenTrie` holds every allowed response as token ids (e.g. every valid item code of a
recommender, `<a_12><b_3><c_40>`), each ending with an eos id so a sample stops right after a
complete item. At every step of a constrained rollout the engine keeps only the logits of the
ids the trie allows after the tokens generated so far (`-inf` elsewhere), then applies
temperature / top-k / top-p: the sampled distribution is the model's renormalised over the
allowed ids, and the engine's log-probs are of that distribution.

Why hand-written rather than transformers' `prefix_allowed_tokens_fn` alone: the trainer must
compute the log-probs of the *same* renormalised distribution (otherwise the importance ratio
and the rollout correction compare a constrained sampler with an unconstrained policy), so the
mask has to exist as a tensor the trainer's forward can apply (`mask_logits`), and the engines
(HF `LogitsProcessor`, vLLM's logits processors) and the trainer all read it from this module.
`mask_logits` is `masked_fill(-inf)` followed by the caller's `log_softmax`, the op the HF
engine's processor performs; masking before or after dividing by the temperature gives the
same numbers (`-inf / T = -inf`, and the allowed logits are divided alike).

Beam search (`constrained_beam_search`) returns the top-K allowed sequences with the sum of
their log-probs under the same renormalised distribution (for HR@K-style evaluation).
"""

from __future__ import annotations

import copy
import importlib
import json
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from rl.common import UserError

__all__ = ["ConstraintError", "TokenTrie", "allowed_mask", "mask_logits", "constrained_logprobs", "allowed_rows",
           "TrieLogitsProcessor", "constrained_beam_search", "constrained_beam_searches", "is_function_spec", "load_constraint", "explicit_generation_config",
           "vllm_allowed_ids", "vllm_extra_args", "vllm_logits_processor"]


class ConstraintError(UserError, ValueError):
    """A constraint that cannot be built (empty, a line that tokenises to nothing, ids outside the
    vocabulary, a missing file): `rl.train` prints it as one `error:` line naming the key and line."""


class _Node:
    __slots__ = ("children", "end", "_ids", "_list")

    def __init__(self):
        self.children: dict[int, _Node] = {}
        self.end = False  # an eos id may follow here: the path so far is a complete allowed sequence
        self._ids: torch.Tensor | None = None  # allowed next ids, cached for the engines' masks
        self._list: list[int] | None = None  # the same as a list (packing)


class TokenTrie:
    """Allowed token-id sequences, each completed by any of `eos_ids`.

    `sequences` are id lists without the eos (a trailing eos id is accepted and stripped);
    `allowed(prefix)` lists the ids that may follow `prefix` (the eos ids where `prefix` is a
    complete sequence), `[]` after a completed sequence or for a prefix outside the trie;
    `is_complete(ids)` is True for an allowed sequence ended by an eos id. `name` (the recipe
    key or file) starts every error message.
    """

    def __init__(self, sequences: Iterable[Sequence[int]], eos_ids: Sequence[int], name: str = "constraint",
                 unit: str = "sequence"):
        self.name = name
        self.eos_ids = sorted({int(e) for e in eos_ids})
        if not self.eos_ids:
            raise ConstraintError(f"{name}: no eos id given (every allowed sequence must end with one)")
        self.root = _Node()
        self.num_sequences = 0  # distinct sequences
        self.max_len = 0  # longest sequence, eos included
        eos = self._eos = set(self.eos_ids)
        for i, seq in enumerate(sequences):
            ids = [int(t) for t in seq]
            if ids and ids[-1] in eos:
                ids = ids[:-1]
            where = f"{name}: {unit} {i + 1}"
            if not ids:
                raise ConstraintError(f"{where} is empty (every allowed sequence needs at least one token before "
                                      f"its eos)")
            if any(t < 0 for t in ids):
                raise ConstraintError(f"{where} has a negative token id: {ids}")
            if eos & set(ids):
                raise ConstraintError(f"{where} contains the eos id {sorted(eos & set(ids))[0]} before its end: "
                                 f"a sample would stop there ({ids})")
            node = self.root
            for t in ids:
                node = node.children.setdefault(t, _Node())
            if not node.end:
                node.end = True
                self.num_sequences += 1
                self.max_len = max(self.max_len, len(ids) + 1)
        if self.num_sequences == 0:
            raise ConstraintError(f"{name}: allows no sequence (nothing to decode: give at least one allowed {unit})")

    @classmethod
    def from_texts(cls, tokenizer, texts: Iterable[str], eos_ids: Sequence[int], name: str = "constraint",
                   unit: str = "line") -> TokenTrie:
        """Each text tokenised on its own (no special tokens added): those exact ids are the allowed
        sequence, whatever a tokenizer would make of the text inside a longer string."""
        seqs = []
        for i, text in enumerate(texts):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ConstraintError(f"{name}: {unit} {i + 1} ({text!r}) tokenizes to nothing")
            seqs.append(ids)
        return cls(seqs, eos_ids, name=name, unit=unit)

    def _walk(self, ids: Sequence[int]) -> tuple[_Node | None, bool]:
        """(node reached, completed): completed once an eos id follows a complete sequence (the
        rest of `ids` is ignored then: padding after a finished sample); node None = off the trie."""
        node = self.root
        for t in ids:
            if node.end and t in self._eos:
                return node, True
            node = node.children.get(int(t))
            if node is None:
                return None, False
        return node, False

    def allowed(self, prefix_ids: Sequence[int]) -> list[int]:
        node, done = self._walk(prefix_ids)
        if node is None or done:
            return []
        return list(self._next(node))

    def _next(self, node: _Node) -> list[int]:
        """The ids allowed after `node` (children, then the eos ids where a sequence ends), cached."""
        if node._list is None:
            node._list = sorted(node.children) + (self.eos_ids if node.end else [])
        return node._list

    def is_complete(self, ids: Sequence[int]) -> bool:
        return len(ids) > 0 and self._depth(ids) == len(ids)

    def _depth(self, ids: Sequence[int]) -> int:
        """Length up to and including the first eos that completes a sequence."""
        node = self.root
        for k, t in enumerate(ids):
            if node.end and t in self._eos:
                return k + 1
            node = node.children.get(int(t))
            if node is None:
                return -1
        return -1

    def allowed_steps(self, ids: Sequence[int]) -> list[list[int]]:
        """`allowed(ids[:j])` for every j, in one walk (the trie's cached lists: read them, do not
        modify them); raises ValueError if `ids` leaves the trie."""
        out, node = [], self.root
        for j, t in enumerate(ids):
            here = self._next(node)
            out.append(here)
            if not (t in node.children or (node.end and t in self._eos)):
                raise ValueError(f"{self.name}: token {j} (id {t}) is not allowed after {list(ids[:j])} "
                                 f"(allowed: {here[:10]}{'...' if len(here) > 10 else ''})")
            if node.end and t in self._eos:
                if j != len(ids) - 1:
                    raise ValueError(f"{self.name}: {len(ids) - j - 1} tokens follow the eos that completes "
                                     f"{list(ids[:j + 1])}")
                break
            node = node.children[t]
        return out

    def sequences(self) -> list[list[int]]:
        """Every allowed sequence, each with the first eos id appended (for enumeration, tests)."""
        out = []

        def rec(node: _Node, path: list[int]):
            if node.end:
                out.append(path + [self.eos_ids[0]])
            for t in sorted(node.children):
                rec(node.children[t], path + [t])

        rec(self.root, [])
        return out

    def ids_tensor(self, node: _Node) -> torch.Tensor:
        if node._ids is None:
            node._ids = torch.tensor(self._next(node), dtype=torch.long)
        return node._ids

    def __repr__(self) -> str:
        return f"TokenTrie({self.name!r}, {self.num_sequences} sequences, max_len={self.max_len})"


# ----------------------------------------------------------------------------- tensor side


def allowed_mask(allowed: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """`[N, K]` allowed ids per row, padded with -1 -> `[N, vocab]` bool, True where allowed.
    A row of only -1 is unconstrained (all True): a constrained row always holds at least its target."""
    valid = allowed >= 0
    idx = torch.where(valid, allowed, torch.full_like(allowed, vocab_size))  # padding -> a spare column
    mask = torch.zeros(allowed.shape[0], vocab_size + 1, dtype=torch.bool, device=allowed.device)
    mask.scatter_(1, idx, True)
    mask = mask[:, :vocab_size]
    mask[~valid.any(dim=1)] = True
    return mask


def mask_logits(logits: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """`logits` `[N, V]` with `-inf` outside each row's allowed ids (the engines' op); unchanged if None."""
    if allowed is None:
        return logits
    return logits.masked_fill(~allowed_mask(allowed.to(logits.device), logits.shape[-1]), float("-inf"))


def constrained_logprobs(logits: torch.Tensor, targets: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """Log-probs of `targets` under `softmax(logits)` renormalised over each row's allowed ids."""
    logp = torch.log_softmax(mask_logits(logits.float(), allowed), dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def allowed_rows(trajs: list, order: list[int]) -> torch.Tensor | None:
    """Per-target allowed ids `[N, K]` (-1 padded) for the targets of `trajs[r]` for r in `order`
    (the target order of a micro-batch); None when no trajectory is constrained, so nothing changes
    for unconstrained runs. An unconstrained trajectory's rows are all -1."""
    if not any(getattr(trajs[r], "constraint", None) is not None for r in order):
        return None
    steps: list[list[int]] = []
    for r in order:
        t = trajs[r]
        trie = getattr(t, "constraint", None)
        if trie is None:
            steps.extend([[]] * len(t.response_ids))
            continue
        if not all(t.loss_mask):
            raise ValueError(f"trajectory {r}: constrained decoding is single-turn only, but its response has "
                             f"environment tokens (loss_mask 0)")
        try:
            steps.extend(trie.allowed_steps(t.response_ids))
        except ValueError as e:
            raise ValueError(f"trajectory {r} (group {t.group_id}): its response does not follow its constraint: "
                             f"{e}") from None
    width = max([len(s) for s in steps] + [1])
    out = torch.full((len(steps), width), -1, dtype=torch.long)
    for i, s in enumerate(steps):
        if s:
            out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


# ----------------------------------------------------------------------------- HF engine side


class TrieLogitsProcessor:
    """transformers logits processor: `-inf` outside the ids the trie allows after each row's
    *generated* tokens.

    The generated part starts where the first call's `input_ids` end (the padded prompt width,
    the same for every row under left padding, cached columns of an engine session included), so
    rows with different prompt lengths are handled alike. A row that has completed a sequence
    (its eos, then padding) is left unmasked: generate replaces its token with padding anyway.
    A row off the trie: `on_invalid="raise"` (sampling, where a masked id has probability 0, so
    it is a bug) or `"mask"` (beam search, whose spare `-inf` candidates may leave the trie:
    every id stays `-inf`). `renormalize`: return log-probs renormalised over the allowed ids
    (beam search receives log-probs, and its scores should be those of the constrained
    distribution); sampling leaves it off (the engine's log_softmax of the processed scores
    renormalises)."""

    def __init__(self, trie: TokenTrie, renormalize: bool = False, on_invalid: str = "raise"):
        self.trie, self.renormalize, self.on_invalid = trie, renormalize, on_invalid
        self.start: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.start is None:
            self.start = input_ids.shape[1]
        remove = torch.ones_like(scores, dtype=torch.bool)
        live = torch.zeros(scores.shape[0], dtype=torch.bool)
        for row, ids in enumerate(input_ids[:, self.start :].tolist()):
            node, done = self.trie._walk(ids)
            if done:
                remove[row] = False
            elif node is None:
                if self.on_invalid == "raise":
                    raise RuntimeError(f"{self.trie.name}: generated tokens {ids} left the trie")
            else:
                remove[row, self.trie.ids_tensor(node).to(scores.device)] = False
                live[row] = True
        scores = scores.masked_fill(remove, float("-inf"))
        if self.renormalize and live.any():
            scores[live] = torch.log_softmax(scores[live], dim=-1)
        return scores


_GEN_TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def explicit_generation_config(model) -> Callable[[], None]:
    """Until the returned function is called: every `generation_config` of `model` (and of its
    wrapped modules) is a fresh `GenerationConfig` holding only the checkpoint's special-token ids.

    transformers 5 fills every generate() argument left None from `model.generation_config`
    (`_prepare_generation_config`): a checkpoint shipping `num_beams: 4`, `do_sample: true`,
    `top_k: 5`, `repetition_penalty`, `min_p`... would silently turn a recipe's greedy decode into
    beam search or sampling. The engines pass every sampling field themselves; with this, what
    they do not pass falls back to transformers' neutral global defaults, never the checkpoint's.
    A function returning its undo rather than a context manager, so the engine's existing
    try/finally restores it without re-indenting its generation loop."""
    from transformers import GenerationConfig

    swapped = []
    for m in model.modules():
        cfg = m.__dict__.get("generation_config")
        if isinstance(cfg, GenerationConfig):
            clean = GenerationConfig(**{k: getattr(cfg, k) for k in _GEN_TOKEN_FIELDS if getattr(cfg, k, None) is not None})
            swapped.append((m, cfg))
            m.generation_config = clean

    def restore() -> None:
        for m, cfg in reversed(swapped):
            m.generation_config = cfg

    return restore


@torch.no_grad()
def constrained_beam_search(model, tokenizer_or_pad_id, prompts: list[list[int]], trie: TokenTrie, k: int,
                            max_new_tokens: int | None = None, renormalize: bool = True) -> list[list[tuple[list[int], float]]]:
    """Top-`k` allowed sequences per prompt, best first, as (ids ending with eos, score).

    The canonical beam search (no length penalty, as transformers' `generate(num_beams=k,
    length_penalty=0, early_stopping="never")`) with the prompt prefilled once (`_beam_search_one`):
    the score is the sum of the sequence's log-probs. `renormalize=True` (default):
    log-probs of the constrained distribution, the one constrained sampling draws from and the
    trainer trains; False: the model's unconstrained log-probs (what `prefix_allowed_tokens_fn`
    gives). Beam search is exact (the true top-k) when `k` is at least the number of distinct
    prefixes at every depth; otherwise it is the usual approximation. `k` must not exceed the
    number of allowed sequences. `max_new_tokens` defaults to the trie's longest sequence."""
    return [constrained_beam_searches(model, tokenizer_or_pad_id, p, [(trie, k)], max_new_tokens, renormalize)[0]
            for p in prompts]


def constrained_beam_searches(model, tokenizer_or_pad_id, prompt: list[int], searches: Sequence[tuple[TokenTrie, int]],
                              max_new_tokens: int | None = None,
                              renormalize: bool = True) -> list[list[tuple[list[int], float]]]:
    """Several beam searches after one prompt, which is run through the model once: each `(trie, k)` of
    `searches` continues its own copy of the prompt's KV cache (e.g. a recommender's top-K over every
    item and an exact ranking of a row's candidates). One result per search, as `constrained_beam_search`."""
    if len(prompt) == 0:
        raise ValueError("constrained_beam_search: empty prompt (every prompt needs at least one token)")
    for trie, k in searches:
        if not 1 <= k <= trie.num_sequences:
            raise ValueError(f"{trie.name}: beam search k={k} must be in [1, {trie.num_sequences}] (the number of "
                             f"sequences the constraint allows)")
        max_new = trie.max_len if max_new_tokens is None else max_new_tokens
        if max_new < trie.max_len:
            raise ValueError(f"{trie.name}: max_new_tokens={max_new} is shorter than its longest sequence "
                             f"({trie.max_len} tokens with the eos): those could never complete")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            # the last position's logits only: the others' [len(prompt), vocab] head output is never read
            out = model(input_ids=torch.tensor([prompt], device=device), use_cache=True, logits_to_keep=1)
        results = []
        for j, (trie, k) in enumerate(searches):
            cache = out.past_key_values if j == len(searches) - 1 else copy.deepcopy(out.past_key_values)
            max_new = trie.max_len if max_new_tokens is None else max_new_tokens
            results.append(_beam_search_one(model, cache, out.logits[:, -1, :].float(), trie, k, max_new,
                                            renormalize, device))
    finally:
        model.train(was_training)
    return results


@torch.no_grad()
def _beam_search_one(model, cache, logits: torch.Tensor, trie: TokenTrie, k: int, max_new: int, renormalize: bool,
                     device) -> list[tuple[list[int], float]]:
    beams: list[tuple[list[int], float, _Node]] = [([], 0.0, trie.root)]
    finished: list[tuple[list[int], float]] = []
    for _ in range(max_new):
        candidates = []
        for b, (ids, score, node) in enumerate(beams):
            allowed = trie._next(node)
            row = logits[b]
            logp = torch.log_softmax(row[allowed], -1) if renormalize else torch.log_softmax(row, -1)[allowed]
            candidates.extend((score + lp, b, t) for t, lp in zip(allowed, logp.tolist()))
        candidates.sort(key=lambda c: -c[0])
        nxt, parents = [], []
        for score, b, t in candidates:
            ids, _, node = beams[b]
            if node.end and t in trie._eos:
                finished.append((ids + [t], score))
            elif len(nxt) < k and t in node.children:
                nxt.append((ids + [t], score, node.children[t]))
                parents.append(b)
        finished.sort(key=lambda h: -h[1])
        del finished[k:]
        if not nxt or (len(finished) == k and finished[-1][1] >= nxt[0][1]):
            break
        beams = nxt
        cache.reorder_cache(torch.tensor(parents, device=device))
        step = torch.tensor([[ids[-1]] for ids, _, _ in beams], device=device)
        out = model(input_ids=step, past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1, :].float()
    for ids, score in finished:
        if not score > float("-inf"):
            raise RuntimeError(f"{trie.name}: beam search finished a sequence of probability 0: {ids}")
    return finished


# ----------------------------------------------------------------------------- recipes


def is_function_spec(spec: str) -> bool:
    """"package.module:function" (and no such file): what `rollout.constraint` calls rather than reads."""
    return re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", spec) is not None and not Path(spec).exists()


def load_constraint(spec: Any, tokenizer, eos_ids: Sequence[int], key: str = "rollout.constraint") -> TokenTrie | None:
    """A recipe's `rollout.constraint` as a `TokenTrie`: a text file (one allowed sequence per
    line), a `.jsonl` file (per line a JSON string, or an object with "text" or "ids"), or
    "module:function" returning a list of strings / id lists or a `TokenTrie`. Every error is one
    ValueError naming the key, the file and the line."""
    if spec is None or isinstance(spec, TokenTrie):
        return spec
    spec = str(spec)
    path = Path(spec)
    if path.is_file():
        name = f"{key} ({path})"
        lines = path.read_text(encoding="utf-8").splitlines()
        if path.suffix == ".jsonl":
            items: list = []
            for i, line in enumerate(lines):
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConstraintError(f"{name}: line {i + 1} is not JSON: {e}") from None
                if isinstance(obj, dict) and ("text" in obj or "ids" in obj):
                    obj = obj["ids"] if "ids" in obj else obj["text"]
                if not isinstance(obj, (str, list)):
                    raise ConstraintError(f"{name}: line {i + 1}: expected a string or an object with 'text' or 'ids', "
                                     f"got {line[:80]!r}")
                items.append(obj)
            return _trie_from_items(items, tokenizer, eos_ids, name)
        return _trie_from_items(lines, tokenizer, eos_ids, name)
    if is_function_spec(spec):
        module, _, attr = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ConstraintError(f"{key}: cannot import {spec!r}: {e}") from None
        got = fn()
        if isinstance(got, TokenTrie):
            return got
        if not isinstance(got, (list, tuple)):
            raise ConstraintError(f"{key}: {spec} returned {type(got).__name__}, expected a list of strings or a TokenTrie")
        return _trie_from_items(list(got), tokenizer, eos_ids, f"{key} ({spec})", unit="item")
    raise ConstraintError(f"{key}: file not found: {spec} (give a file, or 'module:function')")


def _trie_from_items(items: list, tokenizer, eos_ids, name: str, unit: str = "line") -> TokenTrie:
    vocab = len(tokenizer)
    seqs = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            ids = tokenizer(item, add_special_tokens=False)["input_ids"] if item.strip() else []
            if not ids:
                raise ConstraintError(f"{name}: {unit} {i + 1} ({item!r}) tokenizes to nothing")
        else:
            ids = [int(t) for t in item]
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ConstraintError(f"{name}: {unit} {i + 1} has ids outside the tokenizer's vocabulary "
                                 f"(size {vocab}): {bad}")
        seqs.append(ids)
    return TokenTrie(seqs, eos_ids, name=name, unit=unit)


# ----------------------------------------------------------------------------- vLLM side
# vLLM 0.32 (V1) takes custom logits processors as classes at `LLM(logits_processors=[...])`; one
# instance serves the whole persistent batch and learns each request's SamplingParams when it joins.
# `AdapterLogitsProcessor` turns that into a per-request function of the output ids so far, which is
# what a trie needs. A processor that is not argmax-invariant runs before greedy selection,
# temperature, top-k/top-p and the `processed_logprobs` computation (vllm/v1/sample/sampler.py), so
# vLLM samples from, and reports the log-probs of, the same renormalised distribution as the HF
# engine. The trie travels as a key in `SamplingParams.extra_args` (the colocate engine's core is
# in-process, so the key finds the object registered here); `allowed_token_ids` cannot express it
# (a fixed set for the whole request) and structured outputs would need the trie as a grammar.

VLLM_EXTRA_KEY = "agentrl_constraint"
_VLLM_TRIES: dict[str, TokenTrie] = {}
_VLLM_CLASS: list = []


def vllm_extra_args(trie: TokenTrie) -> dict[str, str]:
    """`extra_args` for a vLLM SamplingParams: the request samples under `trie`."""
    key = f"{id(trie):x}"
    _VLLM_TRIES[key] = trie  # held for the process' life: tries are few (one per recipe)
    return {VLLM_EXTRA_KEY: key}


def vllm_allowed_ids(trie: TokenTrie, output_ids: Sequence[int]) -> list[int] | None:
    """The ids a vLLM request may sample next given its output so far (None: finished, no mask)."""
    node, done = trie._walk(output_ids)
    if done:
        return None
    if node is None:
        raise RuntimeError(f"{trie.name}: generated tokens {list(output_ids)} left the trie")
    return trie.ids_tensor(node).tolist()


def vllm_logits_processor() -> type:
    """The vLLM logits-processor class to pass as `LLM(logits_processors=[vllm_logits_processor()])`
    (built on first use: importing this module must not import vLLM). Requests without the
    `extra_args` key are left alone."""
    if _VLLM_CLASS:
        return _VLLM_CLASS[0]
    from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

    class TrieVllmLogitsProcessor(AdapterLogitsProcessor):
        def is_argmax_invariant(self) -> bool:
            return False  # it changes greedy choices too

        def new_req_logits_processor(self, params):
            key = (params.extra_args or {}).get(VLLM_EXTRA_KEY)
            if key is None:
                return None
            trie = _VLLM_TRIES[key]

            def apply(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
                node, done = trie._walk(output_ids)
                if done:
                    return logits
                if node is None:
                    raise RuntimeError(f"{trie.name}: generated tokens {list(output_ids)} left the trie")
                idx = trie.ids_tensor(node).to(logits.device)
                out = torch.full_like(logits, float("-inf"))
                out[idx] = logits[idx]
                return out

            return apply

    _VLLM_CLASS.append(TrieVllmLogitsProcessor)
    return TrieVllmLogitsProcessor

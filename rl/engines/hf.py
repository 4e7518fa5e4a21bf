"""The Hugging Face engine: transformers `generate` on the trainer's live module (the default).

Log-probs are those of the distribution the token was sampled from (after temperature /
top-k / top-p), which is what importance ratios need. The trainer computes its own
log-probs as log_softmax(logits / temperature); with top_p = 1 and top_k = 0 the two agree
up to float rounding (tests/test_engines.py checks it). `session()` reuses the KV cache of
one call's sequences in the next (`_PrefixCache`), which the multi-turn loop opens per rollout.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from rl.constraints import TokenTrie, TrieLogitsProcessor, constrained_beam_search, constrained_beam_searches, explicit_generation_config
from rl.engines.base import BaseEngine, Generation, SamplingParams, eos_ids
from rl.forward import release_memory
from rl.multimodal import ImageError, VisionInputs, processor_of


def _first_stop(text_of: Callable[[int], str], n: int, stops: list[str]) -> tuple[int, str] | None:
    """Smallest k such that the text of the first k tokens contains a stop string."""
    full = text_of(n)
    if not any(s in full for s in stops):
        return None
    lo, hi = 1, n  # containment is monotone in k, so bisect on decodes instead of decoding every prefix
    while lo < hi:
        mid = (lo + hi) // 2
        if any(s in text_of(mid) for s in stops):
            hi = mid
        else:
            lo = mid + 1
    text = text_of(lo)
    return lo, min((s for s in stops if s in text), key=text.find)


class HFEngine(BaseEngine):
    """transformers `generate` with left padding and KV cache, batched.

    It samples with the live training module, so `update_weights` has nothing to
    copy: the next call already uses the new weights.

    `session()` (overriding the base class's no-op): inside `with engine.session():`, each generate
    call keeps the key/value cache of the sequences it ended with (prompt + generated
    tokens), and the next call reuses it for every prompt that starts with one of
    those sequences, so only the new tokens (the environment's reply, the last sampled
    token) are prefilled: what a multi-turn loop needs, whose turn t+1 prompts extend
    turn t's outputs (`agents.multi_turn.run_episodes` opens one per rollout). See
    `_PrefixCache` for why the reuse is exact. Memory: inside a session the engine holds
    the KV cache of every sequence of the previous call (all its batches), not only of
    the batch being generated.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, batch_size: int = 64):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.eos_ids = set(eos_ids(model, tokenizer))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids)
        self._prefix: _PrefixCache | None = None  # set inside `session()`
        self._stop_criteria: dict[tuple[str, ...], Any] = {}
        self.stats = {"prefill_tokens": 0, "reused_tokens": 0}  # over the engine's life (benchmarks read them)
        self._vision_inputs: VisionInputs | None = None  # made on the first prompt with images

    def update_weights(self, model: torch.nn.Module) -> None:
        self.model = model
        if self._prefix is not None:  # keys/values of the old weights are stale
            self._prefix.clear()

    def sleep(self) -> None:  # the HF engine owns no memory of its own, apart from a session's cache
        if self._prefix is not None:
            self._prefix.clear()
        release_memory()  # the generation's KV caches and scores are freed: hand the pages back before the update

    @contextlib.contextmanager
    def session(self):
        """Reuse the KV cache of one generate call's outputs in the next call (prefix reuse)."""
        outer, self._prefix = self._prefix, _PrefixCache()
        try:
            yield self
        finally:
            self._prefix.clear()
            self._prefix = outer

    def _vision(self) -> VisionInputs:
        """Pixel inputs for image prompts, from the processor attached to the tokenizer (`rl.multimodal`)."""
        if self._vision_inputs is None:
            processor = processor_of(self.tokenizer)
            if processor is None:
                raise ImageError("HFEngine.generate: prompts with images, but the policy has no processor "
                                 "(a text model): use a vision-language model")
            self._vision_inputs = VisionInputs(processor, self.model)
        return self._vision_inputs

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 images: list[list[Any]] | None = None) -> list[Generation]:
        out: list[Generation] = []
        if images is not None:
            if len(images) != len(prompts):
                raise ValueError(f"HFEngine.generate: {len(images)} image lists for {len(prompts)} prompts")
            if any(images):
                vision = self._vision()
                for i, (p, ims) in enumerate(zip(prompts, images)):
                    vision.check(p, ims, f"prompt {i}")
            else:
                images = None
        was_training = self.model.training
        self.model.eval()
        restore_config = explicit_generation_config(self.model)  # the recipe decides, never generation_config.json
        try:
            starts = range(0, len(prompts), self.batch_size)
            # a bar only when there is more than one batch (evaluation, big groups)
            for start in tqdm(starts, desc="generate", leave=False, disable=len(starts) < 2):
                batch_images = images[start : start + self.batch_size] if images is not None else None
                out.extend(self._generate_batch(prompts[start : start + self.batch_size], params, batch_images))
            if self._prefix is not None:
                self._prefix.commit()
        finally:
            restore_config()
            self.model.train(was_training)
        return out

    def _generate_kwargs(self, params: SamplingParams) -> dict:
        greedy = params.temperature <= 0
        from transformers import StoppingCriteriaList

        kwargs = dict(
            max_new_tokens=params.max_new_tokens,
            do_sample=not greedy,
            num_beams=1,  # explicit: a checkpoint's generation_config may ask for beam search
            repetition_penalty=1.0,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=self.pad_id,
            eos_token_id=sorted(self.eos_ids),
        )
        if not greedy:
            # top_k=0 must be passed explicitly: None would fall back to generation_config's top_k (often 50)
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
        else:  # neutralise sampling defaults a checkpoint's generation_config may carry
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if params.stop:
            kwargs["stopping_criteria"] = StoppingCriteriaList([self._stop_criterion(tuple(params.stop))])
        if params.constraint is not None:  # before temperature / top-k / top-p (transformers' order): renormalised
            from transformers import LogitsProcessorList

            kwargs["logits_processor"] = LogitsProcessorList([TrieLogitsProcessor(params.constraint)])
        return kwargs

    def beam_search(self, prompts: list[list[int]], constraint: TokenTrie, k: int,
                    max_new_tokens: int | None = None) -> list[list[tuple[list[int], float]]]:
        """Top-`k` sequences the constraint allows per prompt, best first, with their summed
        log-probs under the constrained distribution (`rl.constraints.constrained_beam_search`)."""
        return constrained_beam_search(self.model, self.pad_id, prompts, constraint, k, max_new_tokens)

    def beam_searches(self, prompt: list[int], searches: list[tuple[TokenTrie, int]],
                      max_new_tokens: int | None = None) -> list[list[tuple[list[int], float]]]:
        """Several `(constraint, k)` beam searches after one prompt, prefilled once
        (`rl.constraints.constrained_beam_searches`); one result per search, as `beam_search`."""
        return constrained_beam_searches(self.model, self.pad_id, prompt, searches, max_new_tokens)

    def _stop_criterion(self, stops: tuple[str, ...]):
        """transformers' StopStringCriteria, built once per stop-string set: building it walks the whole
        vocabulary (~0.5-1.5 s for SmolLM2 on 2 CPU cores), which `stop_strings=` would redo every call,
        i.e. every turn of a multi-turn rollout. It keeps no state between calls."""
        from transformers import StopStringCriteria

        if stops not in self._stop_criteria:
            self._stop_criteria[stops] = StopStringCriteria(self.tokenizer, list(stops))
        return self._stop_criteria[stops]

    def _generate_batch(self, prompts: list[list[int]], params: SamplingParams,
                        images: list[list[Any]] | None = None) -> list[Generation]:
        if any(len(p) == 0 for p in prompts):
            raise ValueError("HFEngine.generate: empty prompt (every prompt needs at least one token)")
        device = next(self.model.parameters()).device
        # Layout of row j: [pad | cached c_j tokens] [pad | s_j new prompt tokens] [generated ...]
        # with C = max c_j columns of cache and S = max s_j columns of new input. Without a
        # session (or with nothing to reuse) C = 0: plain left padding. Batches with images are
        # prefilled whole: their pixel inputs go with the prompt (and M-RoPE models derive their
        # position offsets from the full prompt), so no cache is reused or kept for them.
        reuse = self._prefix is not None and images is None
        plan = self._prefix.plan(prompts) if reuse else [(None, 0)] * len(prompts)
        cached = [c for _, c in plan]
        C = max(cached)
        S = max(len(p) - c for p, c in zip(prompts, cached))
        input_ids = torch.full((len(prompts), C + S), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), C + S), dtype=torch.long)
        for j, (p, c) in enumerate(zip(prompts, cached)):
            p_t = torch.tensor(p)
            input_ids[j, C - c : C], attention_mask[j, C - c : C] = p_t[:c], 1
            input_ids[j, C + S - (len(p) - c) :], attention_mask[j, C + S - (len(p) - c) :] = p_t[c:], 1
        kwargs = self._generate_kwargs(params)
        if C > 0:
            kwargs["past_key_values"] = self._prefix.gather(plan, C, device)
        if processor_of(self.tokenizer) is not None:  # a VLM policy never samples an image placeholder
            kwargs["suppress_tokens"] = self._vision().banned_ids  # (the trainer masks the same ids)
        if images is not None:
            flat = [im for row in images for im in row]
            kwargs.update({k: v.to(device) for k, v in self._vision().model_inputs(input_ids, flat).items()})
        self.stats["prefill_tokens"] += sum(len(p) - c for p, c in zip(prompts, cached))
        self.stats["reused_tokens"] += sum(cached)
        res = self.model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **kwargs
        )
        width = C + S
        new_tokens = res.sequences[:, width:].cpu()
        # log-softmax of the processed scores = log-probs of the distribution sampled from; one step at
        # a time (the same per-row op, same bits), not one stacked [B, new, V] fp32 copy plus its
        # log-softmax: 3 x 190 MB for 20 samples x 48 tokens of SmolLM2
        logprobs = torch.zeros(new_tokens.shape, dtype=torch.float32)
        for t, step_scores in enumerate(res.scores):
            step_logp = torch.log_softmax(step_scores.float(), dim=-1)
            logprobs[:, t] = step_logp.gather(-1, new_tokens[:, t : t + 1].to(step_logp.device)).squeeze(-1).cpu()

        gens = []
        for i in range(len(prompts)):
            ids = new_tokens[i].tolist()
            n, reason, stop_string = len(ids), "length", None
            for j, tok in enumerate(ids):
                if tok in self.eos_ids:  # pad == eos for many models: the first one ends the sample
                    n, reason = j + 1, "eos"
                    break
            if params.stop:
                found = _first_stop(lambda k: self.tokenizer.decode(ids[:k]), n, params.stop)
                if found is not None:
                    n, reason, stop_string = found[0], "stop", found[1]
            gens.append(Generation(ids[:n], logprobs[i, :n].tolist(), reason, stop_string))
        if reuse:
            self._prefix.add(res.past_key_values, prompts, cached, C, S, [g.token_ids for g in gens])
        return gens


class _PrefixCache:
    """Keys/values of the sequences one generate call ended with, for the next call.

    After a call, row j of the batch's cache holds the keys/values of prompt_j +
    generated_j[:-1] (the last sampled token was never fed) at known columns; the
    other columns (padding, tokens generated after a stop string or eos) are ignored.
    `plan` matches each new prompt to the held sequence with the longest common prefix
    (token ids compared exactly; at least one prompt token is always left to prefill),
    and `gather` copies those keys/values into a fresh cache, right-aligned in C
    columns with zero-filled, masked padding on their left.

    Why this is exact: a token's keys/values depend only on the tokens before it and
    on its position; reused tokens have identical predecessors (same ids, same order)
    and the same positions (generate derives positions from the attention mask's
    cumulative sum, which counts only real tokens, so padding before, between or after
    them does not shift them); padding columns are masked out of every attention.
    What differs from re-prefilling is float rounding only (keys/values computed in a
    decode step instead of a prefill batch, as batch composition already changes it),
    and the log-probs returned are still those of the distribution each token was
    sampled from. Reuse is limited to models whose cache layers are all full
    `DynamicLayer`s (no sliding windows, no recurrent state); for others the session
    simply re-prefills. Only the latest call's sequences are held (a multi-turn loop's
    next prompts extend exactly those), so memory is one batch's cache.
    """

    def __init__(self):
        self.entries: list[tuple[list, int, torch.Tensor, list[int]]] = []  # (store, row, cols, ids)
        self.pending: list[tuple[list, int, torch.Tensor, list[int]]] = []
        self._matrix: torch.Tensor | None = None  # held ids, padded with -1: [n_entries, max_len]

    def clear(self) -> None:
        self.entries, self.pending, self._matrix = [], [], None

    def commit(self) -> None:
        """The sequences of the call that just ended replace those held before."""
        self.entries, self.pending = self.pending, []
        self._matrix = None
        if self.entries:
            width = max(len(e[3]) for e in self.entries)
            m = torch.full((len(self.entries), width), -1, dtype=torch.long)
            for k, e in enumerate(self.entries):
                m[k, : len(e[3])] = torch.tensor(e[3], dtype=torch.long)
            self._matrix = m

    def plan(self, prompts: list[list[int]]) -> list[tuple[int | None, int]]:
        """(entry index or None, number of reusable leading tokens) per prompt."""
        if self._matrix is None:
            return [(None, 0)] * len(prompts)
        out = []
        width = self._matrix.shape[1]
        for p in prompts:
            m = min(len(p) - 1, width)  # leave at least one token to prefill: its logits start the generation
            if m <= 0:
                out.append((None, 0))
                continue
            eq = self._matrix[:, :m] == torch.tensor(p[:m], dtype=torch.long)
            # common prefix length per entry: index of the first mismatch (m if none); the -1 padding mismatches
            lcp = torch.where(eq.all(dim=1), m, (~eq).int().argmax(dim=1))
            best = int(lcp.argmax())
            out.append((best, int(lcp[best])) if int(lcp[best]) > 0 else (None, 0))
        return out

    def gather(self, plan: list[tuple[int | None, int]], C: int, device) -> Any:
        """A DynamicCache of C columns: row j's reused keys/values right-aligned, zeros (masked) before them."""
        from transformers import DynamicCache

        by_store: dict[int, tuple[list, list, list, list, list]] = {}  # id(store) -> store, dst rows/cols, src rows/cols
        for j, (e, c) in enumerate(plan):
            if e is None or c == 0:
                continue
            store, row, cols, _ = self.entries[e]
            g = by_store.setdefault(id(store), (store, [], [], [], []))
            g[1].append(torch.full((c,), j, dtype=torch.long))
            g[2].append(torch.arange(C - c, C))
            g[3].append(torch.full((c,), row, dtype=torch.long))
            g[4].append(cols[:c])
        groups = [(s, *(torch.cat(x).to(device) for x in rest)) for s, *rest in by_store.values()]
        n_layers = len(groups[0][0])
        layers = []
        for layer in range(n_layers):
            kv = []
            for which in (0, 1):  # keys, values: [B, H, W, D]
                ref = groups[0][0][layer][which]
                out = ref.new_zeros((len(plan), C, ref.shape[1], ref.shape[3]))
                for store, dr, dc, sr, sc in groups:
                    out[dr, dc] = store[layer][which][sr, :, sc, :]  # [n, H, D]
                kv.append(out.transpose(1, 2).contiguous())
            layers.append(tuple(kv))
        return DynamicCache(ddp_cache_data=layers)

    def add(self, cache: Any, prompts: list[list[int]], cached: list[int], C: int, S: int, gen_ids: list[list[int]]):
        """Hold this batch's sequences (prompt + generation minus its last token) for the next call."""
        from transformers.cache_utils import DynamicLayer

        layers = getattr(cache, "layers", None)
        if not layers or any(type(layer) is not DynamicLayer for layer in layers):
            return  # sliding windows, recurrent state, unknown cache type: re-prefill instead
        store = [(layer.keys, layer.values) for layer in layers]
        for j, (p, c, g) in enumerate(zip(prompts, cached, gen_ids)):
            s, n = len(p) - c, max(len(g) - 1, 0)
            cols = torch.cat([torch.arange(C - c, C), torch.arange(C + S - s, C + S), torch.arange(C + S, C + S + n)])
            self.pending.append((store, j, cols, list(p) + list(g[:n])))

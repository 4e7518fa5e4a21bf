"""Rollout engines: token ids in, token ids + log-probs + finish reasons out.

The protocol is deliberately small so a vLLM engine (in-process or server) plugs in
without trainer changes: `generate`, `update_weights`, `sleep`, `wake`.

Log-probs are those of the distribution the token was sampled from (after
temperature / top-k / top-p), which is what importance ratios need. The trainer
computes its own log-probs as log_softmax(logits / temperature); with top_p = 1 and
top_k = 0 the two agree up to float rounding (tests/test_engines.py checks it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from tqdm.auto import tqdm


@dataclass
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)


@dataclass
class Generation:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "eos" | "stop" (a stop string) | "length"
    stop_string: str | None = None  # which stop string ended it


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]: ...

    def update_weights(self, model: torch.nn.Module) -> None: ...

    def sleep(self) -> None: ...

    def wake(self) -> None: ...


ENGINES: dict[str, Callable[..., RolloutEngine]] = {}


def register_engine(name: str):
    def deco(factory):
        ENGINES[name] = factory
        return factory

    return deco


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


@register_engine("hf")
class HFEngine:
    """transformers `generate` with left padding and KV cache, batched.

    It samples with the live training module, so `update_weights` has nothing to
    copy: the next call already uses the new weights.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, batch_size: int = 64):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.eos_ids = set(_eos_ids(model, tokenizer))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids)

    def update_weights(self, model: torch.nn.Module) -> None:
        self.model = model

    def sleep(self) -> None:  # nothing to release: the HF engine owns no memory of its own
        pass

    def wake(self) -> None:
        pass

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        out: list[Generation] = []
        was_training = self.model.training
        self.model.eval()
        try:
            starts = range(0, len(prompts), self.batch_size)
            # a bar only when there is more than one batch (evaluation, big groups)
            for start in tqdm(starts, desc="generate", leave=False, disable=len(starts) < 2):
                out.extend(self._generate_batch(prompts[start : start + self.batch_size], params))
        finally:
            self.model.train(was_training)
        return out

    def _generate_batch(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        if any(len(p) == 0 for p in prompts):
            raise ValueError("HFEngine.generate: empty prompt (every prompt needs at least one token)")
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p) :] = torch.tensor(p)
            attention_mask[i, width - len(p) :] = 1
        greedy = params.temperature <= 0
        kwargs = dict(
            max_new_tokens=params.max_new_tokens,
            do_sample=not greedy,
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
            kwargs.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        res = self.model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **kwargs
        )
        new_tokens = res.sequences[:, width:].cpu()
        # log-softmax of the processed scores = log-probs of the distribution sampled from
        scores = torch.stack(res.scores, dim=1).float().cpu()  # [B, new, V]
        logprobs = torch.log_softmax(scores, dim=-1).gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)

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
        return gens


def _eos_ids(model, tokenizer) -> list[int]:
    ids = []
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
    if isinstance(eos, int):
        ids.append(eos)
    elif isinstance(eos, (list, tuple)):
        ids.extend(eos)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("no eos token: set tokenizer.eos_token or generation_config.eos_token_id")
    return sorted(set(ids))


def build_engine(name: str, model, tokenizer, batch_size: int) -> RolloutEngine:
    if name not in ENGINES:
        raise KeyError(f"unknown rollout engine '{name}'; available: {sorted(ENGINES)}")
    return ENGINES[name](model, tokenizer, batch_size=batch_size)
